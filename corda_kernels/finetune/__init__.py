"""Fine-tuning recipes: the adapters against LoRA, PiSSA, QLoRA and LoftQ under one budget.

``methods`` builds each initialization on a fresh model, ``train`` fine-tunes it with
transformers' ``Trainer`` and measures held-out perplexity, ``experiments`` runs the three
experiments (knowledge preservation, convergence, quantized) over methods × seeds, resumable, and
draws their plots. The command line is ``corda-kernels finetune``.
"""
