"""TensorBoard's HPARAMS tab of a run: the recipe's key values, with val/bpb, val/loss, val/ratio as its metrics and
no placeholder metric (Lightning's ``hp_metric``)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2

from dlcm.train.cli import HPARAM_METRICS, log_hparams_summary, recipe_hparams

CONFIG = {
    "model": {
        "class_path": "dlcm.train.lightning_modules.DLCMModule",
        "init_args": {
            "context_length": 256,
            "config": {"encoder": {"width": 128, "n_layers": 2}, "parser": {"target_ratio": 4.0, "aux_weight": 0.03}},
            "optimizer": {"lr": 1e-3},
        },
    },
    "data": {"data_dir": None, "tokens_per_batch": 2048},
    "trainer": {"max_steps": 300, "precision": "32-true"},
    "seed_everything": 0,
}


def test_recipe_hparams_are_the_key_values_by_short_name() -> None:
    assert recipe_hparams(CONFIG) == {
        "model.class_path": "DLCMModule",
        "encoder.width": 128,
        "encoder.n_layers": 2,
        "parser.target_ratio": 4.0,
        "parser.aux_weight": 0.03,
        "context_length": 256,
        "optimizer.lr": 1e-3,
        "data.tokens_per_batch": 2048,
        "trainer.max_steps": 300,
        "trainer.precision": "32-true",
        "seed_everything": 0,
    }


def test_summary_names_val_bpb_as_metric_and_logs_no_placeholder(tmp_path: Path) -> None:
    logger = TensorBoardLogger(tmp_path, name="run", default_hp_metric=False)
    log_hparams_summary(SimpleNamespace(is_global_zero=True, logger=logger), CONFIG)
    events = EventAccumulator(logger.log_dir)
    events.Reload()
    content = events.PluginTagToContent("hparams")
    experiment = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/experiment"]).experiment
    assert [m.name.tag for m in experiment.metric_infos] == list(HPARAM_METRICS)
    session = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"]).session_start_info
    assert session.hparams["parser.target_ratio"].number_value == 4.0
    assert session.hparams["model.class_path"].string_value == "DLCMModule"
    assert events.Tags()["scalars"] == []  # no metric value is made up
