"""Every initialization the experiments compare, built on a fresh model under one budget.

``adapt(model, method, budget, calibration)`` returns the model to train (a PEFT model, or the
model itself for full fine-tuning) with only the parameters that method trains left trainable:

* ``lora``: PEFT's default (Kaiming A, zero B);
* ``pissa``: PEFT's ``pissa_niter_4`` (principal singular vectors, fast SVD);
* ``corda-ipm`` / ``corda-kpm``: this library's CorDA (calibration, damped CO-SVD, adapters);
* ``corda++-ipm`` / ``corda++-kpm``: CorDA++ (candidate selection and per-layer ranks within the
  same parameter budget);
* ``full``: every weight trainable, the reference for forgetting;
* ``qlora``, ``loftq``, ``qpissa``, ``qcorda``: the frozen base weight of every adapted layer in
  NF4 (bitsandbytes' format, through :func:`corda_kernels.nf4_quantize`), held dequantized in
  float32: the same forward as bitsandbytes' ``Linear4bit`` on these weights, trainable on any
  device. QLoRA = LoRA on NF4(W); LoftQ = PEFT's ``LoftQConfig`` (4 bits, one alternation) on CUDA,
  and on the CPU, where PEFT's ``loftq_init`` asks for a CUDA device, the same steps written here
  (NF4 of W, then the rank-r SVD of W − deq(NF4(W)) as B·A); QPiSSA / QCorDA = NF4 of the PiSSA /
  CorDA-IPM residual.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..engine import stages
from ..engine.adapters import lora_scaling
from ..engine.layers import linear_weight, target_modules
from ..ops.nf4 import nf4_dequantize, nf4_quantize

METHODS = (
    "lora",
    "pissa",
    "corda-ipm",
    "corda-kpm",
    "corda++-ipm",
    "corda++-kpm",
    "full",
    "qlora",
    "loftq",
    "qpissa",
    "qcorda",
)
QUANTIZED = ("qlora", "loftq", "qpissa", "qcorda")


@dataclass
class Budget:
    """What every method shares: rank, alpha, the adapted layers, CorDA++'s candidate rounds."""

    rank: int = 8
    alpha: float | None = None  # None: alpha = rank (scaling 1, which LoftQ's initialization assumes)
    targets: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    rounds: int = 4  # CorDA++: candidate covariances per layer (the calibration split K ways)
    blocksize: int = 64  # NF4

    def lora_config(self, **kw):  # noqa: ANN003, ANN201
        from peft import LoraConfig

        base = {
            "r": self.rank,
            "lora_alpha": self.lora_alpha,
            "target_modules": list(self.targets),
            "lora_dropout": 0.0,
        }
        return LoraConfig(**{**base, **kw})

    @property
    def lora_alpha(self) -> float:
        return float(self.rank if self.alpha is None else self.alpha)


def _corda(model: nn.Module, budget: Budget, calibration: torch.Tensor, mode: str, dynamic: bool) -> nn.Module:
    targets = target_modules(model, budget.lora_config())
    got = stages.collect(model, targets, calibration, rounds=budget.rounds if dynamic else 1, progress=False)
    chosen = stages.plan(
        targets, got, rank=budget.rank, alpha=budget.lora_alpha, mode=mode, dynamic=dynamic, progress=False
    )
    kept = {n: m for n, m in targets.items() if chosen.ranks[n] > 0}
    adapters: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for res in stages.decompose(kept, chosen.covariances, chosen.ranks, mode, progress=False):
        scaling = lora_scaling(chosen.alphas[res.name], chosen.ranks[res.name], False)
        A, B, _ = stages.build(kept[res.name], res, scaling, mode)
        adapters[res.name] = (A, B)
    config = budget.lora_config(
        target_modules=sorted(kept),
        rank_pattern={n: r for n, r in chosen.ranks.items() if n in kept and r != budget.rank},
        alpha_pattern={n: a for n, a in chosen.alphas.items() if n in kept and a != budget.lora_alpha},
    )
    return stages.attach_adapters(model, adapters, config)


def quantize_base(model: nn.Module, blocksize: int = 64) -> dict[str, float]:
    """Replace every LoRA layer's frozen base weight by its NF4 round trip; per layer ‖ΔW‖/‖W‖."""
    errors: dict[str, float] = {}
    for name, module in model.named_modules():
        base = getattr(module, "base_layer", None)
        if base is None or not hasattr(module, "lora_A"):
            continue
        W = linear_weight(base)
        packed, state = nf4_quantize(W.detach(), blocksize=blocksize)
        deq = nf4_dequantize(packed, state).reshape(W.shape).to(W.dtype)
        errors[name] = float((deq.float() - W.float()).norm() / W.float().norm())
        with torch.no_grad():
            W.copy_(deq)
    return errors


@torch.no_grad()
def loftq_in_place(model: nn.Module, blocksize: int = 64, iters: int = 1) -> None:
    """PEFT's ``loftq_init`` steps on every LoRA layer, on any device: Q = NF4(W − B·A) and
    B·A = the rank-r SVD of W − deq(Q), alternated ``iters`` times; the base weight becomes deq(Q),
    A = √S·Vᵀ and B = U·√S (PEFT's split, no scaling applied: alpha = rank keeps W = deq(Q) + B·A)."""
    for module in model.modules():
        base = getattr(module, "base_layer", None)
        if base is None or not hasattr(module, "lora_A"):
            continue
        W = linear_weight(base).float()
        r = module.r["default"]
        res = W
        for i in range(iters):
            packed, state = nf4_quantize(res, blocksize=blocksize)
            deq = nf4_dequantize(packed, state).reshape(W.shape).float()
            U, S, Vh = torch.linalg.svd(W - deq, full_matrices=False)
            L, R = U[:, :r] * S[:r].sqrt(), S[:r].sqrt().unsqueeze(1) * Vh[:r]
            if i + 1 < iters:
                res = W - L @ R
        linear_weight(base).copy_(deq.to(linear_weight(base).dtype))
        module.lora_A["default"].weight.copy_(R)
        module.lora_B["default"].weight.copy_(L)


def adapt(model: nn.Module, method: str, budget: Budget, calibration: dict[str, torch.Tensor]) -> nn.Module:
    """The model to train for ``method``; ``calibration`` maps ``"task"`` / ``"knowledge"`` to token ids.

    CorDA-IPM and QCorDA calibrate on the task, CorDA-KPM on the knowledge to keep.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    from peft import get_peft_model

    if method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    if method in ("lora", "qlora"):
        peft_model = get_peft_model(model, budget.lora_config(init_lora_weights=True))
    elif method in ("pissa", "qpissa"):
        peft_model = get_peft_model(model, budget.lora_config(init_lora_weights="pissa_niter_4"))
    elif method == "loftq":
        if next(model.parameters()).is_cuda:
            from peft import LoftQConfig

            loftq = LoftQConfig(loftq_bits=4, loftq_iter=1)
            # PEFT writes the dequantized NF4 weight into the base and the SVD of the rest into A, B
            return get_peft_model(model, budget.lora_config(init_lora_weights="loftq", loftq_config=loftq))
        peft_model = get_peft_model(model, budget.lora_config(init_lora_weights=True))
        loftq_in_place(peft_model, budget.blocksize)
        return peft_model
    else:
        mode = "kpm" if method.endswith("kpm") else "ipm"
        ids = calibration["knowledge" if mode == "kpm" else "task"]
        peft_model = _corda(model, budget, ids, mode, dynamic=method.startswith("corda++"))
    if method in ("qlora", "qpissa", "qcorda"):
        quantize_base(peft_model, budget.blocksize)
    return peft_model


def trainable_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
