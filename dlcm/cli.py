"""The ``dlcm`` command: one table of subcommands, each imported only when it runs.

``fit`` / ``validate`` / ``test`` go to the LightningCLI (:mod:`dlcm.train.cli`); ``dlcm data …`` (tokenizers and
shards), ``dlcm flops …`` (inference FLOPs per token of a recipe or preset), ``dlcm eval …`` (zero-shot benchmarks of
a checkpoint), ``dlcm generate …``, ``dlcm consolidate …``, ``dlcm scaling fit …`` (the compression-aware scaling
law), ``dlcm sweep …``, ``dlcm analyze …`` (loss by position inside a concept), ``dlcm plot …`` and
``dlcm plan …`` (memory, communication, time and GPU-hours of a recipe on a cluster) go to their own module's
``main(argv)``.
"""

from __future__ import annotations

import importlib
import sys

# Subcommands besides LightningCLI's fit/validate/test: name → module whose ``main(argv)`` runs it (imported lazily,
# so `dlcm fit` does not pay for matplotlib, lm-eval or the scaling fit).
SUBCOMMANDS = {
    "data": "dlcm.data.build_cli",
    "flops": "dlcm.research.flops_report",
    "eval": "dlcm.eval.cli",
    "consolidate": "dlcm.train.consolidate",
    "generate": "dlcm.infer.generate_cli",
    "scaling": "dlcm.research.scaling_cli",
    "sweep": "dlcm.research.sweep",
    "analyze": "dlcm.research.concept_analysis",
    "plot": "dlcm.research.plots",
    "plan": "dlcm.research.plan",
}


def main(argv: list[str] | None = None) -> int:
    """Console entry point; ``argv`` (without the program name) defaults to the command line."""
    words = sys.argv[1:] if argv is None else argv
    if words and words[0] in SUBCOMMANDS:
        return importlib.import_module(SUBCOMMANDS[words[0]]).main(words[1:])
    from dlcm.train.cli import run_cli

    run_cli(argv)  # None: LightningCLI reads sys.argv itself
    return 0
