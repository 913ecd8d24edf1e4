"""Loss by position in concept (dlcm/research/concept_analysis.py): the docstring's hand-computed example, caps, a
brute-force check of analyze() on real tiny modules, and the run-directory reader of `dlcm analyze`
(dlcm/research/concept_analysis_cli.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from dlcm.model.presets import tiny_baseline, tiny_dlcm
from dlcm.research.concept_analysis import ConceptLossStats, analyze, concept_positions
from dlcm.research.concept_analysis_cli import main, run_files
from dlcm.train.lightning_modules import BaselineModule, DLCMModule


def test_docstring_example() -> None:
    boundary_T = torch.tensor([1, 0, 1, 1, 0, 0], dtype=torch.bool)
    cu = torch.tensor([0, 6], dtype=torch.int32)
    position_T, length_T = concept_positions(boundary_T, cu)
    assert position_T.tolist() == [0, 1, 0, 0, 1, 2]
    assert length_T.tolist() == [2, 2, 1, 3, 3, 3]
    nats_T = torch.tensor([1.0, 2.0, 4.0, 8.0, 16.0, 0.0])  # ℓ0…ℓ4; the last token predicts nothing
    has_target_T = torch.tensor([True] * 5 + [False])
    stats = ConceptLossStats(max_position=20, max_length=32)
    stats.update(nats_T, has_target_T, boundary_T, cu)
    out = stats.to_dict()
    assert out["loss_by_position"][:4] == [(2.0 + 4.0) / 2, (1.0 + 8.0) / 2, 16.0, None]
    assert out["tokens_by_position"][:4] == [2, 2, 1, 0]
    assert out["loss_by_length"][:4] == [2.0, 1.0, (4.0 + 8.0 + 16.0) / 3, None]
    assert out["mean_loss"] == pytest.approx(31.0 / 5)


def test_caps_and_documents() -> None:
    # Two documents: [0 1 2 3 4 | 5 6]; one 5-token concept, then concepts of 1 and 1.
    boundary_T = torch.tensor([1, 0, 0, 0, 0, 1, 1], dtype=torch.bool)
    cu = torch.tensor([0, 5, 7], dtype=torch.int32)
    nats_T = torch.arange(1.0, 8.0)
    has_target_T = torch.tensor([True, True, True, True, False, True, False])
    stats = ConceptLossStats(max_position=2, max_length=2)
    stats.update(nats_T, has_target_T, boundary_T, cu)
    out = stats.to_dict()
    # Predicted tokens: 1, 2 (positions 1, 2), 3 and 4 (positions 3, 4 → bucket 2), 6 (position 0 of a 1-token
    # concept); tokens 0 and 5 start documents and are never predicted.
    assert out["tokens_by_position"] == [1, 1, 3]
    assert out["loss_by_position"] == [6.0, 1.0, (2.0 + 3.0 + 4.0) / 3]
    # Lengths: tokens 1-4 sit in a 5-token concept (bucket "≥ 2"), token 6 in a 1-token one.
    assert out["tokens_by_length"] == [1, 4]
    assert out["loss_by_length"] == [6.0, 2.5]
    with pytest.raises(ValueError, match="max_position=0"):
        ConceptLossStats(max_position=0)


def batches(vocab: int, n: int) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        cu = torch.tensor([0, 23, 60, 64], dtype=torch.int32)
        out.append(
            {
                "input_ids": torch.randint(0, vocab, (64,), generator=g),
                "cu_seqlens": cu,
                "max_seqlen": 37,
                "token_bytes": torch.ones(64, dtype=torch.int32),
                "domain": torch.zeros(3, dtype=torch.int64),
            }
        )
    return out


def test_analyze_matches_a_per_token_loop() -> None:
    torch.manual_seed(0)
    dlcm = DLCMModule(tiny_dlcm(vocab_size=64, target_ratio=3.0))
    base = BaselineModule(tiny_baseline(vocab_size=64))
    data = batches(64, 3)
    got = analyze(dlcm, data, base, max_position=4, max_length=5)
    assert got["batches"] == 3 and got["tokens"] == 3 * 64
    sums = {name: [[0.0] * 5, [0] * 5] for name in ("dlcm", "baseline")}
    with torch.no_grad():
        for batch in data:
            lm_loss, has_T, out = dlcm.eval().lm_terms(batch)
            base_loss, _, _ = base.eval().lm_terms(batch)
            nats_T, base_nats_T = lm_loss.nats_T, base_loss.nats_T
            b = out.parser.boundary_T.tolist()
            for t in range(63):
                if not has_T[t]:
                    continue
                target = t + 1
                start = max(s for s in range(target + 1) if b[s])  # the predicted token's concept start
                position = min(target - start, 4)
                for name, values in (("dlcm", nats_T), ("baseline", base_nats_T)):
                    sums[name][0][position] += float(values[t])
                    sums[name][1][position] += 1
    for name in ("dlcm", "baseline"):
        assert got[name]["tokens_by_position"] == sums[name][1]
        expected = [s / c if c else None for s, c in zip(*sums[name], strict=True)]
        assert got[name]["loss_by_position"] == pytest.approx(expected, rel=1e-5)
    # Both models are bucketed by the DLCM's segmentation: equal counts everywhere.
    assert got["dlcm"]["tokens_by_length"] == got["baseline"]["tokens_by_length"]


def test_run_files_strip_fit_arguments(tmp_path: Path) -> None:
    log_dir = tmp_path / "run" / "tb" / "version_0"
    (log_dir / "checkpoints").mkdir(parents=True)
    saved = {"seed_everything": 0, "model": {"class_path": "x"}, "data": {}, "ckpt_path": None, "weights_only": None}
    (log_dir / "config.yaml").write_text(yaml.safe_dump(saved))
    (log_dir / "checkpoints" / "last.ckpt").write_bytes(b"")
    config, ckpt = run_files(tmp_path / "run", tmp_path / "scratch")
    assert ckpt == str(log_dir / "checkpoints" / "last.ckpt")
    assert yaml.safe_load(Path(config).read_text()) == {"seed_everything": 0, "model": {"class_path": "x"}, "data": {}}
    with pytest.raises(FileNotFoundError, match=r"config\.yaml and a last\.ckpt"):
        run_files(tmp_path / "scratch", tmp_path / "scratch2")


def test_cli_argument_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = ["--out", str(tmp_path / "a.json")]
    for args, message in (
        ([], "give the DLCM as --run DIR"),
        (["--run", "r", "--config", "c.yaml"], "give the DLCM as --run DIR"),
        (["--config", "c.yaml"], "give the DLCM as --run DIR"),
        (["--run", "r", "--baseline-config", "b.yaml"], "--baseline-config and --baseline-ckpt together"),
        (["--run", "r", "--baseline-run", "b", "--baseline-ckpt", "x"], "as --baseline-run DIR"),
    ):
        with pytest.raises(SystemExit) as done:
            main(args + out)
        assert done.value.code == 2
        assert message in capsys.readouterr().err
    assert main(["--run", str(tmp_path / "missing"), *out]) == 2
    assert "need a config.yaml and a last.ckpt" in capsys.readouterr().err
