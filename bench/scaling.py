"""Planning past one machine: memory, time and traffic per rank for LLaMA-2 7B / 13B / 70B shapes.

Two parts, both in one run:

* measured here: one damping unit of each 7B width (q/k/v reading one 4096-wide input, and
  down_proj's 11008-wide input), damped and decomposed by ``decompose_layers`` (IPM and KPM,
  rank 16) in a fresh process each, for the seconds and the peak resident memory;
* planned: the real unit plan and owner assignment (``plan_units`` / ``layer_owners`` on
  meta-device layers, no weights) of every target layer of each model for 1–8 ranks, giving each
  rank's covariance bytes while calibrating (every rank holds all of them) and after the reduce
  (its share), its estimated decomposition time (the planner's flop estimate times the seconds
  per flop measured above, per mode) and the float64 bytes it reduces and receives.

Run: ``python bench/scaling.py --json bench/results/scaling.json`` (a few minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time

import torch
from torch import nn

from corda_kernels.engine.pipeline import layer_owners, plan_units

MODELS = {  # hidden, intermediate, key/value width, layers (LLaMA-2)
    "llama2-7b": (4096, 11008, 4096, 32),
    "llama2-13b": (5120, 13824, 5120, 40),
    "llama2-70b": (8192, 28672, 1024, 80),
}
RANK = 16
WORLDS = (1, 2, 4, 8)


def meta_model(hidden: int, inter: int, kv: int, layers: int) -> tuple[dict[str, nn.Module], dict[str, torch.Tensor]]:
    """Every attention and MLP projection as a meta-device ``nn.Linear``; one meta covariance per distinct input."""
    mods: dict[str, nn.Module] = {}
    covs: dict[str, torch.Tensor] = {}
    for i in range(layers):
        p = f"model.layers.{i}"
        x, attn, mlp_in, mlp_mid = (torch.empty(n, n, device="meta") for n in (hidden, hidden, hidden, inter))
        for name, (out, inp), C in (
            ("self_attn.q_proj", (hidden, hidden), x),
            ("self_attn.k_proj", (kv, hidden), x),
            ("self_attn.v_proj", (kv, hidden), x),
            ("self_attn.o_proj", (hidden, hidden), attn),
            ("mlp.gate_proj", (inter, hidden), mlp_in),
            ("mlp.up_proj", (inter, hidden), mlp_in),
            ("mlp.down_proj", (hidden, inter), mlp_mid),
        ):
            mods[f"{p}.{name}"] = nn.Linear(inp, out, bias=False, device="meta")
            covs[f"{p}.{name}"] = C
    return mods, covs


def measure_unit(spec: str) -> dict:
    """In this process: one unit ``q`` (q/k/v of 7B on one input) or ``down`` (down_proj of 7B), both modes."""
    from corda_kernels.engine.pipeline import decompose_layers

    hidden, inter = 4096, 11008
    gen = torch.Generator().manual_seed(0)
    shapes = {"q": [(hidden, hidden)] * 3, "down": [(hidden, inter)]}[spec]
    n = shapes[0][1]
    # a covariance with a decaying head and a floor (rank-1024 factor plus a ridge): cheap to build at n = 11008
    G = torch.randn(n, 1024, generator=gen) * torch.logspace(0, -3, 1024)
    C = G @ G.T / 1024 + 1e-4 * torch.eye(n)
    mods = {f"l{j}": nn.Linear(inp, out, bias=False) for j, (out, inp) in enumerate(shapes)}
    for m in mods.values():
        nn.init.normal_(m.weight, std=m.in_features**-0.5)
    covs = dict.fromkeys(mods, C)
    out = {}
    for mode in ("ipm", "kpm"):
        t0 = time.perf_counter()
        for _ in decompose_layers(mods, covs, dict.fromkeys(mods, RANK), mode, progress=False):
            pass
        seconds = time.perf_counter() - t0
        cost = sum(u.cost(mods) for u in plan_units(mods, covs))
        out[mode] = {"seconds": seconds, "cost": cost, "seconds_per_cost": seconds / cost}
    import resource

    out["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    out["n"], out["layers"] = n, [list(s) for s in shapes]
    return out


def plan_model(hidden: int, inter: int, kv: int, layers: int, rates: dict[str, float]) -> list[dict]:
    mods, covs = meta_model(hidden, inter, kv, layers)
    groups = {id(C): C.shape[-1] for C in covs.values()}
    total_cov = sum(4 * n * n for n in groups.values())
    rows = []
    for world in WORLDS:
        owners = layer_owners(mods, covs, world)
        held = [0] * world
        seen: set[int] = set()
        for name, C in covs.items():
            if id(C) not in seen:
                seen.add(id(C))
                held[owners[name]] += 4 * C.shape[-1] ** 2
        cost = [0.0] * world
        for unit in plan_units(mods, covs, world):  # the units the ranks run (smaller ones on more ranks)
            cost[owners[unit.names[0]]] += unit.cost(mods)
        triplets = sum(4 * RANK * (m.in_features + m.out_features + 1) for m in mods.values())
        rows.append(
            {
                "world": world,
                "covariances_calibrating_gib": total_cov / 2**30,
                "covariances_held_max_gib": max(held) / 2**30,
                "decompose_hours_max": {mode: max(cost) * rate / 3600 for mode, rate in rates.items()},
                "imbalance": max(cost) / (sum(cost) / world),
                "reduce_float64_gib_per_rank": 2 * total_cov / 2**30 if world > 1 else 0.0,
                "triplets_gib": triplets / 2**30,
            }
        )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default=None)
    ap.add_argument("--unit", choices=["q", "down"], help=argparse.SUPPRESS)  # one measurement (subprocess)
    args = ap.parse_args()
    if args.unit:
        print(json.dumps(measure_unit(args.unit)))
        return
    measured = {}
    for unit in ("q", "down"):
        done = subprocess.run([sys.executable, __file__, "--unit", unit], capture_output=True, text=True, check=True)
        measured[unit] = json.loads(done.stdout.strip().splitlines()[-1])
        print(unit, json.dumps(measured[unit]), flush=True)
    # seconds per planner cost unit, per mode: the mean over the two measured widths
    rates = {
        mode: sum(m[mode]["seconds_per_cost"] for m in measured.values()) / len(measured) for mode in ("ipm", "kpm")
    }
    plans = {name: plan_model(*shape, rates) for name, shape in MODELS.items()}
    # imported only here: the unit measurements' peak memory must not include peft and transformers
    from bench_dropin import _cpu_model, write_results  # the drop-in benchmark's CPU line and writer

    result = {
        "date": time.strftime("%Y-%m-%d"),
        "cpu": platform.processor() or platform.machine(),
        "cpu_model": _cpu_model(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "rank": RANK,
        "measured_7b_units": measured,
        "seconds_per_cost": rates,
        "plans": plans,
    }
    for name, rows in plans.items():
        for r in rows:
            print(
                f"{name:11s} world {r['world']}: calibrating {r['covariances_calibrating_gib']:7.1f} GiB, "
                f"held ≤ {r['covariances_held_max_gib']:7.1f} GiB, decompose ≤ "
                f"{r['decompose_hours_max']['ipm']:6.2f} h ipm / {r['decompose_hours_max']['kpm']:6.2f} h kpm "
                f"(imbalance {r['imbalance']:.2f}), reduce {r['reduce_float64_gib_per_rank']:6.1f} GiB float64"
            )
    if args.json:
        write_results(args.json, result)


if __name__ == "__main__":
    main()
