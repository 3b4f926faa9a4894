"""The drop-in under ``torch.distributed``: two gloo ranks, each calibrating its own shard.

Every rank must end with the covariance of all shards (up to float32 summation order), PEFT's
sample counts of all shards, and the same ``eigens`` on every rank, bit for bit those one process
gets from that covariance (each unit is decomposed exactly as one process decomposes it).
"""

from __future__ import annotations

import datetime
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from corda_kernels.engine import distributed
from corda_kernels.engine.calibration import NonFiniteActivationError
from corda_kernels.engine.pipeline import decompose_layers, layer_owners, plan_units, unit_size
from corda_kernels.peft import collect_covariances, layer_ranks, preprocess_corda, target_modules
from tests.test_peft_parity import MODELS, lora_config
from tests.tiny_models import sequences

WORLD = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _init(rank: int, port: int) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=datetime.timedelta(seconds=120))


def _rank_main(rank: int, port: int, arch: str, method: str, prune: bool, seqs: list[torch.Tensor], out: str) -> None:
    _init(rank, port)
    if not prune:  # small buckets: tensors cut into pieces, pieces of several tensors in one bucket
        distributed.BUCKET_BYTES = 8 * 1000
    try:
        build, targets = MODELS[arch]
        model = build(0)
        cfg = lora_config(targets, method, prune_temporary_fields=prune)
        held: dict[str, torch.Tensor] = {}

        def collect(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
            covs = collect_covariances(*args, **kwargs)
            held.update(covs)
            return covs

        mine = seqs[rank::WORLD]
        with mock.patch("corda_kernels.peft.corda.collect_covariances", collect):
            preprocess_corda(model, cfg, run_model=lambda: [model(s.unsqueeze(0)) for s in mine])
        mods = target_modules(model, cfg)
        torch.save(
            {
                "eigens": {n: (m.eigens.U_WC, m.eigens.S_WC, m.eigens.V_WC) for n, m in mods.items()},
                "held": held,
                "counts": {n: getattr(m, "sample_count", None) for n, m in mods.items()},
            },
            os.path.join(out, f"rank{rank}.pt"),
        )
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize(
    ("arch", "method", "prune"),
    [
        ("llama", "ipm", True),
        ("llama", "kpm", True),
        ("gpt2", "ipm", True),
        ("gpt2", "kpm", True),
        ("llama", "kpm", False),
        ("gpt2", "ipm", False),
    ],
)
def test_two_ranks_match_one_process(arch: str, method: str, prune: bool, gen: torch.Generator, tmp_path) -> None:  # noqa: ANN001
    """Pruned (PEFT's default): each covariance summed on the rank that decomposes it, held nowhere
    else. ``prune_temporary_fields=False``: every rank holds every covariance (PEFT's fields)."""
    seqs = sequences(gen, 7, lo=8, hi=30)  # an odd count: the shards differ in size
    mp.spawn(_rank_main, args=(_free_port(), arch, method, prune, seqs, str(tmp_path)), nprocs=WORLD, join=True)
    got = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]

    build, targets = MODELS[arch]
    model = build(0)
    cfg = lora_config(targets, method, prune_temporary_fields=False)
    preprocess_corda(model, cfg, run_model=lambda: [model(s.unsqueeze(0)) for s in seqs])
    mods = target_modules(model, cfg)

    if prune:  # every layer's covariance on exactly one rank: the one layer_owners names
        held = [set(g["held"]) for g in got]
        assert held[0].isdisjoint(held[1]) and held[0] | held[1] == set(mods), held
        covs = {**got[0]["held"], **got[1]["held"]}
        assert layer_owners(mods, covs, WORLD) == {n: 0 if n in held[0] else 1 for n in mods}
        assert all(held), "both ranks must own work"
    else:
        assert all(set(g["held"]) == set(mods) for g in got)
        covs = got[0]["held"]
        for name, module in mods.items():
            assert all(g["counts"][name] == module.sample_count for g in got), name
    tokens = sum(len(s) for s in seqs)
    tol = 10 * tokens**0.5 * torch.finfo(torch.float32).eps
    for name, module in mods.items():
        for g in got:
            if name in g["held"]:
                C = g["held"][name]
                err = float((C.double() - module.covariance_matrix.double()).norm() / module.covariance_matrix.norm())
                assert err < tol, (name, err, tol)
        for g in got:
            for a, b in zip(g["eigens"][name], got[0]["eigens"][name]):
                assert torch.equal(a, b), name

    # the decomposition of the summed covariances is the one a single process computes from them
    if arch == "llama":  # q/k/v and gate/up read one input each
        assert len({id(c) for c in covs.values()}) < len(covs), "shared inputs must stay shared"
    ranks = layer_ranks(cfg, list(mods))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        alone = {res.name: res for res in decompose_layers(mods, covs, ranks, method, progress=False)}
    finally:
        torch.set_num_threads(threads)
    for name in mods:
        U, S, V = got[0]["eigens"][name]
        assert torch.equal(U, alone[name].U) and torch.equal(S, alone[name].S) and torch.equal(V, alone[name].V), name


def _outcome(rank: int, out: str, run, errors: type[Exception]) -> None:  # noqa: ANN001
    """Run ``run()`` on this rank and write the message of the error it raised ("no error") to ``rank<i>.txt``."""
    try:
        run()
        message = "no error"
    except errors as err:
        message = str(err)
    with open(os.path.join(out, f"rank{rank}.txt"), "w") as f:
        f.write(message)


def _rank_nan(rank: int, port: int, prune: bool, seqs: list[torch.Tensor], out: str) -> None:
    _init(rank, port)
    try:
        build, targets = MODELS["llama"]
        model = build(0)
        if rank == 1:  # this rank's activations turn NaN: every rank must stop, naming a layer
            model.model.embed_tokens.weight.data[seqs[1][0]] = float("nan")
        cfg = lora_config(targets, "ipm", prune_temporary_fields=prune)
        mine = seqs[rank::WORLD]
        run = lambda: preprocess_corda(model, cfg, run_model=lambda: [model(s.unsqueeze(0)) for s in mine])  # noqa: E731
        _outcome(rank, out, run, NonFiniteActivationError)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("prune", [True, False])
def test_non_finite_on_one_rank_stops_every_rank(prune: bool, gen: torch.Generator, tmp_path) -> None:  # noqa: ANN001
    seqs = sequences(gen, 4, lo=8, hi=30)
    mp.spawn(_rank_nan, args=(_free_port(), prune, seqs, str(tmp_path)), nprocs=WORLD, join=True)
    messages = [(tmp_path / f"rank{r}.txt").read_text() for r in range(WORLD)]
    assert all(m.startswith("layer model.layers.") and "not finite" in m for m in messages), messages


def _rank_cache(rank: int, port: int, out: str) -> None:
    _init(rank, port)
    try:
        build, targets = MODELS["llama"]
        model = build(0)
        cache_file = os.path.join(out, "eigens.pt" if rank == 0 else f"missing-{rank}.pt")
        cfg = lora_config(targets, "ipm", cache_file=cache_file)
        run = lambda: preprocess_corda(model, cfg, run_model=lambda: [model(torch.randint(0, 200, (1, 16)))])  # noqa: E731
        _outcome(rank, out, run, ValueError)
    finally:
        dist.destroy_process_group()


def test_ranks_that_see_different_caches_stop(tmp_path: Path) -> None:
    """A cache on one rank only (no shared file system): every rank stops, naming the difference."""
    build, targets = MODELS["llama"]
    model = build(0)
    cfg = lora_config(targets, "ipm", cache_file=str(tmp_path / "eigens.pt"))
    preprocess_corda(model, cfg, run_model=lambda: [model(torch.randint(0, 200, (1, 16))) for _ in range(4)])
    mp.spawn(_rank_cache, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    messages = [(tmp_path / f"rank{r}.txt").read_text() for r in range(WORLD)]
    assert all("disagree on which of the caches exist" in m for m in messages), messages


def test_a_ranks_layers_plan_into_its_units(gen: torch.Generator) -> None:
    """Every layer in one unit; a rank's layers, planned alone, give exactly the units it owns
    (so it decomposes them as one process does), for widths spanning several units."""
    mods: dict[str, torch.nn.Module] = {}
    covs: dict[str, torch.Tensor] = {}
    for i, (n_in, n_out, readers) in enumerate([(8, 5, 1)] * 19 + [(12, 7, 3)] * 5 + [(8, 9, 2)] * 4):
        C = torch.eye(n_in)
        for j in range(readers):  # layers reading one input share their covariance object
            name = f"layer{i}.{j}"
            mods[name] = torch.nn.Linear(n_in, n_out + int(torch.randint(0, 3, (1,), generator=gen)))
            covs[name] = C
    for world in (1, 2, 3, 5, 9):
        units = plan_units(mods, covs, world)
        size = unit_size(world)
        assert sorted(name for u in units for name in u.names) == sorted(mods)
        assert sum(len(u.chunk) == size for u in units) >= 2 and all(len(u.chunk) <= size for u in units)
        assert world > 1 or any(len(u.chunk) < size for u in units)
        owner = distributed.assign_by_cost([u.cost(mods) for u in units], world)
        owners = layer_owners(mods, covs, world)
        assert owners == {name: o for u, o in zip(units, owner) for name in u.names}
        for r in range(world):
            mine = {name: m for name, m in mods.items() if owners[name] == r}
            planned = [u.names for u in plan_units(mine, covs, world)] if mine else []
            assert planned == [u.names for u, o in zip(units, owner) if o == r]


def _meta_llama(hidden: int, inter: int, kv: int, layers: int) -> tuple[dict, dict]:
    """Every projection of a LLaMA-shaped model as a meta-device layer, one covariance per distinct input."""
    mods: dict[str, torch.nn.Module] = {}
    covs: dict[str, torch.Tensor] = {}
    for i in range(layers):
        x, attn, mlp, mid = (torch.empty(n, n, device="meta") for n in (hidden, hidden, hidden, inter))
        for name, out, inp, C in (("q", hidden, hidden, x), ("k", kv, hidden, x), ("v", kv, hidden, x),
                                  ("o", hidden, hidden, attn), ("gate", inter, hidden, mlp),
                                  ("up", inter, hidden, mlp), ("down", hidden, inter, mid)):  # fmt: skip
            mods[f"{i}.{name}"] = torch.nn.Linear(inp, out, bias=False, device="meta")
            covs[f"{i}.{name}"] = C
    return mods, covs


@pytest.mark.parametrize(
    "shape", [(4096, 11008, 4096, 32), (5120, 13824, 5120, 40), (8192, 28672, 1024, 80), (2048, 5632, 256, 22)]
)
def test_ranks_share_llama_decompositions_evenly(shape: tuple[int, int, int, int]) -> None:
    """LLaMA-2 7B / 13B / 70B and TinyLlama shapes: no rank's estimated cost exceeds the mean by 5%
    on 2–8 ranks. Whole batches of 8 of the widest covariances left a rank 1.27× the mean at 8."""
    mods, covs = _meta_llama(*shape)
    for world in range(2, 9):
        owners = layer_owners(mods, covs, world)
        load = [0.0] * world
        for unit in plan_units(mods, covs, world):
            assert len({owners[name] for name in unit.names}) == 1
            load[owners[unit.names[0]]] += unit.cost(mods)
        assert max(load) <= 1.05 * sum(load) / world, (world, max(load) / (sum(load) / world))


@pytest.mark.parametrize("mode", ["ipm", "kpm"])
def test_smaller_units_give_the_same_triplets(mode: str, gen: torch.Generator) -> None:
    """More ranks cut a width's covariances into smaller units; a layer's triplets do not depend on
    which others share its batch (up to float32 rounding: each matrix of a batch is solved alone)."""
    mods: dict[str, torch.nn.Module] = {}
    covs: dict[str, torch.Tensor] = {}
    for i in range(7):
        X = torch.randn(300, 72, generator=gen) * torch.logspace(0, -1, 72)
        C = X.T @ X / 300
        for j, out in enumerate((72, 40)):
            mods[f"{i}.{j}"] = torch.nn.Linear(72, out, bias=False)
            torch.nn.init.normal_(mods[f"{i}.{j}"].weight, generator=gen)
            covs[f"{i}.{j}"] = C
    ranks = dict.fromkeys(mods, 6)
    whole = {r.name: r for r in decompose_layers(mods, covs, ranks, mode, progress=False)}
    assert len(plan_units(mods, covs)) == 1
    for world in (2, 3, 8):
        assert len(plan_units(mods, covs, world)) == -(-7 // unit_size(world))
        for res in decompose_layers(mods, covs, ranks, mode, progress=False, world=world):
            ref = whole[res.name]
            assert res.damp == ref.damp, res.name
            rebuilt, expect = (t.U.double() * t.S.double() @ t.V.double().T for t in (res, ref))
            assert float((rebuilt - expect).norm() / expect.norm()) < 1e-5, (res.name, world)


@pytest.mark.parametrize("world", [1, 2, 3, 4, 7])
def test_assign_by_cost_is_longest_first(world: int, gen: torch.Generator) -> None:
    costs = (torch.rand(23, generator=gen) * 100).tolist()
    owner = distributed.assign_by_cost(costs, world)
    load = [0.0] * world
    for i in sorted(range(len(costs)), key=lambda i: -costs[i]):
        r = min(range(world), key=lambda r: (load[r], r))
        assert owner[i] == r
        load[r] += costs[i]
    # list scheduling's bound: no rank ends later than the mean load plus (1 - 1/world) of the longest unit
    assert max(load) <= sum(costs) / world + (1 - 1 / world) * max(costs) + 1e-9


def test_inactive_without_a_group() -> None:
    assert not distributed.active()
    assert distributed.rank_and_world() == (0, 1)


def _init_cli(tiny_dir: Path, out: Path, *extra: str, ranks: int = 1) -> None:
    args = ["-m", "corda_kernels", "init", "--model", str(tiny_dir), "--data", "pydoc", "--samples", "7"]
    args += ["--seq-len", "40", "--rank", "4", "--batch-size", "2", "--out", str(out), "--no-progress", *extra]
    launcher = [sys.executable]
    if ranks > 1:
        launcher += ["-m", "torch.distributed.run", f"--nproc-per-node={ranks}", f"--master-port={_free_port()}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # torchrun's default for its ranks: the same for one process
    done = subprocess.run([*launcher, *args], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.parametrize(("mode", "extra"), [("ipm", ()), ("kpm", ("--dynamic", "--rounds", "2"))])
def test_torchrun_init_matches_one_process(tiny_dir: Path, tmp_path: Path, mode: str, extra: tuple) -> None:
    """``torchrun --nproc-per-node 2 -m corda_kernels init``: the covariances of all samples (within
    10·√T·u₃₂ of one process's calibration, CorDA++'s rounds kept), each held by one rank only
    (CorDA, whose layers are shared out; CorDA++ plans with all of them on every rank), and from
    them the very output one process writes from the same covariances: adapters and residual bit
    for bit, the same files."""
    from safetensors.torch import load_file

    two, one, alone = tmp_path / "two", tmp_path / "one", tmp_path / "alone"
    _init_cli(tiny_dir, two, "--mode", mode, *extra, ranks=2)
    _init_cli(tiny_dir, alone, "--mode", mode, *extra)
    one.mkdir()
    for cached in two.glob("covariance*.pt"):  # a run resumes from the cached covariances
        shutil.copy2(cached, one / cached.name)
    _init_cli(tiny_dir, one, "--mode", mode, *extra)

    dynamic = "--dynamic" in extra
    files = sorted(p.name for p in two.glob("covariance*.pt"))
    parts = [torch.load(two / f, weights_only=False)["data"] for f in files]
    report = json.loads((two / "report.json").read_text())
    held = [r["covariances_held_mib"] for r in report["extra"]["ranks"]]
    total = json.loads((alone / "report.json").read_text())["extra"]["covariances_held_mib"]
    if dynamic:
        assert files == ["covariance.pt"] and held == [total, total]
    else:
        assert files == ["covariance.rank0-of-2.pt", "covariance.rank1-of-2.pt"]
        shares = [set(part["covariances"]) for part in parts]
        assert shares[0] and shares[1] and not shares[0] & shares[1]
        owners = parts[0]["owners"]
        assert owners == parts[1]["owners"] and all(owners[n] == r for r in (0, 1) for n in shares[r])
        assert 0 < min(held) and max(held) < total and abs(sum(held) - total) < 1e-3 * total, (held, total)
    summed = {
        "covariances": {n: C for part in parts for n, C in part["covariances"].items()},
        "candidates": {n: K for part in parts for n, K in part["candidates"].items()},
    }
    single = torch.load(alone / "covariance.pt", weights_only=False)["data"]
    tokens = 7 * 40
    tol = 10 * tokens**0.5 * torch.finfo(torch.float32).eps
    for kind in ("covariances", "candidates"):
        assert summed[kind].keys() == single[kind].keys()
        for name, C in summed[kind].items():
            err = float((C.double() - single[kind][name].double()).norm() / single[kind][name].double().norm())
            assert err < tol, (kind, name, err, tol)
    assert bool(summed["candidates"]) == dynamic

    assert [r["rank"] for r in report["extra"]["ranks"]] == [0, 1]
    assert all("decompose" in r["stages"] for r in report["extra"]["ranks"])
    assert report["verify"]["logits_rel_err"] < 1e-5
    names = sorted(p.relative_to(one).as_posix() for p in one.rglob("*") if p.is_file())
    assert names == sorted(p.relative_to(two).as_posix() for p in two.rglob("*") if p.is_file())
    for part in ("adapter/adapter_model.safetensors", "residual/model.safetensors"):
        a, b = load_file(one / part), load_file(two / part)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), part
    cfg_one, cfg_two = (json.loads((d / "adapter/adapter_config.json").read_text()) for d in (one, two))
    for cfg in (cfg_one, cfg_two):
        cfg.pop("base_model_name_or_path")
        cfg["target_modules"] = sorted(cfg["target_modules"])  # PEFT writes a set
    assert cfg_one == cfg_two

    if not dynamic:  # a rerun on two ranks reads each rank's own share, not the whole set
        stamps = {f: (two / f).stat().st_mtime_ns for f in files}
        _init_cli(tiny_dir, two, "--mode", "kpm", ranks=2)
        assert {f: (two / f).stat().st_mtime_ns for f in files} == stamps
        again = json.loads((two / "report.json").read_text())
        assert [r["covariances_held_mib"] for r in again["extra"]["ranks"]] == held


def test_launched_without_a_group_warns(monkeypatch: pytest.MonkeyPatch) -> None:
    """torchrun's environment but no process group: each process would adapt to its own shard alone."""
    build, targets = MODELS["llama"]
    model = build(0)
    cfg = lora_config(targets, "ipm")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.warns(UserWarning, match="WORLD_SIZE=2 but no torch.distributed process group"):
        preprocess_corda(model, cfg, run_model=lambda: [model(torch.randint(0, 200, (1, 16))) for _ in range(3)])
