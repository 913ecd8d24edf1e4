"""Resuming a run: finding its newest complete checkpoint (``--resume auto``) and the rules a resumed run obeys.

A checkpoint fixes what defines the run: the model's shape, the objective, the optimizer and the learning-rate
schedule, including its length (``ScheduleMultiplier`` keeps ``total_steps`` in the scheduler state). At resume,
command-line values are applied where they cannot change that run — data, logging, trainer limits, execution
(compile, activation checkpointing, attention kernels) — and refused with one line naming each difference where
they would. ``trainer.max_steps`` may differ from the checkpoint's only with ``--extend_run=true``, and only where
re-fitting the schedule to the new length leaves the learning rate at the resume step unchanged (warm-up, or the
flat phase of WSD); otherwise pin ``model.init_args.schedule.total_steps`` to the checkpoint's length.
"""

from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.utilities.load import _METADATA_FILENAME
from lightning.pytorch.callbacks import Callback

from dlcm.train.checkpoint_io import SHARD_INDEX, UNREADABLE
from dlcm.train.optim import lr_multiplier

# Names a resumable checkpoint has: dlcm's step saves, Lightning's `last` and its SLURM `hpc_ckpt_<n>`. Best-by-
# metric checkpoints are not resume targets (they are not the newest state).
RESUMABLE = re.compile(r"^(step\d+|last(-v\d+)?|hpc_ckpt_\d+)\.ckpt$")
# Hyper-parameters whose change at resume cannot alter the run (how it executes, which data it reads).
SAFE_HPARAMS = ("config.attn_backend", "config.cross.impl", "context_length", "execution")
RUN_STATE = "dlcm_run"  # the checkpoint key where the trainer's max_steps is kept


def checkpoint_metadata(path: Path) -> dict[str, Any]:
    """What a checkpoint holds besides its tensors' data (a file is memory-mapped, not read): its step,
    hyper-parameters and loop states; of a sharded checkpoint directory, its metadata file."""
    if path.is_dir():
        return torch.load(path / _METADATA_FILENAME, map_location="cpu", weights_only=False)
    return torch.load(path, map_location="cpu", weights_only=False, mmap=True)


def checkpoint_step(path: Path) -> int | None:
    """The ``global_step`` a complete checkpoint was saved at, or None if ``path`` is not one."""
    try:
        if path.is_dir() and not (path / SHARD_INDEX).is_file():
            return None
        return int(checkpoint_metadata(path)["global_step"])
    except (*UNREADABLE, OSError, KeyError, ValueError):
        return None


def newest_checkpoint(directories: list[Path]) -> tuple[Path, int] | None:
    """The complete resumable checkpoint with the highest step (then the newest) in ``directories``."""
    found = []
    for directory in directories:
        if not directory.is_dir():
            continue
        for path in directory.iterdir():
            if path.is_symlink() or not RESUMABLE.match(path.name):  # last.ckpt links to a step save
                continue
            step = checkpoint_step(path)
            if step is not None:
                found.append((step, path.stat().st_mtime_ns, path))
    if not found:
        return None
    step, _, path = max(found)
    return path, step


def flat(prefix: str, value: Any) -> dict[str, Any]:
    """Nested dataclasses/dicts as ``{"a.b.c": leaf}``."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            out.update(flat(f"{prefix}.{key}" if prefix else str(key), item))
        return out
    return {prefix: list(value) if isinstance(value, tuple) else value}


def refused_overrides(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """``name=now (checkpoint: saved)`` for every hyper-parameter that differs and would change the run."""
    old, new = flat("", dict(saved)), flat("", dict(now))
    out = []
    for key in sorted(set(old) | set(new)):
        if key.startswith("_") or key == "schedule.total_steps" or key.startswith(SAFE_HPARAMS):
            continue  # Lightning's bookkeeping; the schedule's length is checked against max_steps
        if old.get(key) != new.get(key):
            out.append(f"model.init_args.{key}={new.get(key)!r} (checkpoint: {old.get(key)!r})")
    return out


def check_settings(path: Path, hparams: dict[str, Any], subcommand: str) -> int:
    """Refuse the settings of this run (recipe and command line) that differ from what the checkpoint at ``path``
    fixes; return its step. ``--ckpt_path`` and ``--resume=auto`` both come here, before anything is loaded or
    logged, for ``validate`` as for ``fit``: every value either reaches the model or is refused, none is silently
    replaced by the checkpoint's."""
    meta = checkpoint_metadata(path)
    what = f"cannot resume from {path}" if subcommand == "fit" else f"cannot {subcommand} {path}"
    refuse_changed_settings(meta.get("hyper_parameters") or {}, hparams, what, new_run=subcommand == "fit")
    return int(meta.get("global_step", 0))


def refuse_changed_settings(saved: dict[str, Any], now: dict[str, Any], what: str, new_run: bool) -> None:
    """One line naming every hyper-parameter in ``now`` that differs from the checkpoint's ``saved`` and would
    change the run."""
    refused = refused_overrides(saved, now)
    if refused:
        raise ValueError(
            f"{what}: {'; '.join(refused)}. The model shape, objective, optimizer and schedule are fixed in a "
            "checkpoint: drop these values from the command line and recipe (the config.yaml of the checkpoint's run "
            "holds the ones it was trained with)" + (", or start a new run (--resume=never)" if new_run else "")
        )


class ResumeRules(Callback):
    """Keeps the trainer's ``max_steps`` in checkpoints and applies the rule on the run's length when ``fit``
    resumes, after refusing changed hyper-parameters (as :func:`check_settings` does before anything loads).

    Args:
        extend_run: allow ``trainer.max_steps`` to differ from the checkpoint's (the schedule follows it where
            that leaves the current learning rate unchanged).
    """

    def __init__(self, extend_run: bool = False) -> None:
        self.extend_run = extend_run

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        checkpoint[RUN_STATE] = {"max_steps": trainer.max_steps}

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        if trainer.state.fn != "fit":
            return
        # `dlcm fit` compared the settings before loading (check_settings); this covers a Trainer run directly.
        where = f"cannot resume from {trainer.ckpt_path}"
        refuse_changed_settings(checkpoint.get("hyper_parameters", {}), dict(pl_module.hparams), where, new_run=True)
        self._check_length(trainer, pl_module, checkpoint, where)

    def _check_length(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict, where: str) -> None:
        lambdas = (checkpoint.get("lr_schedulers") or [{}])[0].get("lr_lambdas") or [None]
        saved = lambdas[0] if isinstance(lambdas[0], dict) else None
        saved_max = checkpoint.get(RUN_STATE, {}).get("max_steps")
        if saved is None or saved_max is None:
            return  # written before the schedule's length was kept: nothing to compare with
        total_then, total_now = saved["total_steps"], pl_module.total_optimizer_steps()
        if saved_max == trainer.max_steps and total_then == total_now:
            return
        step = int(checkpoint["global_step"])
        if not self.extend_run:
            raise ValueError(
                f"{where}: trainer.max_steps={trainer.max_steps} differs from the checkpoint's {saved_max} "
                f"(its learning-rate schedule spans {total_then} steps). Resume with --trainer.max_steps={saved_max}, "
                "or pass --extend_run=true to change the run's length"
            )
        if trainer.max_steps != -1 and trainer.max_steps <= step:
            raise ValueError(
                f"{where}: trainer.max_steps={trainer.max_steps} is not beyond the checkpoint's step {step}"
            )
        cfg = pl_module.schedule_cfg
        lr_then, lr_now = lr_multiplier(cfg, step, total_then), lr_multiplier(cfg, step, total_now)
        if not math.isclose(lr_then, lr_now, rel_tol=1e-9):
            raise ValueError(
                f"{where}: fitting the schedule to {total_now} steps would change the learning rate at step {step} "
                f"from {lr_then:.4g} to {lr_now:.4g} × the peak. Keep the schedule with "
                f"--model.init_args.schedule.total_steps={total_then} (the rate stays at its end value after step "
                f"{total_then}), or start a new run"
            )
        for entry in lambdas:  # one per parameter group (the same multiplier): the scheduler restores each
            entry["total_steps"] = total_now
