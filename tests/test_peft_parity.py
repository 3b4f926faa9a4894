"""PEFT parity: our preprocess_corda gives PEFT's covariances, adapters and residuals.

Two stages are compared separately, because the bottom CO-SVD triplets of an ill-conditioned
``W·C_fix`` amplify even float32 rounding differences of the covariance (~1e-7) to ~1e-4:

* covariance: ours (one padded batch with a mask) equals PEFT's (batch size 1) within 1e-6;
* decomposition, from PEFT's own covariance: (a) ours equals a float64 CO-SVD within 1e-6 (we
  are exact); (b) ours equals PEFT's within 1e-4 wherever PEFT's float32 SVD is itself exact to
  that level; (c) where it is not (KPM's bottom triplets), ours differs from PEFT by at most 3×
  PEFT's own error against the float64 CO-SVD. A wrong crop, scaling or sign would be O(1).

End to end (ours calibrating itself), the adapted model's logits equal the original's.
"""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.lora.config import CordaConfig
from peft.tuners.lora.corda import preprocess_corda as peft_preprocess

from corda_kernels.engine import cache
from corda_kernels.engine.layers import in_features, linear_weight
from corda_kernels.ops.cosvd import BOTTOM_TOL, TOP_TOL, principal_cosines
from corda_kernels.peft import preprocess_corda, set_calibration_mask, target_modules, weights_key
from tests.conftest import rel_err
from tests.tiny_models import GPT2_TARGETS, LLAMA_TARGETS, pad, sequences, tiny_gpt2, tiny_llama

MODELS = {"llama": (tiny_llama, LLAMA_TARGETS), "gpt2": (tiny_gpt2, GPT2_TARGETS)}
RANK_PATTERN = {"layers.1.mlp.down_proj": 4, "h.1.mlp.c_fc": 4}
TOL = 1e-4


def lora_config(targets, method, **kw):  # noqa: ANN001, ANN201
    return LoraConfig(
        r=8,
        lora_alpha=16,
        target_modules=targets,
        init_lora_weights="corda",
        corda_config=CordaConfig(corda_method=method, **kw),
        rank_pattern=dict(RANK_PATTERN),
    )


def float64_truth(module, C: torch.Tensor, method: str, r: int, scaling: float):  # noqa: ANN001, ANN201
    """A, B, W_res from a float64 CO-SVD of ``C`` (damped by PEFT's rule, in float32 as PEFT does),
    written here from the definitions (the paper's and PEFT's), none of the library's helpers:
    ``W·C_fix = U Σ Vhᵀ``, ``V = C_fix⁻¹·Vhᵀ``, ``A = diag(√(S/s))·Vᵀ``, ``B = U·diag(√(S/s))``,
    ``W_res = W − s·B·A``."""
    C = C.float()
    damp = 0.01
    while True:
        C_fix = C + torch.diag(torch.ones(C.shape[0]) * torch.mean(torch.diag(C)) * damp)
        if torch.dist(C_fix @ torch.linalg.inv(C_fix), torch.eye(C.shape[0])).item() < 0.05:
            break
        damp *= 2
    W = linear_weight(module).double()
    U, S, Vh = torch.linalg.svd(W @ C_fix.double(), full_matrices=False)
    V = torch.linalg.inv(C_fix.double()) @ Vh.T
    sl = slice(0, r) if method == "ipm" else slice(S.numel() - r, S.numel())
    root = (S[sl] / scaling).sqrt()
    A = root[:, None] * V[:, sl].T
    B = U[:, sl] * root[None, :]
    return A.float(), B.float(), (W - scaling * (B @ A)).float()


def adapter_values(B: torch.Tensor) -> torch.Tensor:
    """The singular values behind an adapter, up to the scaling: ``B = U·diag(√(S/s))`` with unit ``U``."""
    return B.double().norm(dim=0) ** 2


def aligned(A, B, A_ref):  # noqa: ANN001, ANN201
    sign = torch.sign((A.double() * A_ref.double()).sum(1))
    assert bool((sign != 0).all())
    return A * sign.view(-1, 1), B * sign.view(1, -1)


def run_peft_corda(base, targets, method, seqs):  # noqa: ANN001, ANN201
    """PEFT's own pipeline (batch size 1, as it requires); returns (peft model, covariances)."""
    model = copy.deepcopy(base)
    cfg = lora_config(targets, method, prune_temporary_fields=False)
    peft_preprocess(model, cfg, run_model=lambda: [model(s.unsqueeze(0)) for s in seqs])
    covs = {name: m.covariance_matrix.clone() for name, m in target_modules(model, cfg).items()}
    return model, cfg, covs


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_covariance_matches_peft(arch: str, gen: torch.Generator) -> None:
    build, targets = MODELS[arch]
    base = build(seed=int(torch.randint(0, 1000, (1,), generator=gen)))
    seqs = sequences(gen, 12, 8, 40)
    _, _, peft_covs = run_peft_corda(base, targets, "ipm", seqs)

    model = copy.deepcopy(base)
    cfg = lora_config(targets, "ipm", prune_temporary_fields=False)
    batch, mask = pad(seqs)

    def run() -> None:
        set_calibration_mask(mask)
        model(batch, attention_mask=mask.long())

    preprocess_corda(model, cfg, run_model=run)
    ours = target_modules(model, cfg)
    assert ours.keys() == peft_covs.keys()
    for name, C in peft_covs.items():
        assert rel_err(ours[name].covariance_matrix, C) < 1e-6, name


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("method", ["ipm", "kpm"])
@pytest.mark.parametrize("cosvd", ["fast", "exact"])
def test_adapters_match_peft(arch: str, method: str, cosvd: str, gen: torch.Generator, tmp_path) -> None:  # noqa: ANN001
    """Both CO-SVD methods of the drop-in (``fast``, its default, and ``exact``) against PEFT and float64."""
    build, targets = MODELS[arch]
    base = build(seed=int(torch.randint(0, 1000, (1,), generator=gen)))
    seqs = sequences(gen, 16, 24, 48)  # ~570 tokens: more than the widest input (256), as PEFT advises
    ids = torch.randint(0, 200, (2, 24), generator=gen)
    with torch.no_grad():
        logits_before = base(ids).logits

    peft_model, cfg_peft, peft_covs = run_peft_corda(base, targets, method, seqs)
    theirs = get_peft_model(peft_model, cfg_peft)

    # Ours decomposes PEFT's own covariances, handed over through our (validated) covariance file.
    our_model = copy.deepcopy(base)
    cov_file = tmp_path / "cov.pt"
    cfg_ours = lora_config(targets, method, covariance_file=str(cov_file))
    mods = target_modules(our_model, cfg_ours)
    meta = {
        "normalization": "peft",
        "float16": False,
        "in_features": {n: in_features(m) for n, m in mods.items()},
        "model_weights": weights_key(our_model),
    }
    cache.save_atomic(cov_file, "covariance", meta, peft_covs)
    preprocess_corda(our_model, cfg_ours, method=cosvd)
    ours = get_peft_model(our_model, cfg_ours)

    layers_ours, layers_theirs = dict(ours.named_modules()), dict(theirs.named_modules())
    originals = dict(base.named_modules())
    checked = 0
    for name, C in peft_covs.items():
        key = f"base_model.model.{name}"
        mine, peft_layer = layers_ours[key], layers_theirs[key]
        r = mine.r["default"]
        A_p, B_p = peft_layer.lora_A["default"].weight, peft_layer.lora_B["default"].weight
        A_o, B_o = aligned(mine.lora_A["default"].weight, mine.lora_B["default"].weight, A_p)
        W_o, W_p = linear_weight(mine.base_layer), linear_weight(peft_layer.base_layer)
        A_t, B_t, W_t = float64_truth(originals[name], C, method, r, 16 / r)
        A_t, B_t = aligned(A_t, B_t, A_p)
        if cosvd == "exact":  # each singular pair, as PEFT's own vectors
            pairs = ((A_o, A_p, A_t), (B_o, B_p, B_t), (W_o, W_p, W_t))
        else:  # the certified fast path pins the subspace and the values; within a cluster of close
            # values its vectors may rotate, which leaves the adapter's product s·B·A unchanged
            sv_o, sv_t = adapter_values(B_o), adapter_values(B_t)
            assert float(((sv_o - sv_t).abs() / sv_t).max()) < 1e-6, name
            for got, true in ((A_o, A_t), (B_o.T, B_t.T)):
                assert float(principal_cosines(got.T, true.T)[0]) > 0.9999, name
            pairs = ((B_o @ A_o, B_p @ A_p, B_t @ A_t), (W_o, W_p, W_t))
        # exact: float64 work whose outputs are rounded to float32 (u₃₂ = 6e-8: 1e-6 leaves ~16×); fast: the
        # vectors' certified residual level
        tol = 1e-6 if cosvd == "exact" else max(TOP_TOL, BOTTOM_TOL)
        for got, ref, true in pairs:
            assert rel_err(got, true) < tol, name
            peft_own = rel_err(ref, true)
            assert rel_err(got, ref) < max(TOL, 3 * peft_own), (name, peft_own)
        checked += 1
    assert checked == len(peft_covs) > 0
    with torch.no_grad():
        assert rel_err(ours(ids).logits, logits_before) < 1e-5
        assert rel_err(theirs(ids).logits, logits_before) < 1e-5


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("method", ["ipm", "kpm"])
def test_end_to_end_logits_exact(arch: str, method: str, gen: torch.Generator) -> None:
    build, targets = MODELS[arch]
    model = build(seed=int(torch.randint(0, 1000, (1,), generator=gen)))
    ids = torch.randint(0, 200, (2, 24), generator=gen)
    with torch.no_grad():
        before = model(ids).logits
    batch, mask = pad(sequences(gen, 16, 24, 48))
    cfg = lora_config(targets, method)

    def run() -> None:
        for i in range(0, batch.shape[0], 5):  # several batches, each with its own mask
            set_calibration_mask(mask[i : i + 5])
            model(batch[i : i + 5], attention_mask=mask[i : i + 5].long())

    n_targets = len(target_modules(model, cfg))
    preprocess_corda(model, cfg, run_model=run)
    adapted = get_peft_model(model, cfg)
    with torch.no_grad():
        assert rel_err(adapted(ids).logits, before) < 1e-5
    assert sum(1 for n, _ in adapted.named_parameters() if "lora_A" in n) == n_targets > 0
