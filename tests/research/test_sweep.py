"""`dlcm sweep` (dlcm/research/sweep.py, shape_search.py, run_metrics.py): spec expansion and errors, the μP
protocol's descent and tables, (R, P) shapes against the FLOPs budget, summaries from TensorBoard events, and one
real tiny run (summary, resume, refusal of a changed spec, a failing run)."""

from __future__ import annotations

import dataclasses
import json
import math
import subprocess
from pathlib import Path

import pytest
import yaml

from dlcm.callbacks.mup import DecoupledMuP
from dlcm.infer.recipe import load_recipe
from dlcm.model.config import DLCMConfig
from dlcm.model.config_io import dataclass_from_dict
from dlcm.model.flops import inference_flops_per_token
from dlcm.research.run_metrics import cumulative_train_flops, read_scalars, summarize_run, tokens_per_step
from dlcm.research.shape_search import budget_shape, matched_baseline, width_scaled
from dlcm.research.sweep import (
    Executor,
    MuPProtocol,
    cpu_threads,
    format_mup_tables,
    grid_runs,
    load_spec,
    main,
    ratio_fraction_runs,
    run_state,
    static_runs,
)
from dlcm.train.cli import run_cli

ROOT = Path(__file__).parents[2]
TINY = ROOT / "recipes" / "dlcm_tiny_r4_defaultcorpus_cpu.yaml"
MODEL = "--model.init_args.config."


def write_spec(tmp_path: Path, spec: dict, name: str = "spec.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump({"configs": [str(TINY)], **spec}, sort_keys=False))
    return path


def config_from_args(base: DLCMConfig, args: tuple[str, ...]) -> DLCMConfig:
    """The model config a run's ``--model.init_args.config.*`` overrides describe (independent of the sweep)."""
    values = dataclasses.asdict(base)
    for arg in args:
        if arg.startswith(MODEL):
            key, value = arg.removeprefix(MODEL).split("=", 1)
            *parents, leaf = key.split(".")
            node = values
            for part in parents:
                node = node[part]
            node[leaf] = yaml.safe_load(value)
    return dataclass_from_dict(DLCMConfig, values, "config")


# ---- grid ------------------------------------------------------------------------------------------------------


def test_grid_expansion_and_dry_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    spec_path = write_spec(
        tmp_path,
        {
            "set": {"trainer.max_steps": 7, "model.init_args.optimizer.betas": [0.9, 0.99]},
            "axes": [
                {"name": "lr", "key": "model.init_args.optimizer.lr", "values": [0.001, 0.002]},
                {
                    "name": "scope",
                    "points": {
                        "global": {"model.init_args.config.parser.ratio_scope": "global"},
                        "sequence": {"model.init_args.config.parser.ratio_scope": "sequence", "seed_everything": 3},
                    },
                },
            ],
        },
    )
    runs = grid_runs(load_spec(spec_path))
    assert [r.name for r in runs] == [
        "lr-0.001__scope-global",
        "lr-0.001__scope-sequence",
        "lr-0.002__scope-global",
        "lr-0.002__scope-sequence",
    ]
    assert runs[1].args == (
        f"--config={TINY}",
        "--trainer.max_steps=7",
        "--model.init_args.optimizer.betas=[0.9, 0.99]",
        "--model.init_args.optimizer.lr=0.001",
        "--model.init_args.config.parser.ratio_scope=sequence",
        "--seed_everything=3",
    )
    assert runs[1].meta == {"lr": "0.001", "scope": "sequence"}
    assert main(["run", str(spec_path), "--out", str(tmp_path / "out"), "--dry-run"]) == 0
    printed = capsys.readouterr().out
    assert printed.count("-m dlcm fit") == 4
    assert f"--trainer.default_root_dir={tmp_path / 'out' / 'lr-0.002__scope-global'}" in printed
    assert not (tmp_path / "out").exists()
    # No axes: one run called base.
    assert [r.name for r in grid_runs(load_spec(write_spec(tmp_path, {"set": {}})))] == ["base"]


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"protocol": "grid", "axis": []}, "unknown key(s) axis; allowed: protocol, configs"),
        ({"protocol": "random"}, "protocol='random' is not allowed"),
        ({"configs": ["nope.yaml"]}, "nope.yaml does not exist"),
        ({"axes": [{"name": "lr", "key": "a.b", "values": [1], "points": {}}]}, "give either key and values, or"),
        ({"axes": [{"name": "lr", "key": "a.b", "values": []}]}, "values=[] is not allowed"),
        ({"axes": [{"name": "a b", "key": "a.b", "values": [1]}]}, "name='a b' is not allowed"),
        ({"axes": [{"name": "x", "key": "k", "values": [1]}, {"name": "x", "key": "j", "values": [2]}]}, "must differ"),
        ({"mup": {"widths": [64, 256], "lr": 0.001}}, "key mup belongs to protocol mup-transfer"),
        ({"protocol": "mup-transfer"}, "needs a mup: section"),
        ({"protocol": "mup-transfer", "mup": {"widths": [64], "lr": 0.001}}, "at least two positive integer widths"),
        ({"protocol": "mup-transfer", "mup": {"widths": [64, 128], "lr": 0.001, "multipliers": [1.0]}}, "other than"),
        ({"protocol": "mup-transfer", "mup": {"widths": [64, 128], "lr": -1}}, "lr=-1 is not allowed"),
        ({"protocol": "mup-transfer", "mup": {"widths": [64, 128], "lr": 1, "coordinates": ["width"]}}, "distinct"),
        ({"protocol": "ratio-fraction", "ratio_fraction": {"fractions": [0.5, 1.2]}}, "numbers in (0, 1)"),
        ({"protocol": "ratio-fraction", "ratio_fraction": {"ratios": [1]}}, "numbers > 1"),
    ],
)
def test_bad_specs_are_named(tmp_path: Path, capsys: pytest.CaptureFixture[str], spec: dict, message: str) -> None:
    path = write_spec(tmp_path, spec)
    assert main(["run", str(path), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert message in err and str(path) in err


def test_axes_that_set_the_same_key_clash(tmp_path: Path) -> None:
    axes = [
        {"name": "a", "key": "trainer.max_steps", "values": [1]},
        {"name": "b", "key": "trainer.max_steps", "values": [2]},
    ]
    with pytest.raises(ValueError, match=r"axes set the same key\(s\) trainer\.max_steps"):
        grid_runs(load_spec(write_spec(tmp_path, {"axes": axes})))


# ---- μP transfer -----------------------------------------------------------------------------------------------


def mup_spec(tmp_path: Path, **mup: object) -> Path:
    settings = {"widths": [64, 256], "lr": 0.002, "coordinates": ["token", "concept"], "max_rounds": 0} | mup
    return write_spec(tmp_path, {"protocol": "mup-transfer", "mup": settings}, "mup.yaml")


def test_mup_runs_scale_the_widths_and_add_the_callback(tmp_path: Path) -> None:
    spec = load_spec(mup_spec(tmp_path))
    runs = {r.name: r for r in static_runs(spec)}
    # Two widths × (token line + concept line through the centre, centre shared) = 2 × 9 runs.
    assert len(runs) == 18
    wide = runs["w256_tok0.004_cpt0.002"]
    assert wide.meta == {"width": 256, "lr_token": 0.004, "lr_concept": 0.002}
    args = wide.args
    callback = args.index("--trainer.callbacks+=dlcm.callbacks.mup.DecoupledMuP")
    assert args[callback + 1 :][:4] == (
        "--trainer.callbacks.init_args.d_base=64",
        "--trainer.callbacks.init_args.lr_token=0.004",
        "--trainer.callbacks.init_args.lr_concept=0.002",
        "--trainer.callbacks.init_args.lr_others=0.001",
    )
    base = load_recipe(TINY).config
    config = config_from_args(base, args)
    assert (config.d_token, config.d_concept, config.d_base) == (256, 512, 64)
    assert config.encoder.head_dim == base.encoder.head_dim and config.backbone.head_dim == base.backbone.head_dim
    assert config.encoder.n_layers == base.encoder.n_layers and config.backbone.ffn_hidden == 3 * 512
    assert config == width_scaled(base, 256, 64)
    with pytest.raises(ValueError, match="width=96 is not allowed: a positive multiple of 64"):
        width_scaled(base, 96, 64)


def test_mup_sets_the_configs_own_callback_which_must_come_last(tmp_path: Path) -> None:
    spec = {"protocol": "mup-transfer", "mup": {"widths": [64, 256], "lr": 0.002}}
    spec["configs"] = [str(TINY), str(ROOT / "recipes" / "fragments" / "mup_tiny_cpu.yaml")]
    path = tmp_path / "mup.yaml"
    path.write_text(yaml.safe_dump(spec))
    args = MuPProtocol(load_spec(path)).run(256, (0.004, 0.002)).args
    assert not any(a.startswith("--trainer.callbacks+=") for a in args)  # the fragment's callback is reused
    cli = run_cli([*args, "--trainer.logger=false"], run=False)
    (mup,) = [c for c in cli.trainer.callbacks if isinstance(c, DecoupledMuP)]
    assert (mup.d_base, mup.lr_token, mup.lr_concept, mup.lr_others) == (64, 0.004, 0.002, 0.001)
    assert cli.model.config.d_token == 256

    fragment = yaml.safe_load((ROOT / "recipes" / "fragments" / "mup_tiny_cpu.yaml").read_text())
    fragment["trainer"]["callbacks"].append({"class_path": "lightning.pytorch.callbacks.LearningRateMonitor"})
    (tmp_path / "mup_then_other.yaml").write_text(yaml.safe_dump(fragment))
    spec["configs"] = [str(TINY), str(tmp_path / "mup_then_other.yaml")]
    path.write_text(yaml.safe_dump(spec))
    with pytest.raises(ValueError, match=r"include DecoupledMuP, but not last"):
        static_runs(load_spec(path))


def test_paper_mup_spec_plans_with_a_given_vocabulary(capsys) -> None:
    spec_path = ROOT / "recipes" / "sweeps" / "mup_transfer_paper_87m.yaml"
    assert main(["run", str(spec_path), "--dry-run"]) == 2  # the paper data is not built here
    assert "pass --vocab-size" in capsys.readouterr().err
    assert main(["run", str(spec_path), "--dry-run", "--vocab-size", "128815"]) == 0
    assert "--trainer.callbacks.init_args.lr_token=0.0003 " in capsys.readouterr().out
    protocol = MuPProtocol(load_spec(spec_path, vocab_size=128815))
    assert protocol.recipe_has_callback
    args = protocol.run(1536, (3e-4, 3e-4)).args
    assert not any(a.startswith("--trainer.callbacks+=") or "vocab_size" in a for a in args)
    base = load_recipe(ROOT / "recipes" / "paper" / "mup_proxy_87m.yaml", 128815).config
    assert config_from_args(base, args) == width_scaled(base, 1536, 384)


def test_mup_descent_and_tables_with_a_fake_runner(tmp_path: Path) -> None:
    """A loss surface with its minimum at (η_token, η_concept) = (0.004, 0.001) on the multiplier grid from 0.002:
    the descent must walk there, and both widths' lines must have their minima at ×1."""
    protocol = MuPProtocol(load_spec(mup_spec(tmp_path, max_rounds=3)))
    stages = []

    def runner(runs: list) -> dict[str, dict]:
        stages.append([r.name for r in runs])
        out = {}
        for r in runs:
            tok, cpt, width = r.meta["lr_token"], r.meta["lr_concept"], r.meta["width"]
            loss = 3.0 + math.log(tok / 0.004) ** 2 + math.log(cpt / 0.001) ** 2 - 0.1 * math.log(width)
            out[r.name] = {"val_loss": loss}
        return out

    result = protocol.execute(runner, log=lambda _: None)
    assert result["center"] == [0.004, 0.001]
    # The first stage is the proxy's centre alone, then one line per coordinate per round, then the transfer lines.
    assert stages[0] == ["w64_tok0.002_cpt0.002"]
    assert all(name.startswith("w64_") for stage in stages[1:-1] for name in stage)
    for coordinate in ("token", "concept"):
        table = result["coordinates"][coordinate]
        assert table["argmin_multiplier"] == {"w64": 1.0, "w256": 1.0}
        assert table["aligned"] and table["within_one_step"]
        assert [row["multiplier"] for row in table["rows"]] == [0.5, 0.75, 1.0, 1.5, 2.0]
    assert "aligned" in format_mup_tables(result)


def test_mup_tables_flag_misaligned_minima(tmp_path: Path) -> None:
    protocol = MuPProtocol(load_spec(mup_spec(tmp_path, coordinates=["tied"])))

    def runner(runs: list) -> dict[str, dict]:
        best = {64: 0.002, 256: 0.004}  # the wide model prefers twice the rate: two grid points away
        return {r.name: {"val_loss": math.log(r.meta["lr_token"] / best[r.meta["width"]]) ** 2} for r in runs}

    table = protocol.execute(runner, log=lambda _: None)["coordinates"]["tied"]
    assert table["argmin_multiplier"] == {"w64": 1.0, "w256": 2.0}
    assert not table["aligned"] and not table["within_one_step"]


# ---- ratio × fraction ------------------------------------------------------------------------------------------


def test_ratio_fraction_shapes_meet_the_budget(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    tolerance, share_tolerance = 0.05, 0.03
    spec = {
        "protocol": "ratio-fraction",
        "ratio_fraction": {"tolerance": tolerance, "share_tolerance": share_tolerance},
    }
    spec_path = write_spec(tmp_path, spec)
    runs, table = ratio_fraction_runs(load_spec(spec_path))
    base = load_recipe(TINY)
    budget = inference_flops_per_token(base.config, base.context_length).total
    assert [r.name for r in runs] == [f"R{r}_P{p}" for r in (2, 4, 8) for p in (30, 50, 70)]
    for run, row in zip(runs, table, strict=True):
        # Rebuild the model from the run's own arguments and count its FLOPs independently.
        config = config_from_args(base.config, run.args)
        flops = inference_flops_per_token(config, base.context_length)
        assert config.parser.target_ratio == row["R"]
        assert abs(flops.total / budget - 1) <= tolerance, run.name
        assert abs(flops.share("backbone") - row["P"]) <= share_tolerance, run.name
        assert row["flops_per_token"] == flops.total and row["budget"] == budget
        assert run.sidecar["R"] == row["R"] and 0 < run.sidecar["P"] < 1
    assert main(["run", str(spec_path), "--dry-run"]) == 0
    printed = capsys.readouterr().out
    assert "R8_P70" in printed and f"budget {budget:.4g}" in printed


def test_budget_shape_errors() -> None:
    base = load_recipe(TINY)
    with pytest.raises(ValueError, match=r"no shape for R=4, P=0\.5 within ±0%"):
        budget_shape(base.config, 4, 0.5, 4.866e6, base.context_length, tolerance=1e-9, share_tolerance=1e-9)
    with pytest.raises(ValueError, match=r"P=1\.5 is not allowed"):
        budget_shape(base.config, 4, 1.5, 4.866e6, base.context_length)


def test_repro_recipes_are_flops_matched_and_parse() -> None:
    h200 = ROOT / "recipes" / "sweeps" / "repro_small_h200"
    dlcm, baseline = load_recipe(h200 / "recipe_dlcm_r4.yaml"), load_recipe(h200 / "recipe_baseline.yaml")
    d = inference_flops_per_token(dlcm.config, dlcm.context_length).total
    b = inference_flops_per_token(baseline.config, baseline.context_length).total
    assert abs(d / b - 1) < 0.03
    assert matched_baseline(dlcm.config, baseline.config, dlcm.context_length) == baseline.config
    for spec_path in sorted((ROOT / "recipes" / "sweeps").rglob("sweep_*.yaml")) + sorted(
        (ROOT / "recipes" / "sweeps").glob("*.yaml")
    ):
        paper = spec_path.name.endswith("_paper_87m.yaml")  # the paper data is not built here
        assert static_runs(load_spec(spec_path, vocab_size=128815 if paper else None)), spec_path


# ---- summaries ---------------------------------------------------------------------------------------------------


def test_summary_from_events_integrates_flops_per_token(tmp_path: Path) -> None:
    from torch.utils.tensorboard import SummaryWriter

    log_dir = tmp_path / "run" / "tb" / "version_0"
    fpt = {2: 10.0, 4: 20.0, 6: 30.0, 8: 40.0, 9: 50.0}
    with SummaryWriter(str(log_dir)) as w:
        for step in range(10):
            w.add_scalar("train/loss", 5.0 - step / 10, step)
            w.add_scalar("train/ratio", 4.0 + step, step)
            w.add_scalar("train/segmentation/target_R", 4.0, step)
        for step, value in fpt.items():
            w.add_scalar("train/perf/model_flops_per_token", value, step)
        for step, loss in ((4, 4.5), (9, 4.0)):
            w.add_scalar("val/loss", loss, step)
            w.add_scalar("val/bpb", loss / 2, step)
            w.add_scalar("val/segmentation/tokens_per_concept/code", 3.5, step)
    config = {"trainer": {"devices": 1, "accumulate_grad_batches": 2}, "data": {"tokens_per_batch": 100}}
    (log_dir / "config.yaml").write_text(yaml.safe_dump(config))
    assert tokens_per_step(config) == 200
    assert tokens_per_step({"trainer": {"devices": "auto"}, "data": {"tokens_per_batch": 100}}) is None

    summary = summarize_run(tmp_path / "run")
    # Batches 0-2 at the first point's 10, 3-4 at 20, 5-6 at 30, 7-8 at 40, 9 at 50.
    through_4 = 200 * (3 * 10 + 2 * 20)
    total = 200 * (3 * 10 + 2 * 20 + 2 * 30 + 2 * 40 + 50)
    assert summary["steps"] == 10 and summary["tokens"] == 2000
    assert summary["train_flops"] == total and summary["val_flops"] == [through_4, total]
    assert summary["flops_per_token"] == total / 2000
    assert (summary["val_loss"], summary["val_bpb"], summary["target_ratio"]) == (4.0, 2.0, 4.0)
    assert summary["train_ratio"] == 13.0 and summary["tokens_per_concept"] == {"code": 3.5}
    assert summary["curves"]["val/loss"] == {"step": [4, 9], "value": [4.5, 4.0]}
    assert cumulative_train_flops({}, 200, [3]) is None
    with pytest.raises(ValueError, match="no TensorBoard scalars"):
        summarize_run(tmp_path / "empty")


TINY_RUN = {
    "trainer.max_steps": 4,
    "trainer.val_check_interval": 2,
    "trainer.limit_val_batches": 1,
    "trainer.log_every_n_steps": 1,
    "trainer.enable_model_summary": False,
    "data.tokens_per_batch": 256,
}


def test_a_real_tiny_run_summary_resume_and_refusal(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spec = load_spec(write_spec(tmp_path, {"set": TINY_RUN}))
    out = tmp_path / "out"
    (run,) = grid_runs(spec)
    results = Executor(out, parallel=1, threads=1, log=lambda _: None)([run])
    result = results["base"]
    assert result["status"] == "ok", (out / "base" / "train.log").read_text()[-3000:]
    assert json.loads((out / "base" / "result.json").read_text())["val_loss"] == result["val_loss"]
    assert result["steps"] == 4 and result["tokens_per_step"] == 256 and result["tokens"] == 1024
    assert math.isfinite(result["val_loss"]) and result["val_bpb"] > 0 and result["val_ratio"] > 1
    assert set(result["tokens_per_concept"]) <= {"prose", "code"} and result["tokens_per_concept"]
    # FLOPs: the callback's per-token points integrated over the four steps, by hand.
    points = read_scalars(out / "base", ["train/perf/model_flops_per_token"])["train/perf/model_flops_per_token"]
    first, steps = min(points), sorted(points)
    per_batch = [points[first]] + [points[min(s for s in steps if s >= b)] for b in range(1, 4)]
    assert result["train_flops"] == pytest.approx(256 * sum(per_batch))
    assert result["flops_per_token"] > 1e6  # the tiny DLCM: ~10 MFLOPs per trained token

    # A second pass trains nothing: the result is on disk.
    monkeypatch.setattr(subprocess, "call", lambda *a, **k: pytest.fail("a finished run was trained again"))
    again = Executor(out, parallel=1, log=lambda _: None)([run])
    assert again["base"]["val_loss"] == result["val_loss"]
    # Without its result.json the run resumes from last.ckpt; with other arguments it is refused.
    (out / "base" / "result.json").unlink()
    assert run_state(run, out / "base") == ("resume", None)
    changed = dataclasses.replace(run, args=(*run.args, "--trainer.max_steps=5"))
    with pytest.raises(ValueError, match="other arguments"):
        run_state(changed, out / "base")


def test_a_failing_run_is_reported(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    spec_path = write_spec(tmp_path, {"set": {**TINY_RUN, "data.tokens_per_bach": 8}})
    assert main(["run", str(spec_path), "--out", str(tmp_path / "out")]) == 1
    assert "1 run(s) failed: base" in capsys.readouterr().err
    assert not (tmp_path / "out" / "base" / "result.json").exists()
    assert "tokens_per_bach" in (tmp_path / "out" / "base" / "train.log").read_text()
    rows = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert rows[0]["status"] == "failed" and rows[0]["returncode"] != 0


def test_concurrent_cpu_runs_share_the_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("dlcm.research.sweep.os.cpu_count", lambda: 8)
    assert cpu_threads(2, None) == 4 and cpu_threads(16, None) == 1
    assert cpu_threads(1, None) is None  # one run alone keeps torch's default
    assert cpu_threads(4, ["0", "1"]) is None  # GPU runs: threads are not the bottleneck


def test_runs_logged_under_old_tag_names_read_as_the_kept_names(tmp_path: Path) -> None:
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(str(tmp_path / "old")) as w:
        w.add_scalar("boundary/ratio", 4.5, 1)  # today: train/ratio
        w.add_scalar("train/ratio_threshold", 5.5, 1)  # today: train/segmentation/ratio_threshold
        w.add_scalar("val/ratio", 6.0, 1)
        w.add_scalar("val_boundary/ratio_threshold", 6.5, 1)  # the val/ratio logged under today's name wins
        w.add_scalar("perf/tokens_per_sec", 7.0, 1)  # groups now under train/ and val/
        w.add_scalar("val_boundary/tokens_per_concept/code", 3.0, 1)
        w.add_scalar("lr-AdamW/decay", 1e-3, 1)
    scalars = read_scalars(tmp_path / "old")
    assert scalars == {
        "train/ratio": {1: 4.5},
        "train/segmentation/ratio_threshold": {1: 5.5},
        "val/ratio": {1: 6.0},
        "train/perf/tokens_per_sec": {1: 7.0},
        "val/segmentation/tokens_per_concept/code": {1: 3.0},
        "train/lr/decay": {1: pytest.approx(1e-3)},
    }
    assert read_scalars(tmp_path / "old", ["train/ratio"]) == {"train/ratio": {1: 4.5}}
