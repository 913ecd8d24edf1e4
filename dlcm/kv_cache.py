"""Per-layer KV cache for one document running through a :class:`~dlcm.block.TransformerStack` incrementally.

The stack's own ``forward`` takes a whole packed stream; decoding instead feeds a few new rows at a time (a prompt
chunk, one token, or one completed concept for the backbone). :class:`StackCache` replays the block's pre-norm
computation on those rows with the stack's weights, appending each layer's rotated keys and values so later rows
attend to every earlier row of the same document. Positions continue from the cache length, which is the token
position for the encoder/decoder/baseline and the concept index for the backbone (the same RoPE positions as a
full forward of one document).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dlcm.attention import SelfAttention
from dlcm.block import TransformerBlock, TransformerStack
from dlcm.rope import rope_angles


def cached_attention(
    attn: SelfAttention,
    x_ND: torch.Tensor,
    rope: tuple[torch.Tensor, torch.Tensor],
    past: tuple[torch.Tensor, torch.Tensor] | None,
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """Self-attention of ``n`` new rows over the cached rows and themselves; returns output and the grown cache."""
    n = x_ND.shape[0]
    q_NnH, k_NKH, v_NKH = attn.project(x_ND, rope)
    if past is not None:
        k_NKH, v_NKH = torch.cat([past[0], k_NKH]), torch.cat([past[1], v_NKH])
    total = k_NKH.shape[0]
    # New row i sits at cache index total − n + i and reads keys up to it (causal, top-left aligned on the cache).
    rows = torch.arange(total - n, total, device=x_ND.device)
    mask_NL = rows[:, None] >= torch.arange(total, device=x_ND.device)[None, :]
    out_nNH = F.scaled_dot_product_attention(
        q_NnH.transpose(0, 1), k_NKH.transpose(0, 1), v_NKH.transpose(0, 1), attn_mask=mask_NL, enable_gqa=True
    )
    return attn.wo(out_nNH.transpose(0, 1).reshape(n, -1)), (k_NKH, v_NKH)


class StackCache:
    """KV cache of one document through one stack: ``extend(x)`` runs the new rows and returns their outputs."""

    def __init__(self, stack: TransformerStack) -> None:
        self.stack = stack
        self.layers: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * len(stack.layers)
        self.length = 0  # rows seen so far = RoPE position of the next row

    def extend(self, x_ND: torch.Tensor) -> torch.Tensor:
        n = x_ND.shape[0]
        position = torch.arange(self.length, self.length + n, device=x_ND.device)
        rope = rope_angles(position, self.stack.head_dim, self.stack.rope_theta)
        for i, layer in enumerate(self.stack.layers):
            x_ND, self.layers[i] = self._block(layer, x_ND, rope, self.layers[i])
        self.length += n
        return self.stack.norm(x_ND)

    @staticmethod
    def _block(
        layer: TransformerBlock,
        x_ND: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        past: tuple[torch.Tensor, torch.Tensor] | None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        grown: list[tuple[torch.Tensor, torch.Tensor]] = []

        def attend(h_ND: torch.Tensor) -> torch.Tensor:
            read_ND, kv = cached_attention(layer.attn, h_ND, rope, past)
            grown.append(kv)
            return read_ND

        return layer.residual(x_ND, attend), grown[0]
