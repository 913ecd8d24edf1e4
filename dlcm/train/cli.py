"""The LightningCLI behind ``dlcm fit`` / ``dlcm validate``: recipe links, checkpointing defaults, atomic writes,
run directories and auto-resume.

Recipes are YAML files for LightningCLI (``--config`` may be given several times and composes in order; OmegaConf
interpolation is enabled). Arguments that must agree are linked rather than repeated: the tokenizer's vocabulary
size (known once the data module has read its manifest) fills ``model.config.vocab_size``, and the model's
``context_length`` sets the data packer's ``max_seq_len``. ``global_batch.tokens`` fixes the optimizer step in tokens:
the trainer's gradient accumulation is derived from it for the world size of the launch.

Run directories: TensorBoard logs and checkpoints go to ``runs/<name>/version_<n>``, ``<name>`` being
``--run_name`` or the recipe's file name. ``--resume=auto`` continues the newest version of that name: from its
newest complete checkpoint (see :mod:`dlcm.train.resume`) when it has one, in the same TensorBoard run, whose
events past the checkpoint's step are discarded.
"""

from __future__ import annotations

import difflib
import itertools
import sys
import warnings
from argparse import ArgumentError
from pathlib import Path
from typing import Any, Literal, Union

import torch
import yaml
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities.rank_zero import rank_zero_info

from dlcm.callbacks.boundary_stats import BoundaryStats
from dlcm.callbacks.throughput import FlopsThroughput
from dlcm.data.datamodule import PackedDataModule
from dlcm.train import preemption
from dlcm.train.checkpoint_io import UNREADABLE, AtomicCheckpointIO, require_sharded_checkpoint, unreadable
from dlcm.train.global_batch import GlobalBatch, apply_global_batch
from dlcm.train.lightning_modules import LanguageModelModule
from dlcm.train.resume import ResumeRules, check_settings, newest_checkpoint
from dlcm.train.run_directory import RunDirectoryGuard
from dlcm.train.step_checkpoint import StepCheckpoint, checkpoint_dir
from dlcm.train.tensorboard_logger import RunTensorBoardLogger

DEFAULT_RUN_NAME = "dlcm"
# Lightning warns that a mid-epoch resume is inexact unless the DataLoader itself is stateful; PackedDataModule's
# state_dict carries the position and its next iterator starts there (tests/train/test_cli.py checks exactness).
NOT_RESUMABLE_WARNING = ".*dataloader is not resumable.*"
# torch 2.13 deprecates LeafSpec, which Lightning's pytree helper still builds at every fit (nothing to act on here).
LEAFSPEC_WARNING = r"`isinstance\(treespec, LeafSpec\)` is deprecated"


def run_name_of(configs: list[Any] | None) -> str:
    """The recipe's file name without extension: the first ``--config`` that is not a composable fragment."""
    paths = [Path(str(c)) for c in configs or []]
    recipes = [p for p in paths if p.parent.name != "fragments"]
    return recipes[0].stem if recipes else DEFAULT_RUN_NAME


# Parsers of every subcommand: no abbreviated keys (`--trainer.max_step` must not pass for max_steps), and errors
# raised rather than printed after a multi-page usage block, so that `dlcm` reports them as one line.
STRICT_PARSER = {"allow_abbrev": False, "exit_on_error": False}


class DLCMCLI(LightningCLI):
    """LightningCLI with dlcm's links, checkpointing defaults and atomic checkpoint writes.

    Subcommands are ``fit`` and ``validate``: Lightning's ``test`` would read the validation split again under
    another name, and ``predict`` is served by ``dlcm generate`` (sampling) and ``dlcm eval`` (scoring).
    """

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        return {name: skip for name, skip in LightningCLI.subcommands().items() if name in ("fit", "validate")}

    def parse_arguments(self, parser: Any, args: Any) -> None:
        check_recipe_files(args if isinstance(args, list) else sys.argv[1:])
        try:
            with warnings.catch_warnings():  # `dlcm` passes the words after the subcommand name as `args` on purpose
                warnings.filterwarnings("ignore", message=".*args parameter is intended.*")
                super().parse_arguments(parser, args)
        except ArgumentError as err:
            raise ArgumentError(None, _with_suggestions(str(err), self._known_keys(args))) from err

    def _known_keys(self, args: Any) -> list[str]:
        words = args if isinstance(args, list) else sys.argv[1:]
        subcommand = next((w for w in words if w in self.subcommands()), None)
        parser = getattr(self, "_subcommand_parsers", {}).get(subcommand, self.parser)
        return [option for action in parser._actions for option in action.option_strings if option.startswith("--")]

    def _parse_ckpt_path(self) -> None:
        # Lightning replaces the recipe's model section with the checkpoint's hyperparameters here, which silently
        # drops what the user typed. Here the checkpoint is only checked to be one of this recipe's model class
        # (naming the problem, not with a raw unpickling or union error); the recipe and command line build the
        # model, and check_settings refuses each value that differs from what the checkpoint fixes.
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if not ckpt_path:
            return
        path = Path(ckpt_path)
        if path.is_dir():  # a sharded checkpoint: its metadata is read by check_settings
            if not (path / ".metadata").is_file():
                raise ValueError(
                    f"--ckpt_path {path} is a directory, not a checkpoint: pass a .ckpt file (e.g. "
                    f"{path / 'checkpoints' / 'last.ckpt'}) or a sharded checkpoint directory"
                )
            require_sharded_checkpoint(path)
            return
        if not path.is_file():
            raise FileNotFoundError(f"--ckpt_path {path} does not exist: pass a .ckpt file written by `dlcm fit`")
        try:
            checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except UNREADABLE as err:
            raise unreadable(path, err) from err
        if not isinstance(checkpoint, dict) or not {"state_dict", "pytorch-lightning_version"} <= checkpoint.keys():
            raise ValueError(f"--ckpt_path {path} is not a checkpoint written by `dlcm fit` (no Lightning state in it)")
        trained = (checkpoint.get("hyper_parameters") or {}).get("_class_path")
        recipe = self.config[subcommand].get("model", {}).get("class_path")
        if trained and recipe and trained != recipe:
            raise ValueError(
                f"checkpoint {path} was trained with another model than this recipe's: {trained.rsplit('.', 1)[-1]} "
                f"(the recipe builds {recipe.rsplit('.', 1)[-1]}); use the recipe it was trained with (the "
                "config.yaml of its run directory)"
            )

    def _run_subcommand(self, subcommand: str) -> None:
        if subcommand == "fit":
            preemption.install()  # a signal during start-up is acted on at the first step boundary
            # Before anything reads the logger's log_dir, which would fix its version to a new one.
            self.config_init["fit"]["ckpt_path"] = self.resolve_resume()
        ckpt_path = self.config_init[subcommand].get("ckpt_path")
        if subcommand == "validate" and ckpt_path is None:
            raise ValueError(
                "dlcm validate scores a checkpoint: pass --ckpt_path <step….ckpt, last.ckpt or a sharded checkpoint "
                "directory> (without one it would score an untrained network)"
            )
        start_step = 0 if ckpt_path is None else check_settings(Path(ckpt_path), dict(self.model.hparams), subcommand)
        # A command that fails before its first optimizer step leaves the run directory as it found it.
        guard = RunDirectoryGuard(self.trainer.logger.log_dir if self.trainer.logger is not None else None)
        try:
            super()._run_subcommand(subcommand)
        except BaseException:
            if self.trainer.global_step in (0, start_step):
                guard.restore()
            if preemption.stopped_at_once():  # Lightning turns the KeyboardInterrupt into a bare exit status 1
                raise KeyboardInterrupt(self._nothing_saved()) from None
            raise

    def _nothing_saved(self) -> str:
        step_checkpoint = next((c for c in self.trainer.callbacks if isinstance(c, StepCheckpoint)), None)
        last = step_checkpoint.last_path if step_checkpoint is not None else None
        newest = (
            f"the newest checkpoint is {last.parent / last.readlink()}"
            if last and last.exists()
            else "no checkpoint was saved"
        )
        return f"stopped at once at step {self.trainer.global_step}, nothing saved there ({newest})"

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
        # val_check_interval counts training batches across epochs, so a small corpus (an epoch shorter than the
        # interval) validates on schedule instead of failing; a token stream has no meaningful epoch boundary.
        parser.set_defaults({"trainer.check_val_every_n_epoch": None})
        count_before_fraction(parser)
        # After ModelCheckpoint: Lightning's `trainer.checkpoint_callback` (ckpt_path="best") is the first checkpoint
        # callback.
        parser.add_lightning_class_args(StepCheckpoint, "step_checkpoint")
        parser.add_lightning_class_args(LearningRateMonitor, "lr_monitor")
        parser.set_defaults({"lr_monitor.logging_interval": "step"})
        parser.add_lightning_class_args(BoundaryStats, "boundary_stats")
        parser.add_lightning_class_args(FlopsThroughput, "throughput")
        parser.add_class_arguments(GlobalBatch, "global_batch")

    def before_instantiate_classes(self) -> None:
        config = self.config.get(str(self.subcommand), self.config)
        logger = config.get("trainer", {}).get("logger")
        init_args = getattr(logger, "init_args", None)
        if init_args is not None and logger.class_path.endswith("TensorBoardLogger") and init_args.name is None:
            init_args.name = config.get("run_name") or run_name_of(config.get("config"))

    def _instantiate_trainer(self, config: dict[str, Any], callbacks: list) -> Any:
        accumulate = config.get("accumulate_grad_batches")
        if isinstance(accumulate, int) and accumulate < 1:  # Lightning would divide by it at the first batch
            raise ValueError(
                f"trainer.accumulate_grad_batches={accumulate} is not allowed: micro-batches per optimizer step, "
                "1 or more"
            )
        max_steps, interval = config.get("max_steps"), config.get("val_check_interval")
        if isinstance(max_steps, int) and (max_steps == 0 or max_steps < -1):  # 0 would "finish" without a step
            raise ValueError(
                f"trainer.max_steps={max_steps} is not allowed: optimizer steps in total, 1 or more (or -1: until "
                "max_epochs)"
            )
        if isinstance(interval, (int, float)) and interval <= 0:  # Lightning would divide by it
            raise ValueError(
                f"trainer.val_check_interval={interval} is not allowed: training batches between validations (an "
                "integer >= 1), or a fraction of an epoch in (0, 1]"
            )
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
        warnings.filterwarnings("ignore", message=LEAFSPEC_WARNING, category=FutureWarning)
        trainer = super()._instantiate_trainer(config, callbacks)
        apply_global_batch(trainer, self._get(self.config_init, "global_batch"), self.datamodule.tokens_per_batch)
        return trainer

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
        log_hparams_summary(self.trainer, self.config[self.subcommand] if self.subcommand else self.config)

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


# The recipe's key values shown in TensorBoard's HPARAMS tab (dotted config keys; absent ones are skipped), and the
# metrics it tabulates against them (scalar tags the run logs).
HPARAM_KEYS = (
    "model.class_path",
    "model.init_args.config.encoder.width",
    "model.init_args.config.encoder.n_layers",
    "model.init_args.config.backbone.width",
    "model.init_args.config.backbone.n_layers",
    "model.init_args.config.decoder.width",
    "model.init_args.config.decoder.n_layers",
    "model.init_args.config.n_layers",
    "model.init_args.config.width",
    "model.init_args.config.parser.target_ratio",
    "model.init_args.config.parser.boundary_mode",
    "model.init_args.config.parser.aux_weight",
    "model.init_args.config.d_base",
    "model.init_args.context_length",
    "model.init_args.optimizer.lr",
    "model.init_args.optimizer.weight_decay",
    "model.init_args.schedule.warmup_steps",
    "data.data_dir",
    "data.tokens_per_batch",
    "trainer.max_steps",
    "trainer.accumulate_grad_batches",
    "trainer.devices",
    "trainer.num_nodes",
    "trainer.precision",
    "seed_everything",
)
HPARAM_METRICS = ("val/bpb", "val/loss", "val/ratio")


def recipe_hparams(config: Any) -> dict[str, Any]:
    """The values of :data:`HPARAM_KEYS` in a resolved recipe, as TensorBoard takes them (numbers, text, bools)."""
    values = {}
    for key in HPARAM_KEYS:
        node = config
        for part in key.split("."):
            node = node.get(part) if hasattr(node, "get") else getattr(node, part, None)
            if node is None:
                break
        if node is None:
            continue
        short = key.removeprefix("model.init_args.").removeprefix("config.")
        values[short] = node if isinstance(node, (bool, int, float, str)) else str(node)
    if "model.class_path" in values:
        values["model.class_path"] = values["model.class_path"].rsplit(".", 1)[-1]
    return values


def log_hparams_summary(trainer: Any, config: Any) -> None:
    """Write the HPARAMS summary of this run: the recipe's key values, with val/bpb (then loss, ratio) as metrics.

    The metrics are named, not logged here: TensorBoard reads their values from the run's own scalars, so no
    placeholder point (Lightning's ``hp_metric = -1``) appears.
    """
    logger = trainer.logger
    if not trainer.is_global_zero or not isinstance(logger, TensorBoardLogger):
        return
    # torch's writer: Lightning uses it whenever the tensorboard package (a dependency) is installed.
    from torch.utils.tensorboard.summary import hparams

    params = recipe_hparams(config)
    writer = logger.experiment._get_file_writer()  # as Lightning's own log_hyperparams
    for summary in hparams(params, dict.fromkeys(HPARAM_METRICS, 0.0)):
        writer.add_summary(summary)
    writer.flush()


def count_before_fraction(parser: Any) -> None:
    """Make the Trainer's "int = batches, float = fraction" flags (``limit_val_batches``, ``val_check_interval``, …)
    read an integer as a count. jsonargparse types them ``Union[float, int, None]`` and tries ``float`` first, so
    ``--trainer.limit_val_batches=1`` became 1.0 — the whole split — instead of one batch."""
    fraction_first = Union[float, int, None]  # noqa: UP007 (jsonargparse's own form, compared as such)
    for action in parser._actions:
        if action.dest.startswith("trainer.") and getattr(action, "_typehint", None) == fraction_first:
            action._typehint = int | float | None


def check_recipe_files(words: list[str]) -> None:
    """Read each ``--config`` YAML once up front, so that a syntax error names the file (jsonargparse parses the
    text and reports "<unicode string>") and a recipe that is not a mapping of sections is refused by name."""
    paths = [w.split("=", 1)[1] for w in words if w.startswith(("--config=", "-c="))]
    paths += [nxt for flag, nxt in itertools.pairwise(words) if flag in ("--config", "-c")]
    for path in map(Path, paths):
        if not path.is_file():
            continue  # jsonargparse names a missing file itself
        try:
            with open(path, encoding="utf-8") as f:
                recipe = yaml.safe_load(f)
        except yaml.YAMLError as err:
            raise ValueError(f"recipe {path} is not valid YAML: {' '.join(str(err).split())}") from err
        if recipe is not None and not isinstance(recipe, dict):
            raise ValueError(
                f"recipe {path} holds a {type(recipe).__name__}, not a mapping of sections (trainer:, model:, data:, …)"
            )


def _with_suggestions(message: str, known: list[str]) -> str:
    """``message`` plus the allowed keys closest to each unrecognized ``--key`` in it."""
    if not message.startswith("unrecognized arguments:"):
        return message
    hints = []
    for word in message.split(":", 1)[1].split():
        key = word.split("=", 1)[0]
        if key.startswith("--"):
            close = difflib.get_close_matches(key, known, n=2, cutoff=0.75)
            hints.append(f"{key} is not a key; did you mean {' or '.join(close)}?" if close else f"{key} is not a key")
    return f"{message} ({'; '.join(hints)}; `--help` lists every key)" if hints else message


def run_cli(args: list[str] | None = None, run: bool = True) -> DLCMCLI:
    """Build (and by default run) the CLI; ``args`` replaces ``sys.argv[1:]`` (tests call it directly)."""
    return DLCMCLI(
        LanguageModelModule,
        PackedDataModule,
        subclass_mode_model=True,
        args=args,
        run=run,
        parser_kwargs={"parser_mode": "omegaconf", **STRICT_PARSER, "fit": STRICT_PARSER, "validate": STRICT_PARSER},
        trainer_defaults={
            "logger": {
                "class_path": f"{RunTensorBoardLogger.__module__}.{RunTensorBoardLogger.__name__}",
                "init_args": {
                    "save_dir": "runs",
                    "name": None,
                    "default_hp_metric": False,
                },  # None: --run_name or the recipe's name
            },
        },
        save_config_kwargs={"overwrite": True},
        auto_configure_optimizers=False,
    )
