"""dlcm-recipes: Dynamic Large Concept Models (Qu et al., arXiv 2512.24617) on Lightning.

The package is layered; each layer imports only from the ones before it:

- :mod:`dlcm.model` — configuration, presets, every mechanism of the network, FLOPs counting;
- :mod:`dlcm.data` — tokenizers, shards, packing, the data module (independent of the model);
- :mod:`dlcm.train` and :mod:`dlcm.callbacks` — LightningModules, the ``dlcm fit`` CLI, optimizer, execution,
  checkpoints, and the callbacks that log boundaries, throughput and μP groups;
- :mod:`dlcm.infer` — KV caches, decoding steps, generation;
- :mod:`dlcm.eval` — zero-shot benchmarks and boundary metrics;
- :mod:`dlcm.research` — sweeps, scaling law, analyses, plots;
- :mod:`dlcm.cli` — the command table.

The network classes and :func:`dlcm.load` (a trained model and its tokenizer from a checkpoint or an exported
folder) are re-exported here, imported on first use so that ``dlcm --help`` does not load torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "load": "dlcm.infer.load",
    "Pretrained": "dlcm.infer.load",
    "DLCM": "dlcm.model.dlcm",
    "DLCMOutput": "dlcm.model.dlcm",
    "DenseBaseline": "dlcm.model.baseline",
    "BaselineConfig": "dlcm.model.config",
    "CrossConfig": "dlcm.model.config",
    "DLCMConfig": "dlcm.model.config",
    "ParserConfig": "dlcm.model.config",
    "StackConfig": "dlcm.model.config",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'dlcm' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
