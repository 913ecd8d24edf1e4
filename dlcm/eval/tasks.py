"""Loaders that turn local benchmark files into a uniform list of :class:`Example`.

Formats read (one JSON object per line, blank lines skipped):

==========================  ==============================================================  =====================
tasks                       fields                                                          scoring
==========================  ==============================================================  =====================
arc_easy, arc_challenge,    ``query``, ``choices``, ``gold`` (LLM Foundry local data)       multiple choice
piqa, boolq, openbook_qa,
copa, commonsense_qa, siqa
mmlu, mmlu_small            Foundry's ``query``/``choices``/``gold``/``category`` or the    multiple choice
                            public ``question``/``choices``/``answer``/``subject`` layout
race                        ``article``/``question``/``options``/``answer`` (one line per   multiple choice
                            question), or the original per-article ``article``/
                            ``questions``/``options``/``answers`` parallel lists
ceval, cmmlu                ``question``, ``A``…``D``, ``answer`` letter; JSONL or CSV      multiple choice
                            (C-Eval's ``id``/``explanation``, CMMLU's index column and
                            capitalised ``Question``/``Answer`` are accepted)
winogrande                  ``context_options``, ``continuation``, ``gold``                 partial scoring
hellaswag                   ``ctx``, ``endings``, ``label``, ``activity_label`` (standard)  multiple choice
lambada_openai, lambada     ``context``, ``continuation``                                   cloze (greedy + ppl)
==========================  ==============================================================  =====================

``ceval`` and ``cmmlu`` are read from ``<name>.jsonl``, ``<name>.csv`` or a directory ``<name>/`` of per-subject
``*.csv``/``*.jsonl`` files (the datasets ship one CSV per subject); every other task from ``<name>.jsonl``.

Prompts follow the common zero-shot convention: a question ends in ``"\\nAnswer:"`` and every continuation starts
with the single space that separates it from the context, so a byte-level BPE tokenises the context identically
alone and with the continuation appended (the scorer relies on that to find the continuation's tokens).
"""

from __future__ import annotations

import csv
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dlcm.data.sources import iter_jsonl_records

ANSWER_CUE = "\nAnswer:"


@dataclass(frozen=True)
class Example:
    """One item: a context, one continuation per option, and the index of the correct option.

    ``option_contexts`` is set for partial scoring (Winogrande): option ``i`` is scored as the log-likelihood of
    ``continuations[i]`` (the same suffix for every option) after ``option_contexts[i]``; ``context`` then holds
    the first option's context for display only. ``kind='cloze'`` marks LAMBADA-style items with one continuation
    whose tokens must all be the greedy prediction.
    """

    context: str
    continuations: tuple[str, ...]
    label: int
    option_contexts: tuple[str, ...] | None = None
    kind: str = "choice"

    def requests(self) -> list[tuple[str, str]]:
        """The ``(context, continuation)`` pairs to score, one per option."""
        contexts = self.option_contexts or (self.context,) * len(self.continuations)
        return list(zip(contexts, self.continuations, strict=True))


Loader = Callable[[Path], list[Example]]


def _read_jsonl(path: Path, parse: Callable[[dict[str, Any]], Example]) -> list[Example]:
    """Parse every non-blank line; any error names the file and the 1-based line number."""
    return list(iter_jsonl_records(path, lambda _, row: parse(row)))


def _choice_example(context: str, choices: Any, gold: Any) -> Example:
    if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) for c in choices):
        raise ValueError(f"choices must be a list of at least 2 strings, got {choices!r}")
    if not isinstance(gold, int) or isinstance(gold, bool) or not 0 <= gold < len(choices):
        raise ValueError(f"gold/label {gold!r} is not an index into {len(choices)} choices")
    if not isinstance(context, str) or not context.strip():
        raise ValueError("the context is empty (the first token of a document is never predicted)")
    return Example(context, tuple(" " + c.strip() for c in choices), gold)


def _query_loader(answer_cue: bool) -> Loader:
    """Foundry ``{"query","choices","gold"}``; ``answer_cue`` ends a bare question with ``"\\nAnswer:"``."""

    def parse(row: dict[str, Any]) -> Example:
        context = row["query"].rstrip()
        if answer_cue and not context.endswith("Answer:"):
            context += ANSWER_CUE
        return _choice_example(context, row["choices"], row["gold"])

    return lambda path: _read_jsonl(path, parse)


def _parse_mmlu(row: dict[str, Any]) -> Example:
    if "query" in row:  # Foundry: the question already lists "(A) … (B) …"; choices are the letters
        return _choice_example(row["query"].rstrip() + ANSWER_CUE, row["choices"], row["gold"])
    choices = row["choices"]  # public layout: option texts, scored as their letters like the Foundry form
    if not isinstance(choices, list):
        raise ValueError(f"choices must be a list, got {choices!r}")
    letters = [chr(ord("A") + i) for i in range(len(choices))]
    lines = [row["question"].strip(), *(f"{letter}. {text}" for letter, text in zip(letters, choices, strict=True))]
    return _choice_example("\n".join(lines) + ANSWER_CUE, letters, row["answer"])


def _letter_index(answer: Any) -> int:
    """``"B"`` (any case, surrounding spaces ignored) → 1; a bare int index passes through for the bounds check."""
    if isinstance(answer, int) and not isinstance(answer, bool):
        return answer
    if isinstance(answer, str) and len(answer.strip()) == 1 and answer.strip().isalpha():
        return ord(answer.strip().upper()) - ord("A")
    raise ValueError(f"answer must be a letter A, B, …, got {answer!r}")


def _race_example(article: Any, question: Any, options: Any, answer: Any) -> Example:
    if not isinstance(article, str) or not isinstance(question, str):
        raise ValueError("article and question must be strings")
    context = f"Article: {article.strip()}\n\nQuestion: {question.strip()}{ANSWER_CUE}"
    return _choice_example(context, options, _letter_index(answer))


def _parse_race(row: dict[str, Any]) -> list[Example]:
    if "questions" not in row:  # one (article, question) pair per line, as in the Hugging Face export
        return [_race_example(row["article"], row["question"], row["options"], row["answer"])]
    questions, options, answers = row["questions"], row["options"], row["answers"]
    if not all(isinstance(x, list) for x in (questions, options, answers)) or not (
        len(questions) == len(options) == len(answers)
    ):
        raise ValueError("questions, options and answers must be lists of the same length")
    return [_race_example(row["article"], *qoa) for qoa in zip(questions, options, answers, strict=True)]


def _load_race(path: Path) -> list[Example]:
    # The original layout holds every question of an article on one line, so a line yields several examples.
    return [ex for group in iter_jsonl_records(path, lambda _, row: _parse_race(row)) for ex in group]


def _parse_lettered(row: dict[str, Any]) -> Example:
    """C-Eval / CMMLU: ``question``, option columns ``A``, ``B``, …, ``answer`` letter, in the MMLU prompt."""
    # CMMLU capitalises "Question"/"Answer"; option keys "A".."D" lower-case to "a".."d" without clashing.
    fields = {k.strip().lower(): v for k, v in row.items() if isinstance(k, str)}
    question = fields["question"]
    if not isinstance(question, str) or not question.strip():
        raise ValueError("question is empty")
    letters: list[str] = []
    while chr(ord("a") + len(letters)) in fields:
        letters.append(chr(ord("A") + len(letters)))
    options = [fields[letter.lower()] for letter in letters]
    if not all(isinstance(o, str) for o in options):
        raise ValueError(f"options must be strings, got {options!r}")
    lines = [question.strip(), *(f"{letter}. {text.strip()}" for letter, text in zip(letters, options, strict=True))]
    return _choice_example("\n".join(lines) + ANSWER_CUE, letters, _letter_index(fields["answer"]))


def _read_csv(path: Path, parse: Callable[[dict[str, Any]], Example]) -> list[Example]:
    """Parse every row of a headed CSV; any error names the file and the line the row starts on."""
    examples: list[Example] = []
    # utf-8-sig: C-Eval's CSVs may start with a byte-order mark that would otherwise glue onto the first column name.
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.DictReader(f)
        columns = reader.fieldnames or []  # reads the header, so line_num now points at its last line
        start = reader.line_num + 1  # quoted fields (C-Eval explanations) can span lines, so track each row's start
        for row in reader:
            try:
                if None in row or None in row.values():
                    raise ValueError(f"expected {len(columns)} columns")
                examples.append(parse(row))
            except KeyError as err:
                raise ValueError(f"{path}, line {start}: malformed CSV record (missing the {err} column)") from None
            except (ValueError, TypeError) as err:
                raise ValueError(f"{path}, line {start}: malformed CSV record ({err})") from err
            start = reader.line_num + 1
    return examples


def _load_lettered(path: Path) -> list[Example]:
    """One ``.jsonl`` or ``.csv`` file, or a directory of them (sorted, so the order and ``--limit`` are stable)."""
    files = sorted(f for f in path.iterdir() if f.suffix in (".csv", ".jsonl")) if path.is_dir() else [path]
    if not files:
        raise FileNotFoundError(f"{path} holds no .csv or .jsonl files")
    examples: list[Example] = []
    for f in files:
        examples += _read_csv(f, _parse_lettered) if f.suffix == ".csv" else _read_jsonl(f, _parse_lettered)
    return examples


def _parse_winogrande(row: dict[str, Any]) -> Example:
    options, continuation = row["context_options"], row["continuation"]
    if not isinstance(options, list) or len(options) < 2 or not all(isinstance(o, str) and o for o in options):
        raise ValueError(f"context_options must be a list of at least 2 non-empty strings, got {options!r}")
    if not isinstance(continuation, str) or not continuation.strip():
        raise ValueError("continuation is empty")
    base = _choice_example(options[0], [continuation] * len(options), row["gold"])
    return Example(options[0], base.continuations, base.label, tuple(o.rstrip() for o in options))


def _hellaswag_text(text: str) -> str:
    # WikiHow items carry "[header]"/"[title]"/"[step]" markup; a title marker ends a sentence, the rest is noise.
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return re.sub(r"\s{2,}", " ", text).strip()


def _parse_hellaswag(row: dict[str, Any]) -> Example:
    # ctx is ctx_a + " " + ctx_b; rebuilding it capitalises the sentence that ctx_b starts.
    ctx = row["ctx_a"] + " " + row["ctx_b"].capitalize() if "ctx_a" in row and "ctx_b" in row else row["ctx"]
    context = _hellaswag_text(f"{row['activity_label']}: {ctx}")
    endings = row["endings"]
    if not isinstance(endings, list):
        raise ValueError(f"endings must be a list, got {endings!r}")
    label = row["label"]
    label = int(label) if isinstance(label, str) and label.isdigit() else label  # some dumps store "2"
    return _choice_example(context, [_hellaswag_text(e) for e in endings], label)


def _parse_lambada(row: dict[str, Any]) -> Example:
    context, word = row["context"], row["continuation"]
    if not isinstance(context, str) or not context.strip() or not isinstance(word, str) or not word.strip():
        raise ValueError("context and continuation must be non-empty strings")
    return Example(context.rstrip(), (" " + word.strip(),), 0, kind="cloze")


TASKS: dict[str, Loader] = {
    "arc_easy": _query_loader(answer_cue=True),
    "arc_challenge": _query_loader(answer_cue=True),
    "piqa": _query_loader(answer_cue=True),
    "boolq": _query_loader(answer_cue=True),
    "openbook_qa": _query_loader(answer_cue=False),
    "copa": _query_loader(answer_cue=False),
    "commonsense_qa": _query_loader(answer_cue=True),
    "siqa": _query_loader(answer_cue=True),
    "mmlu": lambda path: _read_jsonl(path, _parse_mmlu),
    "mmlu_small": lambda path: _read_jsonl(path, _parse_mmlu),
    "race": _load_race,
    "ceval": _load_lettered,
    "cmmlu": _load_lettered,
    "winogrande": lambda path: _read_jsonl(path, _parse_winogrande),
    "hellaswag": lambda path: _read_jsonl(path, _parse_hellaswag),
    "lambada_openai": lambda path: _read_jsonl(path, _parse_lambada),
    "lambada": lambda path: _read_jsonl(path, _parse_lambada),
}

# Where each task may live under the data directory, in order of preference ("/" marks a directory).
_LOCATIONS: dict[str, tuple[str, ...]] = {
    "ceval": ("ceval.jsonl", "ceval.csv", "ceval/"),
    "cmmlu": ("cmmlu.jsonl", "cmmlu.csv", "cmmlu/"),
}


def task_path(name: str, data_dir: str | Path) -> Path:
    """The file (or directory) task ``name`` is read from under ``data_dir``: the first accepted location present."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}: expected one of {', '.join(sorted(TASKS))}")
    candidates = [
        (Path(data_dir) / loc.rstrip("/"), loc.endswith("/")) for loc in _LOCATIONS.get(name, (f"{name}.jsonl",))
    ]
    found = [path for path, is_dir in candidates if (path.is_dir() if is_dir else path.is_file())]
    if not found:
        raise FileNotFoundError(
            f"task {name!r} needs one of {', '.join(str(p) for p, _ in candidates)}, none of which exists"
        )
    return found[0]


def load_task(name: str, data_dir: str | Path, limit: int | None = None) -> list[Example]:
    """Examples of task ``name`` from ``data_dir/<name>.jsonl`` or another accepted location (the first ``limit``)."""
    path = task_path(name, data_dir)  # checks the name first
    examples = TASKS[name](path)
    return examples if limit is None else examples[:limit]
