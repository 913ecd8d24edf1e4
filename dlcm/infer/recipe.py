"""The one reader of training recipes outside ``dlcm fit``: the model a recipe describes, and its tokenizer.

``dlcm flops``, ``dlcm plan``, ``dlcm sweep`` and the loaders of :mod:`dlcm.infer.load` read recipes here, without
building data loaders, a trainer or a LightningModule. Sections may be inline or paths to fragments relative to the
recipe's folder. The ``model.class_path`` is read by its class name only (``DLCMModule`` or ``BaselineModule``), so the
reader does not import the training layer. A recipe's ``config.vocab_size`` is normally linked from the data, so the
vocabulary comes from, in order: the caller's ``vocab_size``; ``config.vocab_size`` in the YAML; the manifest of
``data.data_dir``; else the embedded default corpus's tokenizer (4,096 ids), which is what ``data_dir: null`` trains
on. The returned note says which.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dlcm.model.config import BaselineConfig, DLCMConfig
from dlcm.model.config_io import DEFAULT_CONTEXT_LENGTH, MODEL_TYPES, dataclass_from_dict

if TYPE_CHECKING:
    from tokenizers import Tokenizer

# The recipe groups read here that may be given as a path to a fragment file.
FRAGMENT_GROUPS = ("model", "data")
# The LightningModule class names of recipes and the network each trains.
MODULE_MODEL_TYPES = {"DLCMModule": "dlcm", "BaselineModule": "baseline"}


@dataclass
class RecipeModel:
    """A recipe's network config, with where it and its vocabulary size came from."""

    name: str
    config: DLCMConfig | BaselineConfig
    context_length: int | None  # the recipe's context_length; None for presets
    vocab_note: str


def load_yaml(path: Path) -> dict[str, Any]:
    """A recipe file as a mapping (OmegaConf interpolations resolved, as ``dlcm fit`` resolves them)."""
    from omegaconf import OmegaConf

    if not path.is_file():
        raise FileNotFoundError(f"recipe {path} does not exist")
    data = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    if not isinstance(data, dict):
        raise ValueError(f"recipe {path} is not a YAML mapping")
    return data


def section(recipe: dict[str, Any], key: str, base: Path) -> dict[str, Any]:
    """A recipe group, which may be given inline or as a path to a fragment relative to the recipe's folder."""
    value = recipe.get(key) or {}
    return load_yaml(base / value) if isinstance(value, str) else value


def read_recipes(paths: str | Path | list[str | Path]) -> tuple[Path, dict[str, Any]]:
    """(first recipe's path, the recipes merged in order): later files override earlier keys, as ``--config`` given
    several times composes in ``dlcm fit``. Sections given as fragment paths are read relative to their own file."""
    from omegaconf import OmegaConf

    paths = [Path(p) for p in (paths if isinstance(paths, list) else [paths])]
    merged = OmegaConf.create({})
    for path in paths:
        recipe = load_yaml(path)
        groups = {key: section(recipe, key, path.parent) for key in FRAGMENT_GROUPS if key in recipe}
        merged = OmegaConf.merge(merged, recipe | groups)
    return paths[0], OmegaConf.to_container(merged)


def data_args(recipe: dict[str, Any], base: Path) -> dict[str, Any]:
    data = section(recipe, "data", base)
    return data.get("init_args") or data


def vocab_from_data(data: dict[str, Any]) -> tuple[int, str]:
    """The vocabulary size the data section's tokenizer gives, without building the default corpus."""
    data_dir, mixture = data.get("data_dir"), data.get("mixture")
    if data_dir is not None:
        from dlcm.data.mixture import Mixture
        from dlcm.data.shards import Manifest

        try:
            if mixture:
                return Mixture.load(data_dir, mixture).vocab_size, f"from the mixture's sources in {data_dir}"
            return Manifest.load(Path(data_dir)).vocab_size, f"from {data_dir}/manifest.json"
        except (FileNotFoundError, ValueError) as err:
            raise ValueError(
                f"cannot read the vocabulary size of data.data_dir={data_dir} ({err}); pass --vocab-size"
            ) from err
    from dlcm.data.corpus import ensure_default_corpus

    default = inspect.signature(ensure_default_corpus).parameters["vocab_size"].default
    return default, "from the embedded default corpus's tokenizer (data.data_dir is null)"


def load_recipe(paths: str | Path | list[str | Path], vocab_size: int | None = None) -> RecipeModel:
    """The model config and context length of a training recipe (several compose in order)."""
    path, recipe = read_recipes(paths)
    model = section(recipe, "model", path.parent)
    class_path = model.get("class_path")
    if not class_path:
        raise ValueError(f"{path}: model.class_path is missing (expected e.g. dlcm.train.lightning_modules.DLCMModule)")
    class_name = class_path.rpartition(".")[2]
    if class_name not in MODULE_MODEL_TYPES:
        raise ValueError(
            f"{path}: model.class_path={class_path!r} is not allowed: a class named {' or '.join(MODULE_MODEL_TYPES)}"
        )
    config_cls = MODEL_TYPES[MODULE_MODEL_TYPES[class_name]]
    init_args = model.get("init_args") or {}
    given = init_args.get("config") or {}
    values = load_yaml(path.parent / given) if isinstance(given, str) else dict(given)
    if vocab_size is not None:
        values["vocab_size"], note = vocab_size, "from --vocab-size"
    elif values.get("vocab_size") is not None:
        note = "from the recipe"
    else:
        values["vocab_size"], note = vocab_from_data(data_args(recipe, path.parent))
    config = dataclass_from_dict(config_cls, values, "model.init_args.config")
    context = int(init_args.get("context_length") or DEFAULT_CONTEXT_LENGTH)
    return RecipeModel(path.stem, config, context, f"vocab {config.vocab_size:,} {note}")


def recipe_tokenizer(paths: str | Path | list[str | Path]) -> Tokenizer:
    """The tokenizer the recipe's data section trains with (the default corpus's is built on first use)."""
    from dlcm.data.datamodule import open_manifest
    from dlcm.data.tokenizer import load_tokenizer

    path, recipe = read_recipes(paths)
    data = data_args(recipe, path.parent)
    _, manifest = open_manifest(data.get("data_dir"), data.get("mixture"))
    return load_tokenizer(manifest.tokenizer_path)
