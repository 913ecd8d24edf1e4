"""The LightningCLI behind ``dlcm fit`` / ``dlcm validate``: recipe links, checkpointing defaults, atomic writes,
run directories and auto-resume.

Recipes are YAML files for LightningCLI (``--config`` may be given several times and composes in order; OmegaConf
interpolation is enabled). Arguments that must agree are linked rather than repeated: the tokenizer's vocabulary
size (known once the data module has read its manifest) fills ``model.config.vocab_size``, and the model's
``context_length`` sets the data packer's ``max_seq_len``.

Run directories: TensorBoard logs and checkpoints go to ``runs/<name>/version_<n>``, ``<name>`` being
``--run_name`` or the recipe's file name. ``--resume=auto`` continues the newest version of that name: from its
newest complete checkpoint (see :mod:`dlcm.train.resume`) when it has one, in the same TensorBoard run, whose
events past the checkpoint's step are discarded.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Literal

from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities.rank_zero import rank_zero_info

from dlcm.callbacks.boundary_stats import BoundaryStats
from dlcm.callbacks.throughput import FlopsThroughput
from dlcm.data.datamodule import PackedDataModule
from dlcm.train import preemption
from dlcm.train.checkpoint_io import AtomicCheckpointIO
from dlcm.train.lightning_modules import LanguageModelModule
from dlcm.train.resume import ResumeRules, newest_checkpoint
from dlcm.train.step_checkpoint import StepCheckpoint, checkpoint_dir

DEFAULT_RUN_NAME = "dlcm"
# Lightning warns that a mid-epoch resume is inexact unless the DataLoader itself is stateful; PackedDataModule's
# state_dict carries the position and its next iterator starts there (tests/train/test_cli.py checks exactness).
NOT_RESUMABLE_WARNING = ".*dataloader is not resumable.*"


def run_name_of(configs: list[Any] | None) -> str:
    """The recipe's file name without extension: the first ``--config`` that is not a composable fragment."""
    paths = [Path(str(c)) for c in configs or []]
    recipes = [p for p in paths if p.parent.name != "fragments"]
    return recipes[0].stem if recipes else DEFAULT_RUN_NAME


class DLCMCLI(LightningCLI):
    """LightningCLI with dlcm's links, checkpointing defaults and atomic checkpoint writes."""

    def add_arguments_to_parser(self, parser: Any) -> None:
        parser.link_arguments("data.vocab_size", "model.init_args.config.vocab_size", apply_on="instantiate")
        parser.link_arguments("model.init_args.context_length", "data.max_seq_len")
        parser.add_argument(
            "--resume",
            type=Literal["auto", "never"],
            default="never",
            help="auto: continue the newest run directory of this run name from its newest complete checkpoint "
            "(start it if there is none); never: start a new version",
        )
        parser.add_argument(
            "--extend_run",
            type=bool,
            default=False,
            help="at resume, allow trainer.max_steps to differ from the checkpoint's (docs: recipes/README.md)",
        )
        parser.add_argument(
            "--run_name",
            type=str | None,
            default=None,
            help="directory name of the run under the logger's save_dir (default: the recipe's file name)",
        )
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults(
            {
                "checkpoint.filename": "step{step:07d}-val_loss{val/loss:.4f}",
                "checkpoint.auto_insert_metric_name": False,
                "checkpoint.monitor": "val/loss",
                "checkpoint.mode": "min",
                "checkpoint.save_last": False,  # last.ckpt: step_checkpoint's link to its newest save
                "checkpoint.save_top_k": 1,
            }
        )
        # After ModelCheckpoint: Lightning's `trainer.checkpoint_callback` (ckpt_path="best") is the first checkpoint
        # callback.
        parser.add_lightning_class_args(StepCheckpoint, "step_checkpoint")
        parser.add_lightning_class_args(LearningRateMonitor, "lr_monitor")
        parser.set_defaults({"lr_monitor.logging_interval": "step"})
        parser.add_lightning_class_args(BoundaryStats, "boundary_stats")
        parser.add_lightning_class_args(FlopsThroughput, "throughput")

    def before_instantiate_classes(self) -> None:
        config = self.config.get(str(self.subcommand), self.config)
        logger = config.get("trainer", {}).get("logger")
        init_args = getattr(logger, "init_args", None)
        if init_args is not None and logger.class_path.endswith("TensorBoardLogger") and init_args.name is None:
            init_args.name = config.get("run_name") or run_name_of(config.get("config"))

    def _instantiate_trainer(self, config: dict[str, Any], callbacks: list) -> Any:
        plugins = config.get("plugins") or []
        plugins = plugins if isinstance(plugins, list) else [plugins]
        if not any(hasattr(p, "save_checkpoint") for p in plugins):
            plugins.append(AtomicCheckpointIO())
        if SLURMEnvironment.detect() and not any(isinstance(p, SLURMEnvironment) for p in plugins):
            # Lightning's requeue saves from inside the SIGUSR1 handler; dlcm saves at the next step boundary and
            # the job script requeues (recipes/paper/slurm_*.sbatch).
            plugins.append(SLURMEnvironment(auto_requeue=False))
        config["plugins"] = plugins
        if config.get("logger") is False:  # LearningRateMonitor refuses to run without a logger
            callbacks = [c for c in callbacks if not isinstance(c, LearningRateMonitor)]
        callbacks = [*callbacks, ResumeRules(extend_run=bool(self._get(self.config, "extend_run", False)))]
        warnings.filterwarnings("ignore", message=NOT_RESUMABLE_WARNING)
        return super()._instantiate_trainer(config, callbacks)

    def resolve_resume(self) -> str | None:
        """With ``--resume=auto``: point the logger at the newest version of the run and return that version's
        newest complete checkpoint (None: start from scratch). An explicit ``--ckpt_path`` wins."""
        explicit = self._get(self.config, "ckpt_path")
        if self._get(self.config, "resume") != "auto" or explicit is not None:
            return explicit
        trainer = self.trainer
        logger = trainer.logger
        if isinstance(logger, TensorBoardLogger):
            versions = [
                int(p.name.split("_")[1])
                for p in Path(logger.root_dir).glob("version_*")
                if p.is_dir() and p.name.split("_")[1].isdigit()
            ]
            if versions and logger._version is None:
                logger._version = max(versions)  # the same TensorBoard run, before anything opens a new one
        step_checkpoint = next(c for c in trainer.callbacks if isinstance(c, StepCheckpoint))
        directory = step_checkpoint.dirpath or checkpoint_dir(trainer)
        found = newest_checkpoint([directory, Path(trainer.default_root_dir)])
        step = 0 if found is None else found[1]
        if isinstance(logger, TensorBoardLogger):
            # TensorBoard drops the events this run logged at steps >= purge_step in earlier event files: the
            # steps a killed process logged after its last checkpoint, which the resumed run logs again.
            logger._kwargs["purge_step"] = step
        if found is None:
            rank_zero_info(f"--resume=auto: no complete checkpoint in {directory}; starting the run there")
            return None
        rank_zero_info(f"--resume=auto: resuming from {found[0]} (step {step})")
        return str(found[0])

    def before_fit(self) -> None:
        preemption.install()  # a signal during start-up is acted on at the first step boundary
        self.config_init["fit"]["ckpt_path"] = self.resolve_resume()

    def after_fit(self) -> None:
        trainer = self.trainer
        if not trainer.is_global_zero:
            return
        ckpt = next((c for c in trainer.callbacks if isinstance(c, ModelCheckpoint)), None)
        log_dir = trainer.logger.log_dir if trainer.logger else None
        lines = ["", "dlcm fit finished."]
        if log_dir:
            lines.append(f"  TensorBoard logs: {log_dir}")
            lines.append(f"  view them with:   tensorboard --logdir {trainer.logger.save_dir}")
        step_checkpoint = next((c for c in trainer.callbacks if isinstance(c, StepCheckpoint)), None)
        if step_checkpoint is not None and step_checkpoint.last_path and step_checkpoint.last_path.exists():
            lines.append(f"  last checkpoint:  {step_checkpoint.last_path}")
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
                "init_args": {"save_dir": "runs", "name": None},  # None: --run_name or the recipe's name
            },
        },
        save_config_kwargs={"overwrite": True},
        auto_configure_optimizers=False,
    )
