"""The calibrated τ moves once per optimizer step, in the training loop: the micro-batches of a step all decide with
the τ from before it, and the step folds their estimates in once (the mean, then the running average)."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback

from dlcm.model.parser import GlobalParser
from dlcm.model.presets import tiny_dlcm
from dlcm.train.lightning_modules import DLCMModule
from tests.conftest import random_cu_seqlens

STEPS, ACCUMULATE, VOCAB = 3, 2, 64


class TauTrace(Callback):
    """τ as each micro-batch starts, and each micro-batch's reported estimate."""

    def __init__(self) -> None:
        self.before: list[float] = []
        self.estimates: list[torch.Tensor] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.before.append(float(pl_module.network.parser.threshold))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.estimates.append(outputs["parser"].threshold_estimate)


def packed_batches(count: int) -> list[dict[str, object]]:
    g = torch.Generator().manual_seed(0)
    cu = random_cu_seqlens([40, 24])
    return [
        {
            "input_ids": torch.randint(0, VOCAB, (64,), generator=g),
            "cu_seqlens": cu,
            "max_seqlen": 40,
            "token_bytes": torch.ones(64, dtype=torch.int64),
            "domain": torch.zeros(2, dtype=torch.int64),
        }
        for _ in range(count)
    ]


def test_tau_is_folded_once_per_optimizer_step_from_its_micro_batches(tmp_path: Path) -> None:
    module = DLCMModule(tiny_dlcm(VOCAB), context_length=64)
    trace = TauTrace()
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=STEPS,
        accumulate_grad_batches=ACCUMULATE,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[trace],
        default_root_dir=tmp_path,
    )
    batches = packed_batches(STEPS * ACCUMULATE)
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(batches, batch_size=None))
    parser = module.network.parser
    reference = GlobalParser(module.config.d_token, parser.cfg)
    assert len(trace.estimates) == STEPS * ACCUMULATE
    for step in range(STEPS):
        micro = slice(step * ACCUMULATE, (step + 1) * ACCUMULATE)
        assert trace.before[micro] == [float(reference.threshold)] * ACCUMULATE, step  # one τ for the whole step
        reference.fold_threshold(trace.estimates[micro])
    assert int(parser.threshold_updates) == STEPS
    assert float(parser.threshold) == pytest.approx(float(reference.threshold), rel=1e-6)
    assert float(parser.threshold) != pytest.approx(parser.cfg.threshold)
