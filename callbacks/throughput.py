"""Training throughput and MFU from the analytic FLOPs of every micro-batch (:mod:`dlcm.model.flops`).

Logged on logging steps (``trainer.log_every_n_steps``), over the last ``window − 1`` logging intervals:

- ``train/perf/tokens_per_sec`` (all ranks) and ``train/perf/tokens_per_sec_per_device``;
- ``train/perf/model_flops_per_sec`` (all ranks) and ``train/perf/mfu`` = model FLOPs/s ÷ (devices × peak FLOPs
  per device);
- ``train/perf/hardware_flops_per_sec`` and ``train/perf/hfu``: the same with Ψ counted as its kernel runs it —
  ``Σ L_i²`` pairs for concept replication instead of the model's ``Σ L_i·C_i`` (equal when the exact L×C kernel runs);
- ``train/perf/model_flops_per_token`` and ``train/perf/hardware_flops_per_token``: training FLOPs per token of the last
  interval (they move with document and concept lengths).

Convention (docs/design.md): model FLOPs are 3 × forward matmul and attention FLOPs with no causal discount; for one
document of length ``seq`` per sequence this is ``(6·N_non-embedding + 12·layers·width·seq)·tokens``, the number
the dense baseline reports, so DLCM and baseline MFU compare like for like.

Cost: each micro-batch adds its length sums (:func:`dlcm.model.flops.packed_length_sums`, a few tiny kernels) on the
device, with no host sync: token offsets come from the batch, concept offsets from ``training_step``'s
``layout``, and the Ψ kernel that ran from the host-side ``max_seqlen``. On logging steps the callback
synchronises the device (the clock must time finished work), all-reduces the sums once over ranks (so unequal
concept counts are counted exactly) and reads them back. Validation time inside ``fit`` is excluded, and so is the
first optimizer step (allocation, compilation, autotuning): it only sets the reference point.
"""

from __future__ import annotations

import time
from typing import Any

import lightning as L
import torch
from lightning.fabric.utilities.throughput import Throughput, get_available_flops

from dlcm.model.config import DLCMConfig
from dlcm.model.flops import LengthStats, cross_kernel, flops_from_stats, packed_length_sums, resolve_config

# Rows of the pending sums: micro-batches whose Ψ ran on each kernel (with impl='auto' it can change per batch).
KERNELS = ("replicate", "exact")
# Compute dtype of a Trainer precision, only for looking up Lightning's peak table when no peak is given.
PRECISION_DTYPES = {
    "bf16-mixed": torch.bfloat16,
    "bf16-true": torch.bfloat16,
    "16-mixed": torch.float16,
    "16-true": torch.float16,
    "64-true": torch.float64,
}


class FlopsThroughput(L.Callback):
    """Logs tokens/s, model and hardware FLOPs/s, MFU and HFU of training (see the module docstring).

    Lightning's ``ThroughputMonitor`` cannot take a peak (it passes ``available_flops`` itself, and its table does
    not know "NVIDIA H200"), so this callback composes :class:`lightning.fabric.utilities.throughput.Throughput`
    directly with the recipe's peak.

    Args:
        peak_flops_per_device: dense peak FLOP/s of one device in the training dtype (H200 bf16: 9.89e14 datasheet,
            ≈7.9e14 measured on large GEMMs). ``None``: Lightning's table for the device; MFU/HFU are not logged
            when it does not know the device (CPU, H200).
        window: logging points the rates are averaged over (≥ 2; 2 = the last logging interval).
        causal_discount: count only attention pairs inside the causal mask (default: no discount, the MFU convention).
        sync_ranks: all-reduce the length sums over ranks on logging steps; ``False`` scales rank 0's count by
            the world size (Lightning's convention), which is exact only when every rank does the same work.
    """

    # Seconds since an arbitrary origin; a class attribute so tests can substitute a deterministic clock.
    clock = staticmethod(time.perf_counter)

    def __init__(
        self,
        peak_flops_per_device: float | None = None,
        window: int = 2,
        causal_discount: bool = False,
        sync_ranks: bool = True,
    ) -> None:
        super().__init__()
        if peak_flops_per_device is not None and peak_flops_per_device <= 0:
            raise ValueError(f"peak_flops_per_device={peak_flops_per_device} is not allowed: None or FLOP/s > 0")
        if window < 2:
            raise ValueError(f"window={window} is not allowed: at least 2 logging points (one interval)")
        self.peak_flops_per_device = peak_flops_per_device
        self.window = window
        self.causal_discount = causal_discount
        self.sync_ranks = sync_ranks
        self.peak: float | None = None
        self._config: Any = None
        self._model: Throughput | None = None
        self._hardware: Throughput | None = None
        self._reset()

    def _reset(self) -> None:
        self._pending: torch.Tensor | None = None  # [kernel, sum] length sums of micro-batches since the last mark
        self._micro = 0
        self._step_seen = -1
        self._t0: float | None = None
        self._paused = 0.0
        self._val_start: float | None = None
        self._totals = [0.0, 0.0, 0.0]  # micro-batches, documents, tokens per device since the reference point

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self._config = resolve_config(pl_module)
        peak = self.peak_flops_per_device
        if peak is None:
            dtype = PRECISION_DTYPES.get(str(trainer.precision), torch.float32)
            peak = get_available_flops(trainer.strategy.root_device, dtype)
        self.peak = float(peak) if peak else None
        world = trainer.world_size
        self._model = Throughput(available_flops=self.peak, world_size=world, window_size=self.window)
        self._hardware = Throughput(available_flops=self.peak, world_size=world, window_size=self.window)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._reset()
        self._step_seen = trainer.global_step
        for throughput in (self._model, self._hardware):
            if throughput is not None:
                throughput.reset()

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        sums = self._length_sums(outputs, batch)
        self._pending = sums if self._pending is None else self._pending + sums
        self._micro += 1
        if trainer.global_step == self._step_seen:
            return  # gradient accumulation: the optimizer step is not finished
        self._step_seen = trainer.global_step
        if self._t0 is None:
            self._reference(trainer)
            return
        every = trainer.log_every_n_steps
        if every > 0 and (trainer.global_step % every == 0 or trainer.should_stop):
            metrics = self._measure(trainer)
            if metrics:
                pl_module.log_dict(
                    {f"train/perf/{k}": v for k, v in metrics.items()}, on_step=True, on_epoch=False, batch_size=1
                )

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or self._t0 is None or trainer.state.fn != "fit":
            return
        self._synchronize(trainer)  # training work queued before validation belongs to training time
        self._val_start = self.clock()

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._val_start is None:
            return
        self._synchronize(trainer)
        self._paused += self.clock() - self._val_start
        self._val_start = None

    def _length_sums(self, outputs: Any, batch: Any) -> torch.Tensor:
        """``[len(KERNELS), 6]``: this micro-batch's sums in the row of the Ψ kernel that ran (host-side choice)."""
        cu_seqlens_cpt, kernel = None, "replicate"
        if isinstance(self._config, DLCMConfig):
            layout = outputs.get("layout") if isinstance(outputs, dict) else None
            if layout is None:
                raise ValueError(
                    "FlopsThroughput needs the concept layout of each DLCM training step: training_step must return "
                    "a dict with 'layout' (as DLCMModule does)"
                )
            cu_seqlens_cpt = layout.seqs.cu_seqlens
            ids_T = batch["input_ids"]
            max_seqlen = batch.get("max_seqlen") or ids_T.shape[0]  # the model's default bound is T
            kernel = cross_kernel(self._config, ids_T.device.type, max_seqlen)
        sums = packed_length_sums(batch["cu_seqlens"], cu_seqlens_cpt)
        rows = torch.zeros(len(KERNELS), sums.shape[0], dtype=sums.dtype, device=sums.device)
        rows[KERNELS.index(kernel)] = sums
        return rows

    @staticmethod
    def _synchronize(trainer: L.Trainer) -> None:
        device = trainer.strategy.root_device
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def _now(self) -> float:
        return self.clock() - self._paused

    def _reference(self, trainer: L.Trainer) -> None:
        self._synchronize(trainer)
        self._t0 = self._now()
        self._pending, self._micro = None, 0
        for throughput in (self._model, self._hardware):
            throughput.update(time=0.0, batches=0, samples=0, lengths=0, flops=0)

    def _measure(self, trainer: L.Trainer) -> dict[str, float]:
        self._synchronize(trainer)
        elapsed = self._now() - self._t0
        sums, micro = self._pending, self._micro
        self._pending, self._micro = None, 0
        world = trainer.world_size
        if self.sync_ranks and world > 1:
            sums = trainer.strategy.reduce(sums, reduce_op="sum")
            share = world  # all ranks' work: Throughput wants per-device amounts
        else:
            share = 1  # this rank's work; Throughput scales it by the world size
        per_kernel = [LengthStats.from_sums(row) for row in sums.tolist()]
        stats = per_kernel[0] + per_kernel[1]
        counts = [
            flops_from_stats(self._config, s, True, self.causal_discount, k)
            for s, k in zip(per_kernel, KERNELS, strict=True)
        ]
        model_total = sum(c.total for c in counts)  # FLOPs are linear in the sums: add the kernels' counts
        hardware_total = sum(c.hardware_total for c in counts)
        self._totals = [
            self._totals[0] + micro,
            self._totals[1] + stats.documents / share,
            self._totals[2] + stats.tokens / share,
        ]
        batches, docs, tokens = self._totals
        for throughput, flops in ((self._model, model_total), (self._hardware, hardware_total)):
            throughput.update(time=elapsed, batches=batches, samples=docs, lengths=tokens, flops=flops / share)
        out = {
            "model_flops_per_token": model_total / stats.tokens,
            "hardware_flops_per_token": hardware_total / stats.tokens,
        }
        m, h = self._model.compute(), self._hardware.compute()
        if "device/items_per_sec" in m and "device/flops_per_sec" in m:
            out["tokens_per_sec"] = m["device/items_per_sec"] * world
            out["tokens_per_sec_per_device"] = m["device/items_per_sec"]
            out["model_flops_per_sec"] = m["device/flops_per_sec"] * world
            out["hardware_flops_per_sec"] = h["device/flops_per_sec"] * world
            if self.peak:
                out["mfu"] = m["device/mfu"]
                out["hfu"] = h["device/mfu"]
        return out
