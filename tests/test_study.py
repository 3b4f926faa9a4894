"""The truncation study on a tiny LLaMA (random weights, random token ids): fast, checked against
independent references."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from corda_kernels import cosvd
from corda_kernels.cli.study import (
    METHODS,
    factor,
    markdown_table,
    param_ratio,
    run_study,
    target_modules,
    write_outputs,
)
from tests.conftest import rel_err
from tests.tiny_models import tiny_llama


def _tiny_llama(seed: int):  # noqa: ANN202
    return tiny_llama(seed, vocab=96, intermediate=128, max_positions=64)


def _ref_ppl(model: nn.Module, ids: torch.Tensor) -> float:
    with torch.no_grad():
        logits = model(ids).logits.double()
    logp = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None])
    return math.exp(-float(logp.mean()))


def test_factor_reconstructs_and_matches_cosvd(gen: torch.Generator) -> None:
    W = torch.randn(24, 40, generator=gen)
    X = torch.randn(200, 40, generator=gen) * torch.linspace(0.05, 3, 40)
    C = X.T @ X / 200
    from corda_kernels.ops.damping import damped_inverse

    C_fix = damped_inverse(C)[0]
    d = X.abs().mean(0) ** 0.5 + 1e-6
    for f, spec in (
        (factor(W), torch.linalg.svdvals(W.double())),
        (factor(W, scale=d), torch.linalg.svdvals(W.double() * d.double())),
        (factor(W, C_fix=C_fix), torch.linalg.svdvals(W.double() @ C_fix.double())),
    ):
        assert rel_err(f.L @ f.R.T, W) < 1e-5
        assert rel_err(f.S, spec) < 1e-12
        assert rel_err(f.tail(f.S.numel()), W) < 1e-5
    U, S, V = cosvd(W, C, rank=7, which="bottom")
    assert rel_err(factor(W, C_fix=C_fix).tail(7), U @ torch.diag(S) @ V.T) < 1e-4


def test_study_tiny_llama(tmp_path, gen: torch.Generator) -> None:  # noqa: ANN001
    seed = int(torch.randint(0, 2**31, (1,), generator=gen))
    model = _tiny_llama(seed)
    corpora = {
        "lee": torch.randint(0, 96, (400,), generator=gen),
        "pydoc": torch.randint(0, 96, (360,), generator=gen),
    }
    mods = target_modules(model)
    before = {n: m.weight.detach().clone() for n, m in mods.items()}
    res = run_study(
        model,
        corpora,
        samples=6,
        seq_len=16,
        eval_tokens=64,
        discards=[0, 4, 8],
        cross_discards=[8],
        rounds=3,
        progress=False,
    )
    rows = res.rows
    for n, m in mods.items():  # the model is restored
        assert torch.equal(m.weight, before[n])
    # every method × k × eval, plus the cross-domain rows
    for method in METHODS:
        for k in (0, 4, 8):
            for ev in ("lee", "pydoc"):
                hit = [r for r in rows if (r["method"], r["calib"], r["discard"], r["eval"]) == (method, "lee", k, ev)]
                assert len(hit) == 1, (method, k, ev)
    assert {(r["discard"], r["eval"]) for r in rows if r["calib"] == "pydoc"} == {(8, "lee"), (8, "pydoc")}
    assert all(set(r) == {"method", "calib", "eval", "discard", "param_ratio", "ppl"} for r in rows)

    def get(method: str, k: int, ev: str, calib: str = "lee") -> dict:
        return next(r for r in rows if (r["method"], r["calib"], r["discard"], r["eval"]) == (method, calib, k, ev))

    # k = 0: the unmodified model, against an independent perplexity
    held_out = corpora["lee"][200 : 200 + 64].view(4, 16)
    assert get("co-svd", 0, "lee")["ppl"] == pytest.approx(_ref_ppl(model, held_out), rel=1e-6)
    # plain SVD at k = 4 against an independent truncation
    with torch.no_grad():
        for m in mods.values():
            U, S, Vh = torch.linalg.svd(m.weight.double(), full_matrices=False)
            m.weight.copy_((U[:, :-4] * S[:-4]) @ Vh[:-4])
        ref = _ref_ppl(model, held_out)
        for n, m in mods.items():
            m.weight.copy_(before[n])
    assert get("plain-svd", 4, "lee")["ppl"] == pytest.approx(ref, rel=1e-5)
    # ASVD and CO-SVD at k = 4 against truncations computed here from the definitions: the layer
    # inputs captured on the calibration windows (the first 6 × 16 tokens), PEFT's per-sequence
    # normalization and damping rule, float64 SVDs, the bottom 4 components removed
    calib = corpora["lee"][: 6 * 16].view(6, 16)
    inputs: dict[str, torch.Tensor] = {}
    hooks = [m.register_forward_pre_hook(lambda mod, a, n=n: inputs.__setitem__(n, a[0].detach().double()))
             for n, m in mods.items()]  # fmt: skip
    with torch.no_grad():
        model.model(calib)
    for h in hooks:
        h.remove()
    for method in ("asvd", "co-svd"):
        with torch.no_grad():
            for n, m in mods.items():
                X, W = inputs[n], m.weight.double()
                if method == "asvd":
                    D = X.abs().mean((0, 1)) ** 0.5 + 1e-6
                    U, S, Vh = torch.linalg.svd(W * D, full_matrices=False)
                    Vhat = Vh / D  # rows of (D⁻¹V)ᵀ
                else:
                    peaks = X.amax((1, 2)).abs()
                    C = (torch.einsum("sti,stj->ij", X / peaks[:, None, None], X / peaks[:, None, None]) / 6).float()
                    damp = 0.01
                    while True:  # PEFT's rule, in float32 as PEFT evaluates it
                        C_fix = C + torch.diag(torch.ones(C.shape[0]) * torch.mean(torch.diag(C)) * damp)
                        if torch.dist(C_fix @ torch.linalg.inv(C_fix), torch.eye(C.shape[0])).item() < 0.05:
                            break
                        damp *= 2
                    U, S, Vh = torch.linalg.svd(W @ C_fix.double(), full_matrices=False)
                    Vhat = torch.linalg.solve(C_fix.double(), Vh.T).T
                m.weight.copy_(W - (U[:, -4:] * S[-4:]) @ Vhat[-4:])
                if n in res.spectra[method]:  # the first block's spectra, reported for the figure
                    assert rel_err(torch.tensor(res.spectra[method][n]), S) < 1e-5, (method, n)
            ref = _ref_ppl(model, held_out)
            for n, m in mods.items():
                m.weight.copy_(before[n])
        assert get(method, 4, "lee")["ppl"] == pytest.approx(ref, rel=1e-4), method
    # truncation changes perplexity, and the dynamic methods use the same parameter budget
    assert get("plain-svd", 8, "lee")["ppl"] != get("plain-svd", 0, "lee")["ppl"]
    widths = max(sum(m.weight.shape) for m in mods.values())
    dense = sum(m.weight.numel() for m in mods.values())
    for method in ("co-svd+", "co-svd++"):
        for k in (4, 8):
            diff = get(method, k, "lee")["param_ratio"] - get("co-svd", k, "lee")["param_ratio"]
            assert 0 <= diff < widths / dense
    assert get("co-svd", 8, "lee")["param_ratio"] == pytest.approx(param_ratio(mods, {n: 8 for n in mods}), rel=1e-12)
    # spectra of the first block's seven layers for the figure, descending
    assert set(res.spectra) == {"plain-svd", "asvd", "co-svd"}
    assert len(res.spectra["co-svd"]) == 7
    assert all(s[i] >= s[i + 1] for per in res.spectra.values() for s in per.values() for i in range(len(s) - 1))
    # outputs
    paths = write_outputs(res, tmp_path)
    assert json.loads(paths["json"].read_text())["rows"] == rows
    for key in ("ppl_plot", "spectra_plot"):
        assert paths[key].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = markdown_table(rows)
    assert table.count("\n") == 1 + len(METHODS) + 1  # header, separator, methods + the pydoc line
