"""How the network executes, applied from one place outside the model code: activation checkpointing, per-block
``torch.compile`` and FSDP2 sharding (so that model code stays free of distributed and execution concerns).

All three act on whole blocks in place — the encoder, backbone and decoder ``TransformerBlock``s and the
cross-attention block Ψ — so parameter names (and with them checkpoints and the μP name rules) do not change. The
parser, pooling and smoothing stay outside checkpointing and compilation: boundary sampling must not be re-run by
a recomputation, and their shapes depend on the sampled boundaries.

Order, as torchtitan applies them: checkpointing, then compile, then ``fully_shard``, whose all-gather and
reduce-scatter hooks wrap the checkpointed, compiled block. Gradients then equal the plain network's (tested with
two gloo ranks in ``tests/train/test_fsdp.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn
from torch.distributed._composable import checkpoint
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from dlcm.model.block import TransformerBlock
from dlcm.model.config import require, require_choice
from dlcm.model.cross_attention import CrossAttentionBlock
from dlcm.model.linear import Embedding
from dlcm.model.lm_head import LMHead
from dlcm.model.parser import GlobalParser

Checkpointing = Literal["none", "selective", "full"]
ParamDtype = Literal["bfloat16", "float32"]


@dataclass
class ExecutionConfig:
    """Activation checkpointing, compilation and (under ``ModelParallelStrategy``) sharding of the network."""

    # none: keep all activations; selective: recompute every second block of each stack (about half the memory
    # of full for a third less recomputation); full: recompute every block and Ψ in the backward pass.
    activation_checkpointing: Checkpointing = "none"
    # torch.compile each block in place (one compiled graph per block shape) and the token cross-entropy
    compile_blocks: bool = False
    # FSDP2 only: dtype the sharded fp32 parameters are all-gathered in for compute. Gradients are always reduced
    # in float32 and the parameters and optimizer state stay float32; the parser always computes in float32.
    fsdp_param_dtype: ParamDtype = "bfloat16"
    # Build the network on the meta device; configure_model allocates it (each rank only its shards under FSDP2)
    # and runs reset_parameters in the eager build's order. For models too large to build in full on every rank.
    meta_init: bool = False

    def __post_init__(self) -> None:
        require_choice("execution.activation_checkpointing", self.activation_checkpointing, Checkpointing)
        require_choice("execution.fsdp_param_dtype", self.fsdp_param_dtype, ParamDtype)


def blocks_of(network: nn.Module) -> list[nn.Module]:
    """The checkpointable/compilable units in execution order."""
    return [m for m in network.modules() if isinstance(m, TransformerBlock | CrossAttentionBlock)]


def data_parallel_mesh(mesh: DeviceMesh) -> DeviceMesh:
    """The data-parallel dimension of ``ModelParallelStrategy``'s mesh (tensor parallelism is not implemented)."""
    names = mesh.mesh_dim_names or ()
    tensor_parallel = mesh["tensor_parallel"].size() if "tensor_parallel" in names else 1
    require(
        tensor_parallel == 1,
        "trainer.strategy.tensor_parallel_size",
        tensor_parallel,
        "1: dlcm shards with FSDP2 over data parallelism only (set data_parallel_size to the number of processes)",
    )
    return mesh["data_parallel"] if "data_parallel" in names else mesh


def shard_network(network: nn.Module, mesh: DeviceMesh, param_dtype: ParamDtype) -> None:
    """FSDP2 ``fully_shard`` per block, Ψ, embedding and head, the parser in fp32, then the root for the rest.

    One all-gather per unit keeps at most a block's full parameters alive at a time; reducing in fp32 keeps
    gradient averaging exact whatever the compute dtype (Lightning's FSDP1 ``bf16-mixed`` would reduce in bf16).
    """
    compute = MixedPrecisionPolicy(param_dtype=getattr(torch, param_dtype), reduce_dtype=torch.float32)
    exact = MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float32)
    heads = [m for m in network.modules() if isinstance(m, Embedding | LMHead)]
    for unit in blocks_of(network) + heads:
        fully_shard(unit, mesh=mesh, mp_policy=compute)
    for parser in (m for m in network.modules() if isinstance(m, GlobalParser)):
        # Boundary scores in fp32. Kept gathered until the backward: FSDP2 hooks its pre-backward
        # all-gather on the tensors of a unit's output, and ParserOutput (a dataclass) shows it none, so a
        # resharded parser failed in the backward on the H200 (torch 2.11: "storage of size 0", [d, d] fp32).
        fully_shard(parser, mesh=mesh, mp_policy=exact, reshard_after_forward=False)
    fully_shard(network, mesh=mesh, mp_policy=compute)


def apply_execution(network: nn.Module, cfg: ExecutionConfig, mesh: DeviceMesh | None = None) -> None:
    """Apply ``cfg`` to ``network`` once (Lightning may call ``configure_model`` more than once); shard it over
    ``mesh`` (a data-parallel mesh) when one is given."""
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
    if mesh is not None:
        shard_network(network, mesh, cfg.fsdp_param_dtype)
    network._dlcm_execution_applied = True


def compiled_graphs() -> int:
    """Graphs dynamo has compiled so far in this process: its growth during training counts recompilations."""
    return int(torch._dynamo.utils.counters["stats"]["unique_graphs"])
