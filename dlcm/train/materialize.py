"""Meta-device materialisation, for plain and FSDP2-sharded modules, and parameter counting."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor


def children_first(module: nn.Module) -> Iterator[nn.Module]:
    """Post-order walk: a module after all its children — the order an eager build finishes ``__init__``s in."""
    for child in module.children():
        yield from children_first(child)
    yield module


def reset_full(module: nn.Module, reset: Callable[[], None]) -> None:
    """Run ``reset`` with every sharded parameter of ``module`` swapped for a full-size plain tensor, then keep each
    rank's shard of it.

    Random init of a DTensor draws per shard, and on a CPU mesh every rank draws the *same* numbers (rows repeat
    across shards). Drawing the full tensor — every rank holds the same RNG state after Lightning's seeding —
    gives the eager build's values whatever the world size.
    """
    sharded = {name: p for name, p in module.named_parameters(recurse=False) if isinstance(p, DTensor)}
    full = {name: torch.empty(p.shape, dtype=p.dtype, device=p.to_local().device) for name, p in sharded.items()}
    for name, tensor in full.items():
        setattr(module, name, nn.Parameter(tensor))
    try:
        reset()
    finally:
        for name, p in sharded.items():
            setattr(module, name, p)
    for name, p in sharded.items():
        shard = distribute_tensor(full[name], p.device_mesh, p.placements, src_data_rank=None)
        p.to_local().copy_(shard.to_local())


def materialize(module: nn.Module, device: torch.device | str) -> nn.Module:
    """Allocate a meta-built (possibly sharded) module on ``device`` and run every submodule's ``reset_parameters``.

    Each dlcm module initialises only the parameters it owns directly, at the end of its ``__init__``. Calling
    the resets children first therefore consumes the RNG in the eager build's order: with the same seed the
    materialised weights equal the eager ones exactly (μP stds and the router's identity init included).
    """
    module.to_empty(device=device)
    with torch.no_grad():
        for sub in children_first(module):
            reset = getattr(sub, "reset_parameters", None)
            if callable(reset):
                reset_full(sub, reset)
    return module


def count_parameters(module: nn.Module, exclude_embeddings: bool = False) -> int:
    """Number of parameters; ``exclude_embeddings`` drops the input embedding table (the FLOPs convention)."""
    total = sum(p.numel() for p in module.parameters())
    if exclude_embeddings:
        total -= sum(p.numel() for name, p in module.named_parameters() if name.startswith("embed."))
    return total
