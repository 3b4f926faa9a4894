"""CO-SVD per layer, side by side on CPU: PEFT's exact path against corda_kernels' fast path.

Run: ``PYTHONPATH=. python bench/bench_cosvd.py [--quick] [--threads N]``. Prints a markdown table.

Threads: 1 by default for both paths. On the shared 2-core machine, MKL's threaded LAPACK
(``gesdd``, ``syevd``) under contention is erratic: a 512² fp32 SVD took 12 s with 2 threads
against ~0.1 s with one, so 2-thread timings measure the contention, not the algorithms.

Inputs: ``W·C_fix`` of shapes 2048², 4096² and 4096×11008 built from the embedded model's real
weights and covariances (SmolLM2-135M calibrated on the Lee corpus with
:class:`~corda_kernels.CovarianceCollector`), tiled up: ``C`` is block-diagonal with real
covariances of different layers (576-wide attention/MLP inputs, or 1536-wide ``down_proj``
inputs for ``n = 11008``), cropped to ``n``; ``W`` is tiled from real weights of different
layers (576×576 ``q_proj``/``o_proj``, or 576×1536 ``down_proj``), cropped to ``m×n``.

Per layer, whole layer included:

* PEFT: its damping loop (explicit ``torch.linalg.inv`` and an ``n³`` check per step), fp32
  ``W @ C_fix``, full fp32 ``torch.linalg.svd``, ``V = (Vh @ C_inv)ᵀ``, crop. Its cost does not
  depend on ``r`` or top/bottom, so it is run once per shape and cropped for every row.
* ours: :func:`corda_kernels.ops.damping.damp_covariance` (the same rule, screened; its ``damp`` is checked equal to
  PEFT's) and :func:`corda_kernels.ops.cosvd.fast_cosvd` (top: randomized, bottom: float64).

Times are medians of ``--repeats`` interleaved runs (PEFT, then every ``ours`` row) for
shapes up to 2048², single runs above. Accuracy of both against a float64 reference (float64
product, full float64 SVD, solve) on the same fp32 inputs, computed once per shape: the
largest relative error of the ``r`` singular values and the smallest principal cosine of the
``U`` subspaces; with tiny gaps at ``r`` (shown) the cosine is not meaningful and the energy
excess (``compare_triplets``) is.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from statistics import median

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import corda_kernels as ck  # noqa: E402
from corda_kernels.ops.cosvd import compare_triplets, fast_cosvd  # noqa: E402
from corda_kernels.ops.damping import damp_covariance  # noqa: E402

FULL_SHAPES = [(2048, 2048), (4096, 4096), (4096, 11008)]
QUICK_SHAPES = [(1024, 1024), (1024, 3072)]
RANKS = (16, 64, 128)


# -- inputs ---------------------------------------------------------------------------------
def real_pool(samples: int = 8, seq_len: int = 256) -> dict[str, list[torch.Tensor]]:
    """Real covariances and weights of the embedded model: ``C576``, ``C1536``, ``W576``, ``Wdown``."""
    from corda_kernels.engine.data import load_model, load_text, token_blocks

    model, tok = load_model()
    names = ("q_proj", "o_proj", "gate_proj", "down_proj")
    mods = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n.split(".")[-1] in names}
    col = ck.CovarianceCollector(mods)
    ids = token_blocks(tok, load_text("lee"), samples, seq_len)
    with torch.no_grad(), col.attached():
        for i in range(0, samples, 4):
            model(ids[i : i + 4])
    pool: dict[str, list[torch.Tensor]] = {"C576": [], "C1536": [], "W576": [], "Wdown": []}
    for name, mod in mods.items():
        kind = name.split(".")[-1]
        W = mod.weight.detach().float().clone()
        if kind in ("q_proj", "gate_proj"):
            pool["C576"].append(col.covariance(name))
        if kind == "down_proj":
            pool["C1536"].append(col.covariance(name))
            pool["Wdown"].append(W)
        if kind in ("q_proj", "o_proj"):
            pool["W576"].append(W)
    return pool


def load_pool(cache: str | None) -> dict[str, list[torch.Tensor]]:
    """:func:`real_pool`, read from ``cache`` when it exists, else calibrated (and saved there if given)."""
    if cache and Path(cache).exists():
        return torch.load(cache)
    pool = real_pool()
    if cache:
        torch.save(pool, cache)
    return pool


def tiled_layer(m: int, n: int, pool: dict[str, list[torch.Tensor]], gen: torch.Generator) -> tuple:
    """``(W (m, n), C (n, n))`` float32 tiled from real blocks of different layers (see module doc)."""
    wide_blocks = n > 4096
    cs = pool["C1536"] if wide_blocks else pool["C576"]
    ws = pool["Wdown"] if wide_blocks else pool["W576"]
    bw = cs[0].shape[0]
    nb = -(-n // bw)
    C = torch.zeros(nb * bw, nb * bw)
    for j in range(nb):
        C[j * bw : (j + 1) * bw, j * bw : (j + 1) * bw] = cs[int(torch.randint(len(cs), (1,), generator=gen))]
    th, tw = ws[0].shape
    W = torch.cat(
        [
            torch.cat([ws[int(torch.randint(len(ws), (1,), generator=gen))] for _ in range(-(-n // tw))], 1)
            for _ in range(-(-m // th))
        ],
        0,
    )
    return W[:m, :n].contiguous(), C[:n, :n].contiguous()


# -- the two paths ---------------------------------------------------------------------------
def peft_layer(W: torch.Tensor, C: torch.Tensor) -> tuple:
    """PEFT's ``corda_init`` arithmetic for one layer: full ``(U, S, V)``, ``damp``, and times."""
    t0 = time.perf_counter()
    damp = 0.01
    while True:
        compensate = torch.diag(torch.ones(C.size(0)) * torch.mean(torch.diag(C)) * damp)
        fix = C + compensate
        cov_inv = torch.linalg.inv(fix)
        if torch.dist(fix @ cov_inv, torch.eye(C.size(0))).item() < 0.05:
            break
        damp *= 2
    t1 = time.perf_counter()
    U, S, Vh = torch.linalg.svd(W.float() @ fix, full_matrices=False)
    V = (Vh @ cov_inv).transpose(0, 1)
    t2 = time.perf_counter()
    return (U, S, V), damp, fix, {"damp": t1 - t0, "decomp": t2 - t1}


def ours_layer(W: torch.Tensor, C: torch.Tensor, r: int, which: str) -> tuple:
    t0 = time.perf_counter()
    C_fix, damps, _ = damp_covariance(C)  # the rule's damp, screened (corda_kernels.ops.damping)
    damp = float(damps[0])
    t1 = time.perf_counter()
    U, S, V, infos = fast_cosvd(W, C_fix, rank=r, which=which)
    t2 = time.perf_counter()
    return (U, S, V), damp, infos[0], {"damp": t1 - t0, "decomp": t2 - t1}


def reference(W: torch.Tensor, C_fix: torch.Tensor) -> tuple:
    C64 = C_fix.double()
    U, S, Vh = torch.linalg.svd(W.double() @ C64, full_matrices=False)
    V = torch.linalg.solve(C64, Vh.T)
    return U, S, V


def crop(t: tuple, r: int, which: str) -> tuple:
    U, S, V = t
    k = S.numel()
    sl = slice(0, r) if which == "top" else slice(k - r, k)
    return U[:, sl], S[sl], V[:, sl]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small shapes (1024², 1024×3072), for a smoke run")
    ap.add_argument("--shapes", default=None, help="comma list like 2048x2048,4096x11008")
    ap.add_argument("--ranks", default=None, help="comma list of ranks (default 16,64,128)")
    ap.add_argument("--no-ref", action="store_true", help="skip the float64 reference (no accuracy columns)")
    ap.add_argument("--threads", type=int, default=1, help="BLAS threads for both paths (default 1, see doc)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--pool-cache", default=None, help="torch.save file to reuse the calibrated covariances")
    ap.add_argument(
        "--repeats", type=int, default=3, help="interleaved repeats (median) for shapes up to 4096² (others: 1)"
    )
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    shapes = QUICK_SHAPES if args.quick else FULL_SHAPES
    if args.shapes:
        shapes = [tuple(int(x) for x in s.split("x")) for s in args.shapes.split(",")]
    ranks = tuple(int(x) for x in args.ranks.split(",")) if args.ranks else RANKS
    gen = torch.Generator().manual_seed(args.seed)
    t0 = time.perf_counter()
    pool = load_pool(args.pool_cache)
    print(
        f"# CO-SVD per layer, CPU, {torch.get_num_threads()} threads; inputs from the embedded model "
        f"(calibrated in {time.perf_counter() - t0:.0f} s)\n",
        flush=True,
    )
    print(
        "| shape | r | which | PEFT damp s | PEFT decomp s | ours damp s | ours decomp s | decomp × | "
        "layer × | gap | PEFT sv err | PEFT U cos | ours sv err | ours U cos | ours energy exc | ours method |"
    )
    print("|" + "---|" * 17, flush=True)
    for m, n in shapes:
        W, C = tiled_layer(m, n, pool, gen)
        reps = args.repeats if m * n <= 4096 * 4096 else 1
        runs = []
        for _ in range(reps):
            peft_full, peft_damp, C_fix, pt = peft_layer(W, C)
            runs.append(pt)
            ours_runs = {}
            for which in ("top", "bottom"):
                for r in ranks:
                    ours_runs[which, r] = ours_layer(W, C, r, which)
            runs[-1] = (pt, ours_runs)
        pt = {k: median([p[k] for p, _ in runs]) for k in ("damp", "decomp")}
        ref = None if args.no_ref else reference(W, C_fix)
        for which in ("top", "bottom"):
            for r in ranks:
                (U, S, V), damp, info, _ = runs[-1][1][which, r]
                ot = {k: median([o[which, r][3][k] for _, o in runs]) for k in ("damp", "decomp")}
                if damp != peft_damp:
                    print(f"WARNING: damp differs: ours {damp} PEFT {peft_damp}", file=sys.stderr)
                peft_r = crop(peft_full, r, which)
                row = [
                    f"{m}×{n}",
                    r,
                    which,
                    f"{pt['damp']:.2f}",
                    f"{pt['decomp']:.2f}",
                    f"{ot['damp']:.2f}",
                    f"{ot['decomp']:.2f}",
                    f"{pt['decomp'] / ot['decomp']:.1f}",
                    f"{(pt['damp'] + pt['decomp']) / (ot['damp'] + ot['decomp']):.1f}",
                ]
                if ref is not None:
                    ref_r = crop(ref, r, which)
                    k = ref[1].numel()
                    i = r if which == "top" else k - r
                    row.append(f"{float(ref[1][i - 1] / ref[1][i]):.4f}")
                    cp = compare_triplets(peft_r, ref_r)
                    co = compare_triplets((U, S, V), ref_r, W=W, C_fix=C_fix, which=which)
                    row += [
                        f"{cp['sv_rel_err']:.1e}",
                        f"{cp['u_cos_min']:.6f}",
                        f"{co['sv_rel_err']:.1e}",
                        f"{co['u_cos_min']:.6f}",
                        f"{co['energy_rel_excess']:.1e}",
                    ]
                else:
                    row += ["–"] * 6
                row.append(f"{info['method']} ({info.get('iterations', '–')} it, n={reps})")
                print("| " + " | ".join(str(x) for x in row) + " |", flush=True)
        del peft_full, ref, C_fix, runs
    print(f"\ntotal {time.perf_counter() - t0:.0f} s", flush=True)


if __name__ == "__main__":
    main()
