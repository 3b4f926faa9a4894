"""Caches written atomically and validated on load.

A cache file is a ``torch.save`` of ``{"format": ..., "meta": {...}, "data": {...}}``. It is
written to a temporary file in the same directory and renamed into place, so an interrupted
run never leaves a half-written cache. On load the stored ``meta`` must equal what the
caller expects (method, ranks, normalization, shapes...), else :class:`CacheMismatchError`
says which field differs — a stale cache is never silently reused.
"""

from __future__ import annotations

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


def load_checked(path: str | os.PathLike, kind: str, expect: dict[str, Any]) -> dict[str, Any]:
    """Load a cache written by :func:`save_atomic`; every key of ``expect`` must match its ``meta``."""
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a truncated or foreign file
        raise CacheMismatchError(f"{path}: not a readable corda_kernels cache ({err})") from err
    if not isinstance(blob, dict) or blob.get("format") != FORMAT or blob.get("kind") != kind:
        raise CacheMismatchError(f"{path}: not a corda_kernels {kind} cache (a PEFT cache or another file?)")
    meta = blob["meta"]
    for key, want in expect.items():
        have = meta.get(key)
        if have != want:
            raise CacheMismatchError(
                f"{path}: cache was built with {key}={_short(have)}, this run has {key}={_short(want)}; "
                "delete the file or change the settings"
            )
    return blob["data"]


def exists(path: str | os.PathLike | None) -> bool:
    return path is not None and os.path.exists(path) and os.path.getsize(path) > 0


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) < 120 else text[:117] + "..."
