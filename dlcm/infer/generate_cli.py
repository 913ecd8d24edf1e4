"""``dlcm generate``: text continuations of prompts from a trained checkpoint, decoded in batches.

Example::

    dlcm generate --ckpt_path runs/…/last.ckpt \\
        --prompt "In the beginning" --prompts-file prompts.jsonl --max-new-tokens 64 --top-p 0.9 \\
        --temperature 0.8 --stop '\\n\\n' --batch-size 16 --seed 0 --out completions.jsonl

``--ckpt_path`` is a checkpoint or an exported folder; the model, its tokenizer and its context length come from
it (:func:`dlcm.load`). ``--config`` is needed only for a checkpoint of format version 0: then the recipe (and its
data section, which names the tokenizer) must be the one the checkpoint was trained with.

Prompts come from ``--prompt`` (repeatable) and ``--prompts-file``: one prompt per line, or for
``.jsonl`` one object per line with a ``"prompt"`` field (so prompts may hold newlines). A prompt plus
``--max-new-tokens`` must fit in the recipe's ``context_length`` (the longest document the model was trained on);
``--truncate`` keeps the last tokens of a longer prompt instead of stopping with an error. Every prompt gives one
JSON line ``{"prompt", "completion", "prompt_tokens", "completion_tokens"}``, on stdout or in ``--out``.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path
from typing import Any

from dlcm.data.sources import iter_jsonl_records
from dlcm.infer.device import torch_device

# Parameter dtypes for decoding, by torch's names (torch is imported when a command runs, not for --help).
DTYPE_NAMES = ("bfloat16", "float32", "float64")


def dtype_of(name: str) -> Any:
    """The torch dtype called ``name`` (one of :data:`DTYPE_NAMES`)."""
    import torch

    if name not in DTYPE_NAMES:
        raise ValueError(f"dtype={name!r} is not allowed: expected one of {', '.join(DTYPE_NAMES)}")
    return getattr(torch, name)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dlcm generate", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", action="append", help="the recipe it was trained with (format version 0 checkpoints)")
    p.add_argument("--ckpt_path", "--ckpt-path", dest="ckpt_path", required=True, help="checkpoint or exported folder")
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    p.add_argument("--prompts-file", default=None, help="one prompt per line, or .jsonl with a 'prompt' field")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens generated per prompt at most")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy; else sample from softmax(logits/T)")
    p.add_argument("--top-k", type=int, default=None, help="sample among the k most likely tokens")
    p.add_argument("--top-p", type=float, default=None, help="sample within the smallest set of mass >= p")
    p.add_argument("--stop", action="append", default=[], help="stop string, cut from the output (repeatable)")
    p.add_argument("--batch-size", type=int, default=16, help="prompts decoded together")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampling generator")
    p.add_argument("--truncate", action="store_true", help="keep the last tokens of a prompt too long for the context")
    p.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    p.add_argument("--dtype", choices=DTYPE_NAMES, default="float32", help="parameter dtype for decoding")
    p.add_argument("--out", default=None, help="write JSONL here instead of stdout")
    return p


def unescape(text: str) -> str:
    """``\\n``, ``\\t`` and ``\\\\`` in a command-line stop string become newline, tab and backslash."""
    return re.sub(r"\\([nt\\])", lambda m: {"n": "\n", "t": "\t", "\\": "\\"}[m.group(1)], text)


def read_prompts(path: str | Path) -> list[str]:
    """Prompts of a file: ``.jsonl`` objects with a ``"prompt"`` string, otherwise every non-blank line."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"prompts file {p} does not exist")
    if p.suffix == ".jsonl":

        def prompt(_: int, row: dict) -> str:
            if not isinstance(row["prompt"], str) or not row["prompt"]:
                raise ValueError(f"'prompt' must be a non-empty string, got {row['prompt']!r}")
            return row["prompt"]

        return list(iter_jsonl_records(p, prompt))
    return [line for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]


def main(argv: list[str]) -> int:
    """Run ``dlcm generate``; returns the process exit code."""
    args = _parser().parse_args(argv)
    import torch

    from dlcm.data.tokenizer import encode_documents
    from dlcm.infer.generation import check_sampling, first_stop, fit_to_context, generate_batch
    from dlcm.infer.load import load_for_command

    args.device = torch_device(args.device)
    check_sampling(args.temperature, args.top_k, args.top_p)
    for flag, value in (("--batch-size", args.batch_size), ("--max-new-tokens", args.max_new_tokens)):
        if value < 1:
            raise ValueError(f"{flag}={value} is not allowed: a positive integer")
    prompts = list(args.prompt) + (read_prompts(args.prompts_file) if args.prompts_file else [])
    if not prompts:
        raise ValueError("no prompts: pass --prompt TEXT (repeatable) and/or --prompts-file FILE")
    stops = [unescape(s) for s in args.stop]
    model = load_for_command(args.config, args.ckpt_path, args.device, dtype_of(args.dtype))
    network, tokenizer = model.network, model.tokenizer
    ids = fit_to_context(encode_documents(tokenizer, prompts), args.max_new_tokens, model.context_length, args.truncate)
    generator = torch.Generator(device=args.device).manual_seed(args.seed)
    stop = (lambda _, new: first_stop(tokenizer.decode(new), stops) >= 0) if stops else None
    # --out is written under a temporary name and renamed when every prompt is done: a failure leaves no half file.
    partial = Path(args.out).with_name(f".{Path(args.out).name}.partial") if args.out else None
    out = open(partial, "w", encoding="utf-8") if partial else sys.stdout  # noqa: SIM115 (stdout is not closed)
    start, produced = time.perf_counter(), 0
    try:
        for first in range(0, len(prompts), args.batch_size):
            batch = ids[first : first + args.batch_size]
            news = generate_batch(
                network, batch, args.max_new_tokens, args.temperature, args.top_k, args.top_p, (), stop, generator
            )
            for prompt, prompt_ids, new in zip(prompts[first : first + args.batch_size], batch, news, strict=True):
                text = tokenizer.decode(new)
                cut = first_stop(text, stops)
                record = {
                    "prompt": prompt,
                    "completion": text if cut < 0 else text[:cut],
                    "prompt_tokens": len(prompt_ids),
                    "completion_tokens": len(new),
                }
                out.write(json.dumps(record, ensure_ascii=False) + "\n")
                produced += len(new)
    except BaseException:
        if partial is not None:
            out.close()
            partial.unlink(missing_ok=True)
        raise
    if partial is not None:
        out.close()
        partial.replace(args.out)
    seconds = time.perf_counter() - start
    rate = produced / max(seconds, 1e-9)
    print(f"{len(prompts)} prompts, {produced} new tokens in {seconds:.1f} s ({rate:.1f} tokens/s)", file=sys.stderr)
    return 0
