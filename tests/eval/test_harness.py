"""lm-evaluation-harness adapter: the harness's own evaluator on local YAML tasks agrees with `dlcm eval`.

No network: the tasks read JSONL fixtures written here through the `datasets` JSON builder, offline.
"""

from __future__ import annotations

import json
import math
import os
import random
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
lm_eval = pytest.importorskip("lm_eval")

from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.api.registry import get_model  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from dlcm.data.tokenizer import train_bpe, vocab_size  # noqa: E402
from dlcm.eval.harness import DLCMHarnessLM, generation_options  # noqa: E402
from dlcm.eval.scoring import encode_request, evaluate_examples, score_requests  # noqa: E402
from dlcm.eval.tasks import load_task  # noqa: E402
from dlcm.infer.generation import generate_texts  # noqa: E402
from dlcm.model.presets import build_model, tiny_baseline, tiny_dlcm  # noqa: E402

WORDS = ["the", "cat", "dog", "sat", "on", "a", "mat", "sun", "rain", "water", "fire", "tree", "house", "ran", "red"]
CONTEXT = 48


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory):
    rng = random.Random(0)
    texts = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))) + "." for _ in range(400)]
    return train_bpe(texts, 320, tmp_path_factory.mktemp("tok") / "tokenizer.json")


def make_network(kind: str, vocab: int) -> torch.nn.Module:
    torch.manual_seed(0)
    network = build_model(tiny_dlcm(vocab) if kind == "dlcm" else tiny_baseline(vocab)).eval()
    if kind == "dlcm":  # random W_q/W_k: many concepts of different lengths, not one per token or per document
        g = torch.Generator().manual_seed(3)
        for w in (network.parser.wq.weight, network.parser.wk.weight):
            w.data.copy_(torch.randn(w.shape, generator=g))
    return network


def phrase(rng: random.Random, lo: int, hi: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))


@pytest.fixture(scope="module")
def tasks(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A multiple-choice and a cloze task: JSONL in `dlcm eval`'s layout plus harness YAML over the same files."""
    root = tmp_path_factory.mktemp("tasks")
    rng = random.Random(1)
    # Choices carry their leading space and the YAML sets target_delimiter "": both tools then score the same
    # pairs and normalise acc_norm by the same length (ASCII: characters = bytes).
    choice_rows = [
        {"query": phrase(rng, 2, 40), "choices": [" " + phrase(rng, 1, 5) for _ in range(4)], "gold": rng.randrange(4)}
        for _ in range(16)
    ]
    cloze_rows = [{"context": phrase(rng, 2, 70), "continuation": rng.choice(WORDS)} for _ in range(12)]
    for name, rows in (("copa", choice_rows), ("lambada_openai", cloze_rows)):
        (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    dataset = "dataset_path: json\ntest_split: test\n"
    files = lambda name: f"dataset_kwargs:\n  data_files: {{test: {root / name}.jsonl}}\n  cache_dir: {root / 'hf'}\n"  # noqa: E731
    (root / "choice.yaml").write_text(
        "task: dlcm_fixture_choice\n" + dataset + files("copa") + "output_type: multiple_choice\n"
        "doc_to_text: query\ndoc_to_choice: choices\ndoc_to_target: gold\ntarget_delimiter: ''\n"
        "metric_list:\n  - metric: acc\n  - metric: acc_norm\n"
    )
    (root / "cloze.yaml").write_text(
        "task: dlcm_fixture_cloze\n" + dataset + files("lambada_openai") + "output_type: loglikelihood\n"
        "doc_to_text: context\ndoc_to_target: \"{{' ' + continuation}}\"\ntarget_delimiter: ''\n"
        "metric_list:\n  - metric: perplexity\n  - metric: acc\n"
    )
    return root


def harness_run(lm: DLCMHarnessLM, root: Path, task: str) -> tuple[dict, list[dict]]:
    out = lm_eval.simple_evaluate(
        model=lm,
        tasks=[task],
        task_manager=TaskManager(include_path=str(root), include_defaults=False),  # indexing lm_eval's own takes ~10 s
        log_samples=True,
        bootstrap_iters=0,
    )
    samples = sorted(out["samples"][task], key=lambda s: s["doc_id"])
    return out["results"][task], samples


def test_multiple_choice_agrees_with_dlcm_eval(tokenizer, tasks: Path) -> None:
    network = make_network("dlcm", vocab_size(tokenizer))
    lm = DLCMHarnessLM.from_network(network, tokenizer, CONTEXT, batch_tokens=300)
    results, samples = harness_run(lm, tasks, "dlcm_fixture_choice")
    examples = load_task("copa", tasks)
    ours = evaluate_examples(network, tokenizer, examples, CONTEXT)
    # Per example, per option: the harness's log-likelihoods are dlcm's scores of the same pairs.
    assert len(samples) == len(examples)
    for sample, example in zip(samples, examples, strict=True):
        requests = [encode_request(tokenizer, c, x, CONTEXT) for c, x in example.requests()]
        expected = [s.loglik for s in score_requests(network, requests)]
        assert [resp[0][0] for resp in sample["resps"]] == pytest.approx(expected, abs=1e-5)
        assert [tuple(args) for args in sample["arguments"]] == example.requests()
    assert results["acc,none"] == pytest.approx(ours["acc"], abs=1e-12)
    # target_delimiter "" with the space in the choices: lm-eval's length is then that of dlcm's continuation.
    assert results["acc_norm,none"] == pytest.approx(ours["acc_norm_bytes"], abs=1e-12)
    assert 0 < ours["acc"] < 1 or 0 < ours["acc_norm_bytes"] < 1  # the fixture does not make the metrics trivial


def test_cloze_perplexity_and_greedy_accuracy_agree(tokenizer, tasks: Path) -> None:
    network = make_network("baseline", vocab_size(tokenizer))
    lm = DLCMHarnessLM.from_network(network, tokenizer, CONTEXT)
    results, samples = harness_run(lm, tasks, "dlcm_fixture_cloze")
    examples = load_task("lambada_openai", tasks)
    ours = evaluate_examples(network, tokenizer, examples, CONTEXT)
    expected = score_requests(network, [encode_request(tokenizer, *ex.requests()[0], CONTEXT) for ex in examples])
    assert [s["resps"][0][0][0] for s in samples] == pytest.approx([e.loglik for e in expected], abs=1e-5)
    assert results["perplexity,none"] == pytest.approx(ours["ppl"], rel=1e-6)
    assert results["acc,none"] == pytest.approx(ours["acc"], abs=1e-12)


def instance(kind: str, args: tuple, idx: int = 0) -> Instance:
    return Instance(request_type=kind, doc={}, arguments=args, idx=idx, metadata=("fixture", idx, 1))


def test_rolling_loglikelihood_sums_windows_of_the_context_length(tokenizer) -> None:
    network = make_network("dlcm", vocab_size(tokenizer))
    lm = DLCMHarnessLM.from_network(network, tokenizer, context_length=CONTEXT)
    rng = random.Random(4)
    texts = [phrase(rng, 3, 8), phrase(rng, 60, 80)]  # one fits a window, one needs several
    got = lm.loglikelihood_rolling([instance("loglikelihood_rolling", (t,), i) for i, t in enumerate(texts)])
    for text, total in zip(texts, got, strict=True):
        ids = tokenizer.encode(text).ids
        # Reference: tokens 1 … n−1 in disjoint runs of CONTEXT predictions; a run ending at token e reads the
        # CONTEXT tokens before e (fewer for the first run), so every token is scored exactly once.
        expected, first = 0.0, 1
        while first < len(ids):
            last = min(first + CONTEXT - 1, len(ids) - 1)
            start = max(0, last - CONTEXT)
            with torch.no_grad():
                out = network(torch.tensor(ids[start:last]), torch.tensor([0, last - start], dtype=torch.int32))
            logp = torch.log_softmax(out.logits_TV.double(), -1)
            expected += sum(float(logp[t - 1 - start, ids[t]]) for t in range(first, last + 1))
            first = last + 1
        assert total == pytest.approx(expected, abs=1e-4)
    assert len(tokenizer.encode(texts[1]).ids) > CONTEXT + 1


def test_generate_until_matches_dlcm_generation(tokenizer) -> None:
    network = make_network("dlcm", vocab_size(tokenizer))
    lm = DLCMHarnessLM.from_network(network, tokenizer, CONTEXT, batch_size=2)
    prompts = ["the cat sat on", "rain", "a red house"]
    full = generate_texts(network, tokenizer, prompts, 10)
    stop = full[0][3:5]
    options = {"until": [stop], "max_gen_toks": 10}
    requests = [instance("generate_until", (p, options), i) for i, p in enumerate(prompts)]
    assert lm.generate_until(requests) == [t[: t.find(stop)] if stop in t else t for t in full]
    assert generation_options({"do_sample": True, "top_k": 5})["temperature"] == 1.0
    with pytest.raises(ValueError, match=r"\['num_beams'\] are not supported"):
        generation_options({"num_beams": 4})
    with pytest.raises(ValueError, match="empty context"):
        lm.loglikelihood([instance("loglikelihood", ("", " cat"))])


def test_registered_model_loads_a_checkpoint_alone_or_with_its_recipe(tmp_path: Path) -> None:
    from dlcm.infer.export import export
    from dlcm.infer.load import load_with_recipe

    recipe = str(Path(__file__).parents[2] / "recipes" / "baseline_tiny_defaultcorpus_cpu.yaml")
    model = load_with_recipe(recipe, None)
    # A checkpoint without a model record (format version 0) loads with its recipe ...
    torch.save({"state_dict": {f"network.{k}": v for k, v in model.network.state_dict().items()}}, tmp_path / "w.ckpt")
    with_recipe = get_model("dlcm").create_from_arg_string(
        f"config={recipe},checkpoint={tmp_path / 'w.ckpt'}", {"batch_size": 4, "device": "cpu"}
    )
    # ... an exported folder alone.
    export(model, "w.ckpt", tmp_path / "exported")
    alone = get_model("dlcm").create_from_arg_string(f"checkpoint={tmp_path / 'exported'}", {"device": "cpu"})
    (expected,) = score_requests(model.network, [encode_request(model.tokenizer, "In the beginning", " God", 256)])
    for lm in (with_recipe, alone):
        assert lm.context_length == model.context_length
        (got,) = lm.loglikelihood([instance("loglikelihood", ("In the beginning", " God"))])
        assert got[0] == pytest.approx(expected.loglik, abs=1e-5) and math.isfinite(got[0])
    assert with_recipe.gen_batch_size == 4
    with pytest.raises(ValueError, match="checkpoint="):
        get_model("dlcm").create_from_arg_string("", {})
