"""A recipe's module rebuilt outside ``dlcm fit``, and a checkpoint's weights loaded into it (eval, generate, …)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch


def build_from_recipe(configs: list[str]) -> tuple[Any, Any]:
    """The LightningModule and the tokenizer a recipe describes, instantiated through the training CLI."""
    from dlcm.train.cli import run_cli

    # No logger: evaluation must not create run directories.
    cli = run_cli([f"--config={c}" for c in configs] + ["--trainer.logger=false"], run=False)
    return cli.model, cli.datamodule.tokenizer


def load_weights(module: torch.nn.Module, ckpt_path: str) -> int:
    """Load a Lightning checkpoint's ``state_dict``, naming shape mismatches and missing/unexpected keys.

    Returns the checkpoint's ``global_step`` (0 if absent), the step at which its evaluation is logged.
    """
    from dlcm.train.checkpoint_io import UNREADABLE, unreadable

    path = Path(ckpt_path)
    if path.is_dir():
        raise ValueError(
            f"checkpoint {path} is a directory: pass a .ckpt file (e.g. {path / 'checkpoints' / 'last.ckpt'}); a "
            "sharded checkpoint is merged into one first with `dlcm consolidate`"
        )
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {ckpt_path} does not exist (pass the .ckpt file that `dlcm fit` wrote)")
    try:
        # weights_only=False: Lightning checkpoints pickle the recipe's config dataclasses in their hyperparameters.
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
    except UNREADABLE as err:
        raise unreadable(path, err) from err
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise ValueError(f"{ckpt_path} has no 'state_dict': not a Lightning checkpoint of a dlcm model")
    if hasattr(module, "on_load_checkpoint"):
        module.on_load_checkpoint(ckpt)  # raises a ValueError that names mismatched shapes
    try:
        module.load_state_dict(ckpt["state_dict"], strict=True)
    except RuntimeError as err:
        raise ValueError(
            f"{ckpt_path} does not match the model of this recipe (use the recipe it was trained with): {err}"
        ) from err
    return int(ckpt.get("global_step", 0))
