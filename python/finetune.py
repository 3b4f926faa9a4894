"""Recipe: fine-tune the adapters written by ``corda-kernels init`` (IPM, KPM or QCorDA).

    python python/finetune.py --out corda-out --data lee --steps 50

Loads ``OUT/residual`` (or, with ``--nf4``, replaces every adapted layer's weight by its NF4
residual from ``OUT/residual_nf4.safetensors`` through bitsandbytes' ``Linear4bit``), attaches
``OUT/adapter`` with PEFT as trainable, and trains the adapters on causal-LM loss over the text
with transformers' ``Trainer`` (``corda_kernels.finetune.train``), reporting held-out perplexity
before and after. Saves the trained adapter to ``OUT/adapter-trained``. The comparison with LoRA,
PiSSA, QLoRA and LoftQ is ``corda-kernels finetune`` (docs/finetuning.md).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from corda_kernels.engine import data
from corda_kernels.finetune.train import Schedule, perplexity, train


def load_nf4_residual(model: torch.nn.Module, path: Path) -> None:
    """Swap each adapted nn.Linear for a ``bnb.nn.Linear4bit`` holding our NF4 residual."""
    import bitsandbytes as bnb
    from safetensors.torch import load_file

    tensors = load_file(str(path))
    names = {k[: -len(".weight")] for k in tensors if k.endswith(".weight")}
    for name in names:
        parent, child = name.rsplit(".", 1)
        linear = model.get_submodule(name)
        q = bnb.nn.Linear4bit(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            compute_dtype=torch.float32,
            quant_type="nf4",
        )
        state = {k[len(name) + len(".weight.") :]: v for k, v in tensors.items() if k.startswith(name + ".weight.")}
        q.weight = bnb.nn.Params4bit.from_prequantized(tensors[name + ".weight"], state, device="cpu", module=q)
        if linear.bias is not None:
            q.bias = linear.bias
        setattr(model.get_submodule(parent), child, q)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="corda-out")
    p.add_argument("--data", default="lee")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--nf4", action="store_true", help="QCorDA: NF4 residual (needs init --quantize nf4)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = Path(args.out)
    model = AutoModelForCausalLM.from_pretrained(out / "residual")
    tokenizer = AutoTokenizer.from_pretrained(out / "residual")
    if args.nf4:
        load_nf4_residual(model, out / "residual_nf4.safetensors")
    model = PeftModel.from_pretrained(model, out / "adapter", is_trainable=True)
    model.print_trainable_parameters()
    n = args.steps * args.batch_size
    text = data.load_text(args.data)
    ids = data.token_blocks(tokenizer, text, n, args.seq_len, offset=0)
    held_out = data.token_blocks(tokenizer, text, 16, args.seq_len, offset=n)
    print(f"held-out perplexity before: {perplexity(model, held_out):.3f}")
    schedule = Schedule(steps=args.steps, batch_size=args.batch_size, lr=args.lr)
    losses = train(model, ids, schedule, seed=args.seed, out_dir=str(out / ".trainer"))
    print(f"loss {losses[0]:.4f} -> {losses[-1]:.4f}; held-out perplexity after: {perplexity(model, held_out):.3f}")
    model.save_pretrained(out / "adapter-trained")


if __name__ == "__main__":
    main()
