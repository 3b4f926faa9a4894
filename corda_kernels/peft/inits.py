"""PEFT's SVD / QR / NF4 initializations computed with this library's ops (installed by
:func:`corda_kernels.peft.accelerate`).

Each function takes the arguments of the PEFT function or method it stands in for and leaves
the same fields PEFT's would (adapter weights in float32, the base weight in its own dtype):

* :func:`pissa_init` — ``init_lora_weights="pissa"`` and ``"pissa_niter_N"``: the certified top-r
  SVD (:func:`~corda_kernels.ops.svd.svd_top`) in place of PEFT's full float32 SVD or its
  ``svd_lowrank`` with N iterations (whose error PEFT does not check: ours is the same for any N);
* :func:`olora_init` — ``"olora"``: the first ``r`` columns of ``Q`` and rows of ``R``
  (:func:`~corda_kernels.ops.svd.qr_leading`) in place of the full QR;
* :func:`loftq_init` / :func:`loftq_init_new` — ``LoftQConfig`` (4-bit) and
  ``replace_lora_weights_loftq``: our NF4 (bitsandbytes' bytes on the weight's device) and
  the certified top-r SVD, on the weight's own device (PEFT's needs a GPU);
* :func:`calib_cov_distribution` / :func:`collect_eigens` — the two stages of PEFT's own
  ``preprocess_corda``: our calibration hooks and CO-SVD; PEFT's caching, cropping and
  pruning around them stay PEFT's.

What these do not cover is handed to PEFT's original (``delegate``): quantized base weights
(OLoRA on bitsandbytes layers), non-2-D weights (convolutions), ``fan_in_fan_out`` layers under
OLoRA (PEFT's OLoRA ignores the flag; we keep its behaviour by not touching it), 8-bit LoftQ,
ranks above ``min(m, n)``. :data:`RECORD` lists every call, accelerated or handed over.
"""

from __future__ import annotations

import copy
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from ..engine.layers import target_modules
from ..engine.offload import Offload
from ..engine.pipeline import decompose_layers
from ..ops.nf4 import nf4_dequantize, nf4_quantize
from ..ops.svd import qr_leading, svd_top
from .corda import collect_covariances

_FLOATS = (torch.float32, torch.float16, torch.bfloat16)
LOFTQ_BLOCKSIZE = 64  # bitsandbytes' Params4bit default, which PEFT's LoftQ uses


@dataclass
class Call:
    """One initialization routed through :func:`corda_kernels.peft.accelerate`."""

    init: str  # pissa, olora, loftq, corda-calibration, corda-eigens
    shape: tuple[int, ...]
    seconds: float
    accelerated: bool  # False: handed to PEFT's original
    detail: dict = field(default_factory=dict)


RECORD: list[Call] = []
_ORIGINALS: dict[str, Callable] = {}  # filled by switch.enable()


def _original(key: str) -> Callable:
    return _ORIGINALS[key]


def _delegate(key: str, init: str, shape: tuple[int, ...], why: str, *args, **kwargs):  # noqa: ANN002, ANN003, ANN202
    t0 = time.perf_counter()
    out = _original(key)(*args, **kwargs)
    RECORD.append(Call(init, shape, time.perf_counter() - t0, False, {"delegated": why}))
    return out


def _unsupported(weight: torch.Tensor, rank: int, fan_in_fan_out: bool = False) -> str:
    """Why a layer is handed to PEFT's original (``""``: it is not): the first reason that applies."""
    if type(weight).__module__.startswith("bitsandbytes"):
        return "quantized"
    if weight.dtype not in _FLOATS:
        return "dtype"
    if weight.dim() != 2:
        return "not 2-D"
    if fan_in_fan_out:  # OLoRA only: PEFT's ignores the flag, kept as it is
        return "fan_in_fan_out"
    if rank > min(weight.shape):
        return "rank > min(m, n)"
    return ""


def _peft_transpose(weight: torch.Tensor, fan_in_fan_out: bool) -> torch.Tensor:
    return weight.T if fan_in_fan_out else weight


def _low_rank(W: torch.Tensor, rank: int, scaling: float = 1.0) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """PEFT's factors of the top ``rank`` triplets of float32 ``W`` ``(m, n)``: ``B = U_r·√(S_r/s)``
    ``(m, r)``, ``A = √(S_r/s)·V_rᵀ`` ``(r, n)`` (PiSSA; LoftQ's ``L``, ``R`` with ``s = 1``), and the info."""
    U, S, V, infos = svd_top(W, rank)
    root = (S / scaling).sqrt()
    return (U * root).contiguous(), (root.unsqueeze(1) * V.T).contiguous(), infos[0]


@torch.no_grad()
def pissa_init(self, adapter_name: str, init_lora_weights: str) -> None:  # noqa: ANN001
    """``LoraLayer.pissa_init``: ``B = U_r·√(S_r/s)``, ``A = √(S_r/s)·V_rᵀ``, base ``W − s·B·A``."""
    weight = self.get_base_layer().weight
    shape = tuple(weight.shape)
    if not isinstance(init_lora_weights, str) or not (
        init_lora_weights == "pissa"
        or (init_lora_weights.startswith("pissa_niter_") and init_lora_weights[12:].isdigit())
    ):
        return _delegate("pissa_init", "pissa", shape, "unknown variant", self, adapter_name, init_lora_weights)
    rank = self.r[adapter_name]
    why = _unsupported(weight, rank)
    if why:
        return _delegate("pissa_init", "pissa", shape, why, self, adapter_name, init_lora_weights)
    t0 = time.perf_counter()
    dtype = weight.dtype
    scaling = self.scaling[adapter_name]
    W = _peft_transpose(weight.to(torch.float32), self.fan_in_fan_out)
    lora_B, lora_A, info = _low_rank(W, rank, scaling)
    self.lora_A[adapter_name].weight.data = lora_A
    self.lora_B[adapter_name].weight.data = lora_B
    residual = torch.addmm(W, lora_B, lora_A, alpha=-scaling)  # one m×n result, not three
    self.get_base_layer().weight.data = _peft_transpose(residual.to(dtype), self.fan_in_fan_out)
    RECORD.append(Call("pissa", shape, time.perf_counter() - t0, True, info))


@torch.no_grad()
def olora_init(self, adapter_name: str) -> None:  # noqa: ANN001
    """``LoraLayer.olora_init``: ``B = Q[:, :r]``, ``A = R[:r]`` of ``W = QR``, base ``W − s·B·A``."""
    base = self.get_base_layer()
    weight = base.weight
    shape = tuple(weight.shape)
    rank = self.r[adapter_name]
    why = _unsupported(weight, rank, self.fan_in_fan_out)
    if why:
        return _delegate("olora_init", "olora", shape, why, self, adapter_name)
    t0 = time.perf_counter()
    dtype = weight.dtype
    scaling = self.scaling[adapter_name]
    W = weight.to(torch.float32)
    Q, R = qr_leading(W.data, rank)
    self.lora_A[adapter_name].weight.data = R.contiguous()
    self.lora_B[adapter_name].weight.data = Q.contiguous()
    W.data -= scaling * Q @ R  # in place, as PEFT: a float32 weight is updated where it lies
    base.weight.data = W.to(dtype)
    RECORD.append(Call("olora", shape, time.perf_counter() - t0, True, {}))


def _loftq_nf4(res: torch.Tensor) -> torch.Tensor:
    """Dequantized NF4 of float32 ``res``: bitsandbytes' ``Params4bit(compress_statistics=False)`` bytes."""
    packed, state = nf4_quantize(res, blocksize=LOFTQ_BLOCKSIZE, compress_statistics=False)
    return nf4_dequantize(packed, state)


def _check_loftq(weight: torch.Tensor, rank: int, where: str) -> None:
    if weight.dim() != 2:
        raise ValueError(f"{where}: only 2-D weights are supported, got shape {tuple(weight.shape)}")
    if not 0 < rank <= min(weight.shape):
        raise ValueError(f"{where}: reduced_rank {rank} must be in [1, {min(weight.shape)}] for {tuple(weight.shape)}")


@torch.no_grad()
def loftq_init(weight: torch.Tensor, num_bits: int, reduced_rank: int, num_iter: int = 1):  # noqa: ANN201
    """``peft.utils.loftq_utils.loftq_init``: ``num_iter`` rounds of NF4 of the residual and top-r
    SVD of the quantization error. Returns ``(dequantized NF4 weight in weight's dtype, A, B)``."""
    shape = tuple(weight.shape)
    if num_bits != 4:  # PEFT's own checks and 8-bit path
        return _delegate("loftq_init", "loftq", shape, f"num_bits={num_bits}", weight, num_bits, reduced_rank, num_iter)
    if num_iter <= 0:
        raise ValueError("Number of iterations must be greater than 0")
    _check_loftq(weight, reduced_rank, "loftq_init")
    t0 = time.perf_counter()
    W = weight.detach().to(torch.float32)
    res = W
    infos = []
    for i in range(num_iter):
        deq = _loftq_nf4(res)
        L, R, info = _low_rank(W - deq, reduced_rank)
        infos.append(info)
        if i + 1 == num_iter:
            break
        res = W - L @ R
    RECORD.append(Call("loftq", shape, time.perf_counter() - t0, True, {"iterations": infos}))
    return deq.to(device=weight.device, dtype=weight.dtype), R, L


@torch.no_grad()
def loftq_init_new(qweight, weight: torch.Tensor, num_bits: int, reduced_rank: int):  # noqa: ANN001, ANN201
    """``peft.utils.loftq_utils._loftq_init_new`` (``replace_lora_weights_loftq``): the top-r factors
    of ``weight − dequantize(qweight)``. Returns ``(A, B)`` on the quantized weight's device."""
    if num_bits != 4:
        raise ValueError("Only 4 bit quantization supported at the moment.")
    _check_loftq(weight, reduced_rank, "replace_lora_weights_loftq")
    t0 = time.perf_counter()
    # our dequantization: bitsandbytes 0.50's native CPU kernel misplaces the blocks of a row
    # whose length is not a multiple of the blocksize (a 64×96 weight comes back 4× off)
    packed = qweight.data if qweight.data.dtype == torch.uint8 else qweight.data.view(torch.uint8)  # quant_storage
    deq = nf4_dequantize(packed, qweight.quant_state).float()
    L, R, info = _low_rank(weight.to(device=deq.device, dtype=torch.float32) - deq, reduced_rank)
    RECORD.append(Call("loftq", tuple(weight.shape), time.perf_counter() - t0, True, info))
    return R, L


@torch.no_grad()
def calib_cov_distribution(
    model: nn.Module,
    config,  # noqa: ANN001
    run_model: Callable[[], None] | None,
    hooked_model: nn.Module | None,
    covariance_file: str | None,
) -> None:
    """PEFT's CorDA calibration stage: ``covariance_matrix`` / ``sample_count`` on every target,
    PEFT's covariance file read or written in PEFT's format; the covariances from our hooks."""
    if covariance_file is not None and os.path.exists(covariance_file) and os.path.getsize(covariance_file) > 0:
        return _original("calib_cov_distribution")(model, config, run_model, hooked_model, covariance_file)
    if run_model is None:
        raise ValueError("run_model must be specified when covariance file and cache file aren't built.")
    t0 = time.perf_counter()
    targets = target_modules(model, config)
    ours = copy.copy(config)  # PEFT's covariance file is PEFT's format, written below, not our cache
    ours.corda_config = copy.copy(config.corda_config)
    ours.corda_config.covariance_file = None
    counts: dict[str, int] = {}
    covs = collect_covariances(model, ours, run_model, hooked_model, targets, counts=counts)
    for name, module in targets.items():
        module.sample_count = counts[name]
        module.covariance_matrix = covs[name].to(module.weight.device)
    if covariance_file is not None:
        os.makedirs(os.path.dirname(covariance_file), exist_ok=True)
        torch.save({name: m.covariance_matrix for name, m in targets.items()}, covariance_file)
    RECORD.append(Call("corda-calibration", (len(targets),), time.perf_counter() - t0, True, {}))


@torch.no_grad()
def collect_eigens(model: nn.Module, config, verbose: bool) -> None:  # noqa: ANN001
    """PEFT's CorDA decomposition stage: ``eigens`` from our CO-SVD, already the ``rank`` triplets
    PEFT's ``crop_corda_eigens`` keeps (so its crop leaves them as they are)."""
    from peft.tuners.lora.corda import CordaEigens

    t0 = time.perf_counter()
    targets = target_modules(model, config)
    methods = {getattr(m, "corda_method", None) for m in targets.values()}
    if len(methods) != 1 or not methods <= {"ipm", "kpm"}:
        found = sorted(map(str, methods))
        raise ValueError(f"collect_eigens: every target needs corda_method 'ipm' or 'kpm', found {found}")
    covs = {name: m.covariance_matrix for name, m in targets.items()}
    ranks = {name: int(m.rank) for name, m in targets.items()}
    offload = Offload(model)
    layers = decompose_layers(targets, covs, ranks, methods.pop(), progress=bool(verbose), offload=offload)
    for res in layers:
        dev = offload.device(res.name, targets[res.name])
        targets[res.name].eigens = CordaEigens(S_WC=res.S.to(dev), U_WC=res.U.cpu(), V_WC=res.V.cpu())
    RECORD.append(Call("corda-eigens", (len(targets),), time.perf_counter() - t0, True, {}))
