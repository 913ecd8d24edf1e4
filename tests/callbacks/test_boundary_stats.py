"""BoundaryStats on a tiny CPU fit: the scalars in TensorBoard equal the statistics of the logged batches; the
near-threshold share against a hand-computed case."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import Callback
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from dlcm.callbacks.boundary_stats import LENGTH_CAP, BoundaryStats, near_threshold_count, wrap_pieces
from dlcm.train.cli import run_cli

RECIPE = str(Path(__file__).parents[2] / "recipes" / "dlcm_tiny_r4_defaultcorpus_cpu.yaml")


class Keep(Callback):
    """Records what training and validation steps returned, as the callback under test saw it."""

    def __init__(self) -> None:
        self.train: list[tuple[dict, dict]] = []
        self.val: list[tuple[dict, dict]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.train.append((outputs, {k: v for k, v in batch.items()}))

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if not trainer.sanity_checking:
            self.val.append((outputs, batch))


@pytest.fixture(scope="module")
def fitted(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("boundary")
    cli = run_cli(
        [
            f"--config={RECIPE}",
            "--data.tokens_per_batch=512",
            "--trainer.max_steps=4",
            "--trainer.val_check_interval=4",
            "--trainer.limit_val_batches=2",
            "--trainer.log_every_n_steps=1",
            "--trainer.enable_progress_bar=false",
            "--boundary_stats.histogram_every_n_steps=2",
            "--boundary_stats.warmup_steps=0",
            f"--trainer.default_root_dir={root}",
            f"--trainer.logger.init_args.save_dir={root}",
        ],
        run=False,
    )
    keep = Keep()
    assert sum(isinstance(c, BoundaryStats) for c in cli.trainer.callbacks) == 1  # the CLI adds it
    cli.trainer.callbacks.append(keep)
    cli.trainer.fit(cli.model, cli.datamodule)
    events = EventAccumulator(cli.trainer.logger.log_dir)
    events.Reload()
    return cli, keep, events


def series(events: EventAccumulator, tag: str) -> list[float]:
    return [e.value for e in events.Scalars(tag)]


def test_training_scalars_match_the_batches(fitted) -> None:
    cli, keep, events = fitted
    cfg = cli.model.config.parser
    expected_thr = [out["parser"].threshold_T.float().mean().item() for out, _ in keep.train]
    assert series(events, "train/segmentation/ratio_threshold") == pytest.approx(
        [1 / f for f in expected_thr], rel=1e-5
    )
    expected_g = [out["parser"].prob_T.mean().item() for out, _ in keep.train]
    assert series(events, "train/segmentation/G") == pytest.approx(expected_g, rel=1e-5)
    midpoint = []
    for out, batch in keep.train:
        p = out["parser"].prob_T.double()
        midpoint.append((4 * p * (1 - p)).sum().item() / (p.numel() - (len(batch["cu_seqlens"]) - 1)))
    assert series(events, "train/segmentation/midpoint") == pytest.approx(midpoint, rel=1e-5)
    assert series(events, "train/segmentation/target_R") == [cfg.target_ratio] * len(keep.train)
    # the share near τ is bounded and logged on every training logging step and validation
    near = series(events, "train/segmentation/near_threshold")
    assert len(near) == len(keep.train) and all(0.0 <= v <= 1.0 for v in near)
    assert len(series(events, "val/segmentation/near_threshold")) >= 1
    # τ is calibrated at every optimizer step: the last value logged is the model's.
    assert series(events, "train/segmentation/threshold")[-1] == pytest.approx(
        float(cli.model.network.parser.threshold)
    )
    assert series(events, "train/segmentation/alpha") == pytest.approx([cfg.sharpen_alpha] * len(keep.train))
    per_seq = [out["layout"].num_concepts / (len(batch["cu_seqlens"]) - 1) for out, batch in keep.train]
    assert series(events, "train/segmentation/concepts_per_seq") == pytest.approx(per_seq, rel=1e-5)
    cv = [
        (out["layout"].length_C.float().std(unbiased=False) / out["layout"].length_C.float().mean()).item()
        for out, _ in keep.train
    ]
    assert series(events, "train/segmentation/length_cv") == pytest.approx(cv, rel=1e-4)
    share = [cfg.aux_weight * out["aux"].item() / out["loss"].item() for out, _ in keep.train]
    assert series(events, "train/segmentation/aux_share") == pytest.approx(share, rel=1e-4)


def test_per_domain_tokens_per_concept(fitted) -> None:
    cli, keep, events = fitted
    domains = cli.datamodule.manifest.domains
    out, batch = keep.train[0]
    tokens_D = batch["cu_seqlens"].diff()
    concepts_D = out["layout"].seqs.cu_seqlens.diff()
    for i, name in enumerate(domains):
        mine = batch["domain"] == i
        if mine.any():
            expected = (tokens_D[mine].sum() / concepts_D[mine].sum()).item()
            assert series(events, f"train/segmentation/tokens_per_concept/{name}")[0] == pytest.approx(
                expected, rel=1e-5
            )


def test_one_tag_per_quantity(fitted) -> None:
    _, _, events = fitted
    scalars = set(events.Tags()["scalars"])
    assert {"train/ratio", "train/aux", "val/ratio", "train/segmentation/ratio_threshold"} <= scalars
    duplicates = {
        "train/segmentation/ratio",
        "train/segmentation/aux",
        "train/ratio_threshold",
        "val/segmentation/ratio",
    }
    duplicates |= {"val/segmentation/ratio_threshold", "train/segmentation/F_sampled", "val/segmentation/F_threshold"}
    assert not scalars & duplicates
    assert "train/segmentation/collapse" not in scalars  # only the held-out inference-mode ratio is judged
    # two groups, train first: TensorBoard sorts groups (a tag's first path part) by name
    assert {tag.split("/")[0] for tag in [*scalars, *events.Tags()["histograms"]]} == {"train", "val"}


def test_validation_scalars_histograms_and_text(fitted) -> None:
    _, keep, events = fitted
    tokens = sum(out["parser"].boundary_T.numel() for out, _ in keep.val)
    thresholded = sum(out["parser"].threshold_T.sum().item() for out, _ in keep.val)
    assert series(events, "val/ratio") == pytest.approx([tokens / thresholded], rel=1e-5)
    histograms = events.Tags()["histograms"]
    expected = {
        "train/segmentation/concept_length",
        "train/segmentation/boundary_prob",
        "val/segmentation/concept_length",
    }
    assert expected <= set(histograms)
    text = events.Tensors("val/segmentation/sample/text_summary")[0].tensor_proto.string_val[0].decode()
    first_out, first_batch = keep.val[0]
    end = min(int(first_batch["cu_seqlens"][1]), 160)
    concepts = len(set(first_out["layout"].concept_id_T[:end].tolist()))
    assert text.startswith(f"**document 0** ({concepts} concepts, {end} tokens)")
    lines = text.split("\n\n")[1].split("\n")
    assert all(line.startswith("    ") and len(line) <= 4 + 100 for line in lines)  # verbatim block, wrapped
    body = "".join(line[4:] for line in lines)
    assert body.count("][") == concepts - 1
    assert "\\n" not in body and body[0] != "'"  # no repr escapes


def test_wrap_pieces_breaks_between_concepts() -> None:
    assert wrap_pieces(["[ab]", "[cd]", "[efghij]"], 8) == ["[ab][cd]", "[efghij]"]
    assert wrap_pieces(["[abcdefghij]"], 5) == ["[abcd", "efghi", "j]"]


def test_concept_length_histogram_keeps_outliers_in_the_last_bin(fitted) -> None:
    cli, _, events = fitted
    cap = math.ceil(LENGTH_CAP * cli.model.config.parser.target_ratio)
    histogram = events.Histograms("val/segmentation/concept_length")[-1].histogram_value
    assert histogram.max <= cap


def test_collapse_flag_and_warning_when_the_ratio_leaves_the_band(fitted, caplog) -> None:
    cli, _, events = fitted
    flags = series(events, "val/segmentation/collapse")
    ratio = series(events, "val/ratio")[0]
    target = cli.model.config.parser.target_ratio
    assert flags == [0.0 if 0.8 * target <= ratio <= 1.25 * target else 1.0]
    stats = BoundaryStats(warmup_steps=0)
    with pytest.warns(UserWarning, match=r"boundary collapse: validation ratio 9\.00"):
        assert stats._check_band(cli.trainer, cli.model, "validation", 9.0) == 1.0
    assert stats._check_band(cli.trainer, cli.model, "validation", 9.5) == 1.0  # no second warning
    with caplog.at_level(logging.INFO):
        assert stats._check_band(cli.trainer, cli.model, "validation", target) == 0.0
        assert stats._check_band(cli.trainer, cli.model, "validation", target) == 0.0
    assert [r.message.split(":")[0] for r in caplog.records] == ["boundary ratio back in band"]  # once


def test_near_threshold_share_by_hand() -> None:
    # two documents [0, 4) and [4, 7); τ = 0.48, band [0.43, 0.53]. Document starts (0 and 4) are forced and never
    # count, even at p = 0.5. Interior: 0.47 in, 0.70 out, 0.53 − 1e-4 in, 0.20 out, 0.43 + 1e-4 in → 3 of 5.
    prob_T = torch.tensor([0.5, 0.47, 0.70, 0.5299, 0.5, 0.20, 0.4301])
    count = near_threshold_count(prob_T, torch.tensor(0.48), torch.tensor([0, 4, 7]))
    assert count.dtype == torch.float64 and float(count) == 3.0
    assert float(near_threshold_count(prob_T, torch.tensor(0.9), torch.tensor([0, 4, 7]))) == 0.0
