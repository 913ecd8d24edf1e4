"""`dlcm generate` end to end on a checkpoint of a two-step fit of the tiny recipe: output, options, errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dlcm.infer.generate_cli import main, unescape
from dlcm.infer.generation import generate_texts
from dlcm.train.cli import run_cli
from dlcm.train.step_checkpoint import StepCheckpoint

RECIPES = Path(__file__).parents[2] / "recipes"
RECIPE = str(RECIPES / "dlcm_tiny_r4_defaultcorpus_cpu.yaml")


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory):
    """(checkpoint path, the fitted LightningModule, its tokenizer)."""
    root = tmp_path_factory.mktemp("fit")
    fit = run_cli(
        [
            f"--config={RECIPE}",
            "--data.tokens_per_batch=512",
            "--trainer.max_steps=2",
            "--trainer.limit_val_batches=2",
            "--trainer.val_check_interval=2",
            "--trainer.enable_progress_bar=false",
            "--trainer.enable_model_summary=false",
            "--trainer.logger=false",
            f"--trainer.default_root_dir={root}",
        ],
        run=False,
    )
    fit.trainer.fit(fit.model, fit.datamodule)
    last = next(c for c in fit.trainer.callbacks if isinstance(c, StepCheckpoint)).last_path
    return str(last), fit.model, fit.datamodule.tokenizer


def run(ckpt: str, *args: str, recipe: str = RECIPE) -> int:
    # The command's own main: errors raise here (`dlcm` itself turns them into one line, tests/test_errors.py).
    return main(["--config", recipe, "--ckpt_path", ckpt, "--device", "cpu", *args])


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_greedy_output_equals_the_python_api_on_the_trained_weights(trained, tmp_path: Path) -> None:
    ckpt, module, tokenizer = trained
    prompts = ["And God said", "In the beginning God created the heaven", "def main("]
    (tmp_path / "prompts.txt").write_text(f"{prompts[1]}\n\n{prompts[2]}\n")
    out = tmp_path / "out.jsonl"
    args = ["--prompt", prompts[0], "--prompts-file", str(tmp_path / "prompts.txt"), "--max-new-tokens", "9"]
    assert run(ckpt, *args, "--batch-size", "2", "--out", str(out)) == 0
    records = read_jsonl(out)
    network = module.network.eval()
    expected = generate_texts(network, tokenizer, prompts, 9)
    assert [r["prompt"] for r in records] == prompts
    assert [r["completion"] for r in records] == expected
    assert [r["prompt_tokens"] for r in records] == [len(tokenizer.encode(p).ids) for p in prompts]
    assert all(r["completion_tokens"] == 9 for r in records)
    # The trained weights, not a fresh initialisation, produced it.
    fresh = run_cli([f"--config={RECIPE}", "--trainer.logger=false"], run=False).model.network.eval()
    assert not all(torch.equal(a, b) for a, b in zip(fresh.parameters(), network.parameters(), strict=True))


def test_generate_from_an_exported_folder_alone_equals_the_trained_weights(trained, tmp_path: Path) -> None:
    from dlcm.infer.export import export
    from dlcm.infer.load import load

    ckpt, module, tokenizer = trained
    loaded = load(ckpt)
    assert loaded.record["global_step"] == 2 and loaded.record["tokens_seen"] == 2 * 512
    assert "class_path: dlcm.train.lightning_modules.DLCMModule" in loaded.record["recipe"]  # the run's config
    export(loaded, ckpt, tmp_path / "exported")
    out = tmp_path / "out.jsonl"
    args = ["--prompt", "And God said", "--max-new-tokens", "6", "--device", "cpu", "--out", str(out)]
    assert main(["--ckpt_path", str(tmp_path / "exported"), *args]) == 0
    assert read_jsonl(out)[0]["completion"] == generate_texts(module.network.eval(), tokenizer, ["And God said"], 6)[0]


def test_sampling_stops_and_stdout(trained, tmp_path: Path, capsys) -> None:
    ckpt = trained[0]
    rows = [{"prompt": "And the earth\nwas"}, {"prompt": "Let there be"}]
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = ["--prompts-file", str(tmp_path / "prompts.jsonl"), "--max-new-tokens", "12", "--temperature", "0.9"]
    sampled = []
    for _ in range(2):
        assert run(ckpt, *args, "--top-k", "20", "--top-p", "0.95", "--seed", "3") == 0
        sampled.append([json.loads(line) for line in capsys.readouterr().out.splitlines()])
    assert sampled[0] == sampled[1] and [r["prompt"] for r in sampled[0]] == [r["prompt"] for r in rows]
    # A stop string that the greedy output contains cuts it there.
    assert run(ckpt, *args[:4]) == 0
    greedy = [json.loads(line)["completion"] for line in capsys.readouterr().out.splitlines()]
    stop = greedy[0][2:4]
    assert run(ckpt, *args[:4], "--stop", stop.replace("\n", "\\n")) == 0
    cut = [json.loads(line)["completion"] for line in capsys.readouterr().out.splitlines()]
    assert cut == [g[: g.find(stop)] if stop in g else g for g in greedy]
    assert unescape(r"a\nb\tc\\n") == "a\nb\tc\\n"


def test_prompt_longer_than_the_context(trained, tmp_path: Path, capsys) -> None:
    ckpt, module = trained[:2]
    long_prompt = "And God said, Let there be light: and there was light. " * 40
    with pytest.raises(ValueError, match=rf"prompt 0 has \d+ tokens; with max_new_tokens=6 at most {256 - 6} fit"):
        run(ckpt, "--prompt", long_prompt, "--max-new-tokens", "6")
    assert module.context_length == 256
    assert run(ckpt, "--prompt", long_prompt, "--max-new-tokens", "6", "--truncate") == 0
    (record,) = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert record["prompt_tokens"] == 250 and record["completion_tokens"] == 6


def test_errors_name_the_bad_input(trained, tmp_path: Path) -> None:
    ckpt = trained[0]
    with pytest.raises(FileNotFoundError, match=r"checkpoint .*nowhere\.ckpt does not exist"):
        run(str(tmp_path / "nowhere.ckpt"), "--prompt", "a")
    with pytest.raises(ValueError, match=r"last\.ckpt does not match the model \(missing stack"):
        run(ckpt, "--prompt", "a", recipe=str(RECIPES / "baseline_tiny_defaultcorpus_cpu.yaml"))
    (tmp_path / "bad.jsonl").write_text('{"prompt": "ok"}\n{"text": "no prompt field"}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl, line 2: .*missing the 'prompt' field"):
        run(ckpt, "--prompts-file", str(tmp_path / "bad.jsonl"))
    with pytest.raises(ValueError, match="no prompts"):
        run(ckpt)
    with pytest.raises(ValueError, match=r"top_p=0\.0"):
        run(ckpt, "--prompt", "a", "--top-p", "0")
