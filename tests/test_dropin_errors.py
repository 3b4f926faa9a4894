"""The PEFT drop-in's error paths and caches: clear messages, nothing silently reused."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.lora.config import CordaConfig

from corda_kernels.engine.cache import CacheMismatchError
from corda_kernels.engine.calibration import NonFiniteActivationError
from corda_kernels.peft import preprocess_corda
from tests.conftest import rel_err
from tests.tiny_models import LLAMA_TARGETS, sequences, tiny_llama


def config(method="ipm", r=4, targets=LLAMA_TARGETS, **kw) -> LoraConfig:  # noqa: ANN001
    return LoraConfig(
        r=r,
        lora_alpha=8,
        target_modules=targets,
        init_lora_weights="corda",
        corda_config=CordaConfig(corda_method=method, **kw),
    )


@pytest.fixture
def setup(gen: torch.Generator):  # noqa: ANN201
    model = tiny_llama()
    seqs = sequences(gen, 6, 20, 30)

    def run_for(m):  # noqa: ANN001, ANN202
        return lambda: [m(s.unsqueeze(0)) for s in seqs]

    return model, run_for


def test_rank_larger_than_layer(setup) -> None:  # noqa: ANN001
    model, run_for = setup
    with pytest.raises(ValueError, match=r"k_proj: rank 40 must be in \[1, 32\]"):
        preprocess_corda(model, config(r=40), run_model=run_for(model))


def test_no_target_matched(setup) -> None:  # noqa: ANN001
    model, run_for = setup
    with pytest.raises(ValueError, match="no target module matched"):
        preprocess_corda(model, config(targets=["qkv_linear"]), run_model=run_for(model))


def test_missing_run_model(setup) -> None:  # noqa: ANN001
    model, _ = setup
    with pytest.raises(ValueError, match="run_model must be given"):
        preprocess_corda(model, config())


def test_nan_names_layer(setup) -> None:  # noqa: ANN001
    model, run_for = setup
    with torch.no_grad():
        model.model.layers[0].self_attn.v_proj.weight[0, 0] = float("inf")
    with pytest.raises(NonFiniteActivationError, match="model.layers.0.self_attn.o_proj"):
        preprocess_corda(model, config(), run_model=run_for(model))


def test_cache_from_other_rank_or_method(setup, tmp_path) -> None:  # noqa: ANN001
    model, run_for = setup
    cache = str(tmp_path / "eig.pt")
    m1 = copy.deepcopy(model)
    preprocess_corda(m1, config(cache_file=cache), run_model=run_for(m1))
    with pytest.raises(CacheMismatchError, match="corda_method='ipm'"):
        preprocess_corda(copy.deepcopy(model), config(method="kpm", cache_file=cache))
    with pytest.raises(CacheMismatchError, match="ranks"):
        preprocess_corda(copy.deepcopy(model), config(r=2, cache_file=cache))
    # The same settings reuse it without calibration and give the same adapters.
    m2 = copy.deepcopy(model)
    preprocess_corda(m2, config(cache_file=cache))
    a = get_peft_model(m1, config(cache_file=cache)).state_dict()
    b = get_peft_model(m2, config(cache_file=cache)).state_dict()
    for key in a:
        if "lora_" in key:
            assert torch.equal(a[key], b[key]), key


def test_covariance_file_checked(setup, tmp_path) -> None:  # noqa: ANN001
    model, run_for = setup
    cov = str(tmp_path / "cov.pt")
    m1 = copy.deepcopy(model)
    preprocess_corda(m1, config(covariance_file=cov), run_model=run_for(m1))
    with pytest.raises(CacheMismatchError, match="normalization"):
        preprocess_corda(copy.deepcopy(model), config(covariance_file=cov), normalization="mean")
    # A PEFT-written (or any foreign) file is refused, not trusted.
    torch.save({"x": torch.ones(2)}, tmp_path / "peft.pt")
    with pytest.raises(CacheMismatchError, match="not a corda_kernels"):
        preprocess_corda(copy.deepcopy(model), config(covariance_file=str(tmp_path / "peft.pt")))
    # KPM from the stored covariances needs no calibration and keeps the model exact.
    m2 = copy.deepcopy(model)
    ids = torch.randint(0, 200, (1, 16))
    preprocess_corda(m2, config(method="kpm", covariance_file=cov))
    with torch.no_grad():
        assert (
            rel_err(get_peft_model(m2, config(method="kpm", covariance_file=cov))(ids).logits, model(ids).logits) < 1e-5
        )


def test_truncated_cache_is_an_error(setup, tmp_path) -> None:  # noqa: ANN001
    model, _ = setup
    bad = tmp_path / "eig.pt"
    bad.write_bytes(b"\x80\x02truncated")
    with pytest.raises(CacheMismatchError, match="not a readable"):
        preprocess_corda(model, config(cache_file=str(bad)))
