"""``corda-kernels init``: CorDA adapters for a model, end to end.

Stages (each timed in ``report.json``; the stage functions are in :mod:`corda_kernels.engine.stages`):
load the model and text, calibrate (covariances of every target layer, cached in
``covariance.pt`` — or one share per rank under ``torchrun`` — under a content key so a rerun
resumes), decompose (damped inverse + CO-SVD + adapters, one layer at a time, progress saved in
``.partial.pt``), export (the residual model with ``save_pretrained`` and a PEFT adapter directory
that ``PeftModel.from_pretrained`` loads onto it), verify (logits after init equal the
original's). Everything is written into ``.<out>.partial/`` beside ``--out`` and moved into place
only when complete and verified.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import resource
import shutil
import signal
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..engine import cache, data, distributed, stages
from ..engine.adapters import lora_scaling
from ..engine.layers import in_features, is_conv1d, linear_weight, target_modules
from ..engine.outputs import output_hashes
from ..engine.pipeline import check_ranks, layer_owners, share_results

# PEFT's own "all-linear": every nn.Linear / Conv1D of the model but its output head (for LLaMA-style
# models the seven projections, for GPT-2 c_attn / c_proj / c_fc)
ALL_LINEAR = "all-linear"
DEFAULT_TARGETS = (ALL_LINEAR,)


@dataclass
class InitOptions:
    """Options of ``corda-kernels init`` (the CLI's flags, one to one)."""

    model: str = data.DEFAULT_MODEL
    data: str = "lee"
    mode: str = "ipm"
    rank: int = 16
    alpha: float | None = None  # default: the rank (scaling 1)
    targets: tuple[str, ...] = DEFAULT_TARGETS
    samples: int = 64
    seq_len: int = 256
    batch_size: int = 8
    normalization: str = "peft"
    method: str = "fast"
    damping_screen: bool = True
    rslora: bool = False
    dynamic: bool = False
    rounds: int = 5
    quantize: str = "none"
    out: str = "corda-out"
    progress: bool = True
    verify_tokens: int = 64

    def lora_alpha(self) -> float:
        return float(self.rank if self.alpha is None else self.alpha)


@dataclass
class Report:
    options: dict
    stages: dict[str, float] = field(default_factory=dict)
    peak_rss_mib: float = 0.0
    layers: dict[str, dict] = field(default_factory=dict)
    verify: dict[str, Any] = field(default_factory=dict)
    outputs: dict[str, str] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    files_sha256: dict[str, str] = field(default_factory=dict)  # what the report describes, by content


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@contextmanager
def stage(report: Report, name: str):  # noqa: ANN201
    t0 = time.perf_counter()
    yield
    report.stages[name] = round(time.perf_counter() - t0, 3)


def lora_config(
    opts: InitOptions,
    *,
    corda: bool = True,
    rank_pattern: dict | None = None,
    alpha_pattern: dict | None = None,
    targets: list[str] | None = None,
    scope: str | None = None,
):  # noqa: ANN201
    """PEFT's ``LoraConfig`` for the run: ``targets`` (exact module names) or ``opts.targets`` (name
    suffixes), the latter only inside the module ``scope`` (a vision-language model's language model)
    when given."""
    from peft import LoraConfig
    from peft.tuners.lora.config import CordaConfig

    kw: dict[str, Any] = {}
    if corda:
        kw = {"init_lora_weights": "corda", "corda_config": CordaConfig(corda_method=opts.mode)}
    return LoraConfig(
        r=opts.rank,
        lora_alpha=opts.lora_alpha(),
        target_modules=list(targets) if targets else scoped_targets(opts.targets, scope),
        use_rslora=opts.rslora,
        rank_pattern=dict(rank_pattern or {}),
        alpha_pattern=dict(alpha_pattern or {}),
        **kw,
    )


def scoped_targets(suffixes: tuple[str, ...], scope: str | None) -> list[str] | str:
    """PEFT's ``target_modules`` for module-name ``suffixes``: the list itself, or inside ``scope``
    a regular expression (PEFT matches a string in full) over the modules below it."""
    if scope is None:
        return list(suffixes)
    names = "|".join(re.escape(t) for t in suffixes)
    return rf"{re.escape(scope)}\.(?:.*\.)?(?:{names})"


def covariance_meta(
    opts: InitOptions, model: nn.Module, targets: dict[str, nn.Module], ids: torch.Tensor, rounds: int
) -> dict[str, Any]:
    """What the covariances depend on, by content: the model's weights (every parameter, sampled:
    :func:`~corda_kernels.engine.cache.fingerprint_tensors`), the calibration tokens, and the settings
    that change the sums. Paths are no part of it: the same model or text under another path is the
    same input, and new weights or text under the same path are not."""
    return {
        "model_weights": cache.fingerprint_model(model),
        "tokens": cache.fingerprint_ids(ids),
        "normalization": opts.normalization,
        "rounds": rounds,
        "in_features": {name: in_features(m) for name, m in targets.items()},
    }


COVARIANCE_FILE = "covariance.pt"


def shard_name(rank: int, world: int) -> str:
    """The covariance cache file of rank ``rank`` of ``world`` (its share of the covariances)."""
    return f"covariance.rank{rank}-of-{world}.pt"


def shard_sets(out: Path) -> dict[int, list[Path]]:
    """The complete sets of covariance shards in ``out``, by their number of ranks."""
    found: dict[int, set[int]] = {}
    for path in out.glob("covariance.rank*-of-*.pt"):
        match = re.fullmatch(r"covariance\.rank(\d+)-of-(\d+)\.pt", path.name)
        if match:
            found.setdefault(int(match[2]), set()).add(int(match[1]))
    return {w: [out / shard_name(r, w) for r in range(w)] for w, got in found.items() if got == set(range(w))}


def load_or_calibrate(  # noqa: ANN201
    model,
    targets,
    ids,
    opts: InitOptions,
    out: Path,
    meta: dict,
    rounds: int = 1,  # noqa: ANN001
) -> stages.Covariances:
    """The covariances of the targets (``{name: C}``, shared tensors for shared inputs; with rounds > 1
    the candidates ``{name: (K, n, n)}``): read from the cache in ``out`` when it matches ``meta``,
    else calibrated and cached.

    One process, or CorDA++ on several (planning it reads every covariance), keeps them all in
    ``covariance.pt``, written by rank 0. Otherwise each of N ranks keeps only the covariances of the
    layers it will decompose (``owners``): each is summed onto that rank alone, which caches its
    share in ``covariance.rank<r>-of-<N>.pt``. A rerun on N ranks reads its own share; any other
    run reads whichever complete cache is there (one machine, or a shared file system).
    """
    rank, world = distributed.rank_and_world()
    share_out = world > 1 and rounds == 1
    stored = _read_covariance_cache(out, meta, share_out, opts.progress)
    if stored is not None:
        return stored
    got = stages.collect(
        model,
        targets,
        ids,
        normalization=opts.normalization,
        rounds=rounds,
        batch_size=opts.batch_size,
        progress=opts.progress,
        shard=(rank, world) if world > 1 else None,
        share_out=share_out,
    )
    if share_out:
        kept = [shard_name(r, world) for r in range(world)]
        data = {"covariances": got.covariances, "candidates": {}, "owners": got.owners}
        cache.save_atomic(out / kept[rank], "covariance", {**meta, "shard": [rank, world]}, data)
    else:
        kept = [COVARIANCE_FILE]
        if rank == 0:
            cache.save_atomic(out / COVARIANCE_FILE, "covariance", meta, {"covariances": got.covariances,
                                                                          "candidates": got.candidates})  # fmt: skip
    if world > 1:
        torch.distributed.barrier()  # every share written before rank 0 tidies up
    if rank == 0:  # caches of other settings or rank counts would only be read instead of this one
        for path in [out / COVARIANCE_FILE, *(p for paths in shard_sets(out).values() for p in paths)]:
            if path.name not in kept:
                path.unlink(missing_ok=True)
    return got


def _read_covariance_cache(out: Path, meta: dict, share_out: bool, progress: bool) -> stages.Covariances | None:
    """What :func:`load_or_calibrate` finds cached, the same decision on every rank; ``None``: calibrate."""
    rank, world = distributed.rank_and_world()
    full = out / COVARIANCE_FILE
    sets = shard_sets(out)
    if world > 1:
        distributed.check_same(
            (cache.exists(full), sorted(sets)), f"the covariance caches in {out} (resuming needs them on every rank)"
        )
    own = share_out and world in sets and not cache.exists(full)
    if own:
        paths = [sets[world][rank]]
    elif cache.exists(full):
        paths = [full]
    elif sets:
        paths = sets[min(sets)]
    else:
        return None
    parts: list[dict] | None = []
    try:
        for path in paths:
            m = re.fullmatch(r"covariance\.rank(\d+)-of-(\d+)\.pt", path.name)
            expect = meta if m is None else {**meta, "shard": [int(m[1]), int(m[2])]}
            parts.append(cache.load_checked(path, "covariance", expect))
    except cache.CacheMismatchError as err:  # other weights, tokens or settings: calibrate anew
        parts = None
        if progress and rank == 0:
            print(f"corda-kernels init: recalibrating: {err}", file=sys.stderr)
    if world > 1 and not all(distributed.all_gather(parts is not None)):
        return None
    if parts is None:
        return None
    covs = {name: C for part in parts for name, C in part["covariances"].items()}
    cands = {name: K for part in parts for name, K in part["candidates"].items()}
    return stages.Covariances(covs, cands, parts[0]["owners"] if own else None)


@dataclass
class Inputs:
    """What :func:`check_inputs` found: everything the job reads, read and checked before it starts."""

    model_dir: Path
    targets: tuple[str, ...]  # module-name suffixes, PEFT's matching ("all-linear" resolved)
    ids: torch.Tensor  # (samples, seq_len) calibration token ids
    tokenizer: Any
    scope: str | None = None  # a vision-language model's language model: the targets lie below it


def check_inputs(opts: InitOptions) -> Inputs:
    """Every argument checked before the model's weights are loaded or any file is written.

    Each failure is a ``ValueError`` naming the argument: numbers out of range, a model directory
    transformers cannot read, ``--data`` that is not UTF-8 text or too short for
    ``--samples × --seq-len``, ``--targets`` that match no ``nn.Linear`` / ``Conv1D`` of the model
    (read from its config on the meta device: no weights), a ``--rank`` larger than a target layer.
    """
    for flag, value, low in (("--rank", opts.rank, 1), ("--samples", opts.samples, 1), ("--seq-len", opts.seq_len, 1),
                             ("--batch-size", opts.batch_size, 1), ("--rounds", opts.rounds, 1)):  # fmt: skip
        if not isinstance(value, int) or value < low:
            raise ValueError(f"{flag} must be an integer ≥ {low}, got {value!r}")
    if opts.dynamic and opts.rounds < 2:
        raise ValueError(f"--rounds must be ≥ 2 with --dynamic (CorDA++ selects among the rounds), got {opts.rounds}")
    if opts.alpha is not None and not (math.isfinite(opts.alpha) and opts.alpha > 0):
        raise ValueError(f"--alpha must be a positive number, got {opts.alpha!r}")
    for flag, value, allowed in (("--mode", opts.mode, ("ipm", "kpm")), ("--quantize", opts.quantize, ("none", "nf4")),
                                 ("--normalization", opts.normalization, ("peft", "mean")),
                                 ("--method", opts.method, ("exact", "fast"))):  # fmt: skip
        if value not in allowed:
            raise ValueError(f"{flag} must be one of {', '.join(allowed)}, got {value!r}")
    out = Path(opts.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} exists and is not a directory")
    text = data.load_text(opts.data)  # a file: strict UTF-8 (data.load_text names the byte that is not)

    from transformers import AutoConfig, AutoTokenizer

    model_dir = data.model_dir(opts.model)
    try:
        config = AutoConfig.from_pretrained(model_dir)
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    except Exception as err:  # noqa: BLE001  (transformers raises many kinds; all mean the same here)
        raise ValueError(
            f"--model {model_dir}: not a loadable transformers model directory ({first_line(err)})"
        ) from err
    try:
        with torch.device("meta"):
            skeleton = data.model_class(config).from_config(config)
        scope = data.language_scope(skeleton)
    except Exception as err:  # noqa: BLE001
        raise ValueError(
            f"--model {model_dir}: transformers cannot build a causal LM or a vision-language model from its "
            f"config ({first_line(err)})"
        ) from err
    layers = linear_layers(skeleton, scope)
    suffixes = sorted({name.rsplit(".", 1)[-1] for name in layers})
    targets = tuple(suffixes) if tuple(opts.targets) == (ALL_LINEAR,) else tuple(opts.targets)
    # the very layers the run will adapt, by PEFT's own matching (engine.layers.target_modules)
    chosen = target_modules(skeleton, lora_config(replace(opts, targets=targets), scope=scope)) if targets else {}
    unmatched = [t for t in targets if not any(n == t or n.endswith("." + t) for n in chosen)]
    if unmatched or not chosen:
        raise ValueError(
            f"--targets {','.join(unmatched) or '(empty)'} matched no nn.Linear / Conv1D of the "
            f"{'model' if scope is None else f'language model ({scope}) of this vision-language model'}; "
            f"its layers are named {', '.join(suffixes)} (or use {ALL_LINEAR})"
        )
    smallest = min(chosen.items(), key=lambda kv: min(linear_weight(kv[1]).shape))
    k = min(linear_weight(smallest[1]).shape)
    if opts.rank > k:
        raise ValueError(f"--rank {opts.rank} is larger than layer {smallest[0]} allows (min(m, n) = {k})")
    try:
        ids = data.token_blocks(tokenizer, text, opts.samples, opts.seq_len)
    except ValueError as err:
        raise ValueError(f"--data {opts.data}: {err}") from err
    return Inputs(model_dir, targets, ids, tokenizer, scope)


def linear_layers(model: nn.Module, scope: str | None = None) -> dict[str, nn.Module]:
    """Every ``nn.Linear`` / ``Conv1D`` of ``model`` but its output head (PEFT's "all-linear" set),
    only those below the module ``scope`` when given."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return {
        name: m
        for name, m in model.named_modules()
        if (isinstance(m, nn.Linear) or is_conv1d(m))
        and m is not head
        and (scope is None or name.startswith(scope + "."))
    }


def first_line(err: BaseException, *, with_type: bool = True) -> str:
    """The first line of ``err``'s message, after its type name unless ``with_type`` is false."""
    text = str(err).strip().splitlines()
    line = text[0] if text else ""
    return f"{type(err).__name__}: {line}".rstrip(": ") if with_type else line


VERIFY_TOLERANCE = 1e-3  # logits after init against before, relative: beyond it the output is not moved into place


def run_init(opts: InitOptions) -> Report:
    """The whole job; returns (and writes) the report.

    Nothing is written before every argument is checked (:func:`check_inputs`). The run holds a
    lock beside ``--out`` (a second run on the same ``--out`` refuses) and writes into
    ``.<out>.partial/`` beside it, which also keeps the resumable state (covariances, finished
    layers). Only a complete, verified output replaces ``--out``, as a whole, by two renames
    (:func:`publish`): ``--out`` always holds either the previous complete output or the new one.
    Under ``torch.distributed`` with several ranks (``torchrun``, see :func:`~corda_kernels.engine.
    distributed.group_from_env`) every rank loads the model and calibrates its share of the samples
    (the sums added over the ranks), the layers' decompositions are shared out by cost, and rank 0
    alone holds the lock, builds the adapters, writes, verifies and publishes; ``report.json``
    records each rank's stages. A resumed run reads its covariance cache from the same path on
    every rank (one machine, or a shared file system).
    """
    inputs = check_inputs(opts)
    opts = replace(opts, targets=inputs.targets)
    out = Path(opts.out)
    rank, world = distributed.rank_and_world()
    if rank != 0:
        if not distributed.broadcast_object(None):
            raise RuntimeError(f"rank 0 could not take the lock on --out {out}; this rank stops too")
        return _run_locked(opts, inputs, out)
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(output_lock(out))
        except BaseException:
            if world > 1:
                distributed.broadcast_object(False)
            raise
        if world > 1:
            distributed.broadcast_object(True)
        return _run_locked(opts, inputs, out)


def _run_locked(opts: InitOptions, inputs: Inputs, out: Path) -> Report:
    rank, world = distributed.rank_and_world()
    lead = rank == 0
    work = staging_dir(out)
    if lead:
        recover(out)
        work.mkdir(parents=True, exist_ok=True)
        for cached in out.glob("covariance*.pt") if out.is_dir() else []:  # resume from the last output
            if not (work / cached.name).exists():
                shutil.copy2(cached, work / cached.name)
    report = Report(options=asdict(opts))

    with stage(report, "load"):
        model, tokenizer = data.load_model(str(inputs.model_dir))
        ids = inputs.ids
        targets = target_modules(model, lora_config(opts, scope=inputs.scope))
        probe = ids[:1, : opts.verify_tokens]
        if lead:
            with torch.inference_mode():
                logits_before = model(probe).logits.float()
    fault_point("load")
    if not lead:
        opts = replace(opts, progress=False)

    rounds = opts.rounds if opts.dynamic else 1
    with stage(report, "calibrate"):
        key = covariance_meta(opts, model, targets, ids, rounds)
        calibration = load_or_calibrate(model, targets, ids, opts, work, key, rounds)
        held = {id(C): C for C in calibration.covariances.values()}
        report.extra["covariances_held_mib"] = round(sum(C.nbytes for C in held.values()) / 2**20, 3)
    fault_point("calibrate")

    with stage(report, "corda++") if opts.dynamic else contextlib.nullcontext():
        chosen = stages.plan(
            targets,
            calibration,
            rank=opts.rank,
            alpha=opts.lora_alpha(),
            mode=opts.mode,
            dynamic=opts.dynamic,
            rslora=opts.rslora,
            progress=opts.progress,
        )
    covs, ranks, alphas = chosen.covariances, chosen.ranks, chosen.alphas
    if opts.dynamic:
        report.extra["corda++"] = chosen.report
    targets = {name: m for name, m in targets.items() if ranks[name] > 0}
    if not targets:
        raise ValueError("CorDA++ left every target layer at rank 0: nothing to adapt (raise --rank)")
    check_ranks(targets, ranks)

    with stage(report, "decompose"):
        adapters = decompose_into(model, targets, covs, ranks, alphas, opts, work, report, key, calibration.owners)
    fault_point("decompose")
    if world > 1:
        held_mib = report.extra["covariances_held_mib"]
        report.extra["ranks"] = distributed.all_gather(
            {"rank": rank, "stages": dict(report.stages), "covariances_held_mib": held_mib}
        )
        if not lead:
            return report

    with stage(report, "export"):
        peft_model = export(model, tokenizer, targets, adapters, ranks, alphas, opts, work, report, final=out)
    fault_point("export")

    with stage(report, "verify"), torch.inference_mode():
        logits_after = peft_model(probe).logits.float()
        err = float((logits_after - logits_before).norm() / logits_before.norm())
        report.verify = {"tokens": int(probe.numel()), "logits_rel_err": err}
    if not err < VERIFY_TOLERANCE:
        raise RuntimeError(
            f"after init the logits differ from the original model's by {err:.3g} (relative) > {VERIFY_TOLERANCE}: "
            f"the output was not moved into {out} (it is in {work})"
        )
    report.peak_rss_mib = round(peak_rss_mib(), 1)
    (work / ".partial.pt").unlink(missing_ok=True)
    report.files_sha256 = output_hashes(work)
    write_report(report, work)
    fault_point("verify")
    publish(work, out)
    return report


def staging_dir(out: Path) -> Path:
    return out.parent / f".{out.name}.partial"


def _previous(out: Path) -> Path:
    return out.parent / f".{out.name}.previous"


@contextlib.contextmanager
def output_lock(out: Path) -> Iterator[None]:
    """An exclusive lock on ``.<out>.lock`` beside ``out``; a second holder refuses at once."""
    import fcntl  # noqa: PLC0415  (POSIX; the lock is advisory between corda-kernels runs)

    out.parent.mkdir(parents=True, exist_ok=True)
    path = out.parent / f".{out.name}.lock"
    with open(path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ValueError(f"--out {out}: another corda-kernels init is writing it (lock {path})") from None
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def recover(out: Path) -> None:
    """Finish what a run killed inside :func:`publish` left: the previous output back in place, or removed."""
    previous = _previous(out)
    if previous.exists():
        if out.exists():
            shutil.rmtree(previous)
        else:
            os.replace(previous, out)


def publish(work: Path, out: Path) -> None:
    """Move the complete output ``work`` into ``out``: the old ``out`` aside, ``work`` in, the old one removed."""
    previous = _previous(out)
    if out.exists():
        os.replace(out, previous)
    fault_point("publish")
    os.replace(work, out)
    if previous.exists():
        shutil.rmtree(previous)


def fault_point(name: str) -> None:
    """Fault injection for the tests: ``CORDA_KERNELS_FAULT=<name>`` kills the process here (SIGKILL)."""
    if os.environ.get("CORDA_KERNELS_FAULT") == name:
        os.kill(os.getpid(), signal.SIGKILL)


def decompose_into(  # noqa: ANN201
    model, targets, covs, ranks, alphas, opts: InitOptions, out: Path, report: Report, key: dict,  # noqa: ANN001
    owners: dict[str, int] | None = None,
):  # fmt: skip
    """Per layer: CO-SVD, adapters, residual written into the model in place. Resumable.

    Several ranks share the layers out by cost; ``owners`` (each layer's rank) when the covariances
    were shared out that way already (each rank holds only its own)."""
    partial = out / ".partial.pt"
    meta = {
        "mode": opts.mode,
        "ranks": ranks,
        "alphas": alphas,
        "method": opts.method,
        "rslora": opts.rslora,
        "covariance": key,
    }
    rank, world = distributed.rank_and_world()
    done: dict[str, dict] = {}
    if rank == 0 and cache.exists(partial):
        try:
            done = cache.load_checked(partial, "partial-adapters", meta)
        except cache.CacheMismatchError:
            done = {}
    finished = set(done) if world == 1 else set(distributed.broadcast_object(sorted(done)))
    adapters: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for name, item in done.items():
        W = linear_weight(targets[name])
        stages.set_residual(targets[name], (W.float() - item["scaling"] * (item["B"] @ item["A"])).to(W.dtype))
        adapters[name] = (item["A"], item["B"])
        report.layers[name] = item["info"]
    todo = {name: m for name, m in targets.items() if name not in finished}
    mine = todo
    if world > 1:
        owners = {n: owners[n] for n in todo} if owners is not None else layer_owners(todo, covs, world)
        mine = {name: m for name, m in todo.items() if owners[name] == rank}
    layers = stages.decompose(
        mine,
        covs,
        ranks,
        opts.mode,
        method=opts.method,
        screen=opts.damping_screen,
        progress=opts.progress,
        world=world,
    )
    if world > 1:  # every rank's share gathered (a collective); rank 0 alone builds the adapters
        layers = share_results(layers, todo, ranks, owners)
        if rank != 0:
            layers = []
    last_save = time.perf_counter()
    for res in layers:
        s = lora_scaling(alphas[res.name], ranks[res.name], opts.rslora)
        A, B, row = stages.build(targets[res.name], res, s, opts.mode)
        adapters[res.name] = (A, B)
        report.layers[res.name] = {**row, "alpha": alphas[res.name]}
        done[res.name] = {"A": A, "B": B, "scaling": s, "info": report.layers[res.name]}
        if time.perf_counter() - last_save > 20:
            cache.save_atomic(partial, "partial-adapters", meta, done)
            last_save = time.perf_counter()
    return adapters


def export(
    model, tokenizer, targets, adapters, ranks, alphas, opts: InitOptions, out: Path, report: Report, final: Path
):  # noqa: ANN001, ANN201, E501
    """Residual model, PEFT adapter directory (and NF4 residuals); returns the PEFT model (for verification)."""
    if opts.quantize == "nf4":
        stages.save_nf4_residual(targets, out / "residual_nf4.safetensors")
        report.outputs["residual_nf4"] = str(final / "residual_nf4.safetensors")
    rank_pattern = {name: r for name, r in ranks.items() if name in targets and r != opts.rank}
    alpha_pattern = {name: a for name, a in alphas.items() if name in targets and a != opts.lora_alpha()}
    # Exact module names as targets: layers that CorDA++ left at rank 0 get no adapter.
    cfg = lora_config(
        opts, corda=False, rank_pattern=rank_pattern, alpha_pattern=alpha_pattern, targets=sorted(targets)
    )
    peft_model = stages.export(model, tokenizer, adapters, cfg, out, base_model=(final / "residual").resolve())
    report.outputs.update({"residual": str(final / "residual"), "adapter": str(final / "adapter")})
    return peft_model


def _json_safe(value: Any) -> Any:
    """``value`` with every non-finite float (an estimate that had no history yet) as ``None``:
    strict JSON has no ``Infinity``/``NaN``, which Python's ``json`` would otherwise write."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def write_report(report: Report, out: Path) -> Path:
    return cache.write_json_atomic(
        out / "report.json", _json_safe(asdict(report)), indent=2, default=str, allow_nan=False
    )
