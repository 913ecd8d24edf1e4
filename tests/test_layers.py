"""The package's layers import one way: walk every module's imports (statically, with ast) and fail on an arrow
that points up the stack, e.g. a model file importing from the training or research layer."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
# Where each layer's sources live in the checkout (data/ and callbacks/ install as dlcm.data, dlcm.callbacks).
LAYER_DIRS = {
    "model": ROOT / "dlcm" / "model",
    "data": ROOT / "data",
    "train": ROOT / "dlcm" / "train",
    "callbacks": ROOT / "callbacks",
    "infer": ROOT / "dlcm" / "infer",
    "eval": ROOT / "dlcm" / "eval",
    "research": ROOT / "dlcm" / "research",
}
# Layers each layer may import from (besides itself), as docs/design.md §16 draws them. Inference and evaluation
# stand on the model and data layers only: a trained model is used without the training stack. Callbacks sit below
# the training layer that builds them (the CLI): they read the module they are given, and the μP callback hands its
# settings to the module, whose training layer holds the group rules beside the optimizer.
ALLOWED = {
    "model": set(),
    "data": set(),
    "train": {"model", "data", "callbacks"},
    "callbacks": {"model", "data"},
    "infer": {"model", "data"},
    "eval": {"model", "data", "infer"},
    "research": {"model", "data", "train", "callbacks", "infer", "eval"},
}


def dlcm_imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every ``dlcm.*`` import in a file, at any depth (function-level imports count too)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        else:
            continue
        found += [(node.lineno, n) for n in names if n == "dlcm" or n.startswith("dlcm.")]
    return found


def layer_of(module: str) -> str | None:
    """The layer a ``dlcm.*`` module belongs to; None for the package root and the command table."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in LAYER_DIRS else None


def reverse_arrows(layer: str, directory: Path, root: Path = ROOT) -> list[str]:
    bad = []
    for path in sorted(directory.rglob("*.py")):
        for line, module in dlcm_imports(path):
            target = layer_of(module)
            if module in ("dlcm", "dlcm.cli") or (target not in (None, layer) and target not in ALLOWED[layer]):
                bad.append(f"{path.relative_to(root)}:{line} imports {module} ({layer} → {target or 'the root'})")
    return bad


@pytest.mark.parametrize("layer", list(LAYER_DIRS))
def test_no_import_points_up_the_stack(layer: str) -> None:
    assert reverse_arrows(layer, LAYER_DIRS[layer]) == []


def test_the_walk_sees_function_level_imports_and_flags_them(tmp_path: Path) -> None:
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "leaky.py").write_text(
        "from dlcm.model.config import DLCMConfig\n\ndef f():\n    from dlcm.train.optim import OptimizerConfig\n"
    )
    (model_dir / "ok.py").write_text("import torch\nfrom dlcm.model import config\n")
    assert reverse_arrows("model", model_dir, tmp_path) == ["model/leaky.py:4 imports dlcm.train.optim (model → train)"]


def test_an_inference_module_importing_the_training_layer_is_flagged(tmp_path: Path) -> None:
    infer_dir = tmp_path / "infer"
    infer_dir.mkdir()
    (infer_dir / "loader.py").write_text(
        "from dlcm.model.config import DLCMConfig\nfrom dlcm.train.cli import run_cli\n"
    )
    assert reverse_arrows("infer", infer_dir, tmp_path) == ["infer/loader.py:2 imports dlcm.train.cli (infer → train)"]
    (infer_dir / "loader.py").write_text("import dlcm.callbacks.mup\n")
    assert reverse_arrows("infer", infer_dir, tmp_path) == [
        "infer/loader.py:1 imports dlcm.callbacks.mup (infer → callbacks)"
    ]


def test_a_callback_importing_the_training_layer_is_flagged(tmp_path: Path) -> None:
    callbacks_dir = tmp_path / "callbacks"
    callbacks_dir.mkdir()
    (callbacks_dir / "groups.py").write_text("from dlcm.model.config import require\nimport dlcm.train.mup\n")
    assert reverse_arrows("callbacks", callbacks_dir, tmp_path) == [
        "callbacks/groups.py:2 imports dlcm.train.mup (callbacks → train)"
    ]


def test_the_top_level_holds_only_entry_files() -> None:
    assert sorted(p.name for p in (ROOT / "dlcm").glob("*.py")) == ["__init__.py", "__main__.py", "cli.py"]
