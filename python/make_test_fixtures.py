"""Regenerate ``tests/data/cosvd_real.safetensors``: real CO-SVD inputs from the embedded model.

Run: ``PYTHONPATH=. python python/make_test_fixtures.py``. Calibrates SmolLM2-135M (the embedded
model) on 8×256 tokens of the Lee corpus with :class:`corda_kernels.CovarianceCollector`
(PEFT normalization) and stores, as float16 (< 4 MB in all):

* ``C_attn`` ``(576, 576)``: the input covariance of layer ``LAYER``'s q/k/v, and ``W_q``
  ``(576, 576)``, its ``q_proj`` weight: a heavy head (``κ(W·C_fix)`` ≈ 1e8) and long tail.
* ``C_down`` ``(640, 640)``: a principal submatrix of the ``down_proj`` input covariance (the
  64 highest-variance channels, outliers included, plus 576 random others, in channel order),
  and ``W_down`` ``(576, 640)``, the matching columns of the ``down_proj`` weight.

Covariances are stored divided by ``C_attn_scale`` / ``C_down_scale`` (float32 scalars) so that
their largest entry is 2¹⁴, inside float16's normal range.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

LAYER = 0
OUT = ROOT / "tests" / "data" / "cosvd_real.safetensors"


def main() -> None:
    from corda_kernels import CovarianceCollector
    from corda_kernels.engine.data import load_model, load_text, token_blocks

    torch.manual_seed(0)
    model, tok = load_model()
    block = model.model.layers[LAYER]
    mods = {"q": block.self_attn.q_proj, "down": block.mlp.down_proj}
    col = CovarianceCollector(mods)
    ids = token_blocks(tok, load_text("lee"), 8, 256)
    with torch.no_grad(), col.attached():
        for i in range(0, 8, 4):
            model(ids[i : i + 4])
    C_attn = col.covariance("q")
    C_down_full = col.covariance("down")
    top = torch.topk(torch.diagonal(C_down_full), 64).indices
    rest = torch.tensor([i for i in torch.randperm(C_down_full.shape[0]).tolist() if i not in set(top.tolist())])
    idx = torch.cat([top, rest[:576]]).sort().values
    C_down = C_down_full[idx][:, idx]
    tensors = {}
    for name, C in (("C_attn", C_attn), ("C_down", C_down)):
        scale = C.abs().max() / 2.0**14
        tensors[name] = (C / scale).half().contiguous()
        tensors[f"{name}_scale"] = scale.reshape(1).float()
    tensors["W_q"] = mods["q"].weight.detach().half().contiguous()
    tensors["W_down"] = mods["down"].weight.detach()[:, idx].half().contiguous()
    OUT.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(OUT), metadata={"layer": str(LAYER), "source": "SmolLM2-135M, lee 8x256, peft norm"})
    print(f"wrote {OUT} ({OUT.stat().st_size / 2**20:.2f} MiB)")


if __name__ == "__main__":
    main()
