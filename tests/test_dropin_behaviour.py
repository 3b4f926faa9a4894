"""The drop-in behaves as PEFT's ``preprocess_corda`` where a PEFT user can see it.

Sample counts (a layer called twice on one tensor counts twice), inputs shared on some calls
and not on others, the temporary fields PEFT leaves, ``use_float16_for_covariance``, hooks
removed afterwards, and the default (fast) path's accuracy against a float64 CO-SVD.
"""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.lora.config import CordaConfig
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from corda_kernels.engine.cache import CacheMismatchError
from corda_kernels.engine.layers import linear_weight
from corda_kernels.ops.cosvd import principal_cosines
from corda_kernels.ops.damping import damp_covariance
from corda_kernels.peft import preprocess_corda, target_modules
from tests.conftest import rel_err
from tests.tiny_models import LLAMA_TARGETS, sequences


def corda_config(targets: list[str], method: str = "ipm", r: int = 4, **kw) -> LoraConfig:
    return LoraConfig(
        r=r,
        lora_alpha=r,
        target_modules=targets,
        init_lora_weights="corda",
        corda_config=CordaConfig(corda_method=method, **kw),
    )


class TwoReaders(nn.Module):
    """``a`` and ``b`` read the same tensor unless ``y`` is given; ``a`` may be called twice."""

    def __init__(self, n: int = 24) -> None:
        super().__init__()
        self.a = nn.Linear(n, n)
        self.b = nn.Linear(n, n)

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None, twice: bool = False) -> torch.Tensor:
        out = self.a(x)
        if twice:
            out = out + self.a(x)
        return out + self.b(x if y is None else y)


def peft_cov(xs: list[torch.Tensor]) -> torch.Tensor:
    """PEFT's covariance of one layer fed ``xs`` one call each, in float64."""
    return sum(x.double().T @ x.double() / x.double().max().abs() ** 2 for x in xs) / len(xs)


def test_same_tensor_twice_counts_two_samples(gen: torch.Generator) -> None:
    model = TwoReaders().eval()
    x = torch.rand(40, 24, generator=gen) + 0.1
    cfg = corda_config(["a", "b"], prune_temporary_fields=False)
    preprocess_corda(model, cfg, run_model=lambda: [model(x), model(x)])
    for layer in (model.a, model.b):
        assert layer.sample_count == 2
        assert rel_err(layer.covariance_matrix, peft_cov([x, x])) < 1e-6


def test_inputs_shared_then_not(gen: torch.Generator) -> None:
    """a, b share x on the first call, read x and y on the second: each gets its own covariance."""
    model = TwoReaders().eval()
    x, y = (torch.randn(30, 24, generator=gen) for _ in range(2))
    cfg = corda_config(["a", "b"], prune_temporary_fields=False)
    preprocess_corda(model, cfg, run_model=lambda: [model(x), model(x, y)])
    assert model.a.sample_count == model.b.sample_count == 2
    assert rel_err(model.a.covariance_matrix, peft_cov([x, x])) < 1e-6
    assert rel_err(model.b.covariance_matrix, peft_cov([x, y])) < 1e-6
    assert rel_err(model.a.covariance_matrix, model.b.covariance_matrix) > 1e-2


def test_repeated_layer_before_its_sharer(gen: torch.Generator) -> None:
    """a(x), a(x), b(x) in each forward: a counts twice as many samples as b."""
    model = TwoReaders().eval()
    x1, x2 = (torch.randn(30, 24, generator=gen) for _ in range(2))
    cfg = corda_config(["a", "b"], prune_temporary_fields=False)
    preprocess_corda(model, cfg, run_model=lambda: [model(x1, twice=True), model(x2, twice=True)])
    assert (model.a.sample_count, model.b.sample_count) == (4, 2)
    assert rel_err(model.a.covariance_matrix, peft_cov([x1, x1, x2, x2])) < 1e-6
    assert rel_err(model.b.covariance_matrix, peft_cov([x1, x2])) < 1e-6


@pytest.mark.parametrize("prune", [True, False])
def test_temporary_fields_and_hooks(prune: bool, gen: torch.Generator) -> None:
    model = TwoReaders().eval()
    x = torch.randn(30, 24, generator=gen)
    calls = []
    model.a.register_forward_hook(lambda *a: calls.append(1))
    cfg = corda_config(["a", "b"], method="kpm", prune_temporary_fields=prune)
    preprocess_corda(model, cfg, run_model=lambda: model(x))
    fields = ("sample_count", "covariance_matrix", "corda_method", "rank")
    for layer in (model.a, model.b):
        assert all(hasattr(layer, f) != prune for f in fields), [f for f in fields if hasattr(layer, f)]
        assert layer.eigens.S_WC.shape == (4,)
    if not prune:
        assert model.a.sample_count == 1 and model.a.corda_method == "kpm" and model.a.rank == 4
    model(x)  # our hooks are gone: no sample is added, the user's own hook still runs
    assert len(calls) == 2
    if not prune:
        assert model.a.sample_count == 1


def test_float16_covariance_honoured(gen: torch.Generator, tmp_path) -> None:  # noqa: ANN001
    model = TwoReaders().eval()
    x = torch.randn(60, 24, generator=gen)
    cov_file = tmp_path / "cov.pt"
    cfg = corda_config(
        ["a", "b"], prune_temporary_fields=False, use_float16_for_covariance=True, covariance_file=str(cov_file)
    )
    preprocess_corda(model, cfg, run_model=lambda: model(x))
    assert model.a.covariance_matrix.dtype == torch.float16
    assert rel_err(model.a.covariance_matrix, peft_cov([x])) < 2e-3  # float16's unit roundoff 4.9e-4
    with pytest.raises(CacheMismatchError, match="float16"):  # the cache says how it was stored
        preprocess_corda(copy.deepcopy(model), corda_config(["a", "b"], covariance_file=str(cov_file)))


def llama_192(seed: int) -> LlamaForCausalLM:
    """192 wide: every target reaches the iterative fast CO-SVD (min(m, n) ≥ FAST_MIN_K)."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=256,
        hidden_size=192,
        intermediate_size=320,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    return LlamaForCausalLM(cfg).eval()


@pytest.mark.parametrize("method", ["ipm", "kpm"])
def test_default_path_matches_float64(method: str, gen: torch.Generator) -> None:
    """Default arguments: cropped σ within 1e-6 of a float64 CO-SVD of the same covariance, the
    subspaces at cosine ≥ 0.9999 wherever the gap at the crop defines them, logits unchanged."""
    model = llama_192(int(torch.randint(0, 1000, (1,), generator=gen)))
    seqs = sequences(gen, 20, 24, 48)  # ~700 tokens, more than the widest input (320)
    ids = torch.randint(0, 256, (2, 20), generator=gen)
    with torch.no_grad():
        before = model(ids).logits
    r = 8
    cfg = corda_config(LLAMA_TARGETS, method, r=r, prune_temporary_fields=False)
    preprocess_corda(model, cfg, run_model=lambda: [model(s.unsqueeze(0)) for s in seqs])
    gaps_checked = 0
    for name, layer in target_modules(model, cfg).items():
        C_fix = damp_covariance(layer.covariance_matrix.float(), screen=False)[0].double()
        U, S, Vh = torch.linalg.svd(linear_weight(layer).double() @ C_fix, full_matrices=False)
        k = S.numel()
        sl, edge = (slice(0, r), (r - 1, r)) if method == "ipm" else (slice(k - r, k), (k - r - 1, k - r))
        got = layer.eigens
        assert float(((got.S_WC.double() - S[sl]).abs() / S[sl]).max()) < 1e-6, name
        if (S[edge[0]] - S[edge[1]]) / S[edge[0]] > 1e-3:  # the gap at the crop defines the subspace
            V = torch.linalg.solve(C_fix, Vh.T)
            assert float(principal_cosines(got.U_WC, U[:, sl])[0]) >= 0.9999, name
            assert float(principal_cosines(got.V_WC, V[:, sl])[0]) >= 0.9999, name
            gaps_checked += 1
    assert gaps_checked >= 3
    adapted = get_peft_model(model, cfg)
    with torch.no_grad():
        assert rel_err(adapted(ids).logits, before) < 1e-5


def test_caches_are_keyed_by_the_weights(gen: torch.Generator, tmp_path) -> None:  # noqa: ANN001
    """covariance_file / cache_file made with one model are refused for another one, never reused."""
    model = TwoReaders().eval()
    x = torch.randn(60, 24, generator=gen)
    files = {"covariance_file": str(tmp_path / "cov.pt"), "cache_file": str(tmp_path / "eig.pt")}
    preprocess_corda(model, corda_config(["a", "b"], **files), run_model=lambda: model(x))
    again = copy.deepcopy(model)
    preprocess_corda(again, corda_config(["a", "b"], **files))  # same weights: both caches serve
    assert torch.equal(again.a.eigens.S_WC, model.a.eigens.S_WC)
    other = TwoReaders().eval()  # other weights, same names and shapes
    for key in files:
        with pytest.raises(CacheMismatchError, match="model_weights"):
            preprocess_corda(copy.deepcopy(other), corda_config(["a", "b"], **{key: files[key]}))
