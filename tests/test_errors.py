"""Every expected mistake ends `dlcm` with one line naming the bad value and what is allowed, no traceback, a
non-zero status, and nothing left behind in the working directory (table-driven, run in-process)."""

from __future__ import annotations

import functools
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dlcm.cli import main
from dlcm.data.shards import build_shards
from dlcm.data.sources import Document
from dlcm.data.tokenizer import train_bpe
from dlcm.train.cli import run_cli
from tests.data.test_shards import garble_in_place

RECIPES = Path(__file__).parents[1] / "recipes"
DLCM = str(RECIPES / "dlcm_tiny_r4_defaultcorpus_cpu.yaml")
BASELINE = str(RECIPES / "baseline_tiny_defaultcorpus_cpu.yaml")
# Each command with the tiny DLCM recipe reading the test shards (not the embedded corpus).
FIT, VALIDATE, EVAL, GENERATE = (
    [command, "--config", DLCM, "--config", "{on_shards}"] for command in ("fit", "validate", "eval", "generate")
)
# `dlcm fit --resume=auto` of the two-step run that the `inputs` fixture trains in {runs}/tiny/version_0.
RESUME = [
    *FIT,
    "--trainer.logger.init_args.save_dir={runs}",
    "--run_name=tiny",
    "--trainer.max_steps=2",
    "--data.tokens_per_batch=256",
    "--trainer.limit_val_batches=0",
    "--trainer.enable_progress_bar=false",
    "--resume=auto",
]
MODEL = "--model.init_args."
WORDS = ("the", "of", "and", "to", "in", "that", "he", "shall", "unto", "for", "his", "a", "lord", "they", "be", "is")


def corpus(n_docs: int) -> list[Document]:
    """Small deterministic documents (a few hundred tokens each)."""
    return [
        Document(f"doc{i:04d}", " ".join(WORDS[(i * 7 + j * 3) % len(WORDS)] for j in range(60 + i % 40)), "prose")
        for i in range(n_docs)
    ]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Shards, checkpoints (DLCM, baseline, truncated, foreign) and broken files that the cases point at."""
    root = tmp_path_factory.mktemp("inputs")
    docs = corpus(60)
    tokenizer = train_bpe((d.text for d in docs), 300, root / "tokenizer.json")
    assert tokenizer.get_vocab_size() <= 300
    build_shards(docs, root / "tokenizer.json", root / "shards", val_fraction=0.2, progress=False)
    paths = {"shards": root / "shards", "tokenizer": root / "tokenizer.json"}
    for name, recipe in (("dlcm", DLCM), ("baseline", BASELINE)):
        cli = run_cli([f"--config={recipe}", f"--data.data_dir={root / 'shards'}", "--trainer.logger=false"], run=False)
        cli.trainer.strategy.connect(cli.model)
        paths[name] = root / f"{name}.ckpt"
        cli.trainer.save_checkpoint(paths[name], weights_only=True)
    paths["truncated"] = root / "truncated.ckpt"
    paths["truncated"].write_bytes(paths["dlcm"].read_bytes()[:20_000])
    paths["foreign"] = root / "foreign.ckpt"
    torch.save({"weights": torch.zeros(2)}, paths["foreign"])
    paths["bad_yaml"] = root / "bad_recipe.yaml"
    paths["bad_yaml"].write_text("trainer:\n  max_steps: [1\n")
    paths["list_yaml"] = root / "list_recipe.yaml"
    paths["list_yaml"].write_text("- 1\n- 2\n")
    paths["no_manifest"] = root / "no_manifest"
    paths["no_manifest"].mkdir()
    bad_tok = root / "bad_tokenizer"
    bad_tok.mkdir()
    for f in (root / "shards").iterdir():
        (bad_tok / f.name).write_bytes(f.read_bytes())
    (bad_tok / "tokenizer.json").write_text("{not json")
    paths["bad_tokenizer"] = bad_tok
    broken = root / "broken_shards"
    broken.mkdir()
    for f in (root / "shards").iterdir():
        data = f.read_bytes()
        (broken / f.name).write_bytes(data[: len(data) // 2] if f.name.startswith("train-") else data)
    paths["broken_shards"] = broken
    garbled = root / "garbled_shards"
    shutil.copytree(root / "shards", garbled)
    garble_in_place(garbled / "train-000000.tar")
    paths["garbled_shards"] = garbled
    tasks = root / "tasks"
    tasks.mkdir()
    good = json.dumps({"query": "Q", "choices": ["a", "b"], "gold": 0}) + "\n"
    (tasks / "piqa.jsonl").write_text(good + "{not json\n")
    (tasks / "arc_easy.jsonl").write_text(good)
    paths["tasks"] = tasks
    paths["on_shards"] = root / "on_shards.yaml"
    paths["on_shards"].write_text(f"data:\n  data_dir: {root / 'shards'}\n")
    paths["spec_bad_key"] = root / "spec.yaml"
    paths["spec_bad_key"].write_text(f"protocol: grid\nconfigs: [{DLCM}]\naxes: {{}}\nsett: {{}}\n")
    paths["bad_csv"] = root / "runs.csv"
    paths["bad_csv"].write_text("a,b\n1,2\n")
    paths["runs"] = root / "runs"
    assert main([*fill(RESUME, paths)[:-2], "--step_checkpoint.every_n_steps=1"]) == 0
    paths["step1"] = root / "runs" / "tiny" / "version_0" / "checkpoints" / "step000000001.ckpt"
    paths["text"] = root / "text.txt"
    paths["text"].write_text("the lord\n")
    return paths


# (id, argv with {name} placeholders for `inputs`, fragments the one error line must contain)
CASES: list[tuple[str, list[str], list[str]]] = [
    ("unknown command", ["nope"], ["'nope'", "fit, validate"]),
    ("no test subcommand", ["test", "--config", DLCM], ["'test'", "fit, validate"]),
    ("no predict subcommand", ["predict", "--config", DLCM], ["'predict'", "generate"]),
    ("abbreviated key", [*FIT, "--trainer.max_step", "5"], ["--trainer.max_step", "max_steps"]),
    ("misspelt key", [*FIT, "--data.tokens_per_bach", "8"], ["--data.tokens_per_batch"]),
    (
        "misspelt model key",
        [*FIT, "--model.init_args.config.parser.target_ration", "4"],
        ["target_ration"],
    ),
    (
        "model value of the wrong type",
        [*FIT, "--model.init_args.config.parser.target_ratio", "abc"],
        ["target_ratio", "float", "abc"],
    ),
    (
        "boundary mode",
        [*FIT, "--model.init_args.config.parser.boundary_mode", "bogus"],
        ["boundary_mode", "bogus"],
    ),
    ("accumulate 0", [*FIT, "--trainer.accumulate_grad_batches", "0"], ["=0", "1 or more"]),
    ("accumulate not int", [*FIT, "--trainer.accumulate_grad_batches", "x"], ["accumulate", "x"]),
    ("tokens per batch", [*FIT, "--data.tokens_per_batch", "1"], ["tokens_per_batch=1", "least 2"]),
    ("workers", [*FIT, "--data.num_workers", "-1"], ["num_workers=-1", "0 or more"]),
    ("val batches", [*FIT, "--data.val_batches", "0"], ["val_batches=0", "at least 1"]),
    ("precision", [*FIT, "--trainer.precision", "7"], ["precision=7", "bf16-mixed"]),
    ("missing recipe", ["fit", "--config", "missing.yaml"], ["missing.yaml", "does not exist"]),
    ("yaml syntax", ["fit", "--config", "{bad_yaml}"], ["bad_recipe.yaml"]),
    ("yaml not a mapping", ["fit", "--config", "{list_yaml}"], ["list_recipe.yaml"]),
    ("model class", [*FIT, "--model.class_path", "dlcm.NoSuchModule"], ["NoSuchModule"]),
    ("data dir missing", [*FIT, "--data.data_dir", "nowhere"], ["nowhere"]),
    ("data dir without manifest", [*FIT, "--data.data_dir", "{no_manifest}"], ["manifest"]),
    ("unreadable tokenizer", [*FIT, "--data.data_dir", "{bad_tokenizer}"], ["tokenizer.json"]),
    (
        "corrupt shard at the first batch",
        [*FIT, "--data.data_dir", "{broken_shards}", "--trainer.enable_progress_bar=false"],
        ["train-000000.tar", "dlcm data build"],
    ),
    (
        "shard garbled in place (same size)",
        [*FIT, "--data.data_dir", "{garbled_shards}", "--trainer.enable_progress_bar=false"],
        ["train-000000.tar", "SHA-256", "dlcm data build"],
    ),
    ("fit: checkpoint missing", [*FIT, "--ckpt_path", "gone.ckpt"], ["gone.ckpt", "does not exist"]),
    ("fit: truncated checkpoint", [*FIT, "--ckpt_path", "{truncated}"], ["truncated.ckpt", "read"]),
    (
        "validate: truncated checkpoint",
        [*VALIDATE, "--ckpt_path", "{truncated}"],
        ["truncated.ckpt", "truncated"],
    ),
    ("fit: directory as checkpoint", [*FIT, "--ckpt_path", "{shards}"], ["is a directory", ".ckpt"]),
    (
        "fit: baseline checkpoint, DLCM recipe",
        [*FIT, "--ckpt_path", "{baseline}"],
        ["baseline.ckpt", "another model", "BaselineModule"],
    ),
    (
        "validate: foreign checkpoint",
        [*VALIDATE, "--ckpt_path", "{foreign}"],
        ["foreign.ckpt"],
    ),
    (
        "eval: truncated checkpoint",
        [*EVAL, "--ckpt_path", "{truncated}", "--tasks", "arc_easy", "--data-dir", "{tasks}"],
        ["truncated.ckpt", "truncated"],
    ),
    (
        "eval: baseline checkpoint, DLCM recipe",
        [*EVAL, "--ckpt_path", "{baseline}", "--tasks", "arc_easy", "--data-dir", "{tasks}"],
        ["baseline.ckpt", "recipe"],
    ),
    (
        "eval: directory as checkpoint",
        [*EVAL, "--ckpt_path", "{shards}", "--tasks", "arc_easy", "--data-dir", "{tasks}"],
        ["is a directory", ".ckpt"],
    ),
    ("eval: unknown task", [*EVAL, "--tasks", "piqaa", "--data-dir", "{tasks}"], ["'piqaa'", "piqa"]),
    ("eval: task file missing", [*EVAL, "--tasks", "arc_easy", "--data-dir", "nowhere"], ["nowhere"]),
    (
        "eval: malformed task file",
        [*EVAL, "--tasks", "piqa", "--data-dir", "{tasks}"],
        ["piqa.jsonl", "line 2"],
    ),
    ("eval: missing flags", [*EVAL], ["--tasks", "required"]),
    ("eval: limit", [*EVAL, "--tasks", "piqa", "--data-dir", "{tasks}", "--limit", "x"], ["'x'"]),
    (
        "generate: truncated checkpoint",
        [*GENERATE, "--ckpt_path", "{truncated}", "--prompt", "a"],
        ["truncated.ckpt", "truncated"],
    ),
    (
        "generate: directory as checkpoint",
        [*GENERATE, "--ckpt_path", "{shards}", "--prompt", "a"],
        ["is a directory", ".ckpt"],
    ),
    (
        "generate: temperature",
        [*GENERATE, "--ckpt_path", "{dlcm}", "--prompt", "a", "--temperature", "-1"],
        ["temperature", "-1"],
    ),
    (
        "generate: top-p",
        [*GENERATE, "--ckpt_path", "{dlcm}", "--prompt", "a", "--top-p", "2"],
        ["top_p", "2"],
    ),
    (
        "generate: batch size",
        [*GENERATE, "--ckpt_path", "{dlcm}", "--prompt", "a", "--batch-size", "0"],
        ["--batch-size=0", "positive"],
    ),
    ("generate: no prompt", [*GENERATE, "--ckpt_path", "{dlcm}"], ["no prompts", "--prompt"]),
    (
        "generate: prompts file missing",
        [*GENERATE, "--ckpt_path", "{dlcm}", "--prompts-file", "nothere.txt"],
        ["nothere.txt"],
    ),
    ("generate: missing checkpoint flag", [*GENERATE, "--prompt", "a"], ["--ckpt_path"]),
    ("scaling: missing csv", ["scaling", "fit", "--csv", "missing.csv"], ["missing.csv"]),
    ("scaling: no inputs", ["scaling", "fit"], ["--csv", "--runs"]),
    ("scaling: csv columns", ["scaling", "fit", "--csv", "{bad_csv}"], ["runs.csv"]),
    ("sweep: missing spec", ["sweep", "run", "nospec.yaml"], ["nospec.yaml"]),
    ("sweep: unknown spec key", ["sweep", "run", "{spec_bad_key}", "--dry-run"], ["sett"]),
    ("sweep: summary of nothing", ["sweep", "summary", "nosweep"], ["nosweep", "does not exist"]),
    (
        "data: missing input",
        ["data", "build", "nofile.txt", "--tokenizer", "{tokenizer}", "--out", "o"],
        ["nofile.txt"],
    ),
    ("flops: unknown preset", ["flops", "--preset", "dlcm_9000b"], ["dlcm_9000b"]),
    ("consolidate: missing checkpoint", ["consolidate", "nodir", "out.ckpt"], ["nodir"]),
    ("plot: missing run", ["plot", "norun"], ["norun"]),
    # Values a recipe may hold: each named with what is allowed, without a dump of the whole model namespace.
    ("val_check_interval 0", [*FIT, "--trainer.val_check_interval", "0"], ["val_check_interval=0", "integer >= 1"]),
    ("max_steps 0", [*FIT, "--trainer.max_steps", "0"], ["max_steps=0", "1 or more"]),
    ("max_steps below -1", [*FIT, "--trainer.max_steps", "-5"], ["max_steps=-5", "-1"]),
    ("ratio beyond the context", [*FIT, f"{MODEL}config.parser.target_ratio", "512"], ["target_ratio=512", "256"]),
    ("ratio below 1", [*FIT, f"{MODEL}config.parser.target_ratio", "-1"], ["target_ratio=-1.0", "> 1"]),
    ("aux weight", [*FIT, f"{MODEL}config.parser.aux_weight", "-2"], ["aux_weight=-2.0", ">= 0"]),
    ("sharpen alpha", [*FIT, f"{MODEL}config.parser.sharpen_alpha", "0"], ["sharpen_alpha=0.0", "> 0"]),
    ("heads", [*FIT, f"{MODEL}config.encoder.n_heads", "3"], ["n_heads=3", "divisor"]),
    ("smoothing", [*FIT, f"{MODEL}config.smoothing", "bogus"], ["smoothing", "bogus", "ema"]),
    ("learning rate", [*FIT, f"{MODEL}optimizer.lr", "-1"], ["lr=-1.0", "> 0"]),
    ("betas", [*FIT, f"{MODEL}optimizer.betas", "[0.9,1.5]"], ["betas=(0.9, 1.5)", "[0, 1)"]),
    ("warm-up", [*FIT, f"{MODEL}schedule.warmup_steps", "-1"], ["warmup_steps=-1", ">= 0"]),
    ("context length", [*FIT, f"{MODEL}context_length", "0"], ["max_seq_len=0", "at least 2"]),
    ("resume mode", [*FIT, "--resume", "bogus"], ["resume", "bogus", "auto"]),
    ("extend_run not a bool", [*FIT, "--extend_run", "maybe"], ["extend_run", "maybe"]),
    ("keep_last", [*FIT, "--step_checkpoint.keep_last", "0"], ["keep_last=0", ">= 1"]),
    ("every_n_steps", [*FIT, "--step_checkpoint.every_n_steps", "0"], ["every_n_steps=0", ">= 1"]),
    # Every value either reaches the model or is refused: --ckpt_path and --resume=auto follow one rule.
    (
        "fit --ckpt_path: another depth",
        [*RESUME, "--ckpt_path", "{step1}", f"{MODEL}config.backbone.n_layers", "4"],
        ["step000000001.ckpt", "backbone.n_layers=4 (checkpoint: 3)"],
    ),
    (
        "resume: another depth",
        [*RESUME, f"{MODEL}config.backbone.n_layers", "4"],
        ["cannot resume", "backbone.n_layers=4 (checkpoint: 3)"],
    ),
    ("resume: another width", [*RESUME, f"{MODEL}config.backbone.width", "512"], ["backbone.width=512"]),
    ("resume: another R", [*RESUME, f"{MODEL}config.parser.target_ratio", "8"], ["target_ratio=8.0 (checkpoint: 4.0)"]),
    ("resume: another learning rate", [*RESUME, f"{MODEL}optimizer.lr", "0.002"], ["lr=0.002 (checkpoint: 0.001)"]),
    ("resume: another seed", [*RESUME, f"{MODEL}seed", "1"], ["seed=1 (checkpoint: 0)"]),
    ("resume: another max_steps", [*RESUME, "--trainer.max_steps=4"], ["max_steps=4", "--extend_run=true"]),
    (
        "resume: another data layout",
        [*RESUME, "--ckpt_path", "{step1}", "--data.tokens_per_batch=512"],
        ["data layout", "tokens_per_batch=256 → 512"],
    ),
    (
        "resume: another vocabulary",
        [*RESUME, "--data.data_dir", "{bad_tokenizer}"],
        ["tokenizer.json"],
    ),
    (
        "validate: another R",
        [*VALIDATE, "--ckpt_path", "{step1}", f"{MODEL}config.parser.target_ratio", "8"],
        ["cannot validate", "target_ratio=8.0 (checkpoint: 4.0)"],
    ),
    (
        "validate: another depth",
        [*VALIDATE, "--ckpt_path", "{step1}", f"{MODEL}config.decoder.n_layers", "1"],
        ["decoder.n_layers=1 (checkpoint: 2)"],
    ),
    ("validate: no checkpoint", [*VALIDATE], ["--ckpt_path", "untrained"]),
    ("validate: checkpoint missing", [*VALIDATE, "--ckpt_path", "gone.ckpt"], ["gone.ckpt", "does not exist"]),
    # eval, generate, plan, flops, data: the flags of the other commands.
    ("eval: no task", [*EVAL, "--ckpt_path", "{dlcm}", "--tasks", ",", "--data-dir", "{tasks}"], ["--tasks=','"]),
    (
        "eval: unknown device",
        [*EVAL, "--ckpt_path", "{dlcm}", "--tasks", "arc_easy", "--data-dir", "{tasks}", "--device", "bogus"],
        ["--device=bogus", "cpu"],
    ),
    (
        "generate: unknown device",
        [*GENERATE, "--ckpt_path", "{dlcm}", "--prompt", "a", "--device", "bogus"],
        ["--device=bogus", "cpu"],
    ),
    (
        "generate: max new tokens",
        [*GENERATE, "--ckpt_path", "{dlcm}", "--prompt", "a", "--max-new-tokens", "-3"],
        ["--max-new-tokens=-3", "positive"],
    ),
    (
        "generate: no new tokens",
        [*GENERATE, "--ckpt_path", "{dlcm}", "--prompt", "a", "--max-new-tokens", "0"],
        ["--max-new-tokens=0", "positive"],
    ),
    ("seed not a number", [*FIT, "--seed_everything", "abc"], ["seed_everything=abc", "int"]),
    ("sweep: spec not YAML", ["sweep", "run", "{bad_yaml}", "--dry-run"], ["bad_recipe.yaml", "not valid YAML"]),
    ("generate: top-k", [*GENERATE, "--ckpt_path", "{dlcm}", "--prompt", "a", "--top-k", "-1"], ["top_k=-1"]),
    ("generate: foreign checkpoint", [*GENERATE, "--ckpt_path", "{foreign}", "--prompt", "a"], ["foreign.ckpt"]),
    ("plan: nodes", ["plan", DLCM, "--nodes", "0"], ["--nodes=0", "at least 1"]),
    ("plan: GPUs per node", ["plan", DLCM, "--gpus-per-node", "0"], ["--gpus-per-node=0", "at least 1"]),
    ("plan: missing recipe", ["plan", "missing.yaml"], ["missing.yaml", "does not exist"]),
    ("plan: step tokens", ["plan", DLCM, "--step-tokens", "3"], ["global_batch.tokens=3", "multiple"]),
    ("flops: missing recipe", ["flops", "--config", "missing.yaml"], ["missing.yaml", "does not exist"]),
    ("flops: ratio", ["flops", "--preset", "dlcm_2.3b", "--ratio", "0"], ["ratio=0.0", "at least 1"]),
    ("flops: context", ["flops", "--preset", "dlcm_2.3b", "--context", "0"], ["context_length=0", "positive"]),
    ("consolidate: not sharded", ["consolidate", "{shards}", "out.ckpt"], ["shards", "not a complete sharded"]),
    ("plot: not a run", ["plot", "{shards}"], ["shards", "neither a sweep"]),
    ("data verify: missing", ["data", "verify", "nowhere"], ["nowhere", "dlcm data build"]),
    (
        "data train-tokenizer: missing input",
        ["data", "train-tokenizer", "nofile.txt", "--vocab-size", "300", "--out", "t.json"],
        ["nofile.txt", "does not exist"],
    ),
    (
        "data train-tokenizer: vocabulary",
        ["data", "train-tokenizer", "{text}", "--vocab-size", "0", "--out", "t.json"],
        ["vocab_size=0", "at least 257"],
    ),
    (
        "data build: val fraction",
        ["data", "build", "{text}", "--tokenizer", "{tokenizer}", "--out", "o", "--val-fraction", "2"],
        ["val_fraction=2.0", "[0, 1)"],
    ),
    (
        "data build: workers",
        ["data", "build", "{text}", "--tokenizer", "{tokenizer}", "--out", "o", "--workers", "0"],
        ["workers=0", "at least 1"],
    ),
    (
        "data build: missing tokenizer",
        ["data", "build", "{text}", "--tokenizer", "nowhere.json", "--out", "o"],
        ["nowhere.json", "does not exist"],
    ),
    ("scaling: run without sidecar", ["scaling", "fit", "--runs", "nowhere"], ["nowhere", "scaling.json"]),
]


def fill(argv: list[str], inputs: dict[str, Path]) -> list[str]:
    return [word.format(**{k: str(v) for k, v in inputs.items()}) if "{" in word else word for word in argv]


def snapshot(root: Path) -> set[Path]:
    return {p.relative_to(root) for p in root.rglob("*")}


def fingerprint(root: Path) -> dict[Path, tuple[int, int]]:
    """Size and modification time of every file under ``root``: the data, checkpoints and run directories."""
    return {p.relative_to(root): (p.lstat().st_size, p.lstat().st_mtime_ns) for p in root.rglob("*") if p.is_file()}


@pytest.mark.parametrize(("argv", "fragments"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_one_line_error_and_nothing_left_behind(
    argv: list[str], fragments: list[str], inputs: dict[str, Path], tmp_path: Path, monkeypatch, capsys
) -> None:
    monkeypatch.chdir(tmp_path)
    before = fingerprint(inputs["shards"].parent)
    status = main(fill(argv, inputs))
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert status != 0
    assert "Traceback" not in err, err
    assert len(errors) == 1, err
    print(errors[0])  # the table of messages, with pytest -rP
    command = "" if argv[0] in ("nope", "test", "predict") else f" {argv[0]}( [a-z-]+)?"
    assert re.match(f"dlcm{command}: error: ", errors[0]), errors[0]
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    assert snapshot(tmp_path) == set(), "left behind"
    assert fingerprint(inputs["shards"].parent) == before, "the data, a checkpoint or a run directory changed"


def test_the_table_covers_every_kind_of_input() -> None:
    assert len(CASES) >= 80
    assert {c[1][0] for c in CASES} >= {"fit", "validate", "eval", "generate", "scaling", "sweep", "data", "plan"}


def test_debug_shows_the_traceback(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"missing\.csv"):
        main(["scaling", "fit", "--csv", "missing.csv", "--debug"])


def test_help_lists_every_subcommand_without_importing_torch() -> None:
    probe = (
        "import sys; from dlcm.cli import main; main(['--help']); "
        "print('torch' in sys.modules, 'lightning' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert out.rstrip().endswith("False False")
    for name in ("fit", "validate", "data", "eval", "generate", "consolidate", "flops", "sweep", "scaling", "analyze"):
        assert f"\n  {name} " in out, name


@pytest.mark.parametrize(
    "command",
    [
        *([name] for name in ("eval", "generate", "sweep", "scaling", "plot", "data", "flops", "plan", "consolidate")),
        *(["data", sub] for sub in ("build", "verify", "train-tokenizer", "default-corpus")),
        ["analyze"],
    ],
    ids=" ".join,
)
def test_subcommand_help_imports_no_torch(command: list[str]) -> None:
    # Deterministic stand-in for "help answers at once": torch and Lightning take seconds to import.
    probe = (
        f"import sys; from dlcm.cli import main; assert main([*{command!r}, '--help']) == 0; "
        "print('torch' in sys.modules, 'lightning' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert out.rstrip().endswith("False False")


@pytest.mark.parametrize(
    ("argv", "reached"),
    [
        ([*RESUME[:-1], "--ckpt_path", "{step1}", f"{MODEL}context_length", "128"], ("context_length", 128)),
        ([*VALIDATE, "--ckpt_path", "{step1}", f"{MODEL}config.attn_backend", "sdpa"], ("config.attn_backend", "sdpa")),
    ],
    ids=["fit --ckpt_path: context length", "validate: attention backend"],
)
def test_accepted_overrides_reach_the_model(argv, reached, inputs, tmp_path: Path, monkeypatch) -> None:
    import lightning as L

    seen = {}

    def recording(original):  # keeps the signature: LightningCLI derives the subcommand's flags from it
        @functools.wraps(original)
        def record(self, model=None, **kwargs) -> None:
            seen.update(model=model, **kwargs)

        return record

    for name in ("fit", "validate"):
        monkeypatch.setattr(L.Trainer, name, recording(getattr(L.Trainer, name)))
    monkeypatch.chdir(tmp_path)
    assert main(fill(argv, inputs)) == 0
    key, value = reached
    node = seen["model"]
    for part in key.split("."):
        node = getattr(node, part)
    assert node == value
    assert seen["ckpt_path"] == str(inputs["step1"])
