"""The decoupled μP callback applies the rules of :mod:`dlcm.train.mup` from a recipe: it installs the module's
group function and restores it, rejects a model of another d_base, and drives a real fit (named groups, TensorBoard
table and LR curves, a resumed run with changed settings refused)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from dlcm.callbacks.mup import TEXT_TAG, DecoupledMuP
from dlcm.train.cli import run_cli
from dlcm.train.lightning_modules import BaselineModule, DLCMModule
from dlcm.train.mup import GroupHParams, MuPParamGroups
from dlcm.train.optim import default_param_groups
from tests.train.test_mup import EPS, LR_CONCEPT, LR_OTHERS, LR_TOKEN, SETTINGS, wide_baseline, wide_dlcm

RECIPE = str(Path(__file__).parents[2] / "recipes" / "dlcm_tiny_r4_defaultcorpus_cpu.yaml")


def callback() -> DecoupledMuP:
    return DecoupledMuP(**SETTINGS)


def test_the_callback_hands_every_setting_to_the_module() -> None:
    cb = DecoupledMuP(32, LR_TOKEN, LR_CONCEPT, LR_OTHERS, lr_readout=7e-4, group_weight_decay={"embeddings": 0.0})
    module = DLCMModule(wide_dlcm())
    cb.setup(None, module, "fit")  # type: ignore[arg-type]
    assert cb.rules.table["readout"].lr == 7e-4 and cb.rules.table["embeddings"].weight_decay == 0.0
    misspelt = DecoupledMuP(32, LR_TOKEN, LR_CONCEPT, LR_OTHERS, group_weight_decay={"embedding": 0.0})
    module = DLCMModule(wide_dlcm())
    with pytest.raises(ValueError, match=r"group_weight_decay='embedding' is not allowed: a group name"):
        misspelt.setup(None, module, "fit")  # type: ignore[arg-type]
    assert module.param_groups_fn is default_param_groups


@pytest.mark.parametrize("model_d_base", [None, 16])
def test_a_model_built_for_another_d_base_is_rejected(model_d_base: int | None) -> None:
    module = DLCMModule(wide_dlcm(d_base=model_d_base))
    with pytest.raises(ValueError, match=rf"DecoupledMuP\(d_base=32\).*model config has d_base={model_d_base}"):
        callback().setup(None, module, "fit")  # type: ignore[arg-type]
    assert module.param_groups_fn is default_param_groups


def test_setup_installs_the_group_function_and_teardown_restores_it() -> None:
    module = BaselineModule(wide_baseline())
    cb = callback()
    cb.setup(None, module, "fit")  # type: ignore[arg-type]
    assert isinstance(module.param_groups_fn, MuPParamGroups)
    cb.teardown(None, module, "fit")  # type: ignore[arg-type]
    assert module.param_groups_fn is default_param_groups


def fit_args(root: Path, steps: int, lr_token: float) -> list[str]:
    mup = {"d_base": 64, "lr_token": lr_token, "lr_concept": LR_CONCEPT, "lr_others": LR_OTHERS, "eps": EPS}
    return [
        f"--config={RECIPE}",
        "--data.tokens_per_batch=512",
        f"--trainer.max_steps={steps}",
        "--model.init_args.config.d_base=64",
        "--trainer.limit_val_batches=0",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        "--trainer.log_every_n_steps=1",
        f"--trainer.default_root_dir={root}",
        f"--trainer.logger.init_args.save_dir={root}",
        # As a recipe would enable it: jsonargparse builds the callback from class_path + init_args.
        "--trainer.callbacks=" + json.dumps([{"class_path": "dlcm.callbacks.mup.DecoupledMuP", "init_args": mup}]),
    ]


def test_callback_drives_a_real_fit_and_logs_table_and_named_lr_curves(tmp_path: Path) -> None:
    cli = run_cli(fit_args(tmp_path, 3, LR_TOKEN), run=False)
    assert any(isinstance(c, DecoupledMuP) for c in cli.trainer.callbacks)
    cli.trainer.fit(cli.model, cli.datamodule)

    # Recipe widths: d_token 128, d_concept 256, d_base 64 → s_token 2, s_concept 4.
    expected = {
        "token_hidden": GroupHParams(LR_TOKEN / 2, EPS / 2, 0.1),
        "concept_hidden": GroupHParams(LR_CONCEPT / 4, EPS / 4, 0.1),
        "embeddings": GroupHParams(LR_OTHERS, EPS, 0.1),
        "norms": GroupHParams(LR_OTHERS, EPS, 0.0),
        "readout": GroupHParams(LR_TOKEN, EPS / 2, 0.1),
    }
    groups = cli.trainer.optimizers[0].param_groups
    assert [g["name"] for g in groups] == list(expected)
    for g in groups:
        want = expected[g["name"]]
        assert (g["initial_lr"], g["eps"], g["weight_decay"]) == pytest.approx(
            (want.lr, want.eps, want.weight_decay), rel=1e-12
        )
    assert cli.model.param_groups_fn is default_param_groups  # restored at teardown

    events = EventAccumulator(cli.trainer.logger.log_dir)
    events.Reload()
    text = events.Tensors(f"{TEXT_TAG}/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "s_token 2 (d_token 128), s_concept 4 (d_concept 256)" in text
    assert "| concept_hidden | 23 |" in text and "| norms |" in text and "ones" in text
    for name, want in expected.items():
        curve = [e.value for e in events.Scalars(f"train/lr/{name}")]
        assert len(curve) == 3, name
        # Warm-up multipliers 1/30, 2/30, 3/30 of each group's own base rate.
        assert curve == pytest.approx([want.lr * k / 30 for k in (1, 2, 3)], rel=1e-6), name

    # Resuming with other μP settings: the checkpoint's groups win in torch, so the callback says so.
    last = Path(cli.trainer.logger.log_dir) / "checkpoints" / "last.ckpt"
    resumed = run_cli([*fit_args(tmp_path, 4, 2 * LR_TOKEN), "--extend_run=true"], run=False)
    stale = r"(?s)restored from .*last\.ckpt.*'token_hidden': lr=0\.001, the rule gives 0\.002"
    with pytest.raises(ValueError, match=stale):
        resumed.trainer.fit(resumed.model, resumed.datamodule, ckpt_path=str(last))
