"""Shared fixtures: packed random batches, and skipping of `gpu` tests on machines without CUDA."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import torch


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


def random_cu_seqlens(doc_lengths: list[int], device: str | torch.device = "cpu") -> torch.Tensor:
    offsets = [0]
    for n in doc_lengths:
        offsets.append(offsets[-1] + n)
    return torch.tensor(offsets, dtype=torch.int32, device=device)


def random_boundaries(cu_seqlens: torch.Tensor, rate: float, generator: torch.Generator) -> torch.Tensor:
    """Bernoulli(rate) boundaries with every document start forced on (the parser's contract)."""
    total = int(cu_seqlens[-1])
    boundary_T = torch.rand(total, generator=generator) < rate
    boundary_T[cu_seqlens[:-1].long()] = True
    return boundary_T


@pytest.fixture(scope="session", autouse=True)
def isolated_dlcm_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Keep the embedded-corpus cache of a test session out of the user's ~/.cache (built once per session)."""
    os.environ["DLCM_CACHE"] = str(tmp_path_factory.mktemp("dlcm-cache"))


@pytest.fixture(autouse=True)
def no_process_group_leaks() -> Iterator[None]:
    """Tear down what an in-process distributed run (a world of one under FSDP2) leaves behind: its process groups
    hold the TCP port that Lightning wrote into MASTER_PORT, which later multi-process tests would then inherit."""
    port = os.environ.get("MASTER_PORT")
    yield
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    if os.environ.get("MASTER_PORT") != port:
        os.environ.pop("MASTER_PORT", None)
