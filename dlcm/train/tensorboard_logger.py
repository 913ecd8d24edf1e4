"""The TensorBoard logger of dlcm runs."""

from __future__ import annotations

from collections.abc import Mapping

from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only


class RunTensorBoardLogger(TensorBoardLogger):
    """Lightning's TensorBoard logger without the ``epoch`` scalar Lightning adds to every write.

    Every dlcm scalar sits under ``train/`` or ``val/``, so those two groups are all the Scalars and Time Series
    dashboards show. ``epoch`` would form a third group sorted ahead of them, and passes over a packed token stream
    carry no information a run's step count does not.
    """

    @rank_zero_only
    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        super().log_metrics({k: v for k, v in metrics.items() if k != "epoch"}, step)
