"""Would EVA be faster on an exact, streamed PCA? PEFT's EVA against the same EVA with its
``IncrementalPCA`` replaced by the exact PCA of every row seen (a streamed covariance).

PEFT's EVA feeds each calibration batch of a layer's inputs to ``IncrementalPCA.partial_fit``
(a rank-``2q`` ``torch.svd_lowrank`` sketch of the previous components and the batch) and cycles
through the dataloader until, for every layer, the top components agree (cosine ≥ ``tau``)
with those of the batch before. :class:`StreamingPCA` keeps ``Σ (x − m₀)(x − m₀)ᵀ`` instead and
refits the top ``q`` eigenpairs of the centred scatter after every batch: the PCA that the
sketch approximates. The question is whether exact components settle in fewer batches, enough
to pay for a ``d × d`` accumulation and eigensolve per batch; this script answers it for the
embedded model (it decides whether ``accelerate()`` routes EVA).

    python bench/eva_exact_pca.py                 # 64 × 128 Lee tokens, batches of 4, r = 16

Writes ``bench/results/eva_exact_pca.json``: for each variant the wall time, the forward passes
until every layer converged, the seconds inside ``partial_fit``, and the principal cosines
between the two variants' final components (median and worst over the layers).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from collections.abc import Iterator
from datetime import date
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.bench_dropin import _cpu_model, write_results  # noqa: E402
from corda_kernels.ops.cosvd import principal_cosines  # noqa: E402
from corda_kernels.ops.cosvd.top import _top_eigenvectors  # noqa: E402
from corda_kernels.ops.covariance import _accumulate  # noqa: E402

FIT_SECONDS = [0.0]
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class StreamingPCA:
    """``peft.utils.incremental_pca.IncrementalPCA`` as EVA uses it (``partial_fit`` and the fitted
    attributes), exact: ``components_`` ``(q, d)`` are the top principal directions of every row
    passed so far, signed as PEFT's ``_svd_flip`` signs them (largest entry positive)."""

    def __init__(
        self,
        n_components: int | None = None,
        copy: bool | None = True,
        batch_size: int | None = None,
        svd_driver: str | None = None,
        lowrank: bool = False,
        lowrank_q: int | None = None,
        lowrank_niter: int = 4,
        lowrank_seed: int | None = None,
    ) -> None:
        self.n_components = n_components
        self.n_features_: int | None = None

    @torch.no_grad()
    def partial_fit(self, X: torch.Tensor, check_input: bool = True) -> StreamingPCA:
        """Add the rows of ``X`` ``(T, d)`` and refit the components."""
        if X.dim() != 2:
            raise ValueError(f"partial_fit: X must be (n_samples, n_features), got shape {tuple(X.shape)}")
        n_samples, d = X.shape
        q = self.n_components
        if q is not None and q > d:
            raise ValueError(
                f"n_components={q} invalid for n_features={d}, need more rows than columns for IncrementalPCA "
                "processing."
            )
        if q is not None and q > n_samples:
            raise ValueError(f"n_components={q} must be less or equal to the batch number of samples {n_samples}")
        if self.n_features_ is not None and d != self.n_features_:
            raise ValueError(
                "Number of features of the new batch does not match the number of features of the first batch."
            )
        if not bool(torch.isfinite(X).all()):
            raise ValueError("partial_fit: the layer inputs have NaN or Inf entries")
        t0 = time.perf_counter()
        Xf = X.detach().to(torch.float32)
        if self.n_features_ is None:
            self.n_features_ = d
            self.n_components = q = q or min(n_samples, d)
            self._shift = Xf.mean(0)
            self._scatter = torch.zeros(d, d, dtype=torch.float32, device=X.device)
            self._sum = torch.zeros(d, dtype=torch.float64, device=X.device)
            self._count = 0
        Y = Xf - self._shift
        _accumulate(self._scatter, Y, upper_only=True)
        self._sum += Y.sum(0, dtype=torch.float64)
        self._count += n_samples
        self._refit()
        FIT_SECONDS[0] += time.perf_counter() - t0
        return self

    def _refit(self) -> None:
        n, q, d = self._count, self.n_components, self.n_features_
        delta = self._sum / n
        C = self._scatter.double().triu()
        C = C + C.triu(1).mT - n * torch.outer(delta, delta)  # the centred scatter, float64
        V = _top_eigenvectors(C.float().unsqueeze(0), q)[0].double()
        V = torch.linalg.qr(V).Q
        lam, rot = torch.linalg.eigh(V.mT @ C @ V)  # float64 Rayleigh–Ritz on the float32 subspace
        lam, V = lam.flip(0).clamp_min(0), (V @ rot).flip(1)
        comps = V.mT
        signs = torch.sign(comps.gather(1, comps.abs().argmax(1, keepdim=True)))  # PEFT's _svd_flip
        comps = comps * signs
        total = float(C.diagonal().sum())
        self.n_samples_seen_ = torch.tensor([n], device=C.device)
        # float64, as PEFT's are from its second batch on (its stacked matrix takes the float64 mean)
        self.components_ = comps
        self.singular_values_ = lam.sqrt()
        self.explained_variance_ = lam / max(n - 1, 1)
        self.explained_variance_ratio_ = lam / total if total > 0 else torch.zeros_like(lam)
        self.mean_ = self._shift.double() + delta
        self.var_ = C.diagonal() / n
        rest = min(n, d) - q
        self.noise_variance_ = torch.tensor(
            max(total - float(lam.sum()), 0.0) / max(n - 1, 1) / rest if rest > 0 else 0.0, device=C.device
        )


@contextlib.contextmanager
def fit_timer() -> Iterator[None]:
    """Adds the seconds spent in PEFT's own ``IncrementalPCA.partial_fit`` to FIT_SECONDS."""
    from peft.utils.incremental_pca import IncrementalPCA

    orig = IncrementalPCA.partial_fit

    def timed(self, X, check_input=True):  # noqa: ANN001, ANN202
        t0 = time.perf_counter()
        out = orig(self, X, check_input)
        FIT_SECONDS[0] += time.perf_counter() - t0
        return out

    IncrementalPCA.partial_fit = timed
    try:
        yield
    finally:
        IncrementalPCA.partial_fit = orig


@contextlib.contextmanager
def exact_pca() -> Iterator[None]:
    from peft.tuners.lora import eva

    saved = eva.IncrementalPCA
    eva.IncrementalPCA = StreamingPCA
    try:
        yield
    finally:
        eva.IncrementalPCA = saved


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--json", default="bench/results/eva_exact_pca.json")
    args = ap.parse_args()
    from peft import EvaConfig, LoraConfig
    from peft.tuners.lora import eva

    from corda_kernels.engine import data

    model, tok = data.load_model()
    model.eval()
    ids = data.token_blocks(tok, data.load_text("lee"), args.samples, args.seq_len)
    batches = [
        {"input_ids": ids[i : i + args.batch], "attention_mask": torch.ones_like(ids[i : i + args.batch])}
        for i in range(0, args.samples, args.batch)
    ]
    cfg = LoraConfig(
        r=args.rank, lora_alpha=args.rank, target_modules=TARGETS, init_lora_weights="eva", eva_config=EvaConfig()
    )
    rows, states = {}, {}
    for variant, ctx in (("peft", fit_timer), ("exact", exact_pca)):
        forwards = [0]

        def forward(m, inputs, forwards=forwards):  # noqa: ANN001, ANN202
            forwards[0] += 1
            return m(**inputs)

        FIT_SECONDS[0] = 0.0
        with ctx():
            t0 = time.perf_counter()
            states[variant] = eva.get_eva_state_dict(model, batches, cfg, forward_fn=forward, show_progress_bar=False)
            seconds = time.perf_counter() - t0
        rows[variant] = {"seconds": seconds, "forwards": forwards[0], "partial_fit_seconds": FIT_SECONDS[0]}
        print(variant, rows[variant], flush=True)
    cosines = []
    for name, a in states["peft"].items():
        b = states["exact"].get(name)
        r = min(a.shape[0], 0 if b is None else b.shape[0])
        if r:
            cosines.append(float(principal_cosines(a[:r].double().T, b[:r].double().T).min()))
    out = {
        "date": date.today().isoformat(),
        "cpu_model": _cpu_model(),
        "threads": torch.get_num_threads(),
        "command": "python bench/eva_exact_pca.py " + " ".join(sys.argv[1:]),
        "batches": len(batches),
        "tokens_per_batch": args.batch * args.seq_len,
        "rows": rows,
        "min_principal_cosine_peft_vs_exact": {"median": statistics.median(cosines), "worst": min(cosines)},
    }
    print(json.dumps(out["min_principal_cosine_peft_vs_exact"]))
    write_results(args.json, out)


if __name__ == "__main__":
    main()
