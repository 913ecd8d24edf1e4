"""dlcm-recipes: Dynamic Large Concept Models (Qu et al., arXiv 2512.24617) on Lightning."""

from dlcm.baseline import DenseBaseline
from dlcm.config import BaselineConfig, CrossConfig, DLCMConfig, ParserConfig, StackConfig
from dlcm.model import DLCM, DLCMOutput

__all__ = [
    "DLCM",
    "BaselineConfig",
    "CrossConfig",
    "DLCMConfig",
    "DLCMOutput",
    "DenseBaseline",
    "ParserConfig",
    "StackConfig",
]
