"""Every recipe parses through the real CLI and instantiates; the counts its comments state are the model's."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from dlcm.train.cli import run_cli

RECIPES = sorted((Path(__file__).parents[2] / "recipes").glob("*.yaml"))
# GPU-only settings are overridden so every recipe instantiates on a CPU-only CI machine.
CPU = ["--trainer.accelerator=cpu", "--trainer.precision=32-true", "--data.num_workers=0"]


def test_there_are_recipes_for_both_families() -> None:
    names = [p.name for p in RECIPES]
    assert any(n.startswith("dlcm_tiny") for n in names) and any(n.startswith("baseline_tiny") for n in names)
    assert any(n.startswith("dlcm_small") for n in names) and any(n.startswith("baseline_small") for n in names)


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_recipe_instantiates_and_states_its_size(recipe: Path) -> None:
    cli = run_cli([f"--config={recipe}", *CPU], run=False)
    assert cli.model.config.vocab_size == cli.datamodule.vocab_size
    assert cli.datamodule.max_seq_len == cli.model.context_length
    net = cli.model.network
    body = sum(p.numel() for p in net.parameters()) - net.embed.weight.numel() - net.head.proj.weight.numel()
    stated = re.search(r"Parameters without embedding and head: ([\d.]+)M", recipe.read_text())
    assert stated, f"{recipe.name} must state its parameter count"
    assert float(stated.group(1)) == pytest.approx(body / 1e6, abs=0.006)


@pytest.mark.parametrize("recipe", sorted(RECIPES[0].parent.rglob("*.yaml")), ids=lambda p: p.stem)
def test_every_recipe_key_with_a_value_has_a_comment(recipe: Path) -> None:
    for number, line in enumerate(recipe.read_text().splitlines(), 1):
        code = line.split("#")[0].rstrip()
        if code and not code.endswith(":"):  # a bare "section:" line opens a commented block
            assert "#" in line, f"{recipe.name}:{number} has no comment: {line.strip()}"
