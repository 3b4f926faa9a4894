"""Weights that accelerate keeps offloaded (``device_map`` with ``"cpu"`` / ``"disk"`` offload).

Such a module's parameters sit on the ``meta`` device between forwards; an ``AlignDevicesHook``
with ``offload=True`` on it, or on a block above it, loads them for each forward. CorDA reads
the weights outside a forward (the content key of the weights, the CO-SVD of each layer), so
:class:`Offload` finds the block that holds a layer's weights and loads it only for that read
(one block at a time: the offloaded model is never all in memory), and names the device a
layer runs on (where its adapters go). Without accelerate or without offloading, every read is
the module's own weight and nothing is loaded.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import torch
from torch import nn


def _offloading(module: nn.Module) -> bool:
    try:
        from accelerate.utils import has_offloaded_params
    except ImportError:  # without accelerate nothing is offloaded
        return False
    return has_offloaded_params(module)


class Offload:
    """The offloaded blocks of ``model`` (module name → module) and how to read through them."""

    def __init__(self, model: nn.Module) -> None:
        self.blocks = {name: m for name, m in model.named_modules() if _offloading(m)}

    def block_of(self, name: str) -> str | None:
        """The offloaded block holding module ``name``'s weights (itself or the nearest one above), if any."""
        parts = name.split(".")
        for end in range(len(parts), -1, -1):
            prefix = ".".join(parts[:end])
            if prefix in self.blocks:
                return prefix
        return None

    @contextlib.contextmanager
    def onloaded(self, names: Iterable[str]) -> Iterator[None]:
        """While inside, the weights of the modules ``names`` hold their values (their blocks loaded)."""
        blocks = sorted({b for b in map(self.block_of, names) if b is not None})
        if not blocks:
            yield
            return
        from accelerate.utils import align_module_device

        with contextlib.ExitStack() as stack:
            for b in blocks:
                stack.enter_context(align_module_device(self.blocks[b]))
            yield

    def device(self, name: str, module: nn.Module) -> torch.device:
        """Where module ``name`` runs: its weight's device, or its block's execution device when offloaded."""
        dev = module.weight.device
        block = self.block_of(name)
        if dev.type == "meta" and block is not None:
            return torch.device(self.blocks[block]._hf_hook.execution_device)
        return dev
