"""Decoupled μP from a recipe: the callback that applies the parameter-group rules of :mod:`dlcm.train.mup`.

It hands its settings to the LightningModule (``use_decoupled_mup``), which installs the rules' group function as
its ``param_groups_fn`` before ``configure_optimizers`` runs; at fit start it checks the optimizer that produced
against the rules and logs the group table once to TensorBoard; a resumed run is checked again after the
checkpoint's optimizer state is restored. The rules, the group table and the choices behind them are documented in
:mod:`dlcm.train.mup`.
"""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.loggers import TensorBoardLogger

from dlcm.model.config import require

TEXT_TAG = "mup/param_groups"


class DecoupledMuP(L.Callback):
    """Decoupled μP optimizer groups for ``DLCMModule`` / ``BaselineModule`` (rules: :mod:`dlcm.train.mup`).

    Enable in a recipe::

        trainer:
          callbacks:
            - class_path: dlcm.callbacks.mup.DecoupledMuP
              init_args: {d_base: 128, lr_token: 1.0e-3, lr_concept: 1.0e-3, lr_others: 1.0e-3}

    together with ``model.init_args.config.d_base`` equal to ``d_base``. ``model.optimizer.lr``, ``eps`` and
    ``weight_decay`` are then unused (the groups set their own); ``betas`` and the schedule still apply.

    Args:
        d_base: base width; must equal the model config's ``d_base``.
        lr_token: η_token^base, the token-stream rate at width ``d_base`` (divided by ``s_token``).
        lr_concept: η_concept^base (divided by ``s_concept``); the paper found it ≈ ``lr_token``.
        lr_others: η_others for embeddings, norm gains and the null concept (width-independent).
        lr_readout: LM-head rate, width-independent; ``None`` means ``lr_token``.
        eps: AdamW ε at width ``d_base`` (divided by ``s`` in the hidden and readout groups).
        weight_decay: decoupled weight decay of the matrix groups and the embedding table.
        group_weight_decay: per-group overrides, e.g. ``{embeddings: 0.0}``.
    """

    def __init__(
        self,
        d_base: int,
        lr_token: float,
        lr_concept: float,
        lr_others: float,
        lr_readout: float | None = None,
        eps: float = 1e-8,
        weight_decay: float = 0.1,
        group_weight_decay: dict[str, float] | None = None,
    ) -> None:
        super().__init__()
        require(d_base > 0, "DecoupledMuP.d_base", d_base, "a positive integer")
        for key, value in (("lr_token", lr_token), ("lr_concept", lr_concept), ("lr_others", lr_others)):
            require(value > 0, f"DecoupledMuP.{key}", value, "a number > 0")
        require(lr_readout is None or lr_readout > 0, "DecoupledMuP.lr_readout", lr_readout, "None or a number > 0")
        require(eps > 0, "DecoupledMuP.eps", eps, "a number > 0")
        require(weight_decay >= 0, "DecoupledMuP.weight_decay", weight_decay, "a number >= 0")
        self.d_base = d_base
        self.lr_token = lr_token
        self.lr_concept = lr_concept
        self.lr_others = lr_others
        self.lr_readout = lr_readout
        self.eps = eps
        self.weight_decay = weight_decay
        self.group_weight_decay = dict(group_weight_decay or {})
        self.rules: Any = None  # dlcm.train.mup.MuPRules, from the module at setup
        self._previous_fn: Any = None

    def settings(self) -> dict[str, Any]:
        """The μP settings: the fields of :class:`dlcm.train.mup.MuPSettings`."""
        keys = ("d_base", "lr_token", "lr_concept", "lr_others", "lr_readout", "eps", "weight_decay")
        return {key: getattr(self, key) for key in keys} | {"group_weight_decay": dict(self.group_weight_decay)}

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # setup runs before configure_model and strategy.setup (where configure_optimizers is called).
        if not hasattr(pl_module, "use_decoupled_mup"):
            raise TypeError(f"DecoupledMuP needs a dlcm LanguageModelModule; got {type(pl_module).__name__}")
        self._previous_fn = pl_module.param_groups_fn
        self.rules = pl_module.use_decoupled_mup(self.settings())

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Runs after configure_optimizers and before a checkpoint's optimizer state is restored.
        for optimizer in trainer.optimizers:
            self.rules.check(optimizer, pl_module.network)
        if trainer.is_global_zero:
            text = self.rules.describe(trainer.optimizers[0], pl_module.network)
            for logger in trainer.loggers:
                if isinstance(logger, TensorBoardLogger):
                    logger.experiment.add_text(TEXT_TAG, text, global_step=trainer.global_step)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # A resumed run has just loaded the checkpoint's param groups, lr/ε/wd included, over the ones built from
        # this callback's arguments: changed μP settings would be ignored silently, so say so.
        if trainer.ckpt_path:
            when = f" restored from {trainer.ckpt_path} (trained with other μP settings?)"
            for optimizer in trainer.optimizers:
                self.rules.check(optimizer, pl_module.network, when)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self._previous_fn is not None:
            pl_module.param_groups_fn = self._previous_fn
            self._previous_fn = None
