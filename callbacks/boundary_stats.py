"""Boundary-rate observability for DLCM: what the global parser decided, per step and per validation epoch.

Everything is read from the outputs ``DLCMModule.training_step`` / ``validation_step`` already return (the parser
decisions, probabilities and concept layout of that very forward): nothing is recomputed.

One tag per quantity. The module itself logs ``train/ratio`` (tokens per concept as sampled for the ratio loss),
``train/aux`` and ``val/ratio`` (tokens per concept with inference-mode boundaries on the validation split, the
headline number). This callback adds (``train/segmentation/…`` on training logging steps, ``val/segmentation/…`` per
validation epoch, all summed over ranks):

- ``train/segmentation/ratio_threshold``: tokens per concept inference would realise on the training batch (``p ≥ τ``);
- ``train/segmentation/threshold``, ``train/segmentation/alpha``: the parser's current τ and sampling α;
  ``train/segmentation/target_R``;
- ``G``: mean boundary probability; ``midpoint``: mean ``4p(1 − p)`` over non-forced tokens (1: every ``p`` at 0.5,
  undecided; 0: all at 0 or 1);
- ``near_threshold``: share of non-forced tokens whose ``p`` lies within ±0.05 of the parser's τ — the decisions a
  small move of τ (or of the probabilities) flips; with a decisive parser it is near 0, and the inference-mode
  ratio no longer hangs on the third decimal of τ;
- ``concepts_per_seq``: concepts per packed document; ``length_cv``: coefficient of variation of concept lengths;
- ``train/segmentation/aux_share``: λ·L_aux as a share of the total loss;
- ``tokens_per_concept/<domain>``: the paper's Table 5 statistic per document domain (prose, code, …); at
  validation these are the inference-mode ratios per domain;
- histograms of concept lengths (lengths above ``8·R`` counted in the last bin, so a rare very long concept does
  not squash the rest) and of boundary probabilities; a text view of a few validation documents, wrapped, with
  concepts bracketed and line breaks / tabs shown as ``⏎`` / ``⇥``;
- ``val/segmentation/collapse``: 1 when, after ``warmup_steps``, ``val/ratio`` — the inference-mode ratio on held-out
  documents, the one that decides inference FLOPs — leaves ``[0.8·R, 1.25·R]``; a warning is printed when it leaves
  the band and, if it comes back, a line saying so (early in training the ratio loss is often still pulling the rate
  in). Training batches are not judged: a batch of 2K tokens from one domain moves its own ratio by ±30 %
  with nothing wrong (see ``train/segmentation/ratio_threshold`` for them).

Training statistics are computed on logging steps only (``trainer.log_every_n_steps``): each costs one small
all-reduce and one host copy.
"""

from __future__ import annotations

import math
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

BAND = (0.8, 1.25)
HEAD = 9  # additive statistics before the per-domain ones (see BoundaryStats._sums)
NEAR = 0.05  # half-width of the band around τ that near_threshold counts
# Per-domain, per-step sums gathered in one all-reduce: [tokens, concepts] for each domain slot.
MAX_DOMAINS = 16
LENGTH_CAP = 8  # concept-length histograms count lengths above LENGTH_CAP·R in their last bin
VISIBLE = str.maketrans({"\n": "⏎", "\r": "␍", "\t": "⇥"})


class BoundaryStats(L.Callback):
    """Logs the global parser's statistics (see module docstring); DLCM modules only, a no-op otherwise.

    Args:
        histogram_every_n_steps: training steps between histogram writes (they cost a host copy).
        text_documents: validation documents rendered with concept brackets at each validation epoch.
        text_max_tokens: tokens shown per rendered document.
        text_width: characters per line of the rendered documents.
        warmup_steps: steps before the collapse check starts (default: the schedule's warm-up).
    """

    def __init__(
        self,
        histogram_every_n_steps: int = 100,
        text_documents: int = 3,
        text_max_tokens: int = 160,
        text_width: int = 100,
        warmup_steps: int | None = None,
    ) -> None:
        super().__init__()
        self.histogram_every_n_steps = histogram_every_n_steps
        self.text_documents = text_documents
        self.text_max_tokens = text_max_tokens
        self.text_width = text_width
        self.warmup_steps = warmup_steps
        self._val_sums: torch.Tensor | None = None
        self._val_lengths: list[torch.Tensor] = []
        self._val_probs: list[torch.Tensor] = []
        self._val_text: str | None = None
        self._warned: set[str] = set()

    # ---- shared statistics ------------------------------------------------------------------------------------

    @staticmethod
    def _is_dlcm(outputs: Any) -> bool:
        return isinstance(outputs, dict) and "layout" in outputs and "parser" in outputs

    def _sums(self, outputs: dict, batch: dict, tau: torch.Tensor) -> torch.Tensor:
        """Additive per-batch statistics: [tokens, sampled, thresholded, Σp, concepts, docs, Σlen², Σ4p(1 − p) over
        non-forced tokens, non-forced tokens with p within ±NEAR of τ, then per domain (tokens, concepts)]."""
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
                midpoint_sum(parser.prob_T),
                near_threshold_count(parser.prob_T, tau, batch["cu_seqlens"]),
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

    def _scalars(self, sums: torch.Tensor, domains: list[str]) -> dict[str, float]:
        """Scalars shared by training and validation, plus ``ratio_threshold`` (which validation logs as
        ``val/ratio`` through the module, so its caller drops it there)."""
        tokens, _, thresholded, prob, concepts, docs, sq_len, midpoint, near = sums[:HEAD].tolist()
        mean_len = tokens / max(concepts, 1.0)
        variance = max(sq_len / max(concepts, 1.0) - mean_len**2, 0.0)
        out = {
            "ratio_threshold": tokens / max(thresholded, 1.0),
            "G": prob / tokens,
            "midpoint": midpoint / max(tokens - docs, 1.0),
            "near_threshold": near / max(tokens - docs, 1.0),
            "concepts_per_seq": concepts / max(docs, 1.0),
            "length_cv": variance**0.5 / mean_len,
        }
        per_domain = sums[HEAD:].view(MAX_DOMAINS, 2).tolist()
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
            if name in self._warned:  # the reader saw the warning: say that it resolved
                self._warned.discard(name)
                rank_zero_info(
                    f"boundary ratio back in band: {name} ratio {ratio:.2f} tokens/concept is within "
                    f"[{low:.2f}, {high:.2f}] (R = {target}) at step {trainer.global_step}; the collapse flag is off"
                )
            return 0.0
        if name in self._warned:  # warn when the ratio leaves the band, not at every step it stays out
            return 1.0
        self._warned.add(name)
        rank_zero_warn(
            f"boundary collapse: {name} ratio {ratio:.2f} tokens/concept left [{low:.2f}, {high:.2f}] (R = {target}) "
            f"at step {trainer.global_step}. Soon after warm-up this can be the ratio loss still pulling the rate in "
            "(a line says so if it returns); if it stays out, see the train/segmentation/* and val/segmentation/* "
            "scalars in TensorBoard"
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
        sums = self._reduce(trainer, self._sums(outputs, batch, pl_module.network.parser.threshold))
        scalars = self._scalars(sums, self._domains(trainer))
        parser_cfg = pl_module.config.parser
        parser = pl_module.network.parser
        scalars["threshold"] = float(parser.threshold)
        scalars["alpha"] = parser.alpha
        scalars["target_R"] = parser_cfg.target_ratio
        loss = float(outputs["loss"])
        scalars["aux_share"] = parser_cfg.aux_weight * float(outputs["aux"]) / loss if loss else 0.0
        pl_module.log_dict({f"train/segmentation/{k}": v for k, v in scalars.items()}, on_step=True, on_epoch=False)
        if trainer.global_step % self.histogram_every_n_steps == 0:
            self._histograms(
                trainer, pl_module, "train/segmentation", outputs["layout"].length_C, outputs["parser"].prob_T
            )

    def _histograms(
        self, trainer: L.Trainer, pl_module: L.LightningModule, prefix: str, lengths: torch.Tensor, probs: torch.Tensor
    ) -> None:
        writer = self._tensorboard(trainer)
        if writer is None or not trainer.is_global_zero:
            return
        cap = math.ceil(LENGTH_CAP * pl_module.config.parser.target_ratio)
        clipped = lengths.clamp(max=cap).cpu().numpy()
        writer.add_histogram(f"{prefix}/concept_length", clipped, trainer.global_step, bins=np.arange(0.5, cap + 1))
        writer.add_histogram(
            f"{prefix}/boundary_prob", probs.float().cpu().numpy(), trainer.global_step, bins=np.linspace(0, 1, 51)
        )

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
        sums = self._sums(outputs, batch, pl_module.network.parser.threshold)
        self._val_sums = sums if self._val_sums is None else self._val_sums + sums
        self._val_lengths.append(outputs["layout"].length_C)
        self._val_probs.append(outputs["parser"].prob_T)
        if self._val_text is None:
            self._val_text = self._render(trainer, batch, outputs)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or self._val_sums is None:
            return
        sums = self._reduce(trainer, self._val_sums)
        scalars = self._scalars(sums, self._domains(trainer))
        ratio = scalars.pop("ratio_threshold")  # = val/ratio, logged by the module
        scalars["collapse"] = self._check_band(trainer, pl_module, "validation inference-mode", ratio)
        pl_module.log_dict({f"val/segmentation/{k}": v for k, v in scalars.items()}, on_step=False, on_epoch=True)
        self._histograms(
            trainer, pl_module, "val/segmentation", torch.cat(self._val_lengths), torch.cat(self._val_probs)
        )
        writer = self._tensorboard(trainer)
        if writer is not None and trainer.is_global_zero and self._val_text:
            writer.add_text("val/segmentation/sample", self._val_text, trainer.global_step)

    def _render(self, trainer: L.Trainer, batch: dict, outputs: dict) -> str | None:
        """The first documents of a validation batch, each concept in brackets, wrapped at concept boundaries into
        an indented (verbatim) markdown block for TensorBoard."""
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
            pieces = [f"[{tokenizer.decode(c).translate(VISIBLE)}]" for c in concepts]
            lines = wrap_pieces(pieces, self.text_width)
            body = "\n".join(f"    {line}" for line in lines)
            blocks.append(f"**document {d}** ({len(concepts)} concepts, {end - start} tokens)\n\n{body}")
        return "\n\n".join(blocks)


def midpoint_sum(prob_T: torch.Tensor) -> torch.Tensor:
    """``Σ 4p(1 − p)``: over the tokens whose boundary is not forced, since forced starts (p = 1) add 0."""
    prob = prob_T.double()
    return (4.0 * prob * (1.0 - prob)).sum()


def near_threshold_count(prob_T: torch.Tensor, tau: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """How many tokens whose boundary is not forced (every document's first, at ``cu_seqlens[:-1]``) have
    ``|p − τ| ≤ NEAR``, as a float64 scalar (no host synchronisation)."""
    near_T = (prob_T.double() - tau.double()).abs() <= NEAR
    near_T[cu_seqlens[:-1].long()] = False
    return near_T.sum().double()


def wrap_pieces(pieces: list[str], width: int) -> list[str]:
    """Join ``pieces`` into lines of at most ``width`` characters, breaking only between pieces (a longer piece is
    split by characters)."""
    lines, line = [], ""
    for piece in pieces:
        if line and len(line) + len(piece) > width:
            lines.append(line)
            line = ""
        line += piece
        while len(line) > width:
            lines.append(line[:width])
            line = line[width:]
    if line:
        lines.append(line)
    return lines
