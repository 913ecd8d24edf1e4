"""How the network executes, applied from one place outside the model code: activation checkpointing and
per-block ``torch.compile`` (SPEC: model code is free of distributed and execution concerns).

Both act on whole blocks in place — the encoder, backbone and decoder ``TransformerBlock``s and the cross-attention
block Ψ — so parameter names (and with them checkpoints and the μP name rules) do not change. The parser, pooling
and smoothing stay outside: boundary sampling must not be re-run by a recomputation, and their shapes depend on
the sampled boundaries.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn
from torch.distributed._composable import checkpoint

from dlcm.block import TransformerBlock
from dlcm.config import require_choice
from dlcm.cross_attention import CrossAttentionBlock

Checkpointing = Literal["none", "selective", "full"]


@dataclass
class ExecutionConfig:
    """Activation checkpointing and compilation of the network's blocks."""

    # none: keep all activations; selective: recompute every second block of each stack (about half the memory
    # of full for a third less recomputation); full: recompute every block and Ψ in the backward pass.
    activation_checkpointing: Checkpointing = "none"
    compile_blocks: bool = False  # torch.compile each block in place (one compiled graph per block shape)

    def __post_init__(self) -> None:
        require_choice("execution.activation_checkpointing", self.activation_checkpointing, Checkpointing)


def blocks_of(network: nn.Module) -> list[nn.Module]:
    """The checkpointable/compilable units in execution order."""
    return [m for m in network.modules() if isinstance(m, TransformerBlock | CrossAttentionBlock)]


def apply_execution(network: nn.Module, cfg: ExecutionConfig) -> None:
    """Apply ``cfg`` to ``network`` once (Lightning may call ``configure_model`` more than once)."""
    if getattr(network, "_dlcm_execution_applied", False):
        return
    for stack in (m for m in network.modules() if isinstance(m, nn.ModuleList)):
        for index, block in enumerate(stack):
            if isinstance(block, TransformerBlock) and (
                cfg.activation_checkpointing == "full" or (cfg.activation_checkpointing == "selective" and index % 2)
            ):
                checkpoint(block)
    cross = [m for m in network.modules() if isinstance(m, CrossAttentionBlock)]
    if cfg.activation_checkpointing == "full":
        for block in cross:
            checkpoint(block)
    if cfg.compile_blocks:
        for block in blocks_of(network):
            block.compile()
    network._dlcm_execution_applied = True


def compiled_graphs() -> int:
    """Graphs dynamo has compiled so far in this process: its growth during training counts recompilations."""
    return int(torch._dynamo.utils.counters["stats"]["unique_graphs"])
