"""Boundary-rate observability for DLCM: what the global parser decided, per step and per validation epoch.

Everything is read from the outputs ``DLCMModule.training_step`` / ``validation_step`` already return (the parser
decisions, probabilities and concept layout of that very forward): nothing is recomputed.

Logged (``boundary/…`` for training steps, ``val_boundary/…`` per validation epoch, all summed over ranks):

- ``F_sampled`` / ``F_threshold``: boundary rate as trained / as inference would decide (``p ≥ 0.5``);
- ``G``: mean boundary probability; ``ratio`` (tokens per concept as trained), ``ratio_threshold``, ``target_R``;
- ``concepts_per_seq``: concepts per packed document; ``length_cv``: coefficient of variation of concept lengths;
- ``aux`` and ``aux_share``: the ratio loss and λ·L_aux as a share of the total loss (training);
- ``tokens_per_concept/<domain>``: the paper's Table 5 statistic per document domain (prose, code, …);
- histograms of concept lengths and boundary probabilities, and a text view of a few validation documents with
  concepts bracketed: ``[In the beginning][ God created]…``;
- ``collapse``: 1 when, after ``warmup_steps``, the smoothed training ratio or the validation ratio leaves
  ``[0.8·R, 1.25·R]`` (a warning is printed when it leaves): a boundary rate that stalls or collapses.

Training statistics are computed on logging steps only (``trainer.log_every_n_steps``): each costs one small
all-reduce and one host copy.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_warn

BAND = (0.8, 1.25)
# Per-domain, per-step sums gathered in one all-reduce: [tokens, concepts] for each domain slot.
MAX_DOMAINS = 16


class BoundaryStats(L.Callback):
    """Logs the global parser's statistics (see module docstring); DLCM modules only, a no-op otherwise.

    Args:
        histogram_every_n_steps: training steps between histogram writes (they cost a host copy).
        text_documents: validation documents rendered with concept brackets at each validation epoch.
        text_max_tokens: tokens shown per rendered document.
        warmup_steps: steps before the collapse check starts (default: the schedule's warm-up).
        smoothing: EMA weight of the newest step in the smoothed training ratio used by the collapse check.
    """

    def __init__(
        self,
        histogram_every_n_steps: int = 100,
        text_documents: int = 3,
        text_max_tokens: int = 160,
        warmup_steps: int | None = None,
        smoothing: float = 0.05,
    ) -> None:
        super().__init__()
        self.histogram_every_n_steps = histogram_every_n_steps
        self.text_documents = text_documents
        self.text_max_tokens = text_max_tokens
        self.warmup_steps = warmup_steps
        self.smoothing = smoothing
        self._ema_rate: float | None = None
        self._val_sums: torch.Tensor | None = None
        self._val_lengths: list[torch.Tensor] = []
        self._val_probs: list[torch.Tensor] = []
        self._val_text: str | None = None
        self._warned: set[str] = set()

    # ---- shared statistics ------------------------------------------------------------------------------------

    @staticmethod
    def _is_dlcm(outputs: Any) -> bool:
        return isinstance(outputs, dict) and "layout" in outputs and "parser" in outputs

    def _sums(self, outputs: dict, batch: dict) -> torch.Tensor:
        """Additive per-batch statistics: [tokens, sampled, thresholded, Σp, concepts, docs, Σlen², then per
        domain (tokens, concepts)]."""
        parser, layout = outputs["parser"], outputs["layout"]
        tokens = torch.tensor(float(parser.boundary_T.numel()), device=parser.prob_T.device)
        length_C = layout.length_C.to(torch.float64)
        head = torch.stack(
            [
                tokens.double(),
                parser.boundary_T.sum().double(),
                parser.threshold_T.sum().double(),
                parser.prob_T.double().sum(),
                torch.tensor(float(layout.num_concepts), device=tokens.device, dtype=torch.float64),
                torch.tensor(float(layout.seqs.num_docs), device=tokens.device, dtype=torch.float64),
                length_C.square().sum(),
            ]
        )
        per_domain = torch.zeros(MAX_DOMAINS, 2, dtype=torch.float64, device=tokens.device)
        domain_D = batch.get("domain")
        if domain_D is not None:
            tokens_D = batch["cu_seqlens"].diff().to(torch.float64)
            concepts_D = layout.seqs.cu_seqlens.diff().to(torch.float64)
            slot_D = domain_D.clamp(max=MAX_DOMAINS - 1)
            per_domain[:, 0].index_add_(0, slot_D, tokens_D)
            per_domain[:, 1].index_add_(0, slot_D, concepts_D)
        return torch.cat([head, per_domain.flatten()])

    @staticmethod
    def _reduce(trainer: L.Trainer, sums: torch.Tensor) -> torch.Tensor:
        return trainer.strategy.reduce(sums, reduce_op="sum") if trainer.world_size > 1 else sums

    def _scalars(self, sums: torch.Tensor, target: float, domains: list[str]) -> dict[str, float]:
        tokens, sampled, thresholded, prob, concepts, docs, sq_len = sums[:7].tolist()
        mean_len = tokens / max(concepts, 1.0)
        variance = max(sq_len / max(concepts, 1.0) - mean_len**2, 0.0)
        out = {
            "F_sampled": sampled / tokens,
            "F_threshold": thresholded / tokens,
            "G": prob / tokens,
            "ratio": tokens / max(sampled, 1.0),
            "ratio_threshold": tokens / max(thresholded, 1.0),
            "target_R": target,
            "concepts_per_seq": concepts / max(docs, 1.0),
            "length_cv": variance**0.5 / mean_len,
        }
        per_domain = sums[7:].view(MAX_DOMAINS, 2).tolist()
        for i, name in enumerate(domains[:MAX_DOMAINS]):
            if per_domain[i][1] > 0:
                out[f"tokens_per_concept/{name}"] = per_domain[i][0] / per_domain[i][1]
        return out

    @staticmethod
    def _domains(trainer: L.Trainer) -> list[str]:
        manifest = getattr(trainer.datamodule, "manifest", None) if trainer.datamodule is not None else None
        return list(manifest.domains) if manifest is not None else []

    def _check_band(self, trainer: L.Trainer, pl_module: L.LightningModule, name: str, ratio: float) -> float:
        warmup = self.warmup_steps
        if warmup is None:
            warmup = getattr(getattr(pl_module, "schedule_cfg", None), "warmup_steps", 0)
        if trainer.global_step < warmup:
            return 0.0
        target = pl_module.config.parser.target_ratio
        low, high = BAND[0] * target, BAND[1] * target
        if low <= ratio <= high:
            self._warned.discard(name)
            return 0.0
        if name in self._warned:  # warn when the ratio leaves the band, not at every step it stays out
            return 1.0
        self._warned.add(name)
        rank_zero_warn(
            f"boundary collapse: {name} ratio {ratio:.2f} tokens/concept left [{low:.2f}, {high:.2f}] (R = {target}) "
            f"at step {trainer.global_step}; see the boundary/* scalars in TensorBoard"
        )
        return 1.0

    @staticmethod
    def _tensorboard(trainer: L.Trainer) -> Any:
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                return logger.experiment
        return None

    # ---- training ---------------------------------------------------------------------------------------------

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        # Only on logging steps: the statistics need one small all-reduce and a host copy.
        if not self._is_dlcm(outputs) or trainer.global_step % trainer.log_every_n_steps != 0:
            return
        sums = self._reduce(trainer, self._sums(outputs, batch))
        target = pl_module.config.parser.target_ratio
        scalars = self._scalars(sums, target, self._domains(trainer))
        aux = float(outputs["aux"])
        weighted = pl_module.config.parser.aux_weight * aux
        scalars["aux"] = aux
        scalars["aux_share"] = weighted / float(outputs["loss"]) if float(outputs["loss"]) else 0.0
        rate, keep = scalars["F_sampled"], 1.0 - self.smoothing
        self._ema_rate = rate if self._ema_rate is None else keep * self._ema_rate + self.smoothing * rate
        smoothed_ratio = 1.0 / max(self._ema_rate, 1e-9)
        scalars["collapse"] = self._check_band(trainer, pl_module, "smoothed training", smoothed_ratio)
        pl_module.log_dict({f"boundary/{k}": v for k, v in scalars.items()}, on_step=True, on_epoch=False)
        if trainer.global_step % self.histogram_every_n_steps == 0:
            self._histograms(trainer, "boundary", outputs["layout"].length_C, outputs["parser"].prob_T)

    def _histograms(self, trainer: L.Trainer, prefix: str, lengths: torch.Tensor, probs: torch.Tensor) -> None:
        writer = self._tensorboard(trainer)
        if writer is None or not trainer.is_global_zero:
            return
        writer.add_histogram(f"{prefix}/concept_length", lengths.float().cpu(), trainer.global_step)
        writer.add_histogram(f"{prefix}/boundary_prob", probs.float().cpu(), trainer.global_step)

    # ---- validation -------------------------------------------------------------------------------------------

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._val_sums, self._val_lengths, self._val_probs, self._val_text = None, [], [], None

    def on_validation_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if trainer.sanity_checking or not self._is_dlcm(outputs):
            return
        sums = self._sums(outputs, batch)
        self._val_sums = sums if self._val_sums is None else self._val_sums + sums
        self._val_lengths.append(outputs["layout"].length_C)
        self._val_probs.append(outputs["parser"].prob_T)
        if self._val_text is None:
            self._val_text = self._render(trainer, batch, outputs)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or self._val_sums is None:
            return
        sums = self._reduce(trainer, self._val_sums)
        scalars = self._scalars(sums, pl_module.config.parser.target_ratio, self._domains(trainer))
        scalars["collapse"] = self._check_band(trainer, pl_module, "validation", scalars["ratio_threshold"])
        pl_module.log_dict({f"val_boundary/{k}": v for k, v in scalars.items()}, on_step=False, on_epoch=True)
        self._histograms(trainer, "val_boundary", torch.cat(self._val_lengths), torch.cat(self._val_probs))
        writer = self._tensorboard(trainer)
        if writer is not None and trainer.is_global_zero and self._val_text:
            writer.add_text("val_boundary/segmentation", self._val_text, trainer.global_step)

    def _render(self, trainer: L.Trainer, batch: dict, outputs: dict) -> str | None:
        """The first documents of a validation batch, each concept in brackets (markdown for TensorBoard)."""
        tokenizer = getattr(trainer.datamodule, "tokenizer", None) if trainer.datamodule is not None else None
        if tokenizer is None or self.text_documents == 0:
            return None
        ids = batch["input_ids"].tolist()
        cu = batch["cu_seqlens"].tolist()
        concept_id = outputs["layout"].concept_id_T.tolist()
        blocks = []
        for d in range(min(self.text_documents, len(cu) - 1)):
            start, end = cu[d], min(cu[d + 1], cu[d] + self.text_max_tokens)
            concepts: list[list[int]] = []
            for t in range(start, end):
                if t == start or concept_id[t] != concept_id[t - 1]:
                    concepts.append([])
                concepts[-1].append(ids[t])
            text = "".join(f"[{tokenizer.decode(c)}]" for c in concepts)
            blocks.append(f"**document {d}** ({len(concepts)} concepts, {end - start} tokens)\n\n    {text!r}")
        return "\n\n".join(blocks)
