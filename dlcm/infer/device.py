"""The ``--device`` of the inference commands (``dlcm generate``, ``dlcm eval``)."""

from __future__ import annotations


def torch_device(name: str | None) -> str:
    """``name`` if torch knows that device and this machine has it (else one line saying so); by default cuda when
    available, else cpu."""
    import torch

    if name is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        kind = torch.device(name).type
    except RuntimeError:
        raise ValueError(f"--device={name} is not allowed: a torch device such as cpu, cuda or cuda:1") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device={name} is not allowed here: this machine has no CUDA device (use cpu)")
    return name
