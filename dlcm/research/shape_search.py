"""Model shapes for sweeps: μP width scaling, and shapes that meet an inference-FLOPs budget at a backbone share.

Both keep what a recipe's author chose per stream — head dimension, query heads per KV head, FFN width per model
width, the encoder/decoder depth split — and change only widths and depths.

μP transfer (:func:`width_scaled`): every stream's width is multiplied by the same factor (``d_concept/d_token`` and
the depths stay), heads follow the width at fixed head dimension, and ``d_base`` is set to the proxy's width.

(R, P) grid at a fixed budget (:func:`budget_shape`): for target ratio R and backbone share P (the backbone's
fraction of the model's inference FLOPs per token, :mod:`dlcm.model.flops`, at the recipe's context length), find token
and concept stream shapes whose FLOPs per token are within ``tolerance`` of the budget and whose backbone share is
within ``share_tolerance`` of P. The search is a grid: token widths and depths are scored on the non-backbone
FLOPs they need ((1 − P) of the budget), concept widths and depths on the backbone FLOPs (P of it), the best
``KEEP`` of each are combined and scored exactly. Among shapes inside both tolerances it takes the one with the
smallest normalised error plus a small penalty for moving widths and depths away from the recipe's (Σ |log ratio|),
so shapes stay recognisably "the same model family".
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, replace

from dlcm.model.config import BaselineConfig, CrossConfig, DLCMConfig, StackConfig
from dlcm.model.flops import inference_flops_per_token, stage_costs

KEEP = 24  # candidates per stream carried into the exact joint scoring
DISTANCE_WEIGHT = 0.25  # weight of the distance from the recipe's shape, in units of a full tolerance error
MAX_WIDTH_FACTOR = 4  # widths searched up to this multiple of the recipe's
MAX_DEPTH_FACTOR = 3  # depths searched up to this multiple of the recipe's


def width_unit(stack: StackConfig) -> int:
    """Smallest width step that keeps the head dimension and whole KV groups: head_dim × (heads per KV head)."""
    return stack.head_dim * (stack.n_heads // stack.n_kv_heads)


def scale_stack(stack: StackConfig, width: int, n_layers: int | None = None) -> StackConfig:
    """``stack`` at ``width`` (same head dimension, KV grouping and FFN/width ratio) and optionally new depth."""
    unit = width_unit(stack)
    if width <= 0 or width % unit:
        raise ValueError(
            f"width={width} is not allowed: a positive multiple of {unit} (head_dim {stack.head_dim} × "
            f"{stack.n_heads // stack.n_kv_heads} query heads per KV head)"
        )
    heads = width // stack.head_dim
    return replace(
        stack,
        width=width,
        n_layers=stack.n_layers if n_layers is None else n_layers,
        n_heads=heads,
        n_kv_heads=heads // (stack.n_heads // stack.n_kv_heads),
        ffn_hidden=round(stack.ffn_hidden * width / stack.width),
    )


def scale_cross(cross: CrossConfig, d_token_old: int, d_token: int) -> CrossConfig:
    """Ψ at a new token width: same head dimension and KV grouping, FFN scaled with the width."""
    head_dim = d_token_old // cross.n_heads
    group = cross.n_heads // cross.n_kv_heads
    if d_token % (head_dim * group):
        raise ValueError(
            f"d_token={d_token} is not allowed for the cross-attention: a multiple of {head_dim * group} "
            f"(its head_dim {head_dim} × {group} query heads per KV head)"
        )
    heads = d_token // head_dim
    return replace(
        cross, n_heads=heads, n_kv_heads=heads // group, ffn_hidden=round(cross.ffn_hidden * d_token / d_token_old)
    )


def width_scaled(config: DLCMConfig | BaselineConfig, d_token: int, d_base: int | None) -> DLCMConfig | BaselineConfig:
    """The model scaled to token width ``d_token`` with μP base width ``d_base`` (``None``: standard
    parametrisation); see the module docstring."""
    if isinstance(config, BaselineConfig):
        return replace(config, stack=scale_stack(config.stack, d_token), d_base=d_base)
    factor = d_token / config.d_token
    d_concept = config.d_concept * factor
    if d_concept != int(d_concept):
        raise ValueError(
            f"d_token={d_token} gives d_concept={d_concept:g} (recipe ratio {config.d_concept}/{config.d_token}); "
            "choose a width that keeps d_concept an integer"
        )
    return replace(
        config,
        encoder=scale_stack(config.encoder, d_token),
        decoder=scale_stack(config.decoder, d_token),
        backbone=scale_stack(config.backbone, int(d_concept)),
        cross=scale_cross(config.cross, config.d_token, d_token),
        d_base=d_base,
    )


def config_overrides(config: DLCMConfig | BaselineConfig, prefix: str = "model.init_args.config") -> dict[str, object]:
    """Dotted CLI keys (``model.init_args.config.encoder.width`` …) that set every shape field of ``config``."""
    out: dict[str, object] = {}
    parts = ("stack",) if isinstance(config, BaselineConfig) else ("encoder", "backbone", "decoder")
    for part in parts:
        stack = getattr(config, part)
        for key in ("width", "n_layers", "n_heads", "n_kv_heads", "ffn_hidden"):
            out[f"{prefix}.{part}.{key}"] = getattr(stack, key)
    if isinstance(config, DLCMConfig):
        for key in ("n_heads", "n_kv_heads", "ffn_hidden"):
            out[f"{prefix}.cross.{key}"] = getattr(config.cross, key)
        out[f"{prefix}.parser.target_ratio"] = config.parser.target_ratio
    out[f"{prefix}.d_base"] = config.d_base
    return out


def matmul_parameters(config: DLCMConfig | BaselineConfig) -> dict[str, int]:
    """Parameters without embedding and LM head (``N``, the count of Eq. 22 and :mod:`dlcm.model.presets`) and the
    backbone's part of them."""
    costs = stage_costs(config)
    body = sum(c.token_params + c.concept_params for name, c in costs.items() if name != "head")
    backbone = costs["backbone"].concept_params if "backbone" in costs else 0
    return {"N": body, "backbone": backbone}


@dataclass(frozen=True)
class BudgetShape:
    """A shape found for one (R, P) cell and how well it meets the budget."""

    ratio: float
    fraction: float  # the requested backbone share P
    config: DLCMConfig
    flops_per_token: float  # inference model FLOPs per token at the context length
    backbone_share: float  # realised share of those FLOPs in the backbone
    budget: float

    @property
    def flops_error(self) -> float:
        """Relative deviation from the budget."""
        return self.flops_per_token / self.budget - 1.0

    def describe(self) -> dict[str, object]:
        """Plain numbers for tables and JSON."""
        cfg = self.config
        params = matmul_parameters(cfg)
        return {
            "R": self.ratio,
            "P": self.fraction,
            "d_token": cfg.d_token,
            "encoder_layers": cfg.encoder.n_layers,
            "decoder_layers": cfg.decoder.n_layers,
            "d_concept": cfg.d_concept,
            "backbone_layers": cfg.backbone.n_layers,
            "flops_per_token": self.flops_per_token,
            "flops_error": self.flops_error,
            "backbone_share": self.backbone_share,
            "params": params["N"],  # without embedding and head
            "backbone_param_fraction": params["backbone"] / params["N"],
        }


def _token_variants(base: DLCMConfig) -> list[DLCMConfig]:
    """Token-stream widths and depths (encoder/decoder split as in the recipe, each at least one layer)."""
    unit = math.lcm(width_unit(base.encoder), width_unit(base.decoder))
    head_dim, group = base.d_token // base.cross.n_heads, base.cross.n_heads // base.cross.n_kv_heads
    unit = math.lcm(unit, head_dim * group)
    depth = base.encoder.n_layers + base.decoder.n_layers
    enc_share = base.encoder.n_layers / depth
    out = []
    for width in range(unit, MAX_WIDTH_FACTOR * base.d_token + 1, unit):
        for total in range(2, MAX_DEPTH_FACTOR * depth + 1):
            enc = min(max(round(total * enc_share), 1), total - 1)
            out.append(
                replace(
                    base,
                    encoder=scale_stack(base.encoder, width, enc),
                    decoder=scale_stack(base.decoder, width, total - enc),
                    cross=scale_cross(base.cross, base.d_token, width),
                )
            )
    return out


def _backbone_variants(base: DLCMConfig) -> list[DLCMConfig]:
    unit = width_unit(base.backbone)
    return [
        replace(base, backbone=scale_stack(base.backbone, width, layers))
        for width in range(unit, MAX_WIDTH_FACTOR * base.d_concept + 1, unit)
        for layers in range(1, MAX_DEPTH_FACTOR * base.backbone.n_layers + 1)
    ]


def _distance(cfg: DLCMConfig, base: DLCMConfig) -> float:
    """How far a shape moved from the recipe: Σ |log(new/old)| over the two streams' widths and depths."""

    def dims(c: DLCMConfig) -> tuple[int, ...]:
        return c.d_token, c.encoder.n_layers + c.decoder.n_layers, c.d_concept, c.backbone.n_layers

    return sum(abs(math.log(a / b)) for a, b in zip(dims(cfg), dims(base), strict=True))


def budget_shape(
    base: DLCMConfig,
    ratio: float,
    fraction: float,
    budget: float,
    context_length: int,
    tolerance: float = 0.05,
    share_tolerance: float = 0.03,
) -> BudgetShape:
    """The (R = ``ratio``, P = ``fraction``) shape whose inference FLOPs per token meet ``budget`` (module docstring).

    Raises ``ValueError`` naming the cell and the closest shape when none is inside both tolerances.
    """
    if not 0 < fraction < 1:
        raise ValueError(f"backbone fraction P={fraction!r} is not allowed: a number in (0, 1)")
    if not ratio > 1:
        raise ValueError(f"ratio R={ratio!r} is not allowed: a number > 1")
    if not budget > 0:
        raise ValueError(f"budget={budget!r} FLOPs per token is not allowed: a number > 0")
    base = replace(base, parser=replace(base.parser, target_ratio=float(ratio)))

    def flops(cfg: DLCMConfig) -> tuple[float, float]:
        count = inference_flops_per_token(cfg, context_length)
        return count.total, count.stages["backbone"].total

    token_target, backbone_target = (1 - fraction) * budget, fraction * budget

    def token_error(cfg: DLCMConfig) -> float:
        # The non-backbone FLOPs of a token shape hardly depend on the backbone (W_up and Ψ's K/V run per concept).
        total, backbone = flops(cfg)
        return abs(math.log((total - backbone) / token_target)) + 0.1 * _distance(cfg, base)

    def backbone_error(cfg: DLCMConfig) -> float:
        return abs(math.log(flops(cfg)[1] / backbone_target)) + 0.1 * _distance(cfg, base)

    tokens = sorted(_token_variants(base), key=token_error)[:KEEP]
    backbones = sorted(_backbone_variants(base), key=backbone_error)[:KEEP]
    best, best_score, closest, closest_err = None, math.inf, None, math.inf
    for tok in tokens:
        for bb in backbones:
            cfg = replace(tok, backbone=bb.backbone)
            total, backbone = flops(cfg)
            share = backbone / total
            err_flops, err_share = abs(total / budget - 1.0) / tolerance, abs(share - fraction) / share_tolerance
            shape = BudgetShape(float(ratio), fraction, cfg, total, share, budget)
            if max(err_flops, err_share) < closest_err:
                closest, closest_err = shape, max(err_flops, err_share)
            if err_flops > 1 or err_share > 1:
                continue
            score = err_flops + err_share + DISTANCE_WEIGHT * _distance(cfg, base)
            if score < best_score:
                best, best_score = shape, score
    if best is None:
        near = closest.describe() if closest else {}
        raise ValueError(
            f"no shape for R={ratio:g}, P={fraction:g} within ±{tolerance:.0%} of {budget:.4g} FLOPs/token and "
            f"±{share_tolerance:g} backbone share; closest: {near.get('flops_per_token', math.nan):.4g} FLOPs/token, "
            f"share {near.get('backbone_share', math.nan):.3f}. Widen the tolerances or change the budget"
        )
    return best


def matched_baseline(
    dlcm: DLCMConfig, baseline: BaselineConfig, context_length: int, ratio: float | None = None
) -> BaselineConfig:
    """The baseline shape (recipe's head dimension, KV grouping, FFN ratio) whose inference FLOPs per token are
    closest to ``dlcm``'s at ``ratio`` (default its target): width and depth searched like a token stream."""
    target = inference_flops_per_token(dlcm, context_length, ratio).total
    unit = width_unit(baseline.stack)
    candidates = [
        dataclasses.replace(baseline, stack=scale_stack(baseline.stack, width, layers))
        for width in range(unit, MAX_WIDTH_FACTOR * baseline.d_token + 1, unit)
        for layers in range(1, MAX_DEPTH_FACTOR * baseline.stack.n_layers + 1)
    ]
    aspect0 = baseline.d_token / baseline.stack.n_layers

    def score(cfg: BaselineConfig) -> float:
        err = abs(math.log(inference_flops_per_token(cfg, context_length).total / target))
        return err + 0.02 * abs(math.log(cfg.d_token / cfg.stack.n_layers / aspect0))

    return min(candidates, key=score)
