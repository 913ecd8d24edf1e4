"""Meta-device materialisation the way Lightning and FSDP2 do it, and parameter counting."""

from __future__ import annotations

import torch
from torch import nn


def materialize(module: nn.Module, device: torch.device | str) -> nn.Module:
    """Allocate a meta-built module on ``device`` and run every submodule's own ``reset_parameters``.

    Each dlcm module initialises only the parameters it owns directly, so calling them all (in any order)
    reproduces an eager build's initialisation exactly in distribution.
    """
    module.to_empty(device=device)
    with torch.no_grad():
        for sub in module.modules():
            reset = getattr(sub, "reset_parameters", None)
            if callable(reset):
                reset()
    return module


def count_parameters(module: nn.Module, exclude_embeddings: bool = False) -> int:
    """Number of parameters; ``exclude_embeddings`` drops the input embedding table (the FLOPs convention)."""
    total = sum(p.numel() for p in module.parameters())
    if exclude_embeddings:
        total -= sum(p.numel() for name, p in module.named_parameters() if name.startswith("embed."))
    return total
