"""LightningModules: one base for the LM loss, validation metrics and optimizer; DLCM and the dense baseline.

Batches are packed micro-batches (see :mod:`dlcm.data.packing`): ``input_ids`` ``[T]``, ``cu_seqlens``
``[docs + 1]``, ``max_seqlen`` (host int), ``token_bytes`` ``[T]`` (UTF-8 bytes each token stands for) and
``domain`` ``[docs]``. Validation reports loss (nats/token), perplexity and bits per byte — the last one
comparable across tokenizers — and, for DLCM, the realised ratio with inference-mode (thresholded) boundaries.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.distributed as dist
import torchmetrics
from lightning.fabric.utilities.seed import _collect_rng_states, _set_rng_states
from torch import nn

from dlcm.model.baseline import DenseBaseline
from dlcm.model.config import BaselineConfig, DLCMConfig
from dlcm.model.config_io import DEFAULT_CONTEXT_LENGTH, FORMAT_VERSION, MODEL_RECORD, config_to_dict, plain
from dlcm.model.dlcm import DLCM, DLCMOutput, parser_loss
from dlcm.model.linear_cross_entropy import TokenLoss
from dlcm.model.loss import IGNORE_INDEX, next_token_targets
from dlcm.train.execution import (
    ExecutionConfig,
    apply_execution,
    compiled_graphs,
    data_parallel_mesh,
    set_gradient_sync,
)
from dlcm.train.materialize import materialize
from dlcm.train.mup import MuPRules, MuPSettings, mup_rules
from dlcm.train.optim import OptimizerConfig, ScheduleConfig, build_optimizer, default_param_groups

LN2 = math.log(2.0)


def detached(obj: Any) -> Any:
    """Copy of a (possibly nested) output dataclass with every tensor detached, for callbacks."""
    if isinstance(obj, torch.Tensor):
        return obj.detach()
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return type(obj)(**{f.name: detached(getattr(obj, f.name)) for f in dataclasses.fields(obj)})
    return obj


class LanguageModelModule(L.LightningModule):
    """Shared training logic: next-token CE on packed documents, validation metrics, AdamW + schedule.

    Subclasses name their ``network_class`` (built from ``config``; on the meta device with
    ``execution.meta_init``, allocated by ``configure_model``) and implement ``run(batch, targets_T) -> (loss,
    extras)``: the head's fused cross-entropy (:class:`~dlcm.model.linear_cross_entropy.TokenLoss`), so no
    ``[T, V]`` logits are held in training or validation.
    ``param_groups_fn`` may be replaced (``use_decoupled_mup``, which the μP callback calls) before
    ``configure_optimizers`` runs.
    """

    network_class: Callable[[Any], nn.Module]

    def __init__(
        self,
        config: DLCMConfig | BaselineConfig,
        optimizer: OptimizerConfig | None,
        schedule: ScheduleConfig | None,
        context_length: int,
        seed: int,
        execution: ExecutionConfig | None = None,
    ) -> None:
        super().__init__()
        if context_length < 1:
            raise ValueError(f"context_length={context_length} is not allowed: a positive number of tokens")
        # Kept in checkpoints; not sent to the logger: `dlcm fit` writes its own HPARAMS summary (the recipe's key
        # values against val/bpb) instead of every nested config object.
        self.save_hyperparameters(logger=False)
        # Plain data only (no pickled config classes): checkpoints stay loadable when a module is renamed.
        self.hparams.update(plain(dict(self.hparams)))
        self.config = config
        self.optimizer_cfg = optimizer or OptimizerConfig()
        self.schedule_cfg = schedule or ScheduleConfig()
        self.execution_cfg = execution or ExecutionConfig()
        meta = self.execution_cfg.meta_init
        # A meta-built network draws its init in configure_model: from the RNG state an eager build would have had.
        self._init_rng_state = torch.get_rng_state() if meta else None
        with torch.device("meta") if meta else contextlib.nullcontext():
            self.network = self.network_class(config)
        self.context_length = context_length
        self.seed = seed
        self.param_groups_fn = default_param_groups
        self.val_nats = torchmetrics.SumMetric()
        self.val_tokens = torchmetrics.SumMetric()
        self.val_bytes = torchmetrics.SumMetric()
        self.last_validation: dict[str, float] | None = None  # the model card's numbers (see model_record)

    def configure_model(self) -> None:
        # Only ModelParallelStrategy provides a mesh: the network is then FSDP2-sharded (over a 2-D replicate ×
        # shard mesh when hybrid); DDP and single-device runs get checkpointing and compile only.
        mesh = None if self.device_mesh is None else data_parallel_mesh(self.device_mesh)
        if self.trainer.strategy.root_device.type == "cuda":
            torch.set_float32_matmul_precision(self.execution_cfg.fp32_matmul_precision)
        apply_execution(self.network, self.execution_cfg, mesh, node_size=self.trainer.num_devices)
        if any(p.is_meta for p in self.network.parameters()):
            # Here rather than in Lightning's setup, which would also `to_empty` the torchmetrics states and reset
            # modules parents first (not the eager build's RNG order).
            saved = self._init_rng_state
            with torch.random.fork_rng(devices=[]) if saved is not None else contextlib.nullcontext():
                if saved is not None:
                    torch.set_rng_state(saved)
                materialize(self.network, self.trainer.strategy.root_device)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.execution_cfg.compile_blocks:
            # Growth of this count after the first steps means recompilation (e.g. new concept-stream lengths).
            self.log("train/compile_graphs", float(compiled_graphs()))

    def run(self, batch: dict[str, Any], targets_T: torch.Tensor) -> tuple[TokenLoss, Any]:
        raise NotImplementedError

    def extra_loss(self, extras: Any) -> torch.Tensor | None:
        return None

    def lm_terms(self, batch: dict[str, Any]) -> tuple[TokenLoss, torch.Tensor, Any]:
        """The CE (summed, and per token: 0 where no target), the target mask, and the subclass extras of one
        forward."""
        targets_T = next_token_targets(batch["input_ids"], batch["cu_seqlens"])
        lm_loss, extras = self.run(batch, targets_T)
        return lm_loss, targets_T != IGNORE_INDEX, extras

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        self.before_micro_batch(batch_idx)
        # Lightning's own decision for this micro-batch (it steps the optimizer after it unless accumulating).
        last_micro_batch = not self.trainer.fit_loop._should_accumulate()
        set_gradient_sync(self.network, self.execution_cfg.gradient_sync, last_micro_batch)
        lm_loss, has_target_T, extras = self.lm_terms(batch)
        ce = lm_loss.total / has_target_T.sum().clamp(min=1)
        loss = ce
        extra = self.extra_loss(extras)
        if extra is not None:
            loss = loss + extra
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/ce", ce)
        return {"loss": loss, "ce": ce.detach(), **self.step_outputs(extras)}

    def before_micro_batch(self, batch_idx: int) -> None:
        """Hook run before each training forward (DLCM restarts its step-level ratio statistics here)."""

    def step_outputs(self, extras: Any) -> dict[str, Any]:
        return {}

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        lm_loss, has_target_T, extras = self.lm_terms(batch)
        nats_T = lm_loss.nats_T
        # Bytes of each *target* token: position t predicts token t+1.
        target_bytes_T = torch.roll(batch["token_bytes"], shifts=-1).to(nats_T.dtype)
        self.val_nats.update(nats_T[has_target_T].sum())
        self.val_tokens.update(has_target_T.sum().to(nats_T.dtype))
        self.val_bytes.update((target_bytes_T * has_target_T).sum())
        self.validation_extras(extras)
        return self.step_outputs(extras)  # the same statistics training returns, for callbacks

    def validation_extras(self, extras: Any) -> None:
        """Hook for subclass validation statistics."""

    def on_validation_epoch_end(self) -> None:
        nats, tokens, n_bytes = self.val_nats.compute(), self.val_tokens.compute(), self.val_bytes.compute()
        loss, bpb = nats / tokens.clamp(min=1), nats / LN2 / n_bytes.clamp(min=1)
        self.log_dict(
            {"val/loss": loss, "val/ppl": torch.exp(loss), "val/bpb": bpb},
            prog_bar=True,
            sync_dist=False,  # SumMetric already reduced across ranks
        )
        if not self.trainer.sanity_checking:
            self.last_validation = {"step": self.global_step, "loss": float(loss), "bpb": float(bpb)}
        for metric in (self.val_nats, self.val_tokens, self.val_bytes):
            metric.reset()

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Every rank's generators, indexed by rank: a sharded checkpoint keeps only rank 0's metadata file. NumPy's
        # global generator is unused here, and its state would make the checkpoint unloadable with weights_only.
        states = _collect_rng_states()
        states.pop("numpy", None)
        gathered = [states]
        if dist.is_available() and dist.is_initialized():
            gathered = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, states)
        checkpoint["rng_states"] = gathered
        checkpoint[MODEL_RECORD] = self.model_record()

    def model_record(self) -> dict[str, Any]:
        """What :func:`dlcm.load` and ``dlcm export`` need beside the weights: the network's config, the context
        length and the tokenizer, plus the run's summary for the model card (recipe, tokens seen, the last
        validation). Plain data, so ``torch.load(weights_only=True)`` reads it."""
        trainer = self._trainer  # None when a checkpoint is saved from a trainer this module was never fitted by
        datamodule = getattr(trainer, "datamodule", None)
        tokenizer = getattr(datamodule, "tokenizer", None)
        micro_tokens = getattr(datamodule, "tokens_per_batch", None)
        step_tokens = micro_tokens * trainer.accumulate_grad_batches * trainer.world_size if micro_tokens else None
        recipe = Path(trainer.log_dir) / "config.yaml" if trainer is not None and trainer.log_dir else None
        return {
            "format_version": FORMAT_VERSION,
            "config": config_to_dict(self.config),
            "context_length": self.context_length,
            "tokenizer": tokenizer.to_str() if tokenizer is not None else None,
            "global_step": self.global_step,
            "tokens_seen": self.global_step * step_tokens if step_tokens else None,
            "validation": self.last_validation,
            "recipe": recipe.read_text(encoding="utf-8") if recipe is not None and recipe.is_file() else None,
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        states = checkpoint.get("rng_states")
        if self._trainer is not None and states is not None and len(states) == self.trainer.world_size:
            _set_rng_states(states[self.global_rank])  # another world size: nothing to match ranks with
        # Name the mismatch before load_state_dict fails with a bare size error (typically a checkpoint trained
        # with another tokenizer, so another vocab_size, or another recipe).
        own = self.state_dict()
        mismatched = [
            f"{name}: checkpoint {tuple(tensor.shape)} vs model {tuple(own[name].shape)}"
            for name, tensor in checkpoint.get("state_dict", {}).items()
            if name in own and tuple(tensor.shape) != tuple(own[name].shape)
        ]
        if mismatched:
            raise ValueError(
                "the checkpoint does not fit this model ("
                + "; ".join(mismatched[:4])
                + "). A different vocab_size means the data's tokenizer differs from the one the checkpoint was "
                "trained with; other shapes mean the recipe's model section differs. Use the recipe and data the "
                "checkpoint was trained with."
            )

    def total_optimizer_steps(self) -> int:
        if self.schedule_cfg.total_steps is not None:
            return self.schedule_cfg.total_steps
        steps = self.trainer.estimated_stepping_batches
        if not math.isfinite(steps):
            raise ValueError(
                "schedule.total_steps is None and the trainer has no finite length: set trainer.max_steps or "
                "model.schedule.total_steps"
            )
        return int(steps)

    def use_decoupled_mup(self, settings: dict[str, Any]) -> MuPRules:
        """Train with decoupled μP groups (:func:`dlcm.train.mup.mup_rules` of this model's config and ``settings``,
        the fields of :class:`~dlcm.train.mup.MuPSettings`) instead of the default ones; returns the rules, to check
        the optimizer against. Called by the μP callback before ``configure_optimizers``."""
        rules = mup_rules(self.config, MuPSettings(**settings))
        self.param_groups_fn = rules.param_groups
        return rules

    def configure_optimizers(self) -> dict[str, Any]:
        groups = self.param_groups_fn(self.network, self.optimizer_cfg)
        optimizer, scheduler = build_optimizer(
            groups, self.optimizer_cfg, self.schedule_cfg, self.total_optimizer_steps()
        )
        # "name": LearningRateMonitor logs train/lr/<param group>, inside the train/ group
        schedule = {"scheduler": scheduler, "interval": "step", "name": "train/lr"}
        return {"optimizer": optimizer, "lr_scheduler": schedule}


class DLCMModule(LanguageModelModule):
    """Trains :class:`dlcm.model.dlcm.DLCM`: ``L = L_CE + λ·L_aux`` (Eq. 15).

    Boundary sampling draws from a generator seeded by ``(seed, global_step, micro-batch, rank)``, so a resumed
    run samples exactly what the uninterrupted run sampled (no RNG state in checkpoints needed).
    """

    network_class = DLCM

    def __init__(
        self,
        config: DLCMConfig,
        optimizer: OptimizerConfig | None = None,
        schedule: ScheduleConfig | None = None,
        context_length: int = DEFAULT_CONTEXT_LENGTH,
        seed: int = 0,
        execution: ExecutionConfig | None = None,
    ) -> None:
        if config.parser.target_ratio > context_length:
            raise ValueError(
                f"parser.target_ratio={config.parser.target_ratio:g} is not allowed with context_length="
                f"{context_length}: tokens per concept, at most the context length"
            )
        super().__init__(config, optimizer, schedule, context_length, seed, execution)
        self.val_boundaries = torchmetrics.SumMetric()
        self.val_all_tokens = torchmetrics.SumMetric()
        self._total_steps: int | None = None  # optimizer steps of the fit, for the α schedule
        # This optimizer step's micro-batch τ estimates (calibrated τ only), folded into τ before the step.
        self._threshold_estimates: list[torch.Tensor] = []

    def configure_model(self) -> None:
        super().configure_model()
        # The global ratio statistics sum over the ranks that split the batch: the data-parallel group (None: the
        # default group, which is that group under DDP).
        mesh = self.device_mesh
        self.network.ratio_loss.process_group = None if mesh is None else data_parallel_mesh(mesh).get_group()

    def on_fit_start(self) -> None:
        self.network.ratio_loss.micro_batches_per_step = self.trainer.accumulate_grad_batches
        self._total_steps = max(self.total_optimizer_steps(), 1)  # for the α schedule

    def before_micro_batch(self, batch_idx: int) -> None:
        if batch_idx % self.trainer.accumulate_grad_batches == 0:
            self.network.ratio_loss.start_step()
            self._threshold_estimates.clear()
        if self._total_steps is not None:
            self.network.parser.set_progress(self.global_step / self._total_steps)

    def sampling_generator(self, device: torch.device) -> torch.Generator:
        micro = self.trainer.fit_loop.epoch_loop.batch_progress.current.ready if self._trainer else 0
        seed = hash((self.seed, self.global_step, micro, self.global_rank)) & 0x7FFF_FFFF_FFFF_FFFF
        return torch.Generator(device=device).manual_seed(seed)

    def run(self, batch: dict[str, Any], targets_T: torch.Tensor) -> tuple[TokenLoss, DLCMOutput]:
        ids_T = batch["input_ids"]
        generator = self.sampling_generator(ids_T.device) if self.training else None
        out = self.network(ids_T, batch["cu_seqlens"], batch["max_seqlen"], generator=generator, targets_T=targets_T)
        if out.parser.threshold_estimate is not None:  # a training forward with a calibrated τ
            self._threshold_estimates.append(out.parser.threshold_estimate)
        return out.lm_loss, out

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        # τ moves once per optimizer step, after all its micro-batches were decided with the τ from before it (one
        # all-reduce per step); a forward alone, even in train mode, leaves it where it is.
        self.network.fold_threshold(self._threshold_estimates)
        self._threshold_estimates.clear()

    def extra_loss(self, extras: DLCMOutput) -> torch.Tensor:
        self.log("train/aux", extras.aux_loss)
        self.log("train/ratio", 1.0 / extras.ratio.boundary_rate.clamp(min=1e-6), prog_bar=True)
        return parser_loss(self.config.parser, extras)

    def step_outputs(self, extras: DLCMOutput) -> dict[str, Any]:
        return {
            "aux": extras.aux_loss.detach(),
            "ratio": detached(extras.ratio),
            "parser": detached(extras.parser),
            "layout": extras.layout,
        }

    def validation_extras(self, extras: DLCMOutput) -> None:
        self.val_boundaries.update(extras.parser.boundary_T.sum().float())
        self.val_all_tokens.update(float(extras.parser.boundary_T.numel()))

    def on_validation_epoch_end(self) -> None:
        super().on_validation_epoch_end()
        rate = self.val_boundaries.compute() / self.val_all_tokens.compute().clamp(min=1)
        ratio = 1.0 / rate.clamp(min=1e-6)
        self.log("val/ratio", ratio, prog_bar=True)
        if self.last_validation is not None and not self.trainer.sanity_checking:
            self.last_validation["ratio"] = float(ratio)
        self.val_boundaries.reset()
        self.val_all_tokens.reset()


class BaselineModule(LanguageModelModule):
    """Trains the dense LLaMA-style :class:`dlcm.model.baseline.DenseBaseline` with the same loss and optimizer."""

    network_class = DenseBaseline

    def __init__(
        self,
        config: BaselineConfig,
        optimizer: OptimizerConfig | None = None,
        schedule: ScheduleConfig | None = None,
        context_length: int = DEFAULT_CONTEXT_LENGTH,
        seed: int = 0,
        execution: ExecutionConfig | None = None,
    ) -> None:
        super().__init__(config, optimizer, schedule, context_length, seed, execution)

    def run(self, batch: dict[str, Any], targets_T: torch.Tensor) -> tuple[TokenLoss, None]:
        return self.network(batch["input_ids"], batch["cu_seqlens"], batch["max_seqlen"], targets_T), None
