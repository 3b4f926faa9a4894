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


def fingerprint_tensors(tensors: dict[str, torch.Tensor], samples: int = 4096) -> str:
    """A content key of named tensors: names, shapes, dtypes and ``samples`` evenly spaced values of each.

    Cheap at any size (a strided gather, not a pass over every byte), and it changes with any
    retraining, fine-tuning or re-initialization of the weights, which move every sampled value.
    """
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach()
        flat = t.reshape(-1)
        step = max(1, flat.numel() // samples)
        picked = flat[::step][:samples].to("cpu", torch.float64).contiguous()
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype}|".encode())
        h.update(picked.numpy().tobytes())
    return h.hexdigest()


def fingerprint_model(model: torch.nn.Module) -> str:
    """The content key of a model's weights: :func:`fingerprint_tensors` of every named parameter."""
    return fingerprint_tensors(dict(model.named_parameters()))


def fingerprint_ids(ids: torch.Tensor) -> str:
    """A content key of calibration token ids: every id, in order, and the shape."""
    h = hashlib.sha256(f"{tuple(ids.shape)}|".encode())
    h.update(ids.to("cpu", torch.int64).contiguous().numpy().tobytes())
    return h.hexdigest()
