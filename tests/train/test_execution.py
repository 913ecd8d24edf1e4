"""Activation checkpointing and per-block compile change speed and memory, never the numbers or the names."""

from __future__ import annotations

import pytest
import torch

from dlcm.model.presets import build_model, tiny_baseline, tiny_dlcm
from dlcm.train.execution import ExecutionConfig, apply_execution


def loss_and_grads(model: torch.nn.Module) -> tuple[float, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    ids_T = torch.randint(0, 256, (64,))
    cu = torch.tensor([0, 20, 64], dtype=torch.int32)
    model.zero_grad()
    if hasattr(model, "parser"):
        out = model(ids_T, cu, generator=torch.Generator().manual_seed(1))
        loss = out.logits_TV.float().logsumexp(-1).mean() + out.aux_loss
    else:
        loss = model(ids_T, cu).float().logsumexp(-1).mean()
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}


def fresh(family: str) -> torch.nn.Module:
    torch.manual_seed(3)
    return build_model(tiny_dlcm() if family == "dlcm" else tiny_baseline()).train()


@pytest.mark.parametrize("family", ["dlcm", "baseline"])
@pytest.mark.parametrize("mode", ["selective", "full"])
def test_activation_checkpointing_is_exact_and_keeps_names(family: str, mode: str) -> None:
    reference = loss_and_grads(fresh(family))
    model = fresh(family)
    names = [n for n, _ in model.named_parameters()]
    apply_execution(model, ExecutionConfig(activation_checkpointing=mode))
    apply_execution(model, ExecutionConfig(activation_checkpointing=mode))  # idempotent
    assert [n for n, _ in model.named_parameters()] == names
    loss, grads = loss_and_grads(model)
    assert loss == reference[0]
    for name, grad in grads.items():
        torch.testing.assert_close(grad, reference[1][name], rtol=0, atol=0, msg=name)


def test_unknown_checkpointing_mode_and_fsdp_dtype_are_rejected() -> None:
    with pytest.raises(ValueError, match=r"execution\.activation_checkpointing='some'"):
        ExecutionConfig(activation_checkpointing="some")
    with pytest.raises(ValueError, match=r"execution\.fsdp_param_dtype='float16' is not allowed: .*'bfloat16'"):
        ExecutionConfig(fsdp_param_dtype="float16")


@pytest.mark.slow
def test_compiled_blocks_match_eager() -> None:
    reference = loss_and_grads(fresh("dlcm"))
    model = fresh("dlcm")
    apply_execution(model, ExecutionConfig(compile_blocks=True))
    loss, grads = loss_and_grads(model)
    assert loss == pytest.approx(reference[0], rel=1e-5)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, reference[1][name], rtol=1e-4, atol=1e-5, msg=name)
