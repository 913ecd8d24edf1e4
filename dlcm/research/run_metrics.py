"""What a finished (or running) training run logged: TensorBoard scalars, training FLOPs, and a summary record.

A *run directory* is any directory with TensorBoard event files somewhere below it (``dlcm fit`` writes them to
``<save_dir>/<name>/version_<n>/``) and, next to the events, the ``config.yaml`` LightningCLI saves. Event files
are merged in name order; where a resumed run logged a step twice, the later file wins.

Step convention. Lightning logs a training batch's scalars (and validation run inside ``fit``) at step
``s`` = optimizer steps completed *before* that batch's step, so TensorBoard step ``s`` holds the state after
``s + 1`` optimizer steps.

Training FLOPs come from the FLOPs callback (:mod:`dlcm.callbacks.throughput`): each
``train/perf/model_flops_per_token`` point at step ``p_k`` is the model-FLOPs-per-token of the batches after the
previous point ``p_{k−1}`` up to and including ``p_k`` (the first point starts after batch 0, the callback's
reference). Tokens per optimizer step are fixed (every micro-batch is full), so the FLOPs through batch ``v`` are
``tokens_per_step · Σ_{i ≤ v} fpt(i)``, with batch 0 (and any batch after the last point) charged at the nearest
point's value. This is exact up to batch 0's own concept count.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

# Scalars whose whole curve a summary keeps (the figures of dlcm.research.plots draw them).
CURVE_TAGS = (
    "train/loss",
    "val/loss",
    "val/bpb",
    "val/ratio",
    "train/ratio",
    "train/segmentation/ratio_threshold",
    "train/segmentation/target_R",
    "val/segmentation/near_threshold",
    "val/segmentation/midpoint",
    "train/perf/model_flops_per_token",
)
CURVE_PREFIXES = ("val/segmentation/tokens_per_concept/", "train/segmentation/tokens_per_concept/")
FLOPS_TAG = "train/perf/model_flops_per_token"
# Names older runs logged a quantity under, read as today's name: second copies of one quantity, and the groups
# that sat beside train/ and val/ before every scalar moved under one of the two.
RENAMED_TAGS = {
    "boundary/ratio": "train/ratio",
    "train/ratio_threshold": "train/segmentation/ratio_threshold",
    "val_boundary/ratio": "val/ratio",
    "val_boundary/ratio_threshold": "val/ratio",
    "compile/graphs": "train/compile_graphs",
}
RENAMED_PREFIXES = {
    "boundary/": "train/segmentation/",
    "val_boundary/": "val/segmentation/",
    "perf/": "train/perf/",
    "lr-AdamW/": "train/lr/",
}


def current_tag(tag: str) -> str:
    """Today's name of a tag an older run may have logged."""
    if tag in RENAMED_TAGS:
        return RENAMED_TAGS[tag]
    for old, new in RENAMED_PREFIXES.items():
        if tag.startswith(old):
            return new + tag.removeprefix(old)
    return tag


def event_files(run_dir: str | Path) -> list[Path]:
    """TensorBoard event files anywhere below ``run_dir``, in name order (names start with the creation time)."""
    return sorted(Path(run_dir).rglob("events.out.tfevents.*"), key=lambda p: (p.name, str(p)))


def read_scalars(run_dir: str | Path, tags: Iterable[str] | None = None) -> dict[str, dict[int, float]]:
    """``{tag: {step: value}}`` of every scalar (or only ``tags``) in the event files below ``run_dir``; a run that
    logged only an old name of a tag (``current_tag``) has its points under today's name."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    wanted = None if tags is None else set(tags)
    out: dict[str, dict[int, float]] = {}
    renamed: dict[str, dict[int, float]] = {}
    for path in event_files(run_dir):
        acc = EventAccumulator(str(path), size_guidance={"scalars": 0})  # 0: keep every point, no reservoir
        acc.Reload()
        for tag in acc.Tags().get("scalars", []):
            name = current_tag(tag)
            if wanted is None or name in wanted:
                into = out if name == tag else renamed
                into.setdefault(name, {}).update({e.step: float(e.value) for e in acc.Scalars(tag)})
    for name, points in renamed.items():
        out.setdefault(name, points)  # a quantity also logged under today's name keeps those points
    return out


def read_run_config(run_dir: str | Path) -> dict[str, Any] | None:
    """The newest ``config.yaml`` LightningCLI saved below ``run_dir`` (the resolved recipe), or ``None``."""
    import yaml

    configs = sorted(Path(run_dir).rglob("config.yaml"), key=lambda p: p.stat().st_mtime)
    if not configs:
        return None
    loaded = yaml.safe_load(configs[-1].read_text())
    return loaded if isinstance(loaded, dict) else None


def tokens_per_step(config: dict[str, Any]) -> int | None:
    """Tokens per optimizer step of a resolved recipe: micro-batch tokens × accumulation × devices × nodes.

    ``None`` when the device count is not a number in the config (``devices: auto``).
    """
    trainer, data = config.get("trainer") or {}, config.get("data") or {}
    data = data.get("init_args", data)
    per_batch = data.get("tokens_per_batch")
    devices = trainer.get("devices", 1)
    if isinstance(devices, list):
        devices = len(devices)
    if isinstance(devices, str) and devices.isdigit():
        devices = int(devices)
    if not isinstance(per_batch, int) or not isinstance(devices, int) or devices < 1:
        return None
    accumulate = trainer.get("accumulate_grad_batches") or 1
    return per_batch * int(accumulate) * devices * int(trainer.get("num_nodes") or 1)


def cumulative_train_flops(
    flops_per_token: dict[int, float], step_tokens: int, steps: Sequence[int]
) -> list[float] | None:
    """Training FLOPs through each logged step in ``steps`` (see the module docstring); ``None`` without points."""
    points = sorted((s, v) for s, v in flops_per_token.items() if math.isfinite(v))
    if not points or step_tokens <= 0:
        return None
    point_steps = [s for s, _ in points]
    last = max(max(steps, default=0), point_steps[-1])
    totals, running = [], 0.0
    for batch in range(last + 1):
        k = min(bisect.bisect_left(point_steps, batch), len(points) - 1)  # the point whose interval holds batch
        running += points[k][1] * step_tokens
        totals.append(running)
    return [totals[s] for s in steps]


def _last(curve: dict[int, float] | None) -> float | None:
    return curve[max(curve)] if curve else None


def _points(curve: dict[int, float]) -> dict[str, list]:
    steps = sorted(curve)
    return {"step": steps, "value": [curve[s] for s in steps]}


def summarize_run(run_dir: str | Path) -> dict[str, Any]:
    """Final metrics and curves of one run, as plain numbers (JSON-ready).

    Keys: ``steps`` (optimizer steps done), ``val_loss``, ``val_bpb``, ``val_ppl``, ``val_ratio`` (inference-mode
    tokens per concept), ``train_ratio`` / ``train_ratio_threshold`` (last training values), ``target_ratio``,
    ``tokens_per_concept`` (last validation value per domain), ``tokens_per_step``, ``tokens`` (trained),
    ``train_flops`` (model FLOPs of training from the FLOPs callback, ``None`` if it logged nothing),
    ``flops_per_token`` (their mean per trained token), ``val_flops`` (training FLOPs at each ``val/loss`` step) and
    ``curves`` (``{tag: {"step": [...], "value": [...]}}`` for :data:`CURVE_TAGS` and per-domain tokens per concept).
    Metrics a run did not log are ``None``.
    """
    run_dir = Path(run_dir)
    scalars = read_scalars(run_dir)
    if not scalars:
        raise ValueError(f"{run_dir}: no TensorBoard scalars below it ({len(event_files(run_dir))} event file(s))")
    config = read_run_config(run_dir) or {}
    step_tokens = tokens_per_step(config) if config else None
    train = scalars.get("train/loss") or {}
    steps_done = max(train) + 1 if train else 0
    val_steps = sorted(scalars.get("val/loss") or {})
    flops = None
    if step_tokens and scalars.get(FLOPS_TAG) and steps_done:
        flops = cumulative_train_flops(scalars[FLOPS_TAG], step_tokens, [steps_done - 1, *val_steps])
    domains = sorted(
        tag.removeprefix("val/segmentation/tokens_per_concept/")
        for tag in scalars
        if tag.startswith("val/segmentation/tokens_per_concept/")
    )
    loss = _last(scalars.get("val/loss"))
    tokens = steps_done * step_tokens if step_tokens else None
    return {
        "run_dir": str(run_dir),
        "steps": steps_done,
        "val_loss": loss,
        "val_bpb": _last(scalars.get("val/bpb")),
        "val_ppl": _last(scalars.get("val/ppl")),
        "val_ratio": _last(scalars.get("val/ratio")),
        "train_ratio": _last(scalars.get("train/ratio")),
        "train_ratio_threshold": _last(scalars.get("train/segmentation/ratio_threshold")),
        "threshold": _last(scalars.get("train/segmentation/threshold")),
        "target_ratio": _last(scalars.get("train/segmentation/target_R")),
        "tokens_per_concept": {d: _last(scalars[f"val/segmentation/tokens_per_concept/{d}"]) for d in domains},
        "tokens_per_step": step_tokens,
        "tokens": tokens,
        "train_flops": flops[0] if flops else None,
        "flops_per_token": flops[0] / tokens if flops and tokens else None,
        "val_flops": flops[1:] if flops else None,
        "curves": {
            tag: _points(curve)
            for tag, curve in sorted(scalars.items())
            if tag in CURVE_TAGS or tag.startswith(CURVE_PREFIXES)
        },
    }
