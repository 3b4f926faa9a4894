"""The truncation study (the paper's Fig. 3, Fig. 4 and Table X on the embedded model).

Calibrate on the first half of a text, discard the bottom components of every target layer
(``W`` is replaced by its truncation), and measure perplexity on held-out text. Methods:

* ``plain-svd``: SVD of ``W``.
* ``asvd``: SVD of ``W·D`` with ``D = diag(mean|x|^0.5 + 1e-6)`` (the original CorDA code's
  ASVD mode, α = 0.5), ``V̂ = D⁻¹V``.
* ``co-svd``: SVD of ``W·C_fix`` (CorDA's damped covariance), ``V̂ = C_fix⁻¹V``.
* ``co-svd+``: co-svd with dynamic ranks (progressive filtering, docs/design.md §5) at the
  parameter budget of discarding ``k`` everywhere.
* ``co-svd++``: co-svd+ on the covariance each layer selects among K calibration rounds.

Each layer is decomposed once per method (float64 full SVD, stored as ``U·diag(S)`` and
``V̂`` in float32); every ``k`` is then evaluated by subtracting the discarded part
``U_t·diag(S_t)·V̂_tᵀ`` from the original weight. ``param_ratio`` = parameters the discarded
components take in factored form, ``Σ_l p_l·(m_l+n_l)``, over the dense parameters of the
target layers ``Σ_l m_l·n_l`` (``p_l`` = components discarded in layer ``l``, capped at
``min(m_l, n_l)``).

Rows (``--json``): ``{method, calib, eval, discard, param_ratio, ppl}``; ``co-svd+`` /
``co-svd++`` rows carry the uniform ``discard`` whose parameter budget they match. At
``discard = 0`` every method is the unmodified model: it is evaluated once and reported for
every method. Cross-domain rows use ``calib = "pydoc"`` (co-svd only).

Why one file of ~600 lines: it is one front end (a command with its options, its experiment,
its JSON and its plots); the engine pieces it runs (calibration, CorDA++ planning, spectra)
live in :mod:`corda_kernels.engine` and :mod:`corda_kernels.ops`.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from ..engine.calibration import CovarianceCollector
from ..engine.dynamic import LayerSpectrum, discard_pattern, plan_dynamic
from ..engine.layers import linear_weight
from ..ops.cosvd import cosvd_float64
from ..ops.damping import damp_covariance
from ..ops.spectra import compactness, eig_extremes

METHODS = ("plain-svd", "asvd", "co-svd", "co-svd+", "co-svd++")
DEFAULT_DISCARDS = (0, 16, 32, 64, 128)
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ASVD_ALPHA = 0.5


# ------------------------------------------------------------------------------------ pieces
@dataclass
class Factored:
    """``W = L·Rᵀ`` by components, descending: ``L = U·diag(S)`` ``(m, k)``, ``R = V̂`` ``(n, k)`` float32;
    ``S`` ``(k,)`` float64."""

    L: torch.Tensor
    R: torch.Tensor
    S: torch.Tensor

    def tail(self, p: int) -> torch.Tensor:
        """The bottom ``p`` components ``(m, n)`` float32 (zeros for ``p = 0``)."""
        k = self.S.numel()
        return self.L[:, k - p :] @ self.R[:, k - p :].T


def factor(W: torch.Tensor, *, C_fix: torch.Tensor | None = None, scale: torch.Tensor | None = None) -> Factored:
    """Full float64 SVD of ``W·C_fix`` (co-svd), ``W·diag(scale)`` (asvd) or ``W`` (plain); ``W`` ``(m, n)``."""
    W64 = W.detach().to(torch.float64)
    if C_fix is not None:
        U, S, V = cosvd_float64(W64, C_fix)
    elif scale is not None:
        d = scale.to(torch.float64)
        U, S, Vh = torch.linalg.svd(W64 * d, full_matrices=False)
        V = Vh.T / d.view(-1, 1)
    else:
        U, S, Vh = torch.linalg.svd(W64, full_matrices=False)
        V = Vh.T
    return Factored((U * S).float(), V.float(), S)


def target_modules(model: nn.Module, targets: Sequence[str] = DEFAULT_TARGETS) -> dict[str, nn.Module]:
    """``name → nn.Linear`` for every linear layer whose last name component is in ``targets``."""
    mods = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.split(".")[-1] in targets}
    if not mods:
        raise ValueError(f"no linear layer named {', '.join(targets)} in the model")
    return mods


def windows(ids: torch.Tensor, seq_len: int, n: int, start: int = 0) -> torch.Tensor:
    """``(n, seq_len)`` consecutive windows of 1-D ``ids`` from token ``start``; raises if too short."""
    if start + n * seq_len > ids.numel():
        raise ValueError(
            f"text too short: {n} windows of {seq_len} tokens from token {start} need "
            f"{start + n * seq_len}, it has {ids.numel()}"
        )
    return ids[start : start + n * seq_len].view(n, seq_len)


@torch.no_grad()
def perplexity(model: nn.Module, ids: torch.Tensor, batch_size: int = 4, desc: str | None = None) -> float:
    """Perplexity of ``model`` on windows ``ids`` ``(N, L)`` (each window predicts its tokens 1..L−1)."""
    nll, count = 0.0, 0
    for b in tqdm(range(0, ids.shape[0], batch_size), desc=desc, disable=desc is None, leave=False):
        x = ids[b : b + batch_size]
        logits = model(x).logits[:, :-1].float()
        nll += float(torch.nn.functional.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten(), reduction="sum"))
        count += x[:, 1:].numel()
    return math.exp(nll / count)


@torch.no_grad()
def calibrate(
    model: nn.Module,
    mods: dict[str, nn.Module],
    ids: torch.Tensor,
    *,
    rounds: int,
    batch_size: int,
    progress: bool,
    desc: str,
) -> tuple[CovarianceCollector, dict[str, torch.Tensor]]:
    """One pass over ``ids`` ``(N, L)``: covariances (K rounds) and per-channel ``mean|x|`` ``(n,)`` float32."""
    col = CovarianceCollector(mods, rounds=rounds)
    abs_sum = {n: torch.zeros(linear_weight(m).shape[1], dtype=torch.float64) for n, m in mods.items()}
    tokens = {"n": 0}

    def hook(name: str):  # noqa: ANN202
        def fn(module: nn.Module, args: tuple) -> None:
            abs_sum[name] += args[0].detach().abs().flatten(0, -2).sum(0, dtype=torch.float64)

        return fn

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in mods.items()]
    body = model.get_decoder() if hasattr(model, "get_decoder") else model  # no lm_head: hidden states suffice
    try:
        with col.attached():
            for b in tqdm(range(0, ids.shape[0], batch_size), desc=desc, disable=not progress):
                x = ids[b : b + batch_size]
                col.set_batch(torch.ones_like(x, dtype=torch.bool))
                body(x)
                tokens["n"] += x.numel()
    finally:
        for h in handles:
            h.remove()
    col.finalize()
    return col, {n: (s / tokens["n"]).float() for n, s in abs_sum.items()}


def uniform_pattern(factors: dict[str, Factored], discard: int) -> dict[str, int]:
    return {n: min(discard, f.S.numel()) for n, f in factors.items()}


def param_ratio(mods: dict[str, nn.Module], pattern: dict[str, int]) -> float:
    """``Σ p_l·(m_l+n_l) / Σ m_l·n_l`` (see the module docstring)."""
    shapes = {n: linear_weight(m).shape for n, m in mods.items()}
    return sum(pattern[n] * (s[0] + s[1]) for n, s in shapes.items()) / sum(s[0] * s[1] for s in shapes.values())


class _Truncator:
    """Swaps truncated weights into the model and restores the originals (kept as float32 copies)."""

    def __init__(self, mods: dict[str, nn.Module]) -> None:
        self.mods = mods
        self.orig = {n: linear_weight(m).detach().clone() for n, m in mods.items()}

    @torch.no_grad()
    def apply(self, factors: dict[str, Factored], pattern: dict[str, int]) -> None:
        for n, m in self.mods.items():
            W = self.orig[n] if pattern[n] == 0 else self.orig[n] - factors[n].tail(pattern[n]).to(self.orig[n])
            linear_weight(m).copy_(W)

    @torch.no_grad()
    def restore(self) -> None:
        for n, m in self.mods.items():
            linear_weight(m).copy_(self.orig[n])


@dataclass
class StudyResult:
    """``rows`` (the ``--json`` list), block-0 ``spectra`` (method → layer → descending σ list),
    ``allocation`` (method → discard → projection → mean components discarded), ``timings`` (s)."""

    rows: list[dict]
    spectra: dict[str, dict[str, list[float]]]
    allocation: dict[str, dict[int, dict[str, float]]]
    timings: dict[str, float]
    meta: dict = field(default_factory=dict)


# ------------------------------------------------------------------------------------ the study
def run_study(
    model: nn.Module,
    corpora: dict[str, torch.Tensor],
    *,
    samples: int = 32,
    seq_len: int = 256,
    eval_tokens: int = 2048,
    discards: Sequence[int] = DEFAULT_DISCARDS,
    cross_discards: Sequence[int] = (32, 128),
    rounds: int = 5,
    methods: Sequence[str] = METHODS,
    targets: Sequence[str] = DEFAULT_TARGETS,
    batch_size: int = 4,
    progress: bool = True,
) -> StudyResult:
    """Run the study. ``corpora`` maps ``"lee"`` (calibration + same-domain eval) and ``"pydoc"``
    (second domain) to 1-D int64 token ids; each is split in halves: calibration windows come
    from the first half, evaluation windows from the second. The model is restored at the end.
    """
    for m in methods:
        if m not in METHODS:
            raise ValueError(f"unknown method {m!r}; choose from {METHODS}")
    if set(corpora) != {"lee", "pydoc"}:
        raise ValueError(f"corpora must be 'lee' and 'pydoc', got {sorted(corpora)}")
    discards = sorted(set(int(k) for k in discards))
    if any(k < 0 for k in discards):
        raise ValueError("discards must be >= 0")
    n_eval = max(1, eval_tokens // seq_len)
    halves = {name: ids.numel() // 2 for name, ids in corpora.items()}
    for name in corpora:
        if samples * seq_len > halves[name]:
            raise ValueError(f"{name}: {samples}×{seq_len} calibration tokens exceed the first half ({halves[name]})")
    calib_ids = {name: windows(ids, seq_len, samples, 0) for name, ids in corpora.items()}
    eval_ids = {name: windows(ids, seq_len, n_eval, halves[name]) for name, ids in corpora.items()}
    mods = target_modules(model, targets)
    trunc = _Truncator(mods)
    timings: dict[str, float] = {}
    rows: list[dict] = []
    spectra: dict[str, dict[str, list[float]]] = {}
    allocation: dict[str, dict[int, dict[str, float]]] = {}
    first_layer_prefix = _first_block_prefix(list(mods))
    block0 = [n for n in mods if n.startswith(first_layer_prefix)]
    model.eval()

    def evaluate(method: str, calib: str, factors: dict[str, Factored] | None, pattern: dict[str, int], k: int) -> None:
        ratio = param_ratio(mods, pattern)
        if factors is not None:
            trunc.apply(factors, pattern)
        try:
            for ev in ("lee", "pydoc"):
                t0 = time.perf_counter()
                desc = f"ppl {method} {calib}→{ev} k={k}" if progress else None
                ppl = perplexity(model, eval_ids[ev], batch_size, desc=desc)
                timings["eval_s"] = timings.get("eval_s", 0.0) + time.perf_counter() - t0
                rows.append(
                    {"method": method, "calib": calib, "eval": ev, "discard": k, "param_ratio": ratio, "ppl": ppl}
                )
                if progress:
                    tqdm.write(
                        f"{method:9s} {calib}→{ev:5s} k={k:<4d} ratio={ratio:.4f} ppl={ppl:.3f}", file=sys.stderr
                    )
        finally:
            trunc.restore()

    def record_allocation(method: str, k: int, pattern: dict[str, int]) -> None:
        per: dict[str, list[int]] = {}
        for n, p in pattern.items():
            per.setdefault(n.split(".")[-1], []).append(p)
        allocation.setdefault(method, {})[k] = {t: sum(v) / len(v) for t, v in per.items()}

    # baseline (k = 0 is the unmodified model for every method)
    if 0 in discards:
        base_rows_start = len(rows)
        evaluate("baseline", "lee", None, {n: 0 for n in mods}, 0)
        base = rows[base_rows_start:]
        del rows[base_rows_start:]
        for method in methods:
            for r in base:
                rows.append({**r, "method": method})
    ks = [k for k in discards if k > 0]

    # calibration passes
    t0 = time.perf_counter()
    col, absmean = calibrate(
        model, mods, calib_ids["lee"], rounds=rounds, batch_size=batch_size, progress=progress, desc="calibrate lee"
    )
    timings["calibrate_lee_s"] = time.perf_counter() - t0

    def cosvd_factors(collector: CovarianceCollector, desc: str) -> tuple[dict[str, Factored], dict[str, float]]:
        t1 = time.perf_counter()
        factors, log_pi = {}, {}
        bar = tqdm(total=len(mods), desc=desc, disable=not progress)
        for acc in collector.accumulators():
            names = [n for n in acc.members if n in mods]
            C_fix = damp_covariance(collector.covariance(names[0]))[0]
            lo, hi = eig_extremes(C_fix)
            for n in names:
                factors[n] = factor(linear_weight(mods[n]), C_fix=C_fix)
                log_pi[n] = math.log(compactness(float(lo), float(hi), linear_weight(mods[n]).shape[0]))
                bar.update(1)
        bar.close()
        timings[f"decompose_{desc}_s"] = time.perf_counter() - t1
        return factors, log_pi

    def dynamic_rows(method: str, calib: str, factors: dict[str, Factored], log_pi: dict[str, float]) -> None:
        layers = [LayerSpectrum(n, f.S, log_pi[n], sum(linear_weight(mods[n]).shape)) for n, f in factors.items()]
        for k in ks:
            t1 = time.perf_counter()
            pattern = discard_pattern(layers, k)
            timings[f"allocate_{method}_s"] = timings.get(f"allocate_{method}_s", 0.0) + time.perf_counter() - t1
            record_allocation(method, k, pattern)
            evaluate(method, calib, factors, pattern, k)

    for method in ("plain-svd", "asvd"):
        if method not in methods:
            continue
        t1 = time.perf_counter()
        factors = {
            n: factor(linear_weight(m), scale=(absmean[n] ** ASVD_ALPHA + 1e-6) if method == "asvd" else None)
            for n, m in tqdm(mods.items(), desc=f"SVD {method}", disable=not progress)
        }
        timings[f"decompose_{method}_s"] = time.perf_counter() - t1
        spectra[method] = {n: factors[n].S.tolist() for n in block0}
        for k in ks:
            evaluate(method, "lee", factors, uniform_pattern(factors, k), k)
        del factors

    if "co-svd" in methods or "co-svd+" in methods:
        factors, log_pi = cosvd_factors(col, "co-svd")
        spectra["co-svd"] = {n: factors[n].S.tolist() for n in block0}
        if "co-svd" in methods:
            for k in ks:
                evaluate("co-svd", "lee", factors, uniform_pattern(factors, k), k)
        if "co-svd+" in methods:
            dynamic_rows("co-svd+", "lee", factors, log_pi)
        del factors

    if "co-svd++" in methods:
        t1 = time.perf_counter()
        plan = plan_dynamic(mods, col, 1, 1.0, "kpm", select=True, allocate=False, progress=progress)
        timings["corda++_selection_s"] = time.perf_counter() - t1
        timings.update({f"corda++_{k}": v for k, v in plan.timings.items()})
        t1 = time.perf_counter()
        factors = {
            n: factor(linear_weight(m), C_fix=plan.c_fix(n))
            for n, m in tqdm(mods.items(), desc="CO-SVD++", disable=not progress)
        }
        timings["decompose_co-svd++_s"] = time.perf_counter() - t1
        log_pi = {r["name"]: r["log_compactness"] for r in plan.rows}
        allocation["co-svd++ choices"] = {
            0: {f"round {i}": sum(1 for c in plan.choice.values() if c == i) for i in range(plan.rounds)}
        }
        del plan
        dynamic_rows("co-svd++", "lee", factors, log_pi)
        del factors
    del col

    # cross-domain: calibrate on pydoc, evaluate on both (pydoc→lee is the cross-domain case)
    cross = [k for k in sorted(set(cross_discards)) if k > 0]
    if cross and "co-svd" in methods:
        t1 = time.perf_counter()
        col_p, _ = calibrate(
            model, mods, calib_ids["pydoc"], rounds=1, batch_size=batch_size, progress=progress, desc="calibrate pydoc"
        )
        timings["calibrate_pydoc_s"] = time.perf_counter() - t1
        factors, _ = cosvd_factors(col_p, "co-svd-pydoc")
        del col_p
        for k in cross:
            evaluate("co-svd", "pydoc", factors, uniform_pattern(factors, k), k)
        del factors
    meta = {
        "samples": samples,
        "seq_len": seq_len,
        "eval_tokens": n_eval * seq_len,
        "rounds": rounds,
        "layers": len(mods),
        "dense_params": sum(linear_weight(m).numel() for m in mods.values()),
    }
    return StudyResult(rows, spectra, allocation, timings, meta)


def _first_block_prefix(names: list[str]) -> str:
    """The name prefix of the first transformer block (e.g. ``model.layers.0.``)."""
    first = names[0].split(".")
    for i, part in enumerate(first):
        if part.isdigit():
            return ".".join(first[: i + 1]) + "."
    return ""


# ------------------------------------------------------------------------------------ output
def markdown_table(rows: list[dict]) -> str:
    """Perplexity table: one line per (method, calib), one column per (discard, eval)."""
    ks = sorted({r["discard"] for r in rows})
    evals = ("lee", "pydoc")
    keys = []
    for r in rows:
        key = (r["method"], r["calib"])
        if key not in keys:
            keys.append(key)
    ratio = {}
    for r in rows:
        if r["method"] in ("plain-svd", "co-svd") and r["calib"] == "lee":
            ratio[r["discard"]] = r["param_ratio"]
    head = "| method | calib | " + " | ".join(f"k={k} ({ratio.get(k, 0):.1%}) {e}" for k in ks for e in evals) + " |"
    sep = "|" + "---|" * (2 + len(ks) * len(evals))
    lines = [head, sep]
    for method, calib in keys:
        cells = []
        for k in ks:
            for e in evals:
                hit = [r for r in rows if (r["method"], r["calib"], r["discard"], r["eval"]) == (method, calib, k, e)]
                cells.append(f"{hit[0]['ppl']:.2f}" if hit else "–")
        lines.append(f"| {method} | {calib} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_ppl(rows: list[dict], path: Path) -> None:
    """Perplexity against discarded rank, one panel per evaluation text."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, ev in zip(axes, ("lee", "pydoc")):
        keys = []
        for r in rows:
            if (r["method"], r["calib"]) not in keys:
                keys.append((r["method"], r["calib"]))
        for method, calib in keys:
            pts = sorted(
                (r["discard"], r["ppl"])
                for r in rows
                if r["method"] == method and r["calib"] == calib and r["eval"] == ev
            )
            if calib != "lee":
                base = [(r["discard"], r["ppl"]) for r in rows if r["discard"] == 0 and r["eval"] == ev]
                pts = sorted(set(base[:1] + pts))
            ax.plot(
                [p[0] for p in pts],
                [p[1] for p in pts],
                marker="o",
                linestyle="--" if calib != "lee" else "-",
                label=f"{method} ({calib} calib)",
            )
        ax.set_yscale("log")
        ax.set_xlabel("discarded rank k (bottom components, every layer)")
        ax.set_ylabel(f"perplexity on held-out {ev}")
        ax.set_title(f"eval: {ev}")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_spectra(spectra: dict[str, dict[str, list[float]]], path: Path) -> None:
    """Normalized singular values (σ_i/σ_1, log scale) of the first block's layers per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = list(next(iter(spectra.values())))
    cols = min(4, len(layers))
    nrows = math.ceil(len(layers) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(3.6 * cols, 3.0 * nrows), squeeze=False)
    for ax, layer in zip(axes.flat, layers):
        for method, per in spectra.items():
            s = torch.tensor(per[layer], dtype=torch.float64)
            ax.plot((s / s[0]).clamp_min(1e-300).tolist(), label=method)
        ax.set_yscale("log")
        ax.set_title(layer.split(".")[-1], fontsize=9)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(layers) :]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=8)
    fig.suptitle("singular values / σ₁ of the first block's layers")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_outputs(result: StudyResult, out: Path) -> dict[str, Path]:
    """``study.json``, ``study.md``, ``ppl_vs_discard.png``, ``spectra_block0.png`` under ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    paths = {
        "json": out / "study.json",
        "markdown": out / "study.md",
        "ppl_plot": out / "ppl_vs_discard.png",
        "spectra_plot": out / "spectra_block0.png",
    }
    payload = {
        "rows": result.rows,
        "meta": result.meta,
        "timings": result.timings,
        "allocation": {m: {str(k): v for k, v in a.items()} for m, a in result.allocation.items()},
    }
    paths["json"].write_text(json.dumps(payload, indent=1))
    paths["markdown"].write_text(markdown_table(result.rows) + "\n")
    plot_ppl(result.rows, paths["ppl_plot"])
    if result.spectra:
        plot_spectra(result.spectra, paths["spectra_plot"])
    return paths


# ------------------------------------------------------------------------------------ CLI
def _ints(text: str) -> list[int]:
    return [int(t) for t in text.split(",") if t.strip()]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``corda-kernels study`` options."""
    parser.add_argument("--model", default="smollm2", help="'smollm2' (embedded) or a transformers directory")
    parser.add_argument("--samples", type=int, default=32, help="calibration windows (first half of each text)")
    parser.add_argument("--seq-len", type=int, default=256, help="tokens per window")
    parser.add_argument("--eval-tokens", type=int, default=2048, help="held-out tokens per evaluation text")
    parser.add_argument("--discard", type=_ints, default=list(DEFAULT_DISCARDS), help="comma list of k")
    parser.add_argument("--cross-discard", type=_ints, default=[32, 128], help="k for pydoc-calibrated co-svd")
    parser.add_argument("--rounds", type=int, default=5, help="K calibration rounds for co-svd++")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma list of methods")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--out", type=Path, default=Path("study_out"), help="directory for json / md / png")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON on stdout")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (on a shared, oversubscribed machine 1 thread ran 8× faster than 2)",
    )


def run_from_args(args: argparse.Namespace) -> StudyResult:
    """Load the model and texts, run the study, write the outputs; print rows (``--json``) or the table."""
    from ..engine.data import load_model, load_text

    progress = not args.no_progress
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    model, tokenizer = load_model(args.model)
    corpora = {
        name: torch.tensor(tokenizer(load_text(name), add_special_tokens=False).input_ids, dtype=torch.int64)
        for name in ("lee", "pydoc")
    }
    result = run_study(
        model,
        corpora,
        samples=args.samples,
        seq_len=args.seq_len,
        eval_tokens=args.eval_tokens,
        discards=args.discard,
        cross_discards=args.cross_discard,
        rounds=args.rounds,
        methods=[m for m in args.methods.split(",") if m],
        batch_size=args.batch_size,
        progress=progress,
    )
    result.timings["total_s"] = time.perf_counter() - t0
    result.meta["model"] = args.model
    paths = write_outputs(result, args.out)
    if args.json:
        print(json.dumps(result.rows, indent=1))
    else:
        print(markdown_table(result.rows))
        print(f"\nwritten: {', '.join(str(p) for p in paths.values())}", file=sys.stderr)
    return result


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="corda-kernels study", description=__doc__.splitlines()[0])
    add_arguments(parser)
    run_from_args(parser.parse_args(argv))
    return 0


def _run_subcommand(args: argparse.Namespace) -> int:
    run_from_args(args)
    return 0


def _register() -> None:
    """Register ``corda-kernels study`` with the CLI (which imports this module for its subcommands)."""
    from . import SUBCOMMANDS

    SUBCOMMANDS["study"] = (add_arguments, _run_subcommand)


_register()

if __name__ == "__main__":
    raise SystemExit(main())
