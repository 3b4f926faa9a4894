"""Fine-tuning with transformers' ``Trainer`` and held-out perplexity.

Every run shares the schedule: the same token blocks in the same order (the data order does not
depend on the seed: ``data_seed`` is fixed), the same learning-rate schedule, steps and batch size;
the seed changes only the methods' own randomness (LoRA's A, PiSSA's random projections).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.data import Dataset


@dataclass
class Schedule:
    steps: int = 30
    batch_size: int = 4
    lr: float = 2e-4
    full_lr: float = 2e-5  # full fine-tuning: the usual ten times lower rate
    warmup_ratio: float = 0.1
    scheduler: str = "cosine"
    data_seed: int = 1234


class Blocks(Dataset):
    """Causal-LM examples from token blocks ``(N, L)`` (labels = inputs; the model shifts them)."""

    def __init__(self, ids: torch.Tensor) -> None:
        self.ids = ids

    def __len__(self) -> int:
        return self.ids.shape[0]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


@torch.no_grad()
def perplexity(model: nn.Module, ids: torch.Tensor, batch_size: int = 8) -> float:
    """exp(mean token negative log-likelihood) of ``ids`` ``(N, L)`` under ``model``."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for batch in torch.split(ids, batch_size):
        batch = batch.to(device)
        logits = model(input_ids=batch).logits[:, :-1].float()
        nll = nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum"
        )
        total += float(nll)
        count += batch[:, 1:].numel()
    model.train(was_training)
    return math.exp(total / count)


def train(model: nn.Module, ids: torch.Tensor, schedule: Schedule, seed: int, *, full: bool = False,
          out_dir: str, progress: bool = True) -> list[float]:  # fmt: skip
    """Fine-tune ``model`` on ``ids`` for ``schedule.steps`` steps; returns the training loss per step."""
    from transformers import Trainer, TrainerCallback, TrainingArguments

    losses: list[float] = []

    class Record(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kw):  # noqa: ANN001, ANN003, ANN201
            if logs and "loss" in logs:
                losses.append(float(logs["loss"]))

    args = TrainingArguments(
        output_dir=out_dir,
        max_steps=schedule.steps,
        per_device_train_batch_size=schedule.batch_size,
        learning_rate=schedule.full_lr if full else schedule.lr,
        lr_scheduler_type=schedule.scheduler,
        warmup_steps=max(1, round(schedule.warmup_ratio * schedule.steps)),
        weight_decay=0.0,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        seed=seed,
        data_seed=schedule.data_seed,
        use_cpu=not torch.cuda.is_available(),
        bf16=torch.cuda.is_available(),
        disable_tqdm=not progress,
        dataloader_num_workers=0,
        remove_unused_columns=False,
    )
    trainer = Trainer(model=model, args=args, train_dataset=Blocks(ids), callbacks=[Record()])
    if not progress:  # without progress bars the Trainer prints every log line instead
        from transformers.trainer_callback import PrinterCallback

        trainer.remove_callback(PrinterCallback)
    trainer.train()
    return losses


def steps_to_reach(losses: list[float], level: float, window: int = 5) -> int | None:
    """First step whose trailing ``window``-step mean loss is at or below ``level`` (None if never)."""
    for i in range(len(losses)):
        lo = max(0, i - window + 1)
        if sum(losses[lo : i + 1]) / (i + 1 - lo) <= level:
            return i + 1
    return None
