"""A network's configuration as plain data (JSON types only) and back, and the version of that format.

Checkpoints and exported models keep the config as a mapping with a ``model_type`` (``dlcm`` or ``baseline``), never
as pickled objects: renaming or moving a Python module cannot make them unloadable, and ``torch.load`` reads them with
``weights_only=True``. :data:`FORMAT_VERSION` is written next to it; a reader refuses any other version by name.

Version history:

- 0: checkpoints of ``dlcm fit`` before the model record (no tokenizer, no format version). They load together with
  the recipe they were trained with, which supplies the config and the tokenizer.
- 1: the model record (config, context length, tokenizer, run summary) in every checkpoint; ``config.json`` of
  exported models.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any

from dlcm.model.config import BaselineConfig, DLCMConfig

FORMAT_VERSION = 1
MODEL_RECORD = "dlcm_model"  # the checkpoint key of the record :func:`dlcm.load` reads
DEFAULT_CONTEXT_LENGTH = 2048  # tokens: the training modules' default longest document
# The files of an exported model folder (``dlcm export``).
CONFIG_FILE, WEIGHTS_FILE, TOKENIZER_FILE = "config.json", "model.safetensors", "tokenizer.json"
MODEL_TYPES: dict[str, type] = {"dlcm": DLCMConfig, "baseline": BaselineConfig}
ModelConfig = DLCMConfig | BaselineConfig


def plain(value: Any) -> Any:
    """``value`` with every dataclass turned into a dict and every tuple into a list, recursively."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {key: plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(item) for item in value]
    return value


def dataclass_from_dict(cls: type, values: dict[str, Any], where: str) -> Any:
    """Build a (nested) config dataclass from plain values; an unknown key is an error naming the allowed ones."""
    hints = typing.get_type_hints(cls)
    allowed = [f.name for f in dataclasses.fields(cls) if f.init]
    kwargs = {}
    for key, value in values.items():
        if key not in allowed:
            raise ValueError(f"{where}.{key} is not a field of {cls.__name__}: allowed {', '.join(allowed)}")
        kind = hints[key]
        if dataclasses.is_dataclass(kind) and isinstance(value, dict):
            value = dataclass_from_dict(kind, value, f"{where}.{key}")
        kwargs[key] = value
    return cls(**kwargs)


def model_type_of(config: ModelConfig) -> str:
    return next(name for name, cls in MODEL_TYPES.items() if isinstance(config, cls))


def config_to_dict(config: ModelConfig) -> dict[str, Any]:
    """``{"model_type": …, <fields>}``: what :func:`config_from_dict` reads back."""
    return {"model_type": model_type_of(config), **plain(config)}


def config_from_dict(values: dict[str, Any], where: str = "config") -> ModelConfig:
    """The config :func:`config_to_dict` wrote; a missing or unknown ``model_type`` is a ``ValueError``."""
    values = dict(values)
    kind = values.pop("model_type", None)
    if kind not in MODEL_TYPES:
        raise ValueError(f"{where}.model_type={kind!r} is not allowed: expected one of {', '.join(MODEL_TYPES)}")
    return dataclass_from_dict(MODEL_TYPES[kind], values, where)


def check_format_version(version: Any, source: str, convert_hint: str) -> None:
    """Refuse a format this code does not read, naming the version found and what to do about it."""
    if version == FORMAT_VERSION:
        return
    if isinstance(version, int) and version > FORMAT_VERSION:
        raise ValueError(
            f"{source} has format version {version}, newer than this dlcm-recipes reads ({FORMAT_VERSION}): "
            "upgrade dlcm-recipes to load it"
        )
    raise ValueError(
        f"{source} has format version {version!r}; this dlcm-recipes reads {FORMAT_VERSION}: {convert_hint}"
    )
