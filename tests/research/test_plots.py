"""`dlcm plot` (dlcm/research/plots.py): each figure from plain run summaries, PNG and TensorBoard output, the CLI
on run and sweep directories, and its errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from dlcm.research import plots


def summary(offset: float, with_boundaries: bool = True) -> dict:
    curves = {
        "val/loss": {"step": [9, 19, 29], "value": [5.0 + offset, 4.5 + offset, 4.2 + offset]},
        "val/bpb": {"step": [9, 19, 29], "value": [2.0 + offset, 1.8 + offset, 1.7 + offset]},
    }
    if with_boundaries:
        curves["train/ratio"] = {"step": list(range(30)), "value": [6.0 - i / 10 for i in range(30)]}
        curves["val/ratio"] = {"step": [9, 19, 29], "value": [5.0, 4.4, 4.1]}
    return {
        "curves": curves,
        "val_flops": [1e12, 2e12, 3e12],
        "target_ratio": 4.0 if with_boundaries else None,
        "tokens_per_concept": {"prose": 3.8, "code": 4.4} if with_boundaries else {},
    }


ANALYSIS = {
    "dlcm": {"max_position": 3, "position": [0, 1, 2, 3], "loss_by_position": [3.0, 2.0, 1.5, None]},
    "baseline": {"max_position": 3, "position": [0, 1, 2, 3], "loss_by_position": [3.2, 1.9, 1.6, None]},
}
MUP = {
    "coordinates": {
        "tied": {
            "rows": [
                {"multiplier": m, "lr_token": 1e-3 * m, "lr_concept": 1e-3 * m, "w64": 4 + (m - 1) ** 2, "w256": None}
                for m in (0.5, 1.0, 2.0)
            ],
            "aligned": True,
            "within_one_step": True,
        }
    }
}
SYNTHETIC = [
    {
        "router_grad": name,
        "scores": {"tol0": {"tolerance": 0, "precision": p, "recall": p, "f1": p}},
        "chance": {"tol0": {"tolerance": 0, "precision": 0.2, "recall": 0.2, "f1": 0.2}},
    }
    for name, p in (("aux", 0.3), ("ste", 0.6))
]


def test_every_figure_and_both_outputs(tmp_path: Path) -> None:
    runs = {"dlcm": summary(0.0), "baseline": summary(0.1, with_boundaries=False)}
    figures = plots.draw_all(runs, {"a": ANALYSIS}, MUP, metric="val/bpb")
    assert sorted(figures) == [
        "loss_vs_flops",
        "lr_transfer",
        "position_loss",
        "ratio_over_training",
        "tokens_per_concept",
    ]
    # One line per run on the FLOPs axis; the ratio panel only for the run with boundary statistics.
    (ax,) = figures["loss_vs_flops"].axes
    assert [tuple(line.get_xdata()) for line in ax.get_lines()] == [(1e12, 2e12, 3e12)] * 2
    assert list(ax.get_lines()[1].get_ydata()) == pytest.approx([2.1, 1.9, 1.8])
    assert [a.get_title() for a in figures["ratio_over_training"].axes if a.get_visible()] == ["dlcm"]
    # Position loss: both models, and the difference panel with the two positions both have.
    left, right = figures["position_loss"].axes
    assert len(left.get_lines()) == 2
    assert list(right.get_lines()[0].get_ydata()) == pytest.approx([-0.2, 0.1, -0.1])
    figures["synthetic"] = plots.boundary_scores(SYNTHETIC)
    paths = plots.save_figures(figures, tmp_path / "png", tmp_path / "tb")
    assert sorted(p.name for p in paths) == sorted(f"{name}.png" for name in figures)
    assert all(p.stat().st_size > 1000 for p in paths)
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    assert sorted(events.Tags()["images"]) == sorted(f"figures/{name}" for name in figures)


def test_nothing_to_draw_gives_no_figure() -> None:
    assert plots.draw_all({"x": {"curves": {}}}) == {}
    assert plots.position_loss({}) is None and plots.boundary_scores([]) is None


def test_cli_on_sweep_and_run_directories(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from torch.utils.tensorboard import SummaryWriter

    sweep = tmp_path / "sweep"
    for name, offset in (("a", 0.0), ("b", 0.2)):
        (sweep / name).mkdir(parents=True)
        (sweep / name / "result.json").write_text(json.dumps(summary(offset)))
    plain = tmp_path / "plain"
    with SummaryWriter(str(plain / "version_0")) as w:
        for step in range(3):
            w.add_scalar("train/loss", 3.0 - step, step)
            w.add_scalar("train/ratio", 5.0 - step, step)
    analysis = tmp_path / "analysis.json"
    analysis.write_text(json.dumps(ANALYSIS))
    runs = plots.load_runs([sweep, plain])
    assert sorted(runs) == ["a", "b", "plain"]
    out = tmp_path / "figures"
    assert plots.main([str(sweep), str(plain), "--analysis", str(analysis), "--out", str(out)]) == 0
    written = sorted(p.name for p in out.glob("*.png"))
    assert written == ["loss_vs_flops.png", "position_loss.png", "ratio_over_training.png", "tokens_per_concept.png"]
    capsys.readouterr()
    assert plots.main([str(tmp_path / "missing")]) == 2
    assert "missing does not exist" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert plots.main([str(tmp_path / "empty")]) == 2
    assert "neither a sweep" in capsys.readouterr().err
