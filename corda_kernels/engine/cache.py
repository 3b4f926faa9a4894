"""Caches written atomically and validated on load.

A cache file is a ``torch.save`` of ``{"format": ..., "meta": {...}, "data": {...}}``. It is
written to a temporary file in the same directory and renamed into place, so an interrupted
run never leaves a half-written cache. On load the stored ``meta`` must equal what the
caller expects (method, ranks, normalization, shapes, and content keys of the weights and the
calibration tokens: :func:`fingerprint_tensors`, :func:`fingerprint_ids`), else
:class:`CacheMismatchError` says exactly what differs — a stale cache is never silently reused.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

FORMAT = "corda_kernels/1"


class CacheMismatchError(ValueError):
    """A cache file was built with other settings than the current run."""


def save_atomic(path: str | os.PathLike, kind: str, meta: dict[str, Any], data: dict[str, Any]) -> None:
    """Write ``data`` with ``meta`` to ``path`` atomically (temp file + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save({"format": FORMAT, "kind": kind, "meta": meta, "data": data}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(path: str | os.PathLike, obj: Any, **dump_kw: Any) -> Path:
    """Write ``obj`` as JSON to ``path`` atomically (temp file + rename), readable by all (0644)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, **dump_kw)
        os.chmod(tmp, 0o644)  # mkstemp makes it private
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_checked(path: str | os.PathLike, kind: str, expect: dict[str, Any]) -> dict[str, Any]:
    """Load a cache written by :func:`save_atomic`; every key of ``expect`` must match its ``meta``."""
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a truncated or foreign file
        raise CacheMismatchError(f"{path}: not a readable corda_kernels cache ({err})") from err
    if not isinstance(blob, dict) or blob.get("format") != FORMAT or blob.get("kind") != kind:
        raise CacheMismatchError(f"{path}: not a corda_kernels {kind} cache (a PEFT cache or another file?)")
    meta = blob["meta"]
    diff = [_difference(key, meta.get(key), want) for key, want in expect.items() if meta.get(key) != want]
    if diff:
        raise CacheMismatchError(
            f"{path}: cache was built with {'; '.join(diff)}; delete the file or change the settings"
        )
    return blob["data"]


def exists(path: str | os.PathLike | None) -> bool:
    return path is not None and os.path.exists(path) and os.path.getsize(path) > 0


def _difference(key: str, have: Any, want: Any) -> str:
    """What differs, whole: for maps, only the entries that differ (a long map is not cut short)."""
    if isinstance(have, dict) and isinstance(want, dict):
        diff = [
            f"{key}[{k!r}]={have.get(k, '<absent>')!r}, this run has {want.get(k, '<absent>')!r}"
            for k in sorted(set(have) | set(want), key=str)
            if have.get(k) != want.get(k)
        ]
        return "; ".join(diff)
    return f"{key}={have!r}, this run has {key}={want!r}"


def _sampled(name: str, t: torch.Tensor, samples: int) -> tuple[bytes, bytes]:
    """What the content key records of one tensor: its header and ``samples`` evenly spaced values."""
    flat = t.detach().reshape(-1)
    step = max(1, flat.numel() // samples)
    picked = flat[::step][:samples].to("cpu", torch.float64).contiguous()
    return f"{name}|{tuple(t.shape)}|{t.dtype}|".encode(), picked.numpy().tobytes()


def _key(entries: dict[str, tuple[bytes, bytes]]) -> str:
    h = hashlib.sha256()
    for name in sorted(entries):
        h.update(entries[name][0])
        h.update(entries[name][1])
    return h.hexdigest()


def fingerprint_tensors(tensors: dict[str, torch.Tensor], samples: int = 4096) -> str:
    """A content key of named tensors: names, shapes, dtypes and ``samples`` evenly spaced values of each.

    Cheap at any size (a strided gather, not a pass over every byte), and it changes with any
    retraining, fine-tuning or re-initialization of the weights, which move every sampled value.
    """
    return _key({name: _sampled(name, t, samples) for name, t in tensors.items()})


def fingerprint_model(model: torch.nn.Module, samples: int = 4096) -> str:
    """The content key of a model's weights: :func:`fingerprint_tensors` of every named parameter.

    Parameters that accelerate keeps offloaded are read one offloaded block at a time; the key is
    the one of the same weights held in memory.
    """
    from .offload import Offload

    entries = {n: _sampled(n, p, samples) for n, p in model.named_parameters() if p.device.type != "meta"}
    offload = Offload(model)
    for prefix, block in offload.blocks.items():
        with offload.onloaded([prefix]):
            for n, p in block.named_parameters():
                full = f"{prefix}.{n}" if prefix else n
                if full not in entries and p.device.type != "meta":
                    entries[full] = _sampled(full, p, samples)
    missing = [n for n, _ in model.named_parameters() if n not in entries]
    if missing:
        raise ValueError(f"parameter(s) {', '.join(missing[:5])} hold no data (on the meta device, not offloaded)")
    return _key(entries)


def fingerprint_ids(ids: torch.Tensor) -> str:
    """A content key of calibration token ids: every id, in order, and the shape."""
    h = hashlib.sha256(f"{tuple(ids.shape)}|".encode())
    h.update(ids.to("cpu", torch.int64).contiguous().numpy().tobytes())
    return h.hexdigest()
