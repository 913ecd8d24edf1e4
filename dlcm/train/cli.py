"""The LightningCLI behind ``dlcm fit`` / ``dlcm validate``: recipe links, checkpointing defaults, atomic writes.

Recipes are YAML files for LightningCLI (``--config`` may be given several times and composes in order; OmegaConf
interpolation is enabled). Arguments that must agree are linked rather than repeated: the tokenizer's vocabulary
size (known once the data module has read its manifest) fills ``model.config.vocab_size``, and the model's
``context_length`` sets the data packer's ``max_seq_len``. ``global_batch.tokens`` fixes the optimizer step in tokens:
the trainer's gradient accumulation is derived from it for the world size of the launch.
"""

from __future__ import annotations

import difflib
import itertools
import shutil
import sys
import warnings
from argparse import ArgumentError
from pathlib import Path
from typing import Any

import torch
import yaml
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import TensorBoardLogger

from dlcm.callbacks.boundary_stats import BoundaryStats
from dlcm.callbacks.throughput import FlopsThroughput
from dlcm.data.datamodule import PackedDataModule
from dlcm.train.checkpoint_io import UNREADABLE, AtomicCheckpointIO, require_sharded_checkpoint, unreadable
from dlcm.train.global_batch import GlobalBatch, apply_global_batch
from dlcm.train.lightning_modules import LanguageModelModule

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
        # Lightning reads the model's hyperparameters from --ckpt_path before anything is built (as it does here, in
        # one read): check the path and the file and name the problem, not with a raw unpickling or union error.
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if not ckpt_path:
            return
        path = Path(ckpt_path)
        if path.is_dir():  # a sharded checkpoint: its hyperparameters are not read (as in Lightning)
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
        hparams = dict(checkpoint.get("hyper_parameters") or {})
        hparams.pop("_instantiator", None)
        if not hparams:
            return
        if "_class_path" in hparams:
            hparams = {"class_path": hparams.pop("_class_path"), "dict_kwargs": hparams}
        try:
            self.config = self.parser.parse_object({subcommand: {"model": hparams}}, self.config)
        except ArgumentError as err:
            raise ValueError(
                f"checkpoint {path} was trained with another model than this recipe's; use the recipe it was "
                f"trained with (the config.yaml of its run directory). {err}"
            ) from err

    def _run_subcommand(self, subcommand: str) -> None:
        # A run that fails before its first optimizer step leaves no run directory behind (only its config.yaml).
        log_dir = self.trainer.logger.log_dir if self.trainer.logger is not None else None
        created = [d for d in (Path(log_dir), *Path(log_dir).parents) if not d.exists()] if log_dir else []
        try:
            super()._run_subcommand(subcommand)
        except BaseException:
            if created and self.trainer.global_step == 0 and not any(created[0].rglob("*.ckpt")):
                shutil.rmtree(created[-1], ignore_errors=True)
            raise

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
        # val_check_interval counts training batches across epochs, so a small corpus (an epoch shorter than the
        # interval) validates on schedule instead of failing; a token stream has no meaningful epoch boundary.
        parser.set_defaults({"trainer.check_val_every_n_epoch": None})
        parser.add_lightning_class_args(LearningRateMonitor, "lr_monitor")
        parser.set_defaults({"lr_monitor.logging_interval": "step"})
        parser.add_lightning_class_args(BoundaryStats, "boundary_stats")
        parser.add_lightning_class_args(FlopsThroughput, "throughput")
        parser.add_class_arguments(GlobalBatch, "global_batch")

    def _instantiate_trainer(self, config: dict[str, Any], callbacks: list) -> Any:
        accumulate = config.get("accumulate_grad_batches")
        if isinstance(accumulate, int) and accumulate < 1:  # Lightning would divide by it at the first batch
            raise ValueError(
                f"trainer.accumulate_grad_batches={accumulate} is not allowed: micro-batches per optimizer step, "
                "1 or more"
            )
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

    def before_fit(self) -> None:
        log_hparams_summary(self.trainer, self.config[self.subcommand] if self.subcommand else self.config)

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
                "class_path": f"{TensorBoardLogger.__module__}.{TensorBoardLogger.__name__}",
                "init_args": {"save_dir": "runs", "name": "dlcm", "default_hp_metric": False},
            },
        },
        save_config_kwargs={"overwrite": True},
        auto_configure_optimizers=False,
    )
