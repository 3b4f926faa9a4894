"""``corda_kernels.peft.accelerate()``: PEFT's own PiSSA, OLoRA, LoftQ and CorDA initializations,
unchanged PEFT code, computed by this library — against PEFT without the switch and float64.

Where PEFT's float32 result is itself accurate (planted spectra with clear gaps), the adapters
equal PEFT's up to the sign of each singular pair, within ``c·√k·u₃₂/gap``; where it is not
(random weights: top gaps of a few percent; ``pissa_niter_N``'s unchecked ``svd_lowrank``),
ours is checked against float64 within the path's own posterior estimates. Every case also
checks what a user sees: base weight + scaled adapter reproduce the original weight (PiSSA,
OLoRA), the logits, ``rank_pattern`` and ``target_modules`` regexes honoured, the calls recorded
as accelerated (not handed back to PEFT).
"""

from __future__ import annotations

import copy
import math
import os

import pytest
import torch
from peft import LoftQConfig, LoraConfig, get_peft_model
from peft.tuners.lora import LoraLayer
from peft.tuners.lora.config import CordaConfig
from peft.tuners.lora.corda import preprocess_corda as peft_preprocess_corda  # bound before any enable()

from corda_kernels.engine.layers import linear_weight
from corda_kernels.ops.nf4 import NF4_LEVELS, nf4_quantize
from corda_kernels.peft import PeftVersionError, accelerate, disable, enable, is_enabled, switch
from tests.conftest import rel_err
from tests.peft_reference import peft_loftq_init_cpu, peft_loftq_init_new_cpu
from tests.test_peft_parity import float64_truth
from tests.tiny_models import GPT2_TARGETS, LLAMA_TARGETS, sequences, tiny_gpt2, tiny_llama

U32 = torch.finfo(torch.float32).eps / 2
MODELS = {"llama": (tiny_llama, LLAMA_TARGETS), "gpt2": (tiny_gpt2, GPT2_TARGETS)}
REGEX = {"llama": r".*\.(q_proj|v_proj|gate_proj|down_proj)", "gpt2": r".*\.(c_attn|c_fc|mlp\.c_proj)"}
RANK_PATTERN = {"down_proj": 4, "c_fc": 4, "layers.0.self_attn.q_proj": 12, "h.0.attn.c_attn": 12}


def config(targets, init, **kw) -> LoraConfig:  # noqa: ANN001
    return LoraConfig(
        r=8, lora_alpha=16, target_modules=targets, init_lora_weights=init, rank_pattern=dict(RANK_PATTERN), **kw
    )


def lora_layers(model) -> dict[str, LoraLayer]:  # noqa: ANN001
    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLayer)}


def expected_rank(name: str) -> int:
    for key, r in RANK_PATTERN.items():
        if name.endswith(key):
            return r
    return 8


def aligned(A: torch.Tensor, B: torch.Tensor, A_ref: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    sign = torch.sign((A.double() * A_ref.double()).sum(1))
    assert bool((sign != 0).all())
    return A * sign.view(-1, 1), B * sign.view(1, -1)


def plant_spectra(model, names: list[str], gen: torch.Generator, ratio: float = 0.85) -> float:  # noqa: ANN001
    """Give each named Linear / Conv1D weight singular values ``s·ratio^i`` (relative gaps ``1 − ratio``
    between neighbours) and random singular vectors; returns ``1 − ratio``."""
    for name in names:
        weight = dict(model.named_modules())[name].weight
        m, n = weight.shape
        k = min(m, n)
        U = torch.linalg.qr(torch.randn(m, k, generator=gen, dtype=torch.float64))[0]
        V = torch.linalg.qr(torch.randn(n, k, generator=gen, dtype=torch.float64))[0]
        s = 0.5 * ratio ** torch.arange(k, dtype=torch.float64)
        weight.data.copy_(((U * s) @ V.T).to(weight.dtype))
    return 1 - ratio


def target_names(model, targets) -> list[str]:  # noqa: ANN001
    from corda_kernels.engine.layers import target_modules

    return list(target_modules(model, LoraConfig(target_modules=targets)))


def logits(model, ids: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
    with torch.no_grad():
        return model(ids).logits


def peft_and_ours(base, cfg: LoraConfig):  # noqa: ANN001, ANN201
    ours_model = copy.deepcopy(base)
    with accelerate() as record:
        ours = get_peft_model(ours_model, copy.deepcopy(cfg))
        calls = list(record)
    return get_peft_model(copy.deepcopy(base), copy.deepcopy(cfg)), ours, calls


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
@pytest.mark.parametrize("regex", [False, True])
def test_pissa_equals_peft_where_peft_is_exact(kind: str, regex: bool, gen: torch.Generator) -> None:
    make, targets = MODELS[kind]
    targets = REGEX[kind] if regex else targets
    base = make()
    names = target_names(base, targets)
    gap = plant_spectra(base, names, gen)
    peft_model, ours, calls = peft_and_ours(base, config(targets, "pissa"))
    assert [c.init for c in calls] == ["pissa"] * len(names) and all(c.accelerated for c in calls)
    theirs, mine = lora_layers(peft_model), lora_layers(ours)
    assert sorted(mine) == sorted(theirs) and len(mine) == len(names)
    for name, layer in mine.items():
        ref = theirs[name]
        A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        A_ref, B_ref = ref.lora_A["default"].weight, ref.lora_B["default"].weight
        assert A.shape == A_ref.shape == (expected_rank(name), A.shape[1]) and A.dtype == A_ref.dtype
        k = min(layer.get_base_layer().weight.shape)
        tol = 50 * math.sqrt(k) * U32 / gap
        A, B = aligned(A, B, A_ref)
        assert rel_err(A, A_ref) <= tol and rel_err(B, B_ref) <= tol, name
        W, W_ref = layer.get_base_layer().weight, ref.get_base_layer().weight
        assert rel_err(W, W_ref) <= tol, name
    ids = torch.randint(0, 200, (2, 17), generator=gen)
    out, out_ref, orig = logits(ours, ids), logits(peft_model, ids), logits(base, ids)
    scale = float(orig.abs().max())
    assert float((out - orig).abs().max()) <= 1e-5 * scale  # PiSSA keeps the function
    assert float((out - out_ref).abs().max()) <= 1e-5 * scale


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_pissa_and_pissa_niter_are_float64_exact_on_random_weights(kind: str, gen: torch.Generator) -> None:
    make, targets = MODELS[kind]
    base = make(seed=int(torch.randint(0, 2**16, (1,), generator=gen)))
    originals = {
        n: linear_weight(m).double().clone()
        for n, m in dict(base.named_modules()).items()
        if n in target_names(base, targets)
    }
    results = {}
    for init in ("pissa", "pissa_niter_2"):
        with accelerate() as record:
            model = get_peft_model(copy.deepcopy(base), config(targets, init))
            infos = [c.detail for c in record]
        assert len(infos) == len(originals) and all(i["method"] in ("fast-ipm", "exact-fallback") for i in infos)
        results[init] = model
        for (name, layer), info in zip(lora_layers(model).items(), infos):
            key = name.removeprefix("base_model.model.")
            W64 = originals[key]
            s = layer.scaling["default"]
            A, B = layer.lora_A["default"].weight.double(), layer.lora_B["default"].weight.double()
            r = A.shape[0]
            assert r == expected_rank(key)
            U, S, Vh = torch.linalg.svd(W64, full_matrices=False)  # (out, in), also for Conv1D
            top = (U[:, :r] * S[:r]) @ Vh[:r]
            # ‖P̂ − P‖ ≤ σ_1·(2 sin θ) + max|Δσ|: relative to ‖P‖ ≥ σ_1
            bound = 4 * info.get("subspace_sin_est", 0.0) + 2 * info.get("sv_rel_bound", 0.0) + 1e-6
            got = s * (B @ A)
            assert rel_err(got, top) <= bound, key
            # residual + scaled adapter reproduce the original weight
            assert rel_err(linear_weight(layer.get_base_layer()).double() + got, W64) <= 10 * U32, key
    # accelerated, the iteration count of pissa_niter_N does not matter: the same certified result
    for (_, a), (_, b) in zip(lora_layers(results["pissa"]).items(), lora_layers(results["pissa_niter_2"]).items()):
        assert torch.equal(a.lora_A["default"].weight, b.lora_A["default"].weight)


def test_pissa_keeps_half_precision_base_weights(gen: torch.Generator) -> None:
    base = tiny_llama().to(torch.bfloat16)
    names = target_names(base, LLAMA_TARGETS)
    gap = plant_spectra(base, names, gen)
    peft_model, ours, calls = peft_and_ours(base, config(LLAMA_TARGETS, "pissa"))
    assert all(c.accelerated for c in calls)
    theirs = lora_layers(peft_model)
    for name, layer in lora_layers(ours).items():
        W, W_ref = layer.get_base_layer().weight, theirs[name].get_base_layer().weight
        assert W.dtype == W_ref.dtype == torch.bfloat16
        assert layer.lora_A["default"].weight.dtype == theirs[name].lora_A["default"].weight.dtype
        # the float32 residuals agree to ~√k·u₃₂/gap; rounding to bf16 may then differ by one ulp
        ulp = 2.0**-7 * W_ref.float().abs() + 1e-30
        excess = ((W.float() - W_ref.float()).abs() - ulp).clamp_min(0)
        assert float(excess.max()) <= 50 * math.sqrt(64) * U32 / gap * float(W_ref.float().abs().max())


def test_olora_is_peft_qr_sliced_and_conv1d_stays_peft(gen: torch.Generator) -> None:
    base = tiny_llama(seed=int(torch.randint(0, 2**16, (1,), generator=gen)))
    for targets in (LLAMA_TARGETS, REGEX["llama"]):
        peft_model, ours, calls = peft_and_ours(base, config(targets, "olora"))
        assert calls and all(c.init == "olora" and c.accelerated for c in calls)
        theirs = lora_layers(peft_model)
        for name, layer in lora_layers(ours).items():
            ref = theirs[name]
            A, A_ref = layer.lora_A["default"].weight, ref.lora_A["default"].weight
            assert A.shape == A_ref.shape and A.shape[0] == expected_rank(name.removeprefix("base_model.model."))
            tol = 20 * math.sqrt(96) * U32  # Householder QR, same reflectors: no sign ambiguity
            assert (
                rel_err(A, A_ref) <= tol
                and rel_err(layer.lora_B["default"].weight, ref.lora_B["default"].weight) <= tol
            )
            assert rel_err(layer.get_base_layer().weight, ref.get_base_layer().weight) <= tol
        ids = torch.randint(0, 200, (2, 11), generator=gen)
        assert float((logits(ours, ids) - logits(peft_model, ids)).abs().max()) <= 1e-5 * float(
            logits(base, ids).abs().max()
        )
    # GPT-2's Conv1D layers (fan_in_fan_out) are left to PEFT's own OLoRA, bit for bit
    gpt2 = tiny_gpt2()
    peft_model, ours, calls = peft_and_ours(gpt2, config(GPT2_TARGETS, "olora"))
    assert calls and all(not c.accelerated and c.detail["delegated"] == "fan_in_fan_out" for c in calls)
    for (k, v), (k2, v2) in zip(peft_model.state_dict().items(), ours.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)


def optimal_error(R: torch.Tensor, r: int) -> float:
    """‖R − best rank-r approximation‖_F in float64."""
    return float(torch.linalg.svdvals(R.double())[r:].square().sum().sqrt())


def nf4_by_definition(
    packed: torch.Tensor, absmax: torch.Tensor, shape: torch.Size, blocksize: int = 64
) -> torch.Tensor:
    """NF4 values from their definition: level[code] · absmax[flat index // blocksize]."""
    b = packed.flatten().view(torch.uint8).long()
    codes = torch.stack([b >> 4, b & 15], 1).flatten()[: math.prod(shape)]
    scale = absmax.float().repeat_interleave(blocksize)[: codes.numel()]
    return (torch.tensor(NF4_LEVELS)[codes] * scale).reshape(shape)


@pytest.mark.parametrize("iters", [1, 3])
def test_loftq_matches_peft_with_the_same_nf4_bytes(iters: int, gen: torch.Generator) -> None:
    import bitsandbytes as bnb

    base = tiny_llama(seed=int(torch.randint(0, 2**16, (1,), generator=gen)))
    cfg = config(LLAMA_TARGETS, "loftq", loftq_config=LoftQConfig(loftq_bits=4, loftq_iter=iters))
    names = target_names(base, LLAMA_TARGETS)
    originals = {n: m.weight.detach().clone() for n, m in base.named_modules() if n in names}
    with accelerate() as record:
        ours = get_peft_model(copy.deepcopy(base), copy.deepcopy(cfg))
        calls = list(record)
    assert len(calls) == len(originals) and all(c.init == "loftq" and c.accelerated for c in calls)
    peft_loftq = peft_loftq_init_cpu()
    compared = 0
    for name, layer in lora_layers(ours).items():
        key = name.removeprefix("base_model.model.")
        W = originals[key]
        r = expected_rank(key)
        deq = layer.get_base_layer().weight.detach()
        A, B = layer.lora_A["default"].weight.detach(), layer.lora_B["default"].weight.detach()
        assert A.shape == (r, W.shape[1]) and B.shape == (W.shape[0], r)
        err = float((W.double() - deq.double() - B.double() @ A.double()).norm())
        assert err <= optimal_error(W - deq, r) * (1 + 1e-5), key  # the top-r of the final error
        if iters == 1:
            # the quantization of W itself: bitsandbytes' bytes, and the values those bytes stand for
            q = bnb.nn.Params4bit(W.clone(), requires_grad=False, compress_statistics=False, quant_type="nf4")
            q = q.to("cpu")
            assert torch.equal(nf4_quantize(W, blocksize=64)[0].flatten(), q.data.flatten())
            assert torch.equal(deq, nf4_by_definition(q.data, q.quant_state.absmax, W.shape))
        if W.shape[1] % 64:
            # bitsandbytes 0.50's native CPU dequantization misplaces the blocks of such rows
            # (a 64×96 weight comes back 4× off), so PEFT's own LoftQ on the CPU is wrong here
            continue
        deq_ref, A_ref, B_ref = peft_loftq(W, num_bits=4, reduced_rank=r, num_iter=iters)
        if iters == 1:
            assert torch.equal(deq, deq_ref)
        else:
            # later rounds quantize W − L·R, whose float32 rounding moves a block's absmax (and so
            # every value of the block) by ~‖Δ(L·R)‖ ~ 1e-6 relative, and may move a value across a
            # code boundary, a jump of ≥ 0.0796·absmax (the smallest gap between NF4 levels): few
            # jumps, and LoftQ's objective as good as PEFT's
            absmax = deq_ref.abs().reshape(-1, 64).amax(1, keepdim=True).expand(-1, 64).reshape(W.shape)
            diff = (deq - deq_ref).abs()
            jumps = diff > 0.01 * absmax
            assert float(jumps.float().mean()) <= 2e-3
            assert bool((diff[~jumps] <= 1e-4 * absmax[~jumps]).all())
        err_ref = float((W.double() - deq_ref.double() - B_ref.double() @ A_ref.double()).norm())
        assert err <= err_ref * (1 + 1e-4), key
        compared += 1
    assert compared >= 10


def test_replace_lora_weights_loftq_on_a_4bit_model(tmp_path, gen: torch.Generator) -> None:  # noqa: ANN001
    from peft import replace_lora_weights_loftq
    from safetensors.torch import load_file
    from transformers import BitsAndBytesConfig, LlamaForCausalLM

    tiny_llama(seed=int(torch.randint(0, 2**16, (1,), generator=gen))).save_pretrained(tmp_path)
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")
    model = LlamaForCausalLM.from_pretrained(tmp_path, quantization_config=quant, device_map="cpu")
    peft_model = get_peft_model(model, LoraConfig(r=8, target_modules=LLAMA_TARGETS))
    path = os.path.join(tmp_path, "model.safetensors")
    originals = load_file(path)
    with accelerate() as record:
        replace_lora_weights_loftq(peft_model, model_path=path)
        calls = list(record)
    layers = lora_layers(peft_model)
    assert len(calls) == len(layers) == 14 and all(c.accelerated for c in calls)
    peft_new = peft_loftq_init_new_cpu()
    for (name, layer), call in zip(layers.items(), calls):
        W = originals[name.removeprefix("base_model.model.") + ".weight"]
        state = layer.weight.quant_state
        residual = W.double() - nf4_by_definition(layer.weight.data, state.absmax, W.shape).double()
        U, S, Vh = torch.linalg.svd(residual, full_matrices=False)
        top = (U[:, :8] * S[:8]) @ Vh[:8]
        P = layer.lora_B["default"].weight.double() @ layer.lora_A["default"].weight.double()
        info = call.detail
        # the float64 top-r of the quantization error (a flat spectrum), within the path's own estimates
        assert rel_err(P, top) <= 4 * info["subspace_sin_est"] + 2 * info["sv_rel_bound"] + 1e-6, name
        if W.shape[1] % 64 == 0:  # PEFT's own on the CPU (bitsandbytes' CPU dequantization, see above)
            A_ref, B_ref = peft_new(layer.weight, W, num_bits=4, reduced_rank=8)
            assert A_ref.shape == layer.lora_A["default"].weight.shape
            err_ref = float((residual - B_ref.double() @ A_ref.double()).norm())
            assert float((residual - P).norm()) <= err_ref * (1 + 1e-4), name


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
@pytest.mark.parametrize("method", ["ipm", "kpm"])
def test_peft_preprocess_corda_runs_on_our_stages(kind: str, method: str, tmp_path, gen: torch.Generator) -> None:  # noqa: ANN001
    make, targets = MODELS[kind]
    base = make()
    seqs = sequences(gen, 16, 24, 48)  # more tokens than the widest input, as PEFT advises
    cache_file, cov_file = str(tmp_path / "eigens.pt"), str(tmp_path / "cov" / "covariance.pt")

    def corda_config(**kw) -> LoraConfig:  # noqa: ANN003
        return config(targets, "corda", corda_config=CordaConfig(corda_method=method, **kw))

    def run_model(model):  # noqa: ANN001, ANN202
        def run() -> None:
            with torch.no_grad():
                for s in seqs:
                    model(s.unsqueeze(0))

        return run

    peft_model = copy.deepcopy(base)
    peft_preprocess_corda(peft_model, corda_config(prune_temporary_fields=False), run_model=run_model(peft_model))
    ours = copy.deepcopy(base)
    cfg = corda_config(prune_temporary_fields=False, cache_file=cache_file, covariance_file=cov_file)
    with accelerate() as record:
        peft_preprocess_corda(ours, cfg, run_model=run_model(ours))  # PEFT's function, imported before
        calls = [(c.init, c.accelerated) for c in record]
    assert calls == [("corda-calibration", True), ("corda-eigens", True)]
    names = target_names(base, targets)
    theirs, mine = dict(peft_model.named_modules()), dict(ours.named_modules())
    tokens = sum(len(s) for s in seqs)
    for name in names:
        m, ref = mine[name], theirs[name]
        assert m.sample_count == ref.sample_count and m.rank == ref.rank == expected_rank(name)
        assert rel_err(m.covariance_matrix, ref.covariance_matrix) <= 10 * math.sqrt(tokens) * U32
        # the decomposition of this covariance: PEFT's damping, a float64 CO-SVD, PEFT's crop
        s = 16 / m.rank
        A64, B64, _ = float64_truth(m, m.covariance_matrix, method, m.rank, s)
        S64 = B64.double().norm(dim=0) ** 2 * s
        S = m.eigens.S_WC.double()
        assert S.shape == (m.rank,) and m.eigens.U_WC.shape[1] == m.eigens.V_WC.shape[1] == m.rank
        # float64 work rounded to float32 (k < FAST_MIN_K: the exact CO-SVD, as the drop-in's parity tests)
        assert float(((S - S64).abs() / S64).max()) <= 1e-6, name
        P = (m.eigens.U_WC.double() * S) @ m.eigens.V_WC.double().T  # what PEFT's corda_init turns into s·B·A
        assert rel_err(P, s * B64.double() @ A64.double()) <= 1e-6, name
    # PEFT's own formats: without the switch, PEFT reads the files we wrote and gets the same eigens
    again = copy.deepcopy(base)
    peft_preprocess_corda(again, corda_config(cache_file=cache_file), run_model=None)
    for name in names:
        assert torch.equal(dict(again.named_modules())[name].eigens.S_WC, mine[name].eigens.S_WC)
    covs = torch.load(cov_file)
    assert sorted(covs) == sorted(names)
    model = get_peft_model(ours, cfg)
    ids = torch.randint(0, 200, (1, 13), generator=gen)
    assert float((logits(model, ids) - logits(base, ids)).abs().max()) <= 1e-5 * float(logits(base, ids).abs().max())


def test_enable_nests_and_restores_peft(monkeypatch) -> None:  # noqa: ANN001
    import peft.tuners.lora.layer as layer_module
    from peft.utils import loftq_utils

    before = (LoraLayer.pissa_init, LoraLayer.olora_init, layer_module.loftq_init, loftq_utils._loftq_init_new)
    assert not is_enabled()
    enable()
    enable()
    assert LoraLayer.pissa_init is not before[0] and is_enabled()
    disable()
    assert LoraLayer.pissa_init is not before[0]
    disable()
    after = (LoraLayer.pissa_init, LoraLayer.olora_init, layer_module.loftq_init, loftq_utils._loftq_init_new)
    assert all(a is b for a, b in zip(after, before)) and not is_enabled()
    with pytest.raises(RuntimeError, match="without a matching enable"):
        disable()
    with pytest.raises(ValueError):  # an exception inside the block still restores PEFT
        with accelerate():
            raise ValueError("boom")
    assert LoraLayer.pissa_init is before[0]


def test_a_peft_without_what_is_patched_fails_loudly(monkeypatch) -> None:  # noqa: ANN001
    import peft

    original = LoraLayer.pissa_init
    changed = list(switch.PATCHES)
    changed[2] = switch._Patch(
        "loftq_init", "peft.tuners.lora.layer", None, "loftq_init", ("weight", "bits"), changed[2].replacement
    )
    monkeypatch.setattr(switch, "PATCHES", tuple(changed))
    with pytest.raises(PeftVersionError, match=f"PEFT {peft.__version__}.*loftq_init takes"):
        enable()
    assert LoraLayer.pissa_init is original and not is_enabled()  # nothing was patched
    changed[2] = switch._Patch(
        "loftq_init", "peft.tuners.lora.layer", "LoraLayer", "no_such_init", ("self",), changed[2].replacement
    )
    monkeypatch.setattr(switch, "PATCHES", tuple(changed))
    with pytest.raises(PeftVersionError, match="has no peft.tuners.lora.layer.LoraLayer.no_such_init"):
        enable()
    assert LoraLayer.pissa_init is original and not is_enabled()
