"""The drop-in under ``torch.distributed``: two gloo ranks, each calibrating its own shard.

Every rank must end with the covariance of all shards (up to float32 summation order), PEFT's
sample counts of all shards, and the same ``eigens`` on every rank, bit for bit those one process
gets from that covariance (each unit is decomposed exactly as one process decomposes it).
"""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from corda_kernels.engine import distributed
from corda_kernels.engine.pipeline import decompose_layers, layer_owners, plan_units
from corda_kernels.peft import layer_ranks, preprocess_corda, target_modules
from tests.test_peft_parity import MODELS, lora_config
from tests.tiny_models import sequences

WORLD = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, port: int, arch: str, method: str, seqs: list[torch.Tensor], out: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        build, targets = MODELS[arch]
        model = build(0)
        cfg = lora_config(targets, method, prune_temporary_fields=False)
        mine = seqs[rank::WORLD]
        preprocess_corda(model, cfg, run_model=lambda: [model(s.unsqueeze(0)) for s in mine])
        mods = target_modules(model, cfg)
        torch.save(
            {
                "eigens": {n: (m.eigens.U_WC, m.eigens.S_WC, m.eigens.V_WC) for n, m in mods.items()},
                "covs": {n: m.covariance_matrix for n, m in mods.items()},
                "counts": {n: m.sample_count for n, m in mods.items()},
            },
            os.path.join(out, f"rank{rank}.pt"),
        )
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("method", ["ipm", "kpm"])
def test_two_ranks_match_one_process(arch: str, method: str, gen: torch.Generator, tmp_path) -> None:  # noqa: ANN001
    seqs = sequences(gen, 7, lo=8, hi=30)  # an odd count: the shards differ in size
    mp.spawn(_rank_main, args=(_free_port(), arch, method, seqs, str(tmp_path)), nprocs=WORLD, join=True)
    got = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]

    build, targets = MODELS[arch]
    model = build(0)
    cfg = lora_config(targets, method, prune_temporary_fields=False)
    preprocess_corda(model, cfg, run_model=lambda: [model(s.unsqueeze(0)) for s in seqs])
    mods = target_modules(model, cfg)

    tokens = sum(len(s) for s in seqs)
    tol = 10 * tokens**0.5 * torch.finfo(torch.float32).eps
    for name, module in mods.items():
        for r in range(WORLD):
            assert got[r]["counts"][name] == module.sample_count, name
            C = got[r]["covs"][name]
            err = float((C.double() - module.covariance_matrix.double()).norm() / module.covariance_matrix.norm())
            assert err < tol, (name, r, err, tol)
            for a, b in zip(got[r]["eigens"][name], got[0]["eigens"][name]):
                assert torch.equal(a, b), (name, r)

    # the decomposition of the summed covariance is the one a single process computes from it
    covs = got[0]["covs"]
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
    assert set(layer_owners(mods, covs, WORLD).values()) == set(range(WORLD)), "both ranks must own work"


def test_plan_units_cover_each_layer_once() -> None:
    build, targets = MODELS["llama"]
    model = build(0)
    cfg = lora_config(targets, "ipm")
    mods = target_modules(model, cfg)
    n = model.config.hidden_size
    shared = torch.eye(n)
    covs = {name: shared if m.in_features == n else torch.eye(m.in_features) for name, m in mods.items()}
    units = plan_units(mods, covs)
    names = [name for u in units for name in u.names]
    assert sorted(names) == sorted(mods)
    for world in (1, 2, 3, 5):
        owners = layer_owners(mods, covs, world)
        assert set(owners) == set(mods) and all(0 <= o < world for o in owners.values())
    owners = layer_owners(mods, covs, 2)
    ranks = layer_ranks(cfg, list(mods))
    for r in range(2):
        got = [res.name for res in decompose_layers(mods, covs, ranks, "ipm", progress=False, shard=(r, 2))]
        assert sorted(got) == sorted(name for name, o in owners.items() if o == r)
    with pytest.raises(ValueError, match="shard"):
        next(decompose_layers(mods, covs, ranks, "ipm", progress=False, shard=(2, 2)))


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


def test_init_refuses_several_ranks(monkeypatch, tmp_path) -> None:  # noqa: ANN001
    from corda_kernels.cli.init import InitOptions, run_init

    monkeypatch.setattr(distributed, "active", lambda: True)
    monkeypatch.setattr(distributed, "rank_and_world", lambda: (0, 2))
    with pytest.raises(RuntimeError, match="one process.*2 ranks"):
        run_init(InitOptions(out=str(tmp_path / "out")))
    assert not (tmp_path / "out").exists()
