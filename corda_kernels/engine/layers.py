"""Model layers as CorDA sees them: the ``(out, in)`` weight of an ``nn.Linear`` or a transformers
``Conv1D``, its input width, and which modules a LoRA config targets (PEFT's own matching)."""

from __future__ import annotations

import torch
from torch import nn


def linear_weight(module: nn.Module) -> torch.Tensor:
    """The ``(out, in)`` weight of an ``nn.Linear`` or a transformers ``Conv1D`` (a view)."""
    w = module.weight
    return w.T if is_conv1d(module) else w


def is_conv1d(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def in_features(module: nn.Module) -> int:
    return linear_weight(module).shape[1]


def target_modules(model: nn.Module, lora_config) -> dict[str, nn.Module]:  # noqa: ANN001
    """The CorDA targets: modules matched by ``lora_config.target_modules`` that are ``nn.Linear`` or ``Conv1D``."""
    from peft.tuners.lora.model import LoraModel

    return {
        name: module
        for name, module in model.named_modules()
        if (isinstance(module, nn.Linear) or is_conv1d(module))
        and LoraModel._check_target_module_exists(lora_config, name)
    }
