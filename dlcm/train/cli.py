"""The LightningCLI behind ``dlcm fit`` / ``dlcm validate``: recipe links, checkpointing defaults, atomic writes.

Recipes are YAML files for LightningCLI (``--config`` may be given several times and composes in order; OmegaConf
interpolation is enabled). Arguments that must agree are linked rather than repeated: the tokenizer's vocabulary
size (known once the data module has read its manifest) fills ``model.config.vocab_size``, and the model's
``context_length`` sets the data packer's ``max_seq_len``. ``global_batch.tokens`` fixes the optimizer step in tokens:
the trainer's gradient accumulation is derived from it for the world size of the launch.
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import TensorBoardLogger

from dlcm.callbacks.boundary_stats import BoundaryStats
from dlcm.callbacks.throughput import FlopsThroughput
from dlcm.data.datamodule import PackedDataModule
from dlcm.train.checkpoint_io import AtomicCheckpointIO
from dlcm.train.global_batch import GlobalBatch, apply_global_batch
from dlcm.train.lightning_modules import LanguageModelModule


class DLCMCLI(LightningCLI):
    """LightningCLI with dlcm's links, checkpointing defaults and atomic checkpoint writes."""

    def add_arguments_to_parser(self, parser: Any) -> None:
        parser.link_arguments("data.vocab_size", "model.init_args.config.vocab_size", apply_on="instantiate")
        parser.link_arguments("model.init_args.context_length", "data.max_seq_len")
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults(
            {
                "checkpoint.filename": "step{step:07d}-val_loss{val/loss:.4f}",
                "checkpoint.auto_insert_metric_name": False,
                "checkpoint.monitor": "val/loss",
                "checkpoint.mode": "min",
                "checkpoint.save_last": True,
                "checkpoint.save_top_k": 1,
            }
        )
        parser.add_lightning_class_args(LearningRateMonitor, "lr_monitor")
        parser.set_defaults({"lr_monitor.logging_interval": "step"})
        parser.add_lightning_class_args(BoundaryStats, "boundary_stats")
        parser.add_lightning_class_args(FlopsThroughput, "throughput")
        parser.add_class_arguments(GlobalBatch, "global_batch")

    def _instantiate_trainer(self, config: dict[str, Any], callbacks: list) -> Any:
        plugins = config.get("plugins") or []
        plugins = plugins if isinstance(plugins, list) else [plugins]
        if not any(hasattr(p, "save_checkpoint") for p in plugins):
            plugins.append(AtomicCheckpointIO())
        config["plugins"] = plugins
        if config.get("logger") is False:  # LearningRateMonitor refuses to run without a logger
            callbacks = [c for c in callbacks if not isinstance(c, LearningRateMonitor)]
        trainer = super()._instantiate_trainer(config, callbacks)
        apply_global_batch(trainer, self._get(self.config_init, "global_batch"), self.datamodule.tokens_per_batch)
        return trainer

    def after_fit(self) -> None:
        trainer = self.trainer
        if not trainer.is_global_zero:
            return
        ckpt = trainer.checkpoint_callback
        log_dir = trainer.logger.log_dir if trainer.logger else None
        lines = ["", "dlcm fit finished."]
        if log_dir:
            lines.append(f"  TensorBoard logs: {log_dir}")
            lines.append(f"  view them with:   tensorboard --logdir {trainer.logger.save_dir}")
        if ckpt is not None and ckpt.last_model_path:
            lines.append(f"  last checkpoint:  {ckpt.last_model_path}")
        if ckpt is not None and ckpt.best_model_path:
            # A run resumed into a new directory without validating keeps the path but may have no score.
            score = "" if ckpt.best_model_score is None else f" (val/loss {float(ckpt.best_model_score):.4f})"
            lines.append(f"  best checkpoint:  {ckpt.best_model_path}{score}")
        print("\n".join(lines))


def run_cli(args: list[str] | None = None, run: bool = True) -> DLCMCLI:
    """Build (and by default run) the CLI; ``args`` replaces ``sys.argv[1:]`` (tests call it directly)."""
    return DLCMCLI(
        LanguageModelModule,
        PackedDataModule,
        subclass_mode_model=True,
        args=args,
        run=run,
        parser_kwargs={"parser_mode": "omegaconf"},
        trainer_defaults={
            "logger": {
                "class_path": f"{TensorBoardLogger.__module__}.{TensorBoardLogger.__name__}",
                "init_args": {"save_dir": "runs", "name": "dlcm"},
            },
        },
        save_config_kwargs={"overwrite": True},
        auto_configure_optimizers=False,
    )
