"""CUDA-graph replay of a decoding phase: a function of a decoder's persistent buffers, launched as one graph.

Decoding one token runs thousands of small kernels whose launch cost, not their work, sets the speed (tens of
milliseconds per step for a 150M-parameter model in eager PyTorch). A phase that reads and writes only tensors the
decoder keeps (no host values, no reallocation) can be captured once and replayed: the first call runs eagerly on
a side stream (lazy initialisation of kernels and library workspaces happens outside capture), the second captures
and replays, later calls replay. Capture executes nothing, so every call advances the decoder's state exactly once.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

import torch

Out = TypeVar("Out")


class StepGraph(Generic[Out]):
    """``phase()`` eagerly off CUDA (or with ``enabled=False``); on CUDA eager once, then captured and replayed.

    The returned tensors are the graph's static outputs, overwritten by the next replay. :meth:`reset` drops the
    graph, as a decoder must when it reallocates a buffer the graph captured.
    """

    def __init__(self, phase: Callable[[], Out], enabled: bool) -> None:
        self.phase = phase
        self.enabled = enabled
        self.reset()

    @property
    def settled(self) -> bool:
        """Whether calls now replay (or run eagerly for good): warm-up and capture are behind."""
        return not self.enabled or self.graph is not None

    def reset(self) -> None:
        self.graph: torch.cuda.CUDAGraph | None = None
        self.warmed = False

    def __call__(self) -> Out:
        if not self.enabled:
            return self.phase()
        if not self.warmed:
            self.warmed = True
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                out = self.phase()
            torch.cuda.current_stream().wait_stream(side)
            return out
        if self.graph is None:
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.out = self.phase()
        self.graph.replay()
        return self.out
