"""The ``dlcm`` command: one table of subcommands, each imported only when it runs, behind one error boundary.

``fit`` / ``validate`` go to the LightningCLI (:mod:`dlcm.train.cli`); every other subcommand to its own module's
``main(argv)``. ``dlcm --help`` prints the table without importing torch or Lightning.

Errors a user can cause (a bad recipe key or value, a missing or unreadable file, a checkpoint of another model)
end the command with one line on stderr, ``dlcm <command>: error: …``, and exit status 2 (bad usage) or 1;
``--debug`` anywhere on the command line shows the traceback instead.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import re
import sys
from collections.abc import Iterator
from typing import NamedTuple, NoReturn


class Command(NamedTuple):
    """One ``dlcm`` subcommand: the module whose ``main(argv)`` runs it (None: the LightningCLI), and its purpose."""

    module: str | None
    purpose: str


COMMANDS = {
    "fit": Command(None, "train a recipe (dlcm fit --config recipes/<recipe>.yaml; continue a run with --resume auto)"),
    "validate": Command(None, "loss, perplexity and bits per byte of a checkpoint on the validation split"),
    "data": Command("dlcm.data.build_cli", "tokenize a corpus into shards, train a tokenizer, build the demo corpus"),
    "eval": Command("dlcm.eval.cli", "zero-shot benchmarks of a checkpoint (ARC, PIQA, WinoGrande, LAMBADA, …)"),
    "generate": Command("dlcm.infer.generate_cli", "sample continuations of prompts from a checkpoint (JSONL)"),
    "export": Command(
        "dlcm.infer.export", "a checkpoint -> config.json, model.safetensors, tokenizer.json, model card"
    ),
    "consolidate": Command("dlcm.train.consolidate", "merge a sharded checkpoint into one .ckpt (and safetensors)"),
    "flops": Command("dlcm.research.flops_report", "inference FLOPs per token of a recipe or preset, per stage"),
    "sweep": Command("dlcm.research.sweep", "expand a sweep spec into dlcm fit runs, run them, summarise them"),
    "scaling": Command("dlcm.research.scaling_cli", "fit the compression-aware scaling law to finished runs"),
    "analyze": Command("dlcm.research.concept_analysis_cli", "loss by position inside a concept, against a baseline"),
    "plot": Command("dlcm.research.plots", "figures of runs (loss vs FLOPs, ratio over training, …) as PNG"),
    "plan": Command("dlcm.research.plan", "memory, communication, time and GPU-hours of a recipe on a cluster"),
}
DEBUG_FLAG = "--debug"
_CLASS_PATH_PROBLEM = re.compile(r"\s*- Problem with given class_path '([^']+)':")
_CLASS_REPR = re.compile(r"<class '(?:builtins\.)?([\w.]+)'>")
_UNION = "Does not validate against any of the Union subtypes"
_PARSER_KEY = re.compile(r'Parser key "([^"]+)":')
_LITERAL = re.compile(r"^Expected a typing\.Literal\[(.*)\]$")


class UsageError(ValueError):
    """A bad command line, raised (not printed) so that the error boundary reports it as one line."""


def usage() -> str:
    """``dlcm --help``."""
    width = max(len(name) for name in COMMANDS)
    rows = "\n".join(f"  {name:<{width}}  {command.purpose}" for name, command in COMMANDS.items())
    return (
        "usage: dlcm <command> [options]      (dlcm <command> --help for its options)\n\n"
        "Lightning training recipes for Dynamic Large Concept Models.\n\n"
        f"commands:\n{rows}\n\n"
        f"{DEBUG_FLAG} (anywhere) shows the full traceback of an error instead of its one-line summary.\n"
    )


def _raise_usage_error(self: argparse.ArgumentParser, message: str) -> NoReturn:
    raise UsageError(f"{message} (see {self.prog} --help)")


@contextlib.contextmanager
def argparse_errors_raise() -> Iterator[None]:
    """Make argparse parsers raise :class:`UsageError` instead of printing their usage block and exiting, for the
    duration of one subcommand (jsonargparse's parser overrides ``error`` and raises on its own)."""
    original = argparse.ArgumentParser.error
    argparse.ArgumentParser.error = _raise_usage_error
    try:
        yield
    finally:
        argparse.ArgumentParser.error = original


def user_error_types() -> tuple[type[BaseException], ...]:
    """Exceptions that mean bad input rather than a bug: reported as one line.

    Lightning's and YAML's types are added only when their packages are already loaded (they are whenever they
    could have raised), so the error path imports nothing.
    """
    types: list[type[BaseException]] = [ValueError, OSError, argparse.ArgumentError]
    for module, name in (
        ("lightning.fabric.utilities.exceptions", "MisconfigurationException"),
        ("yaml", "YAMLError"),
    ):
        if module in sys.modules:
            types.append(getattr(sys.modules[module], name))
    return tuple(types)


def one_line(err: BaseException) -> str:
    """The message of ``err`` on one line.

    jsonargparse reports a bad value inside the model's ``class_path`` as a tree of every union member it tried;
    only the branch of the class the recipe names says what is wrong, so that branch is kept.
    """
    text = str(err) if not isinstance(err, OSError) or not err.filename else f"{err.strerror}: {err.filename}"
    lines = text.splitlines()
    for i, line in enumerate(lines):
        problem = _CLASS_PATH_PROBLEM.match(line)
        if problem:
            depth = len(line) - len(line.lstrip())
            branch = []
            for inner in lines[i + 1 :]:
                if len(inner) - len(inner.lstrip()) <= depth:
                    break
                branch.append(inner.strip())
            head = lines[0].strip().rstrip(":")
            lines = [f"{head} ({problem.group(1)}):", *branch]
            break
    text = " ".join(part.strip() for part in _union_summary(lines) if part.strip())
    return _CLASS_REPR.sub(r"\1", text.removeprefix(f"{_UNION} ").strip())


def _union_summary(lines: list[str]) -> list[str]:
    """jsonargparse's report of a value that no member of a union type accepted, reduced to what is wrong: the
    members' own errors (not "Expected a NoneType", nor a dump of the whole value), or the literals allowed."""
    if not any(_UNION in line for line in lines):
        return lines
    given = next((line.split(":", 1)[1].strip() for line in lines if line.strip().startswith("Given value:")), "")
    errors = [
        line.strip()[2:] for line in lines if line.strip().startswith("- ") and not line.strip().endswith("NoneType'>")
    ]
    key = _PARSER_KEY.match(lines[0].strip())
    name = key.group(1) if key else "the value"
    literals = [match.group(1) for match in map(_LITERAL.match, errors) if match]
    if errors and len(literals) == len(errors):
        allowed = dict.fromkeys(value.strip().strip("'") for group in literals for value in group.split(","))
        return [f"{name}={given} is not allowed: one of {', '.join(allowed)}"]
    if not errors:
        return lines
    # A plain value (a number, a word) is named; a mapping's members name their own bad key in their errors.
    head = f"{name}={given} is not allowed:" if given and len(given) <= 80 else f"{name}:"
    return [head, "; ".join(errors)]


def run_command(name: str, argv: list[str]) -> int:
    """Run one subcommand; errors propagate (:func:`main` reports them)."""
    command = COMMANDS[name]
    if command.module is not None:
        with argparse_errors_raise():
            return int(importlib.import_module(command.module).main(argv) or 0)
    from dlcm.train.cli import run_cli

    run_cli([name, *argv])
    return 0


def main(argv: list[str] | None = None) -> int:
    """Console entry point; ``argv`` (without the program name) defaults to the command line."""
    words = list(sys.argv[1:] if argv is None else argv)
    debug = DEBUG_FLAG in words
    words = [w for w in words if w != DEBUG_FLAG]
    if not words or words[0] in ("-h", "--help", "help"):
        print(usage(), end="")
        return 0 if words else 2
    name, rest = words[0], words[1:]
    if name not in COMMANDS:
        print(f"dlcm: error: unknown command {name!r}; the commands are {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    try:
        return run_command(name, rest)
    except SystemExit as done:  # --help / --print_config, or a subcommand that exits on its own
        return done.code if isinstance(done.code, int) else (0 if done.code is None else 1)
    except KeyboardInterrupt as err:
        if debug:
            raise
        print(f"dlcm {name}: interrupted{f'; {err}' if str(err) else ''}", file=sys.stderr)
        return 130
    except user_error_types() as err:
        if debug:
            raise
        print(f"dlcm {name}: error: {one_line(err)}", file=sys.stderr)
        return 2 if isinstance(err, (UsageError, argparse.ArgumentError)) else 1
