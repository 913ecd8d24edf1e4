"""How the network executes, applied from one place outside the model code: activation checkpointing, per-block
``torch.compile`` and FSDP2 sharding (so that model code stays free of distributed and execution concerns).

All three act on whole blocks in place — the encoder, backbone and decoder ``TransformerBlock``s and the
cross-attention block Ψ — so parameter names (and with them checkpoints and the μP name rules) do not change. The
parser, pooling and smoothing stay outside checkpointing and compilation: boundary sampling must not be re-run by
a recomputation, and their shapes depend on the sampled boundaries.

Order, as torchtitan applies them: checkpointing, then compile, then ``fully_shard``, whose all-gather and
reduce-scatter hooks wrap the checkpointed, compiled block. Gradients then equal the plain network's (tested with
two gloo ranks in ``tests/train/test_fsdp.py``, and on a 2 × 2 hybrid mesh in ``tests/train/test_hsdp.py``).

Hybrid sharding (HSDP) shards within a group of ranks (one node: all-gathers and reduce-scatters stay on NVLink) and
replicates across groups (one gradient all-reduce of a shard per step crosses the network). Under gradient
accumulation ``gradient_sync`` decides which of these collectives run on every micro-batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn
from torch.distributed._composable import checkpoint
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

from dlcm.model.block import TransformerBlock
from dlcm.model.config import require, require_choice
from dlcm.model.cross_attention import CrossAttentionBlock
from dlcm.model.linear import Embedding
from dlcm.model.lm_head import LMHead
from dlcm.model.parser import GlobalParser

Checkpointing = Literal["none", "selective", "full"]
ParamDtype = Literal["bfloat16", "float32"]
Sharding = Literal["full", "hybrid"]
GradientSync = Literal["micro_batch", "step", "replicas_at_step"]
Fp32MatmulPrecision = Literal["highest", "high"]


@dataclass
class ExecutionConfig:
    """Activation checkpointing, compilation and (under ``ModelParallelStrategy``) sharding of the network."""

    # none: keep all activations; selective: recompute every second block of each stack (about half the memory
    # of full for a third less recomputation); full: recompute every block and Ψ in the backward pass.
    activation_checkpointing: Checkpointing = "none"
    # torch.compile each block in place (one compiled graph per block shape) and the head's chunked cross-entropy
    compile_blocks: bool = False
    # FSDP2 only: dtype the sharded fp32 parameters are all-gathered in for compute. Gradients are always reduced
    # in float32 and the parameters and optimizer state stay float32; the parser always computes in float32.
    fsdp_param_dtype: ParamDtype = "bfloat16"
    # Build the network on the meta device; configure_model allocates it (each rank only its shards under FSDP2)
    # and runs reset_parameters in the eager build's order. For models too large to build in full on every rank.
    meta_init: bool = False
    # FSDP2 only. full: shard over every data-parallel rank. hybrid (HSDP): shard within groups of
    # hsdp_shard_size consecutive ranks, replicate across the groups (gradients all-reduced between replicas).
    sharding: Sharding = "full"
    # Ranks per shard group under hybrid sharding; null: the processes of one node (trainer.devices), so a shard
    # group is one node and only the replica all-reduce crosses the network.
    hsdp_shard_size: int | None = None
    # FSDP2 under gradient accumulation. micro_batch: reduce (and all-reduce between replicas) every micro-batch;
    # gradients stay sharded. step: no gradient collective until the step's last micro-batch; each GPU holds the
    # full fp32 gradients meanwhile (+4 bytes per parameter). replicas_at_step (hybrid): reduce-scatter within the
    # shard group every micro-batch, all-reduce between replicas once per step; no extra memory.
    gradient_sync: GradientSync = "micro_batch"
    # CUDA only: precision of fp32 matrix products, which under bf16-mixed are the parser's scan projections (the
    # boundary scores) alone. highest: true fp32 (SIMT kernels: 10 ms of the 2.3B DLCM's step on an H100); high:
    # TF32 tensor cores (inputs rounded to a 10-bit mantissa, fp32 accumulation). Process-wide, as PyTorch has it.
    fp32_matmul_precision: Fp32MatmulPrecision = "highest"

    def __post_init__(self) -> None:
        require_choice("execution.activation_checkpointing", self.activation_checkpointing, Checkpointing)
        require_choice("execution.fsdp_param_dtype", self.fsdp_param_dtype, ParamDtype)
        require_choice("execution.sharding", self.sharding, Sharding)
        require_choice("execution.gradient_sync", self.gradient_sync, GradientSync)
        require_choice("execution.fp32_matmul_precision", self.fp32_matmul_precision, Fp32MatmulPrecision)
        if self.hsdp_shard_size is not None:
            require(self.hsdp_shard_size >= 1, "execution.hsdp_shard_size", self.hsdp_shard_size, "null or >= 1")
        require(
            self.gradient_sync != "replicas_at_step" or self.sharding == "hybrid",
            "execution.gradient_sync",
            self.gradient_sync,
            "micro_batch or step with sharding=full (replicas_at_step needs sharding=hybrid)",
        )


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


def hybrid_mesh(data_parallel: DeviceMesh, shard_size: int) -> DeviceMesh:
    """The 2-D (replicate, shard) mesh over the ranks of ``data_parallel``: shard groups of ``shard_size``
    consecutive ranks (launchers number the ranks of a node consecutively), replicas across them."""
    world = data_parallel.size()
    require(
        world % shard_size == 0,
        "execution.hsdp_shard_size",
        shard_size,
        f"a divisor of the {world} data-parallel ranks (null: the processes of one node)",
    )
    return init_device_mesh(
        data_parallel.device_type, (world // shard_size, shard_size), mesh_dim_names=("replicate", "shard")
    )


def shard_network(network: nn.Module, mesh: DeviceMesh, param_dtype: ParamDtype) -> None:
    """FSDP2 ``fully_shard`` per block, Ψ, embedding and head, the parser in fp32, then the root for the rest.

    One all-gather per unit keeps at most a block's full parameters alive at a time; reducing in fp32 keeps
    gradient averaging exact whatever the compute dtype (Lightning's FSDP1 ``bf16-mixed`` would reduce in bf16).
    A 2-D ``(replicate, shard)`` mesh makes it HSDP: the all-reduce between replicas is in fp32 too.
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


def apply_execution(
    network: nn.Module, cfg: ExecutionConfig, mesh: DeviceMesh | None = None, node_size: int = 1
) -> None:
    """Apply ``cfg`` to ``network`` once (Lightning may call ``configure_model`` more than once); shard it over
    ``mesh`` (a 1-D data-parallel mesh) when one is given, hybrid over shard groups of ``cfg.hsdp_shard_size``
    (default ``node_size``, the processes of one node) when ``cfg.sharding`` says so."""
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
        for head in (m for m in network.modules() if isinstance(m, LMHead)):
            head.compile_loss = True
    if mesh is not None:
        if cfg.sharding == "hybrid":
            mesh = hybrid_mesh(mesh, cfg.hsdp_shard_size or node_size)
        shard_network(network, mesh, cfg.fsdp_param_dtype)
    network._dlcm_execution_applied = True


def set_gradient_sync(network: nn.Module, mode: GradientSync, last_micro_batch: bool) -> None:
    """Before a micro-batch's backward: which gradient collectives FSDP2 runs for it (see ``gradient_sync``).

    Skipped collectives accumulate locally (FSDP2 keeps unsharded fp32 gradients, or partial shards for
    ``replicas_at_step``) and the step's last backward reduces the sum, so the step's gradient is the same.
    """
    if not isinstance(network, FSDPModule):
        return  # not sharded: Lightning's own no_sync covers DDP, one device has nothing to skip
    if mode == "step":
        network.set_requires_gradient_sync(last_micro_batch)
    elif mode == "replicas_at_step":
        network.set_requires_all_reduce(last_micro_batch)


def compiled_graphs() -> int:
    """Graphs dynamo has compiled so far in this process: its growth during training counts recompilations."""
    return int(torch._dynamo.utils.counters["stats"]["unique_graphs"])
