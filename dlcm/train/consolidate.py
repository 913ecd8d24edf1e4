"""``dlcm consolidate``: a sharded checkpoint directory (``ModelParallelStrategy``/FSDP2) → one Lightning
checkpoint file that ``dlcm validate``/``fit --ckpt_path`` load on a single device, and optionally the network's
weights as ``safetensors``.

    dlcm consolidate runs/<recipe>/version_0/checkpoints/last.ckpt last-full.ckpt --safetensors last.safetensors

Lightning's ``_load_distributed_checkpoint`` reads every rank's shards into full tensors on the CPU (the whole
checkpoint must fit in host memory). Optimizer states come keyed by parameter name from
``get_optimizer_state_dict``; a plain ``torch.optim`` state dict numbers parameters in param-group order, so they
are re-keyed that way.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

# torch, Lightning and safetensors are imported by the functions that use them, after the command line is parsed:
# they take seconds to load, and `dlcm consolidate --help` needs none of them.
if TYPE_CHECKING:
    import torch

NETWORK_PREFIX = "network."  # the LightningModule's attribute holding the DLCM / baseline network


def optimizer_state_by_index(state: dict[str, Any]) -> dict[str, Any]:
    """A name-keyed optimizer state dict in ``torch.optim``'s format: ids in param-group order."""
    ids: dict[str, int] = {}
    groups = []
    for group in state["param_groups"]:
        groups.append({**group, "params": [ids.setdefault(name, len(ids)) for name in group["params"]]})
    return {"state": {ids[name]: value for name, value in state["state"].items()}, "param_groups": groups}


def consolidate(sharded: Path) -> dict[str, Any]:
    """The single-file Lightning checkpoint equal to the sharded checkpoint directory ``sharded``."""
    from lightning.fabric.utilities.load import _load_distributed_checkpoint

    from dlcm.train.checkpoint_io import UNREADABLE, require_sharded_checkpoint, unreadable

    require_sharded_checkpoint(sharded)
    try:
        checkpoint = _load_distributed_checkpoint(sharded)
    except UNREADABLE as err:
        raise unreadable(sharded, err) from err
    count = sum(1 for key in checkpoint if key.startswith("optimizer_") and key[len("optimizer_") :].isdigit())
    checkpoint["optimizer_states"] = [optimizer_state_by_index(checkpoint.pop(f"optimizer_{i}")) for i in range(count)]
    return checkpoint


def network_weights(checkpoint: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The network's tensors under its own parameter names (``DLCM(cfg).load_state_dict`` accepts them)."""
    return {
        name[len(NETWORK_PREFIX) :]: tensor.contiguous()
        for name, tensor in checkpoint["state_dict"].items()
        if name.startswith(NETWORK_PREFIX)
    }


def save_safetensors(weights: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    """Written under a temporary name and renamed, like every checkpoint here."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        save_file(weights, str(tmp), metadata=metadata)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dlcm consolidate", description="Sharded checkpoint directory -> single-file checkpoint (+ safetensors)."
    )
    parser.add_argument("sharded", type=Path, help="checkpoint directory written under ModelParallelStrategy")
    parser.add_argument("output", type=Path, help="single-file Lightning checkpoint to write (.ckpt)")
    parser.add_argument("--safetensors", type=Path, default=None, help="also write the network's weights here")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point for ``dlcm consolidate …``; returns the exit status (2 on a missing or unreadable input)."""
    args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
    from dlcm.train.checkpoint_io import AtomicCheckpointIO

    try:
        checkpoint = consolidate(args.sharded)
    except (FileNotFoundError, ValueError) as err:
        print(f"dlcm consolidate: error: {err}", file=sys.stderr)
        return 2
    AtomicCheckpointIO().save_checkpoint(checkpoint, args.output)
    print(f"wrote {args.output} (step {checkpoint.get('global_step')})")
    if args.safetensors is not None:
        weights = network_weights(checkpoint)
        save_safetensors(weights, args.safetensors, {"format": "pt", "global_step": str(checkpoint.get("global_step"))})
        print(f"wrote {args.safetensors} ({len(weights)} tensors)")
    return 0
