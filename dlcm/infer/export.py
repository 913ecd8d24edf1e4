"""``dlcm export``: a checkpoint → the folder people share models in.

    dlcm export runs/<recipe>/version_0/checkpoints/last.ckpt exported/dlcm-tiny/

writes ``config.json`` (the network's config as plain data, the context length, the format version and the run's
summary), ``model.safetensors`` (the network's tensors, the calibrated τ among them), ``tokenizer.json`` and a
``README.md`` model card (recipe, tokens seen, validation bits per byte and ratio, parameters per stage).
``dlcm.load(OUT)`` gives the same logits, bit for bit, as the checkpoint. The input is anything :func:`dlcm.load`
reads (a ``.ckpt``, a sharded checkpoint directory); ``--config`` converts a checkpoint of format version 0 with the
recipe it was trained with. The folder is written under a temporary name and renamed when complete, and must be new
or empty.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dlcm.model.config_io import CONFIG_FILE, FORMAT_VERSION, TOKENIZER_FILE, WEIGHTS_FILE, config_to_dict

# torch is imported by the functions that load and write, after the command line is parsed (`--help` needs none).
if TYPE_CHECKING:
    from dlcm.infer.load import Pretrained

CARD_FILE = "README.md"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dlcm export", description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", help=".ckpt file or sharded checkpoint directory written by `dlcm fit`")
    p.add_argument("out", type=Path, help="folder to write (new or empty)")
    p.add_argument("--config", default=None, help="the recipe it was trained with (only for format version 0)")
    return p


def stage_parameters(pretrained: Pretrained) -> dict[str, int]:
    """Parameters of each top-level part of the network (encoder, parser, backbone, …), in forward order."""
    counts = {name: sum(p.numel() for p in child.parameters()) for name, child in pretrained.network.named_children()}
    return {name: n for name, n in counts.items() if n}


def run_name(checkpoint: Path) -> str:
    """``<name>`` of ``runs/<name>/version_<n>/checkpoints/…``, else the checkpoint's own name."""
    version = next((p for p in checkpoint.parents if p.name.startswith("version_")), None)
    return version.parent.name if version is not None else checkpoint.stem


def model_card(pretrained: Pretrained, checkpoint: str) -> str:
    """The ``README.md`` of an exported folder, from the checkpoint's record."""
    config, record = pretrained.config, pretrained.record
    kind = "DLCM" if hasattr(config, "parser") else "dense baseline"
    lines = [f"# {run_name(Path(checkpoint))}: {kind}", ""]
    step, tokens = record.get("global_step"), record.get("tokens_seen")
    trained = f"Exported from `{checkpoint}` at optimizer step {step}" if step is not None else f"From `{checkpoint}`"
    lines += [trained + (f", after {tokens:,} training tokens." if tokens else "."), ""]
    lines += ["```python", "import dlcm", "", 'model = dlcm.load("<this folder>")']
    lines += ['print(model.generate("In the beginning", max_new_tokens=32))', "```", ""]
    validation = record.get("validation")
    lines += ["## Validation", ""]
    if validation:
        row = f"| {validation['step']} | {validation['bpb']:.4f} | {validation['loss']:.4f} |"
        ratio = validation.get("ratio")
        lines += [
            "| step | bits per byte | loss (nats/token) | tokens per concept |",
            "|---:|---:|---:|---:|",
            row + (f" {ratio:.2f} |" if ratio is not None else " – |"),
        ]
    else:
        lines.append("No validation ran before this checkpoint was saved.")
    lines += ["", "## Parameters per stage", "", "| stage | parameters |", "|---|---:|"]
    counts = stage_parameters(pretrained)
    lines += [f"| {name} | {n:,} |" for name, n in counts.items()] + [f"| total | {sum(counts.values()):,} |", ""]
    shape = f"vocabulary {config.vocab_size:,}, context length {pretrained.context_length:,} tokens"
    if hasattr(config, "parser"):
        shape += (
            f", d_token {config.d_token}, d_concept {config.d_concept}, target ratio R = {config.parser.target_ratio:g}"
        )
        shape += f", inference threshold τ = {float(pretrained.network.parser.threshold):.4f}"
    lines += ["## Model", "", shape + ".", ""]
    lines += [
        "## Files",
        "",
        f"- `{CONFIG_FILE}`: the network's config (format version {FORMAT_VERSION})",
        f"- `{WEIGHTS_FILE}`: weights and buffers",
        f"- `{TOKENIZER_FILE}`: the Hugging Face tokenizer it was trained with",
        "",
    ]
    recipe = record.get("recipe")
    lines += ["## Recipe", ""] + (
        ["```yaml", recipe.rstrip(), "```"] if recipe else ["Not recorded in the checkpoint."]
    )
    return "\n".join(lines) + "\n"


def export_config(pretrained: Pretrained) -> dict[str, Any]:
    summary = {k: pretrained.record.get(k) for k in ("global_step", "tokens_seen", "validation", "recipe")}
    return {
        "format_version": FORMAT_VERSION,
        "config": config_to_dict(pretrained.config),
        "context_length": pretrained.context_length,
        **summary,
    }


def check_destination(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise ValueError(f"export folder {out} is a file: pass a new or empty folder")
    if out.is_dir() and any(out.iterdir()):
        raise ValueError(f"export folder {out} is not empty: pass a new or empty folder (nothing was written)")


def export(pretrained: Pretrained, checkpoint: str, out: Path) -> None:
    """Write the exported folder ``out`` (complete or not at all)."""
    from safetensors.torch import save_file

    check_destination(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(f".{out.name}.partial-{os.getpid()}")
    try:
        partial.mkdir()
        weights = {name: t.detach().contiguous() for name, t in pretrained.network.state_dict().items()}
        save_file(
            weights, str(partial / WEIGHTS_FILE), metadata={"format": "pt", "format_version": str(FORMAT_VERSION)}
        )
        (partial / CONFIG_FILE).write_text(json.dumps(export_config(pretrained), indent=2) + "\n", encoding="utf-8")
        pretrained.tokenizer.save(str(partial / TOKENIZER_FILE))
        (partial / CARD_FILE).write_text(model_card(pretrained, checkpoint), encoding="utf-8")
        if out.is_dir():
            out.rmdir()  # empty (checked above)
        os.replace(partial, out)
    finally:
        shutil.rmtree(partial, ignore_errors=True)


def main(argv: list[str]) -> int:
    """Run ``dlcm export``; returns the process exit code."""
    args = _parser().parse_args(argv)
    from dlcm.infer.load import load, load_with_recipe

    check_destination(args.out)  # before reading a checkpoint of many GB
    pretrained = load(args.checkpoint) if args.config is None else load_with_recipe(args.config, args.checkpoint)
    export(pretrained, args.checkpoint, args.out)
    print(f"wrote {args.out} ({', '.join(sorted(p.name for p in args.out.iterdir()))})")
    return 0
