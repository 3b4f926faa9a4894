"""Calibration hooks: batching with masks, shared inputs, normalizations, rounds, errors."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig

from corda_kernels.engine.calibration import CovarianceCollector, NonFiniteActivationError
from corda_kernels.peft import target_modules
from tests.conftest import rel_err
from tests.tiny_models import GPT2_TARGETS, LLAMA_TARGETS, pad, sequences, tiny_gpt2, tiny_llama


def collect(model, targets, batches, **kw) -> CovarianceCollector:  # noqa: ANN001
    mods = target_modules(model, LoraConfig(target_modules=targets))
    col = CovarianceCollector(mods, **kw)
    with col.attached(), torch.no_grad():
        for ids, mask in batches:
            col.set_batch(mask)
            model(ids, attention_mask=None if mask is None else mask.long())
    return col


@pytest.mark.parametrize("normalization", ["peft", "mean"])
@pytest.mark.parametrize("build,targets", [(tiny_llama, LLAMA_TARGETS), (tiny_gpt2, GPT2_TARGETS)])
def test_batch_with_mask_equals_one_by_one(build, targets, normalization: str, gen: torch.Generator) -> None:  # noqa: ANN001
    model = build()
    seqs = sequences(gen, 7, 5, 30)
    one = collect(model, targets, [(s.unsqueeze(0), None) for s in seqs], normalization=normalization)
    batched = collect(model, targets, [pad(seqs[:4]), pad(seqs[4:])], normalization=normalization)
    for name in one.acc_of:
        assert rel_err(batched.covariance(name), one.covariance(name)) < 1e-6, name


def test_peft_normalization_reference(gen: torch.Generator) -> None:
    """C = (1/N) Σ_s X_sᵀX_s / max(X_s)², checked on the layer inputs captured directly."""
    model = tiny_llama()
    seqs = sequences(gen, 5, 6, 20)
    captured: list[torch.Tensor] = []
    layer = model.model.layers[1].mlp.down_proj
    handle = layer.register_forward_pre_hook(lambda m, a: captured.append(a[0].detach().double()[0]))
    col = collect(model, LLAMA_TARGETS, [(s.unsqueeze(0), None) for s in seqs])
    handle.remove()
    ref = sum(x.T @ x / x.max().abs() ** 2 for x in captured) / len(captured)
    assert rel_err(col.covariance("model.layers.1.mlp.down_proj"), ref) < 1e-6
    col_mean = collect(model, LLAMA_TARGETS, [(s.unsqueeze(0), None) for s in seqs], normalization="mean")
    T = sum(x.shape[0] for x in captured)
    ref_mean = sum(x.T @ x for x in captured) / T
    assert rel_err(col_mean.covariance("model.layers.1.mlp.down_proj"), ref_mean) < 1e-6


def test_shared_inputs_match_separate(gen: torch.Generator) -> None:
    model = tiny_llama()
    batches = [pad(sequences(gen, 3, 5, 20)) for _ in range(2)]
    shared = collect(model, LLAMA_TARGETS, batches)
    separate = collect(model, LLAMA_TARGETS, batches, share_inputs=False)
    # q/k/v and gate/up read one tensor each: 4 accumulators per block instead of 7.
    assert len(shared.accumulators()) == 4 * 2
    assert len(separate.accumulators()) == 7 * 2
    assert set(shared.acc_of["model.layers.0.self_attn.q_proj"].members) == {
        f"model.layers.0.self_attn.{p}_proj" for p in "qkv"
    }
    covs = shared.covariances()
    assert covs["model.layers.0.mlp.gate_proj"] is covs["model.layers.0.mlp.up_proj"]
    for name in separate.acc_of:
        assert rel_err(shared.covariance(name), separate.covariance(name)) < 1e-7, name


def test_rounds_candidates_sum_to_total(gen: torch.Generator) -> None:
    model = tiny_llama()
    batches = [pad(sequences(gen, 4, 5, 20)) for _ in range(3)]
    col = collect(model, LLAMA_TARGETS, batches, rounds=3)
    plain = collect(model, LLAMA_TARGETS, batches)
    name = "model.layers.1.self_attn.o_proj"
    cands = col.candidates(name)
    assert cands.shape[0] == 3
    acc = col.acc_of[name]
    assert acc.weight.tolist() == [4.0, 4.0, 4.0]  # sequence i goes to round i mod 3
    assert rel_err((cands * acc.weight.view(-1, 1, 1).float()).sum(0) / 12, plain.covariance(name)) < 1e-6
    assert rel_err(col.covariance(name), plain.covariance(name)) < 1e-6
    assert rel_err(cands[0], cands[1]) > 1e-3  # the rounds saw different sequences


def test_nan_activation_names_the_layer(gen: torch.Generator) -> None:
    model = tiny_llama()
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[3, 5] = float("nan")
    col = collect(model, LLAMA_TARGETS, [pad(sequences(gen, 2))])
    with pytest.raises(NonFiniteActivationError, match="model.layers.1.mlp.down_proj"):
        col.finalize()


def test_bad_arguments() -> None:
    model = tiny_llama()
    mods = target_modules(model, LoraConfig(target_modules=LLAMA_TARGETS))
    with pytest.raises(ValueError, match="normalization"):
        CovarianceCollector(mods, normalization="max")
    with pytest.raises(ValueError, match="rounds"):
        CovarianceCollector(mods, rounds=0)
    with pytest.raises(ValueError, match="no target modules"):
        CovarianceCollector({})
    col = CovarianceCollector(mods)
    with pytest.raises(ValueError, match="never reached"):
        col.covariance("model.layers.0.self_attn.q_proj")
    col.set_batch(torch.ones(3, 4, dtype=torch.bool))
    with col.attached(), pytest.raises(ValueError, match="batch mask has shape"):
        model(torch.zeros(2, 5, dtype=torch.long))


@pytest.mark.parametrize("normalization", ["peft", "mean"])
@pytest.mark.parametrize("equal_lengths", [True, False])
def test_short_sequences_buffered_across_flushes(normalization: str, equal_lengths: bool, gen: torch.Generator) -> None:
    """Batch-1 calls of short sequences go through the row buffer (one GEMM per full buffer, each
    sequence's ``1/|max|`` applied at the flush): several flushes, sequences of equal and of mixed
    lengths, magnitudes spread over six decades, against PEFT's formula in float64."""
    from corda_kernels.engine.calibration import BUFFER_ROWS

    n = 40
    layer = torch.nn.Linear(n, 8)
    count = 3 * BUFFER_ROWS // 30
    lengths = [30] * count if equal_lengths else torch.randint(1, 60, (count,), generator=gen).tolist()
    xs = [
        torch.randn(1, L, n, generator=gen) * 10.0 ** float(torch.empty(1).uniform_(-3, 3, generator=gen))
        for L in lengths
    ]
    col = CovarianceCollector({"layer": layer}, normalization=normalization)
    with col.attached(), torch.no_grad():
        for x in xs:
            layer(x)
    x64 = [x[0].double() for x in xs]
    if normalization == "peft":
        ref = sum(x.T @ x / x.max().abs() ** 2 for x in x64) / len(x64)
    else:
        ref = sum(x.T @ x for x in x64) / sum(lengths)
    # float32 sums of T rank-one terms (each scaled by its sequence's max): ~√T·u₃₂ relative
    T = sum(lengths)
    assert rel_err(col.covariance("layer"), ref) < 10 * T**0.5 * torch.finfo(torch.float32).eps
    assert col.calls["layer"] == count
