"""``dlcm.load``: a trained network and its tokenizer from what a checkpoint holds, with no recipe, data or trainer.

Three inputs are accepted:

- a single-file checkpoint (``.ckpt``) written by ``dlcm fit`` or ``dlcm consolidate``;
- a sharded checkpoint directory (FSDP2, one ``.distcp`` per rank): the network's tensors are read into one process
  with ``torch.distributed.checkpoint.load`` (no process group, no optimizer state);
- an exported model directory (``config.json``, ``model.safetensors``, ``tokenizer.json``; see ``dlcm export``).

Checkpoints carry a model record (:data:`dlcm.model.config_io.MODEL_RECORD`): the network's config as plain data,
the context length, the tokenizer and the run's summary; the calibrated threshold τ is a buffer among the weights.
Everything is read with ``weights_only=True``. A checkpoint of format version 0 (written before the record) loads
only together with the recipe it was trained with (:func:`load_with_recipe`), which supplies config and tokenizer.
"""

from __future__ import annotations

import json
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from dlcm.model.config_io import (
    CONFIG_FILE,
    MODEL_RECORD,
    TOKENIZER_FILE,
    WEIGHTS_FILE,
    ModelConfig,
    check_format_version,
    config_from_dict,
)

if TYPE_CHECKING:
    from tokenizers import Tokenizer

NETWORK_PREFIX = "network."  # the LightningModule attribute holding the network in a checkpoint's state_dict
SHARD_INDEX, SHARD_META = ".metadata", "meta.pt"  # torch.distributed.checkpoint's index; Lightning's non-tensor state


@dataclass
class Pretrained:
    """A trained network in eval mode with its tokenizer and the longest document it was trained on.

    ``record`` is the rest of the checkpoint's model record: ``global_step``, ``tokens_seen``, ``validation``
    (step, loss, bits per byte, ratio) and the ``recipe`` text, where the run recorded them.
    """

    network: nn.Module
    tokenizer: Tokenizer
    context_length: int
    config: ModelConfig
    source: str
    record: dict[str, Any] = field(default_factory=dict)

    def generate(
        self,
        prompts: str | list[str],
        max_new_tokens: int = 64,
        temperature: float = 0.0,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int = 0,
    ) -> str | list[str]:
        """Continuations of ``prompts`` (greedy by default); a single prompt gives a single string."""
        from dlcm.infer.generation import check_sampling, generate_texts

        check_sampling(temperature, top_k, top_p)
        texts = [prompts] if isinstance(prompts, str) else list(prompts)
        device = next(self.network.parameters()).device
        generator = torch.Generator(device=device).manual_seed(seed)
        out = generate_texts(
            self.network,
            self.tokenizer,
            texts,
            max_new_tokens,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            generator=generator,
            context_length=self.context_length,
        )
        return out[0] if isinstance(prompts, str) else out


def load(path: str | Path, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> Pretrained:
    """The network (eval mode, on ``device`` in ``dtype``; default: CPU, as saved) and tokenizer at ``path``.

    Example::

        model = dlcm.load("runs/dlcm_tiny_r4_defaultcorpus_cpu/version_0/checkpoints/last.ckpt")
        print(model.generate("In the beginning", max_new_tokens=32))
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(
            f"model {path} does not exist: pass a .ckpt file, a sharded checkpoint directory or a `dlcm export` folder"
        )
    if path.is_dir() and (path / CONFIG_FILE).is_file():
        return _placed(load_export(path), device, dtype)
    if path.is_dir() and (path / SHARD_INDEX).is_file():
        record = read_record(_torch_load(path / SHARD_META, path), path)
        pretrained = from_record(record, str(path))
        load_sharded_weights(pretrained.network, path)
        return _placed(pretrained, device, dtype)
    if path.is_dir():
        raise ValueError(
            f"{path} is a directory with no {CONFIG_FILE} and no {SHARD_INDEX}: neither a `dlcm export` folder nor a "
            "sharded checkpoint"
        )
    checkpoint = read_checkpoint_file(path)
    pretrained = from_record(read_record(checkpoint, path), str(path))
    load_network_weights(pretrained.network, network_state(checkpoint, path), path)
    return _placed(pretrained, device, dtype)


def load_with_recipe(
    recipe: str | Path | list[str | Path],
    ckpt_path: str | Path | None,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
) -> Pretrained:
    """The network and tokenizer a training recipe describes, with a checkpoint's weights (None: the initial
    weights). Several recipes compose in order. Reads checkpoints of any format version, including 0, whose
    pickled configs are trusted here."""
    from dlcm.infer.recipe import load_recipe, recipe_tokenizer
    from dlcm.model.presets import build_model

    model = load_recipe(recipe)
    network = build_model(model.config)
    first = recipe[0] if isinstance(recipe, list) else recipe
    record: dict[str, Any] = {"recipe": Path(first).read_text(encoding="utf-8")}
    if ckpt_path is not None:
        ckpt_path = Path(ckpt_path)
        if ckpt_path.is_dir():
            load_sharded_weights(network, ckpt_path)
        else:
            # A version 0 checkpoint may pickle config dataclasses: the user vouches for it by naming its recipe.
            checkpoint = read_checkpoint_file(ckpt_path, weights_only=False)
            load_network_weights(network, network_state(checkpoint, ckpt_path), ckpt_path)
            record["global_step"] = int(checkpoint.get("global_step", 0))
    tokenizer = recipe_tokenizer(recipe)
    check_vocabulary(tokenizer, model.config, f"recipe {recipe}")
    pretrained = Pretrained(network, tokenizer, int(model.context_length), model.config, str(ckpt_path), record)
    return _placed(pretrained, device, dtype)


def load_for_command(
    configs: list[str] | None, ckpt_path: str | None, device: Any = None, dtype: torch.dtype | None = None
) -> Pretrained:
    """What ``--config`` / ``--ckpt_path`` of ``dlcm generate``, ``eval`` and ``analyze`` name: the checkpoint alone
    (its own config and tokenizer), or recipes (composed in order) with an optional checkpoint."""
    if configs:
        return load_with_recipe(list(configs), ckpt_path, device, dtype)
    if ckpt_path is None:
        raise ValueError("no model: pass --ckpt_path (a checkpoint or an exported folder) and/or --config RECIPE")
    return load(ckpt_path, device, dtype)


def load_export(path: Path) -> Pretrained:
    """An exported model folder (see ``dlcm export``)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    config_path = path / CONFIG_FILE
    try:
        meta = json.loads(config_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{config_path} is not valid JSON ({err})") from err
    if not isinstance(meta, dict) or "config" not in meta:
        raise ValueError(f"{config_path} has no 'config': not written by `dlcm export`")
    check_format_version(meta.get("format_version"), str(config_path), "export it again with this dlcm-recipes")
    pretrained = from_record({**meta, "tokenizer": _read_text(path / TOKENIZER_FILE)}, str(path))
    weights_path = path / WEIGHTS_FILE
    if not weights_path.is_file():
        raise FileNotFoundError(f"{weights_path} does not exist: the exported folder is incomplete")
    try:
        weights = load_file(str(weights_path))
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{weights_path} cannot be read ({err}); it is truncated or not a safetensors file") from err
    load_network_weights(pretrained.network, weights, weights_path)
    return pretrained


def from_record(record: dict[str, Any], source: str) -> Pretrained:
    """The network (initial weights) and tokenizer a model record describes."""
    from tokenizers import Tokenizer

    from dlcm.model.presets import build_model

    config = config_from_dict(record["config"], f"{source}: config")
    text = record.get("tokenizer")
    if not text:
        raise ValueError(f"{source} holds no tokenizer: load it with the recipe it was trained with (--config)")
    try:
        tokenizer = Tokenizer.from_str(text)
    except Exception as err:  # the Rust side raises a bare Exception carrying the serde parse error
        raise ValueError(f"{source}: its tokenizer is not a Hugging Face tokenizer.json ({err})") from err
    check_vocabulary(tokenizer, config, source)
    summary = {k: v for k, v in record.items() if k not in ("config", "tokenizer", "format_version")}
    return Pretrained(build_model(config), tokenizer, int(record["context_length"]), config, source, summary)


def check_vocabulary(tokenizer: Tokenizer, config: ModelConfig, source: str) -> None:
    from dlcm.data.tokenizer import vocab_size

    ids = vocab_size(tokenizer)
    if ids != config.vocab_size:
        raise ValueError(
            f"{source}: the tokenizer has {ids:,} ids but the model's embedding has {config.vocab_size:,} rows; use "
            "the tokenizer the model was trained with"
        )


def read_checkpoint_file(path: Path, weights_only: bool = True) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist: pass a .ckpt file written by `dlcm fit`")
    checkpoint = _torch_load(path, path, weights_only)
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise ValueError(f"{path} has no 'state_dict': not a checkpoint written by `dlcm fit`")
    return checkpoint


def read_record(checkpoint: dict[str, Any], path: Path) -> dict[str, Any]:
    """The checkpoint's model record, refused by name when its format version is not this code's."""
    record = checkpoint.get(MODEL_RECORD)
    version = record.get("format_version") if isinstance(record, dict) else 0
    hint = (
        f"load it with the recipe it was trained with (--config RECIPE), or convert it once with "
        f"`dlcm export {path} OUT/ --config RECIPE`"
    )
    check_format_version(version, f"checkpoint {path}", hint)
    return record


def network_state(checkpoint: dict[str, Any], path: Path) -> dict[str, torch.Tensor]:
    """The network's tensors under its own parameter names."""
    weights = {
        name[len(NETWORK_PREFIX) :]: tensor
        for name, tensor in checkpoint["state_dict"].items()
        if name.startswith(NETWORK_PREFIX)
    }
    if not weights:
        raise ValueError(f"{path} holds no network weights (no '{NETWORK_PREFIX}*' tensors): not a dlcm checkpoint")
    return weights


def load_network_weights(network: nn.Module, weights: dict[str, torch.Tensor], source: Path) -> None:
    """``load_state_dict`` (strict) with shape mismatches and missing or unexpected names listed in one line."""
    own = network.state_dict()
    problems = [
        f"{name}: {tuple(tensor.shape)} vs the model's {tuple(own[name].shape)}"
        for name, tensor in weights.items()
        if name in own and tuple(tensor.shape) != tuple(own[name].shape)
    ]
    problems += [f"missing {name}" for name in own if name not in weights]
    problems += [f"unexpected {name}" for name in weights if name not in own]
    if problems:
        more = f" (and {len(problems) - 4} more)" if len(problems) > 4 else ""
        raise ValueError(
            f"{source} does not match the model ({'; '.join(problems[:4])}{more}): a checkpoint of another model or "
            "recipe"
        )
    network.load_state_dict(weights, strict=True)


def load_sharded_weights(network: nn.Module, path: Path) -> None:
    """Read the network's tensors of a sharded checkpoint into ``network`` in this one process."""
    import warnings

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    if not (path / SHARD_INDEX).is_file():
        raise ValueError(f"{path} is a directory, not a sharded checkpoint ({SHARD_INDEX} missing): pass a .ckpt file")
    own = {NETWORK_PREFIX + name: tensor for name, tensor in network.state_dict().items()}
    try:
        with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
            warnings.filterwarnings("ignore", message=".*single process.*")
            dcp.load({"state_dict": own}, checkpoint_id=str(path))
    except (CheckpointException, RuntimeError, ValueError) as err:
        first = " ".join(str(err).split())[:400]
        raise ValueError(f"sharded checkpoint {path} does not match the model or cannot be read ({first})") from err


def _torch_load(path: Path, source: Path, weights_only: bool = True) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=weights_only, mmap=not path.name.endswith(".pt"))
    except pickle.UnpicklingError as err:
        if weights_only and "dlcm." in str(err):  # a version 0 checkpoint's pickled config classes
            read_record({}, source)
        raise ValueError(f"{path} cannot be read safely ({' '.join(str(err).split()[:12])} …)") from err
    except (RuntimeError, EOFError, OSError) as err:
        reason = f"{type(err).__name__}: {err}"
        raise ValueError(f"{path} cannot be read ({reason}); it is truncated or not a checkpoint") from err


def _read_text(path: Path) -> str:
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: the exported folder is incomplete")
    return path.read_text(encoding="utf-8")


def _placed(pretrained: Pretrained, device: Any, dtype: torch.dtype | None) -> Pretrained:
    pretrained.network.to(device=device, dtype=dtype).eval()
    return pretrained
