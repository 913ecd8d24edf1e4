"""Zero-shot evaluation: task loaders on self-written fixtures, packing-invariant scoring, metrics, checkpoints."""

from __future__ import annotations

import csv
import json
import math
import random
import re
from pathlib import Path

import pytest
import torch

from dlcm.data.tokenizer import train_bpe, vocab_size
from dlcm.eval.cli import format_table, markdown_table, write_tensorboard
from dlcm.eval.provenance import sha256_of
from dlcm.eval.scoring import (
    Request,
    encode_request,
    ending_length_chars,
    evaluate_examples,
    multiple_choice_metrics,
    score_requests,
)
from dlcm.eval.tasks import TASKS, Example, load_task
from dlcm.model.presets import build_model, tiny_baseline, tiny_dlcm
from dlcm.train.lightning_modules import BaselineModule
from dlcm.train.restore import load_weights

VOCABULARY = "the cat dog sat on a mat sun rain water fire tree house ran jumped quickly red blue green big small"
WORDS = VOCABULARY.split()


def write_jsonl(path: Path, rows: list[object]) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory):
    rng = random.Random(0)
    texts = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))) + "." for _ in range(400)]
    texts += ["Question: what is it?\nAnswer: yes", "Context: x\nChoices:\nA. b\nB. c\nAnswer: A"]
    return train_bpe(texts, 320, tmp_path_factory.mktemp("tok") / "tokenizer.json")


# --- loaders -------------------------------------------------------------------------------------------------


def test_query_choices_gold_format(tmp_path: Path) -> None:
    rows = [{"query": "Question: Which is hot?", "choices": ["ice", "fire"], "gold": 1}, ""]
    write_jsonl(tmp_path / "arc_easy.jsonl", rows)
    (ex,) = load_task("arc_easy", tmp_path)
    assert ex == Example("Question: Which is hot?\nAnswer:", (" ice", " fire"), 1)
    write_jsonl(
        tmp_path / "siqa.jsonl",
        [{"query": "Context: c\nChoices:\nA. x\nB. y\nAnswer:", "choices": ["A", "B"], "gold": 0}],
    )
    siqa_context = "Context: c\nChoices:\nA. x\nB. y\nAnswer:"
    assert load_task("siqa", tmp_path)[0].requests() == [(siqa_context, " A"), (siqa_context, " B")]
    write_jsonl(tmp_path / "copa.jsonl", [{"query": "It rained, therefore", "choices": ["wet.", "dry."], "gold": 0}])
    assert load_task("copa", tmp_path)[0].context == "It rained, therefore"  # a sentence stem gets no answer cue


def test_mmlu_both_layouts(tmp_path: Path) -> None:
    foundry = {"query": "Question: 1+1?\n(A) 2 (B) 3\n", "choices": ["A", "B"], "gold": 0, "category": "math"}
    public = {"question": "1+1?", "choices": ["2", "3"], "answer": 0, "subject": "math"}
    write_jsonl(tmp_path / "mmlu.jsonl", [foundry, public])
    a, b = load_task("mmlu", tmp_path)
    assert a.context == "Question: 1+1?\n(A) 2 (B) 3\nAnswer:" and a.continuations == (" A", " B")
    assert b.context == "1+1?\nA. 2\nB. 3\nAnswer:" and b.continuations == (" A", " B") and b.label == 0


def test_winogrande_partial_scoring(tmp_path: Path) -> None:
    row = {"context_options": ["Ann beat Bob so Ann", "Ann beat Bob so Bob"], "continuation": "was sad.", "gold": 1}
    write_jsonl(tmp_path / "winogrande.jsonl", [row])
    (ex,) = load_task("winogrande", tmp_path)
    assert ex.requests() == [("Ann beat Bob so Ann", " was sad."), ("Ann beat Bob so Bob", " was sad.")]
    assert ex.label == 1


def test_hellaswag_preprocessing(tmp_path: Path) -> None:
    row = {
        "activity_label": "Cooking",
        "ctx_a": "A man cuts onions.",
        "ctx_b": "he",
        "ctx": "A man cuts onions. he",
        "endings": ["fries them [step] in oil.", "eats  them [title] Done"],
        "label": "1",
    }
    write_jsonl(tmp_path / "hellaswag.jsonl", [row])
    (ex,) = load_task("hellaswag", tmp_path)
    assert ex.context == "Cooking: A man cuts onions. He"
    assert ex.continuations == (" fries them in oil.", " eats them. Done") and ex.label == 1


def test_lambada_cloze(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "lambada_openai.jsonl", [{"context": "the cat sat on the", "continuation": "mat"}])
    assert load_task("lambada_openai", tmp_path) == [Example("the cat sat on the", (" mat",), 0, kind="cloze")]


def test_race_both_layouts(tmp_path: Path) -> None:
    flat = {
        "article": "Tom has a dog. ",
        "question": "What does Tom have?",
        "options": ["a cat", "a dog"],
        "answer": "B",
    }
    original = {
        "id": "high1.txt",
        "article": "It rained.",
        "questions": ["What happened?", "The ground was _ ."],
        "options": [["rain", "sun", "snow", "wind"], ["wet", "dry", "hot", "red"]],
        "answers": ["A", "a"],
    }
    write_jsonl(tmp_path / "race.jsonl", [flat, original])
    a, b, c = load_task("race", tmp_path)
    assert a == Example("Article: Tom has a dog.\n\nQuestion: What does Tom have?\nAnswer:", (" a cat", " a dog"), 1)
    assert b.context == "Article: It rained.\n\nQuestion: What happened?\nAnswer:" and b.label == 0
    assert c.context.endswith("Question: The ground was _ .\nAnswer:") and c.continuations[0] == " wet" and c.label == 0
    assert len(load_task("race", tmp_path, limit=2)) == 2  # the limit counts questions, not articles


def write_csv(path: Path, header: list[str], rows: list[list[str]]) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows([header, *rows])
    return path


LETTERED = Example("1+1=?\nA. 1\nB. 2\nC. 3\nD. 4\nAnswer:", (" A", " B", " C", " D"), 1)


def test_ceval_cmmlu_jsonl_and_csv(tmp_path: Path) -> None:
    row = {"id": 0, "question": "1+1=?", "A": "1", "B": "2", "C": "3", "D": "4", "answer": "B", "explanation": ""}
    write_jsonl(tmp_path / "ceval.jsonl", [row])
    assert load_task("ceval", tmp_path) == [LETTERED]  # the MMLU prompt: lettered options, letters scored
    # C-Eval CSV: id and a multi-line quoted explanation; CMMLU CSV: unnamed index column, capitalised names.
    csv_dir = tmp_path / "csv"
    csv_dir.mkdir()
    header = ["id", "question", "A", "B", "C", "D", "answer", "explanation"]
    write_csv(csv_dir / "ceval.csv", header, [["0", "1+1=?", "1", "2", "3", "4", "B", "1+1\n=2"]] * 2)
    assert load_task("ceval", csv_dir) == [LETTERED] * 2
    write_csv(
        csv_dir / "cmmlu.csv", ["", "Question", "A", "B", "C", "D", "Answer"], [["0", "1+1=?", "1", "2", "3", "4", "B"]]
    )
    assert load_task("cmmlu", csv_dir) == [LETTERED]
    # Per-subject directory, as the datasets ship: files read in sorted order, CSV and JSONL mixed.
    subjects = tmp_path / "dir" / "cmmlu"
    subjects.mkdir(parents=True)
    write_csv(subjects / "b_physics.csv", ["Question", "A", "B", "Answer"], [["Hot?", "ice", "fire", "B"]])
    write_jsonl(subjects / "a_math.jsonl", [row])
    (subjects / "README.md").write_text("not data")
    assert load_task("cmmlu", tmp_path / "dir") == [
        LETTERED,
        Example("Hot?\nA. ice\nB. fire\nAnswer:", (" A", " B"), 1),
    ]
    with pytest.raises(FileNotFoundError, match=r"cmmlu\.jsonl.*cmmlu\.csv.*cmmlu"):
        load_task("cmmlu", tmp_path / "csv" / "nowhere")


@pytest.mark.parametrize(
    ("row", "why"),
    [
        (["1", "q", "a", "b", "c", "d", "E", ""], "not an index"),
        (["2", "q", "a", "b", "c", "d", "", ""], "must be a letter"),
        (["3", "", "a", "b", "c", "d", "A", ""], "question is empty"),
        (["4", "q", "a", "b", "c"], "expected 8 columns"),
    ],
)
def test_malformed_csv_row_names_file_and_line(tmp_path: Path, row: list[str], why: str) -> None:
    header = ["id", "question", "A", "B", "C", "D", "answer", "explanation"]
    # The first record spans lines 2-3, so the bad one starts on line 4: lines, not records, are counted.
    path = write_csv(tmp_path / "ceval.csv", header, [["0", "q", "a", "b", "c", "d", "A", "two\nlines"], row])
    with pytest.raises(ValueError, match=rf"{re.escape(str(path))}, line 4: malformed CSV record .*{why}"):
        load_task("ceval", tmp_path)


def test_csv_missing_column_names_the_column(tmp_path: Path) -> None:
    write_csv(tmp_path / "ceval.csv", ["id", "question", "A", "B", "C", "D"], [["0", "q", "a", "b", "c", "d"]])
    with pytest.raises(ValueError, match=r"line 2: .*missing the 'answer' column"):
        load_task("ceval", tmp_path)


def test_limit(tmp_path: Path) -> None:
    rows = [{"query": f"q{i}", "choices": ["a", "b"], "gold": 0} for i in range(5)]
    write_jsonl(tmp_path / "piqa.jsonl", rows)
    assert len(load_task("piqa", tmp_path, limit=3)) == 3


@pytest.mark.parametrize(
    ("task", "bad", "why"),
    [
        ("piqa", "{not json", "malformed"),
        ("piqa", json.dumps({"query": "q", "choices": ["a", "b"]}), "missing the 'gold' field"),
        ("piqa", json.dumps({"query": "q", "choices": ["a", "b"], "gold": 2}), "not an index"),
        ("winogrande", json.dumps({"context_options": ["a"], "continuation": "b", "gold": 0}), "at least 2"),
        ("lambada_openai", json.dumps({"context": "a", "continuation": ""}), "non-empty"),
        ("race", json.dumps({"article": "t", "question": "q", "options": ["a", "b"], "answer": "C"}), "not an index"),
        ("race", json.dumps({"article": "t", "questions": ["q"], "options": [], "answers": ["A"]}), "same length"),
        ("cmmlu", json.dumps({"question": "q", "A": "a", "B": "b", "answer": "AB"}), "must be a letter"),
        ("cmmlu", json.dumps({"question": "q", "A": "a", "B": 2, "answer": "A"}), "must be strings"),
    ],
)
def test_malformed_line_names_file_and_line(tmp_path: Path, task: str, bad: str, why: str) -> None:
    good = {
        "piqa": {"query": "q", "choices": ["a", "b"], "gold": 0},
        "winogrande": {"context_options": ["a", "b"], "continuation": "c", "gold": 0},
        "lambada_openai": {"context": "a", "continuation": "b"},
        "race": {"article": "t", "question": "q", "options": ["a", "b"], "answer": "A"},
        "cmmlu": {"question": "q", "A": "a", "B": "b", "answer": "A"},
    }[task]
    path = write_jsonl(tmp_path / f"{task}.jsonl", [good, bad])
    with pytest.raises(ValueError, match=rf"{re.escape(str(path))}, line 2: .*{why}"):
        load_task(task, tmp_path)


def test_unknown_task_lists_known(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"unknown task 'arc_hard'.*arc_challenge, arc_easy"):
        load_task("arc_hard", tmp_path)
    with pytest.raises(FileNotFoundError, match=r"boolq\.jsonl"):
        load_task("boolq", tmp_path)
    assert {"arc_easy", "piqa", "winogrande", "hellaswag", "lambada_openai", "mmlu", "race", "ceval", "cmmlu"} <= set(
        TASKS
    )


# --- scoring -------------------------------------------------------------------------------------------------


def direct_score(network: torch.nn.Module, request: Request) -> tuple[float, bool]:
    """Reference: one unpacked forward of a single request, log-softmax over the whole vocabulary."""
    ids = torch.tensor(request.ids)
    network.eval()
    with torch.no_grad():
        out = network(ids[:-1], torch.tensor([0, len(ids) - 1], dtype=torch.int32), len(ids) - 1)
    logp = torch.log_softmax((out if isinstance(out, torch.Tensor) else out.logits_TV).float(), -1)
    n = request.n_continuation
    lp = logp[-n:].gather(1, ids[-n:, None])[:, 0]
    return float(lp.sum()), bool((logp[-n:].argmax(-1) == ids[-n:]).all())


def make_network(kind: str, vocab: int) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(tiny_dlcm(vocab) if kind == "dlcm" else tiny_baseline(vocab))


def random_pairs(n: int, seed: int) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    phrase = lambda k: " ".join(rng.choice(WORDS) for _ in range(k))  # noqa: E731
    return [(phrase(rng.randint(1, 30)), " " + phrase(rng.randint(1, 4))) for _ in range(n)]


@pytest.mark.parametrize("kind", ["dlcm", "baseline"])
def test_score_is_packing_invariant(tokenizer, kind: str) -> None:
    network = make_network(kind, vocab_size(tokenizer))
    requests = [encode_request(tokenizer, c, x, context_length=64) for c, x in random_pairs(24, seed=1)]
    packed = score_requests(network, requests, batch_tokens=4096)  # one forward for all
    small = score_requests(network, requests, batch_tokens=40)  # many forwards, different neighbours
    padded = score_requests(network, requests, batch_tokens=64, pad_batches=True)  # as on a GPU: fixed length
    shuffled_order = list(range(len(requests)))
    random.Random(2).shuffle(shuffled_order)
    shuffled = score_requests(network, [requests[i] for i in shuffled_order], batch_tokens=4096)
    for k, request in enumerate(requests):
        loglik, greedy = direct_score(network, request)
        assert packed[k].loglik == pytest.approx(loglik, abs=1e-4)
        assert small[k].loglik == pytest.approx(loglik, abs=1e-4)
        assert padded[k].loglik == pytest.approx(loglik, abs=1e-4) and padded[k].is_greedy == greedy
        assert packed[k].is_greedy == greedy and packed[k].n_tokens == request.n_continuation
    for pos, k in enumerate(shuffled_order):
        assert shuffled[pos].loglik == pytest.approx(packed[k].loglik, abs=1e-4)
    if kind == "dlcm":  # the invariance is only meaningful if the parser actually cut concepts
        network.eval()
        ids = torch.tensor(requests[0].ids[:-1])
        with torch.no_grad():
            boundary_T = network(ids, torch.tensor([0, len(ids)], dtype=torch.int32)).parser.boundary_T
        assert 1 < int(boundary_T.sum()) < len(ids)


def test_score_requests_restores_training_mode(tokenizer) -> None:
    network = make_network("dlcm", vocab_size(tokenizer)).train()
    score_requests(network, [encode_request(tokenizer, "the cat", " sat", 64)])
    assert network.training


def test_encode_request_continuation_and_left_truncation(tokenizer) -> None:
    full = encode_request(tokenizer, "the cat sat on the", " mat", context_length=1000)
    assert tokenizer.decode(list(full.ids[-full.n_continuation :])) == " mat"
    assert tokenizer.decode(list(full.ids)) == "the cat sat on the mat"
    short = encode_request(tokenizer, "the cat sat on the", " mat", context_length=3)
    assert short.ids == full.ids[-4:] and short.n_continuation == full.n_continuation
    with pytest.raises(ValueError, match="no tokens"):
        encode_request(tokenizer, "the cat", "", 64)


def test_multiple_choice_metrics_by_hand() -> None:
    # Item 1: option 0 wins on the sum, option 1 per byte and per character. Item 2: option 1 wins on all three.
    out = multiple_choice_metrics([[-2.0, -3.0], [-5.0, -1.0]], [[1, 10], [4, 4]], [[1, 9], [3, 3]], [1, 1])
    assert out["acc"] == 0.5 and out["acc_norm_bytes"] == 1.0 and out["acc_norm_chars"] == 1.0 and out["n"] == 2
    assert out["acc_stderr"] == pytest.approx(math.sqrt(0.25 / 2)) and out["acc_norm_bytes_stderr"] == 0.0


def test_acc_norm_by_bytes_and_by_characters_differ_where_the_ending_is_not_ascii() -> None:
    # " ab": 3 bytes with the space, 2 characters without; " ééé": 7 bytes, 3 characters. Per byte option 1 wins
    # (-2/3 < -3.1/7), per character (lm-eval's acc_norm) option 0 (-2/2 > -3.1/3).
    endings = [" ab", " ééé"]
    nbytes = [[len(e.encode()) for e in endings]]
    nchars = [[ending_length_chars(e) for e in endings]]
    assert nbytes == [[3, 7]] and nchars == [[2, 3]]
    out = multiple_choice_metrics([[-2.0, -3.1]], nbytes, nchars, [1])
    assert out["acc_norm_bytes"] == 1.0 and out["acc_norm_chars"] == 0.0


def test_evaluate_examples_matches_hand_computation(tokenizer) -> None:
    network = make_network("dlcm", vocab_size(tokenizer))
    examples = [
        Example("the cat sat on the", (" mat", " red house", " sun"), 0),
        Example("Question: what is it?\nAnswer:", (" yes", " dog ran quickly"), 1),
        Example("a", (" tree", " water"), 1, option_contexts=("the big dog", "the small cat")),
        Example("rain on the", (" mat", " house"), 1),
    ]
    got = evaluate_examples(network, tokenizer, examples, context_length=64, batch_tokens=16)
    acc, acc_norm, acc_chars = [], [], []
    for ex in examples:
        ll = [direct_score(network, encode_request(tokenizer, c, x, 64))[0] for c, x in ex.requests()]
        nbytes = [len(x.encode()) for x in ex.continuations]
        nchars = [len(x) - 1 for x in ex.continuations]  # every ending here starts with one space
        acc.append(max(range(len(ll)), key=lambda i: ll[i]) == ex.label)
        acc_norm.append(max(range(len(ll)), key=lambda i: ll[i] / nbytes[i]) == ex.label)
        acc_chars.append(max(range(len(ll)), key=lambda i: ll[i] / nchars[i]) == ex.label)
    p, pn = sum(acc) / 4, sum(acc_norm) / 4
    assert got["acc"] == p and got["acc_norm_bytes"] == pn and got["n"] == 4
    assert got["acc_norm_chars"] == sum(acc_chars) / 4
    assert got["acc_stderr"] == pytest.approx(math.sqrt(p * (1 - p) / 4))
    assert got["acc_norm_bytes_stderr"] == pytest.approx(math.sqrt(pn * (1 - pn) / 4))
    assert "acc" in format_table({"toy": got})


def test_cloze_accuracy_and_perplexity(tokenizer) -> None:
    network = make_network("baseline", vocab_size(tokenizer))
    examples = [Example(c, (x,), 0, kind="cloze") for c, x in random_pairs(6, seed=3)]
    got = evaluate_examples(network, tokenizer, examples, context_length=64)
    refs = [direct_score(network, encode_request(tokenizer, ex.context, ex.continuations[0], 64)) for ex in examples]
    assert got["acc"] == pytest.approx(sum(g for _, g in refs) / 6)
    assert got["ppl"] == pytest.approx(math.exp(-sum(ll for ll, _ in refs) / 6), rel=1e-5)
    with pytest.raises(ValueError, match="no examples"):
        evaluate_examples(network, tokenizer, [], context_length=64)


# --- TensorBoard -------------------------------------------------------------------------------------------


def read_tensorboard(log_dir: Path) -> tuple[str, int, dict[str, tuple[int, float]]]:
    """The ``eval/results`` text, its step, and every scalar tag → (step, value), read back from the event file."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"tensors": 0, "scalars": 0})
    acc.Reload()
    (text,) = acc.Tensors("eval/results/text_summary")
    scalars = {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}
    assert all(len(v) == 1 for v in scalars.values())
    return text.tensor_proto.string_val[0].decode(), text.step, {tag: v[0] for tag, v in scalars.items()}


def test_tensorboard_results_table_and_scalars(tmp_path: Path) -> None:
    results = {
        "piqa": {
            "acc": 0.5,
            "acc_stderr": 0.1,
            "acc_norm_bytes": 0.75,
            "acc_norm_bytes_stderr": 0.05,
            "acc_norm_chars": 0.7,
            "acc_norm_chars_stderr": 0.05,
            "n": 20,
        },
        "lambada_openai": {"acc": 0.25, "acc_stderr": 0.2, "ppl": 123.456, "n": 4},
    }
    write_tensorboard(results, tmp_path / "tb", step=7)
    text, step, scalars = read_tensorboard(tmp_path / "tb")
    assert text == markdown_table(results) and step == 7
    assert text.splitlines()[2:] == [
        "| piqa | 20 | 0.5000 ± 0.1000 | 0.7500 ± 0.0500 | 0.7000 ± 0.0500 | - |",
        "| lambada_openai | 4 | 0.2500 ± 0.2000 | - | - | 123.46 |",
    ]
    expected = {f"eval/{task}/{m}": (7, v) for task, r in results.items() for m, v in r.items() if m != "n"}
    assert scalars.keys() == expected.keys()
    for tag, (s, v) in expected.items():
        assert scalars[tag][0] == s and scalars[tag][1] == pytest.approx(v)


# --- checkpoints ---------------------------------------------------------------------------------------------


def test_load_weights_roundtrip_and_mismatch(tmp_path: Path) -> None:
    torch.manual_seed(0)
    trained = BaselineModule(tiny_baseline(300), context_length=32)
    torch.save({"state_dict": trained.state_dict()}, tmp_path / "ok.ckpt")
    fresh = BaselineModule(tiny_baseline(300), context_length=32)
    load_weights(fresh, str(tmp_path / "ok.ckpt"))
    assert all(
        torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), trained.state_dict().values(), strict=True)
    )
    with pytest.raises(ValueError, match="does not fit this model"):
        load_weights(BaselineModule(tiny_baseline(400), context_length=32), str(tmp_path / "ok.ckpt"))
    state = dict(trained.state_dict())
    state.pop(next(iter(state)))
    torch.save({"state_dict": state}, tmp_path / "partial.ckpt")
    with pytest.raises(ValueError, match="does not match the model of this recipe"):
        load_weights(fresh, str(tmp_path / "partial.ckpt"))


def test_dlcm_eval_end_to_end_on_a_tiny_fit(tmp_path: Path, capsys) -> None:
    from dlcm.eval.cli import main
    from dlcm.train.cli import run_cli
    from dlcm.train.step_checkpoint import StepCheckpoint

    recipe = str(Path(__file__).parents[2] / "recipes" / "dlcm_tiny_r4_defaultcorpus_cpu.yaml")
    root = tmp_path / "run"
    fit = run_cli(
        [
            f"--config={recipe}",
            "--data.tokens_per_batch=512",
            "--trainer.max_steps=3",
            "--trainer.limit_val_batches=1",
            "--trainer.val_check_interval=3",
            "--trainer.enable_progress_bar=false",
            "--trainer.enable_model_summary=false",
            f"--trainer.default_root_dir={root}",
            f"--trainer.logger.init_args.save_dir={root}",
        ],
        run=False,
    )
    fit.trainer.fit(fit.model, fit.datamodule)
    ckpt = str(next(c for c in fit.trainer.callbacks if isinstance(c, StepCheckpoint)).last_path)
    data = tmp_path / "eval"
    data.mkdir()
    write_jsonl(data / "copa.jsonl", [{"query": "In the beginning", "choices": ["God", "def"], "gold": 0}] * 3)
    write_jsonl(data / "lambada_openai.jsonl", [{"context": "And God said, Let there be", "continuation": "light"}])
    out = tmp_path / "results.json"
    argv = ["--config", recipe, "--ckpt_path", ckpt, "--tasks", "copa,lambada_openai", "--data-dir", str(data)]
    tb = tmp_path / "tb"
    assert main([*argv, "--limit", "2", "--out", str(out), "--tensorboard", str(tb), "--no-progress"]) == 0
    record = json.loads(out.read_text())
    results = record["tasks"]
    assert set(results) == {"copa", "lambada_openai"} and results["copa"]["n"] == 2
    assert set(results["copa"]) == {
        "acc",
        "acc_stderr",
        "acc_norm_bytes",
        "acc_norm_bytes_stderr",
        "acc_norm_chars",
        "acc_norm_chars_stderr",
        "n",
    }
    assert {"acc_norm_bytes", "acc_norm_chars"} <= record["metric_definitions"].keys()
    source = record["provenance"]
    assert source["checkpoint"]["path"] == ckpt and source["checkpoint"]["sha256"] == sha256_of(ckpt)
    assert source["recipes"][0]["sha256"] == sha256_of(recipe)
    assert source["tasks"]["copa"]["sha256"] == sha256_of(data / "copa.jsonl")
    assert source["versions"]["torch"] and source["versions"]["lightning"]
    assert "commit" in source and source["limit"] == 2
    # The numbers are those of the trained weights, not of a fresh initialisation.
    direct = evaluate_examples(
        fit.model.network, fit.datamodule.tokenizer, load_task("lambada_openai", data), fit.model.context_length
    )
    assert results["lambada_openai"]["ppl"] == pytest.approx(direct["ppl"], rel=1e-4)
    assert "lambada_openai" in capsys.readouterr().out
    text, step, scalars = read_tensorboard(tb)  # logged at the checkpoint's training step
    assert step == 3 and "| copa | 2 |" in text
    assert scalars["eval/lambada_openai/ppl"] == (3, pytest.approx(results["lambada_openai"]["ppl"]))
