"""What ``corda-kernels init`` leaves in ``--out``, read back: the file hashes its ``report.json``
records, and :func:`load_output`, the adapted model after checking them."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

OUTPUT_PARTS = ("adapter", "residual", "residual_nf4.safetensors")


def output_hashes(out: Path) -> dict[str, str]:
    """``{path relative to out: sha256}`` of every file of the adapter, the residual and the NF4 residual."""
    files = []
    for part in OUTPUT_PARTS:
        p = out / part
        files += sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else ([p] if p.is_file() else [])
    return {str(f.relative_to(out)): _sha256(f) for f in files}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_output(out: str | os.PathLike, *, verify: bool = True):  # noqa: ANN201
    """The adapted model of a ``corda-kernels init`` output: its adapter on its residual (a ``PeftModel``).

    With ``verify`` every file is first checked against the hashes ``report.json`` recorded; a
    file changed, added or missing since (a half-copied directory, another run's residual) is a
    ``ValueError`` naming it.
    """
    from peft import PeftModel
    from transformers import AutoConfig

    from .data import model_class

    out = Path(out)
    report_path = out / "report.json"
    if not report_path.is_file():
        raise ValueError(f"{out}: no report.json, not a complete corda-kernels init output")
    recorded = json.loads(report_path.read_text()).get("files_sha256") or {}
    if verify:
        if not recorded:
            raise ValueError(f"{report_path}: records no file hashes (written by an older corda-kernels)")
        found = output_hashes(out)
        bad = sorted(k for k in set(recorded) | set(found) if recorded.get(k) != found.get(k))
        if bad:
            raise ValueError(f"{out}: {', '.join(bad)} differ from what report.json describes")
    residual = model_class(AutoConfig.from_pretrained(out / "residual")).from_pretrained(out / "residual")
    return PeftModel.from_pretrained(residual, out / "adapter")
