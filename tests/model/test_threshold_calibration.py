"""The calibrated inference threshold τ: exact ratio on a batch, the running average, checkpoints, and the parser
options around it (α annealing, midpoint and consistency penalties, the rule-based predictor)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from dlcm.model.config import ParserConfig
from dlcm.model.dlcm import interior_mean, midpoint_loss, parser_loss
from dlcm.model.packing import PackedSeqs
from dlcm.model.parser import GlobalParser, decision_disagreement, sharpen
from dlcm.model.presets import build_model, tiny_dlcm
from dlcm.model.threshold_calibration import ABOVE_ALL, ratio_threshold
from tests.conftest import random_cu_seqlens


def thresholded_ratio(prob_T: torch.Tensor, seqs: PackedSeqs, tau: torch.Tensor) -> float:
    boundary_T = (prob_T >= tau) | (seqs.position == 0)
    return prob_T.numel() / int(boundary_T.sum())


@pytest.mark.parametrize("target", [2.0, 3.7, 4.0, 8.0])
def test_ratio_threshold_realises_the_target_on_its_batch(target: float) -> None:
    g = torch.Generator().manual_seed(int(target * 10))
    cu = random_cu_seqlens([300, 17, 211, 500])
    seqs = PackedSeqs.from_cu_seqlens(cu, 1028)
    prob_T = torch.rand(1028, generator=g)
    prob_T[seqs.position == 0] = 1.0
    tau = ratio_threshold(prob_T, seqs, target)
    boundaries = int(((prob_T >= tau) | (seqs.position == 0)).sum())
    assert boundaries == round(1028 / target)


def test_ratio_threshold_with_documents_shorter_than_r() -> None:
    seqs = PackedSeqs.from_cu_seqlens(random_cu_seqlens([2, 3, 2]), 7)
    prob_T = torch.tensor([1.0, 0.9, 1.0, 1.0, 0.99, 1.0, 0.2])
    tau = ratio_threshold(prob_T, seqs, 4.0)  # 7/4 → 2 concepts wanted, 3 forced: no interior boundary
    assert float(tau) == pytest.approx(ABOVE_ALL)
    assert thresholded_ratio(prob_T, seqs, tau) == pytest.approx(7 / 3)


def test_fold_is_a_running_mean_then_an_ema_over_optimizer_steps() -> None:
    parser = GlobalParser(4, ParserConfig(calibration_momentum=0.25))
    seqs = PackedSeqs.from_cu_seqlens(random_cu_seqlens([64]), 64)
    expected = None
    for step in range(1, 9):
        # Two micro-batches per step (the second of the last step a fixed-τ None, which is skipped): one update.
        probs = [torch.rand(64, generator=torch.Generator().manual_seed(10 * step + m)) for m in range(2)]
        estimates = [ratio_threshold(p, seqs, 4.0) for p in probs]
        if step == 8:
            estimates[1] = None
        step_tau = sum(float(e) for e in estimates if e is not None) / sum(e is not None for e in estimates)
        weight = max(1 / step, 0.25)
        expected = step_tau if expected is None else expected + weight * (step_tau - expected)
        parser.fold_threshold(estimates)
        assert float(parser.threshold) == pytest.approx(expected, rel=1e-6)
    assert int(parser.threshold_updates) == 8
    parser.fold_threshold([None, None])  # nothing to fold: a fixed τ
    assert int(parser.threshold_updates) == 8


def test_no_forward_moves_tau() -> None:
    """τ is the training loop's to move: train-mode forwards, with or without autograd, only report an estimate."""
    torch.manual_seed(0)
    model = build_model(tiny_dlcm(64)).train()
    model.parser.threshold.fill_(0.41)
    ids_T, cu = torch.randint(0, 64, (64,)), random_cu_seqlens([40, 24])
    with torch.no_grad():
        first = model(ids_T, cu, generator=torch.Generator().manual_seed(0))
    second = model(ids_T, cu, generator=torch.Generator().manual_seed(0))
    model.eval()
    with torch.no_grad():
        evaluated = model(ids_T, cu)
    assert float(model.parser.threshold) == pytest.approx(0.41) and int(model.parser.threshold_updates) == 0
    assert evaluated.parser.threshold_estimate is None  # eval reports none
    for out in (first, second):
        assert not out.parser.threshold_estimate.requires_grad
        assert float(out.parser.threshold_estimate) == float(ratio_threshold(out.parser.prob_T, out.tokens, 4.0))
    fixed = dataclasses.replace(tiny_dlcm(64).parser, threshold_mode="fixed")
    fixed_model = build_model(dataclasses.replace(tiny_dlcm(64), parser=fixed)).train()
    assert fixed_model(ids_T, cu, generator=torch.Generator()).parser.threshold_estimate is None


def test_training_estimates_after_deciding_and_eval_uses_the_folded_tau() -> None:
    torch.manual_seed(0)
    model = build_model(tiny_dlcm(64)).train()
    cu = random_cu_seqlens([40, 24])
    ids_T = torch.randint(0, 64, (64,))
    out = model(ids_T, cu, generator=torch.Generator().manual_seed(0))
    seqs = out.tokens
    # The batch was decided with the starting τ (0.5); the step's fold then moves τ to its ratio-realising value.
    assert torch.equal(out.parser.threshold_T, (out.parser.prob_T.detach() >= 0.5) | (seqs.position == 0))
    assert float(model.parser.threshold) == 0.5
    model.fold_threshold([out.parser.threshold_estimate])
    tau = float(model.parser.threshold)
    assert tau == pytest.approx(float(ratio_threshold(out.parser.prob_T, seqs, 4.0)))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    assert float(state["parser.threshold"]) == tau
    restored = build_model(tiny_dlcm(64))
    restored.load_state_dict(state)
    restored.eval()
    with torch.no_grad():
        evaluated = restored(ids_T, cu)
    assert torch.equal(evaluated.parser.boundary_T, (evaluated.parser.prob_T >= tau) | (seqs.position == 0))
    assert float(restored.parser.threshold) == tau


def test_checkpoints_without_tau_load_as_a_fixed_half() -> None:
    model = build_model(tiny_dlcm(64))
    old = {k: v for k, v in model.state_dict().items() if not k.startswith("parser.threshold")}
    fresh = build_model(tiny_dlcm(64))
    fresh.parser.threshold.fill_(0.3)
    fresh.load_state_dict(old)  # strict: the missing buffers are filled, not reported
    assert float(fresh.parser.threshold) == pytest.approx(0.3)  # the configured start, 0.5 unless set


def test_alpha_anneals_linearly_to_its_final_value() -> None:
    cfg = ParserConfig(sharpen_alpha=0.2, alpha_final=0.0)
    parser = GlobalParser(4, cfg)
    assert [cfg.alpha_at(x) for x in (0.0, 0.5, 1.0, 2.0)] == pytest.approx([0.2, 0.1, 0.0, 0.0])
    parser.set_progress(0.75)
    assert parser.alpha == pytest.approx(0.05)
    p = torch.tensor([0.2, 0.49, 0.5, 0.7])
    assert torch.equal(sharpen(p, 0.0), torch.tensor([0.0, 0.0, 1.0, 1.0]))


def test_a_calibrated_tau_does_not_change_training() -> None:
    """τ observes training; the sampled boundaries, and so the loss, are those of a fixed τ."""
    cfg = tiny_dlcm(64)
    losses = {}
    for mode in ("fixed", "calibrated"):
        torch.manual_seed(0)
        model = build_model(dataclasses.replace(cfg, parser=dataclasses.replace(cfg.parser, threshold_mode=mode)))
        model.train()
        outs = []
        for i in range(3):
            ids_T = torch.randint(0, 64, (64,), generator=torch.Generator().manual_seed(i))
            outs.append(model(ids_T, random_cu_seqlens([40, 24]), generator=torch.Generator().manual_seed(i)))
            model.fold_threshold([outs[-1].parser.threshold_estimate])
        losses[mode] = [(o.aux_loss.item(), o.parser.boundary_T.sum().item()) for o in outs]
        if mode == "calibrated":
            assert float(model.parser.threshold) != 0.5
    assert losses["fixed"] == losses["calibrated"]


def test_midpoint_loss_is_one_at_half_and_ignores_forced_starts() -> None:
    seqs = PackedSeqs.from_cu_seqlens(random_cu_seqlens([3, 2]), 5)
    prob_T = torch.tensor([1.0, 0.5, 0.0, 1.0, 0.5])
    assert float(midpoint_loss(prob_T, seqs)) == pytest.approx(2 / 3)


def test_rule_predictor_has_no_parameters_and_thresholds_in_training() -> None:
    cfg = tiny_dlcm(64)
    parser_cfg = dataclasses.replace(cfg.parser, predictor="rule", threshold_mode="fixed", threshold=0.4)
    model = build_model(dataclasses.replace(cfg, parser=parser_cfg)).train()
    assert list(model.parser.parameters()) == []
    cu = random_cu_seqlens([30, 18])
    out = model(torch.randint(0, 64, (48,)), cu, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out.parser.boundary_T, out.parser.threshold_T)
    h_TD = model.encoder(model.embed(torch.randint(0, 64, (48,))), out.tokens)
    cos = torch.nn.functional.cosine_similarity(h_TD[:-1].double(), h_TD[1:].double(), dim=-1)
    prob = model.parser.boundary_prob(h_TD, out.tokens)[1:]
    interior = out.tokens.position[1:] != 0
    torch.testing.assert_close(prob[interior].double(), ((1 - cos) / 2).clamp(0, 1)[interior])


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("threshold_mode", "quantile"),
        ("threshold", 1.0),
        ("calibration_momentum", 0.0),
        ("alpha_final", 0.5),
        ("midpoint_weight", -1.0),
        ("predictor", "cosine"),
    ],
)
def test_bad_parser_options_name_the_field(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=f"parser.{field}={value!r} is not allowed"):
        ParserConfig(**{field: value}).validate()


def test_rule_predictor_rejects_a_scan_width() -> None:
    with pytest.raises(ValueError, match=r"parser\.d_scan=16 is not allowed: None with predictor='rule'"):
        ParserConfig(predictor="rule", d_scan=16).validate()


def test_decision_disagreement_is_the_chance_sampling_and_thresholding_differ() -> None:
    prob_T = torch.tensor([0.5, 0.52, 0.45, 0.9, 0.02])
    alpha = 0.1
    q = sharpen(prob_T, alpha)  # what training samples from
    expected = torch.where(prob_T >= 0.5, 1 - q, q)  # P(sample ≠ [p ≥ 0.5])
    torch.testing.assert_close(decision_disagreement(prob_T, alpha), expected)
    assert float(decision_disagreement(prob_T, alpha)[0]) == pytest.approx(0.5)
    assert torch.equal(decision_disagreement(prob_T, 0.0), torch.zeros(5))


def test_the_consistency_penalty_moves_probabilities_away_from_the_cut_on_their_own_side() -> None:
    seqs = PackedSeqs.from_cu_seqlens(random_cu_seqlens([3, 3]), 6)
    prob_T = torch.tensor([1.0, 0.53, 0.47, 1.0, 0.9, 0.1], requires_grad=True)
    interior_mean(decision_disagreement(prob_T, 0.1), seqs).backward()
    grad = prob_T.grad
    assert grad[1] < 0 < grad[2]  # descent raises 0.53 and lowers 0.47: no decision flips
    assert abs(float(grad[4])) < 0.05 * abs(float(grad[1]))  # decided tokens are left nearly alone
    assert grad[0] == 0 and grad[3] == 0  # forced starts are not counted


def test_parser_loss_adds_each_weighted_penalty() -> None:
    cfg = tiny_dlcm(64)
    model = build_model(cfg).train()
    out = model(torch.randint(0, 64, (40,)), random_cu_seqlens([25, 15]), generator=torch.Generator().manual_seed(0))
    weights = dataclasses.replace(cfg.parser, aux_weight=0.5, midpoint_weight=0.25, consistency_weight=2.0)
    expected = 0.5 * out.aux_loss + 0.25 * out.midpoint_loss + 2.0 * out.consistency_loss
    torch.testing.assert_close(parser_loss(weights, out), expected)
    assert float(out.consistency_loss) > 0


def test_rule_predictor_with_a_calibrated_tau_decides_at_it_in_training() -> None:
    cfg = tiny_dlcm(64)
    parser_cfg = dataclasses.replace(cfg.parser, predictor="rule", threshold_mode="calibrated", target_ratio=3.0)
    model = build_model(dataclasses.replace(cfg, parser=parser_cfg)).train()
    model.parser.threshold.fill_(0.37)  # as if earlier steps had calibrated it
    out = model(torch.randint(0, 64, (48,)), random_cu_seqlens([30, 18]))
    expected = (out.parser.prob_T >= 0.37) | (out.tokens.position == 0)
    assert torch.equal(out.parser.boundary_T, expected)  # decided with the running τ of earlier steps
    model.fold_threshold([out.parser.threshold_estimate])
    assert float(model.parser.threshold) != 0.37  # then calibrated on this step
