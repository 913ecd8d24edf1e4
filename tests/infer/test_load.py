"""``dlcm.load`` and ``dlcm export`` on hand-built checkpoints: round trips with bit-identical logits, format
versions, and bad input refused with one line that names it (and nothing written)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dlcm.cli import main as dlcm_main
from dlcm.data.tokenizer import train_bpe
from dlcm.infer.export import export
from dlcm.infer.load import load
from dlcm.model.config_io import FORMAT_VERSION, MODEL_RECORD, config_to_dict
from dlcm.model.presets import build_model, tiny_baseline, tiny_dlcm
from tests.conftest import random_cu_seqlens

TEXT = ["In the beginning God created the heaven and the earth.", "def main():\n    return 0\n"] * 20


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory):
    return train_bpe(TEXT, 300, tmp_path_factory.mktemp("tok") / "tokenizer.json")


def write_checkpoint(path: Path, network: torch.nn.Module, tokenizer, record: dict | None = None) -> Path:
    """A single-file checkpoint as ``dlcm fit`` writes it (state_dict under ``network.``, the model record)."""
    state = {f"network.{name}": tensor for name, tensor in network.state_dict().items()}
    default = {
        "format_version": FORMAT_VERSION,
        "config": config_to_dict(network.cfg),
        "context_length": 64,
        "tokenizer": tokenizer.to_str(),
        "global_step": 7,
        "tokens_seen": 7 * 512,
        "validation": {"step": 6, "loss": 5.5, "bpb": 2.25, "ratio": 4.1},
        "recipe": "model:\n  class_path: dlcm.train.lightning_modules.DLCMModule\n",
    }
    torch.save({"state_dict": state, "global_step": 7, MODEL_RECORD: default | (record or {})}, path)
    return path


def logits(network: torch.nn.Module) -> torch.Tensor:
    ids_T = torch.randint(0, 300, (48,), generator=torch.Generator().manual_seed(1))
    out = network(ids_T, random_cu_seqlens([30, 18]))
    return out if isinstance(out, torch.Tensor) else out.logits_TV


@pytest.mark.parametrize("config", [tiny_dlcm(300), tiny_baseline(300)], ids=["dlcm", "baseline"])
def test_checkpoint_and_export_load_with_bit_identical_logits(config, tokenizer, tmp_path: Path) -> None:
    torch.manual_seed(0)
    network = build_model(config).eval()
    if hasattr(network, "parser"):
        network.parser.threshold.fill_(0.37)  # a calibrated τ travels with the weights
    ckpt = write_checkpoint(tmp_path / "last.ckpt", network, tokenizer)
    with torch.no_grad():
        expected = logits(network)
        from_ckpt = load(ckpt)
        assert not from_ckpt.network.training and from_ckpt.context_length == 64
        assert torch.equal(logits(from_ckpt.network), expected)
        assert dlcm_main(["export", str(ckpt), str(tmp_path / "out")]) == 0
        exported = load(tmp_path / "out")
        assert torch.equal(logits(exported.network), expected)
    assert exported.tokenizer.to_str() == tokenizer.to_str()
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "README.md",
        "config.json",
        "model.safetensors",
        "tokenizer.json",
    ]
    config_json = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config_json["format_version"] == FORMAT_VERSION and config_json["config"]["vocab_size"] == 300
    card = (tmp_path / "out" / "README.md").read_text()
    assert "| 6 | 2.2500 | 5.5000 | 4.10 |" in card and "after 3,584 training tokens" in card
    assert "| total |" in card and "class_path: dlcm.train.lightning_modules.DLCMModule" in card
    if hasattr(network, "parser"):
        assert float(exported.network.parser.threshold) == pytest.approx(0.37) and "τ = 0.3700" in card
    assert isinstance(exported.generate("In the", max_new_tokens=3), str)


def test_bad_inputs_are_refused_with_one_line_and_nothing_written(tokenizer, tmp_path: Path, capsys) -> None:
    network = build_model(tiny_baseline(300))
    good = write_checkpoint(tmp_path / "good.ckpt", network, tokenizer)
    cases = {
        "v0.ckpt": ({MODEL_RECORD: None}, "has format version 0; .* --config RECIPE"),
        "v9.ckpt": ({"format_version": 9}, "has format version 9, newer than this dlcm-recipes reads"),
        "other.ckpt": ({"config": {"model_type": "gpt"}}, r"config.model_type='gpt' is not allowed"),
        "vocab.ckpt": ({"config": config_to_dict(tiny_baseline(512))}, "the tokenizer has 300 ids but .* 512 rows"),
    }
    for name, (record, message) in cases.items():
        path = tmp_path / name
        if record.get(MODEL_RECORD, "") is None:
            torch.save({"state_dict": torch.load(good)["state_dict"]}, path)
        else:
            write_checkpoint(path, network, tokenizer, record)
        with pytest.raises(ValueError, match=message):
            load(path)
    export(load(good), str(good), tmp_path / "out")
    weights = tmp_path / "out" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # truncated
    with pytest.raises(ValueError, match=r"model\.safetensors cannot be read .* truncated"):
        load(tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"is a directory with no config\.json and no \.metadata"):
        load(tmp_path / "empty")
    capsys.readouterr()
    assert dlcm_main(["export", str(good), str(tmp_path / "out")]) == 1  # not empty
    err = capsys.readouterr().err
    assert err.startswith("dlcm export: error: export folder") and "is not empty" in err and err.count("\n") == 1
    assert dlcm_main(["export", str(tmp_path / "v9.ckpt"), str(tmp_path / "new")]) == 1
    assert not (tmp_path / "new").exists() and not list(tmp_path.glob(".new*"))
