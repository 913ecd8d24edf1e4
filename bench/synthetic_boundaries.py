"""Does the global parser find the phrases, or only the rate? Tiny DLCMs on the synthetic phrase language
(:mod:`dlcm.data.synthetic`, known phrase starts), trained with ``router_grad: aux`` and ``ste``, scored by
boundary precision/recall/F1 (:mod:`dlcm.eval.boundary_metrics`, exact and ±1 token) with inference-mode boundaries on
held-out batches, against a chance reference with the same number of boundaries per document.

    python bench/synthetic_boundaries.py --router-grad aux ste --steps 600 --out synthetic.json
    python bench/synthetic_boundaries.py --router-grad aux --parser threshold_mode=fixed alpha_final=0 --steps 600

``--parser key=value`` sets any ``ParserConfig`` field (the boundary mechanisms: ``threshold_mode``,
``alpha_final``, ``midpoint_weight``, ``predictor``, ...); the α schedule follows the step count.

The target ratio R is the language's mean phrase length, so the true phrase starts meet the ratio loss exactly: a
parser that found the phrases would have precision and recall near 1; one that only learned the rate scores like
chance. Also reported: the mean boundary probability at true phrase starts and elsewhere, the realised ratio,
and the language-model loss (the phrase language has a known floor: a token inside a phrase is predictable, a
phrase start is uniform over the inventory's first tokens).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Any

import torch

from dlcm.data.synthetic import PhraseLanguage
from dlcm.eval.boundary_metrics import boundary_scores, chance_boundaries
from dlcm.model.config import ParserConfig
from dlcm.model.dlcm import parser_loss
from dlcm.model.loss import cross_entropy, next_token_targets
from dlcm.model.presets import build_model, tiny_dlcm
from dlcm.research.shape_search import width_scaled

TOLERANCES = (0, 1)


def train_and_score(
    router_grad: str,
    steps: int = 600,
    width: int = 64,
    vocab_size: int = 64,
    n_phrases: int = 48,
    tokens: int = 1024,
    doc_len: int = 128,
    lr: float = 3e-3,
    eval_batches: int = 16,
    seed: int = 0,
    device: str = "cpu",
    max_seconds: float | None = None,
    parser: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Train one tiny DLCM on the phrase language and score its inference-mode boundaries (see module docstring).

    ``max_seconds`` stops training early (the result's ``steps`` says how many ran), for time-boxed drivers.
    ``parser`` overrides fields of the parser configuration.
    """
    torch.manual_seed(seed)
    language = PhraseLanguage(vocab_size=vocab_size, n_phrases=n_phrases, seed=seed)
    target = language.mean_phrase_length
    base = tiny_dlcm(vocab_size=vocab_size, target_ratio=target)
    config = width_scaled(base, width, None) if width != base.d_token else base
    overrides = {**(parser or {}), "router_grad": router_grad}
    config = dataclasses.replace(config, parser=dataclasses.replace(config.parser, **overrides))
    config.parser.validate()
    model = build_model(config).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    train_rng = torch.Generator().manual_seed(seed)
    sample_rng = torch.Generator(device=device).manual_seed(seed)
    ce_curve, ratio_curve = [], []
    start = time.perf_counter()
    for step in range(steps):
        batch = language.batch(tokens, doc_len, train_rng)
        ids, cu = batch.input_ids_T.to(device), batch.cu_seqlens.to(device)
        model.parser.set_progress(step / steps)
        out = model(ids, cu, max_seqlen_tok=doc_len, generator=sample_rng)
        ce = cross_entropy(out.logits_TV, next_token_targets(ids, cu))
        optimizer.zero_grad(set_to_none=True)
        loss = ce + parser_loss(config.parser, out)
        loss.backward()
        optimizer.step()
        model.fold_threshold([out.parser.threshold_estimate])  # τ moves once per optimizer step
        out_of_time = max_seconds is not None and time.perf_counter() - start > max_seconds
        if step % 10 == 0 or step == steps - 1 or out_of_time:
            ce_curve.append([step, ce.item()])
            ratio_curve.append([step, 1.0 / max(out.ratio.boundary_rate.item(), 1e-9)])
        if out_of_time:
            break
    steps_done = step + 1
    train_s = time.perf_counter() - start

    model.eval()
    eval_rng, chance_rng = torch.Generator().manual_seed(10_000 + seed), torch.Generator().manual_seed(20_000 + seed)
    scores = {t: None for t in TOLERANCES}
    chance = {t: None for t in TOLERANCES}
    nats = targets = boundaries = n_tokens = 0.0
    prob_start = prob_other = count_start = count_other = 0.0
    with torch.no_grad():
        for _ in range(eval_batches):
            batch = language.batch(tokens, doc_len, eval_rng)
            ids, cu = batch.input_ids_T.to(device), batch.cu_seqlens.to(device)
            out = model(ids, cu, max_seqlen_tok=doc_len)
            targets_T = next_token_targets(ids, cu)
            valid = targets_T >= 0
            nats += cross_entropy(out.logits_TV, targets_T).item() * int(valid.sum())
            targets += int(valid.sum())
            predicted_T = out.parser.boundary_T.cpu()
            boundaries += int(predicted_T.sum())
            n_tokens += predicted_T.numel()
            # Interior positions only: document starts have p = 1 by construction.
            interior_T = torch.ones_like(predicted_T)
            interior_T[batch.cu_seqlens[:-1].long()] = False
            prob_T = out.parser.prob_T.cpu().double()
            is_start_T = batch.phrase_start_T & interior_T
            is_other_T = ~batch.phrase_start_T & interior_T
            prob_start += float(prob_T[is_start_T].sum())
            count_start += int(is_start_T.sum())
            prob_other += float(prob_T[is_other_T].sum())
            count_other += int(is_other_T.sum())
            random_T = chance_boundaries(predicted_T, batch.cu_seqlens, chance_rng)
            for t in TOLERANCES:
                got = boundary_scores(predicted_T, batch.phrase_start_T, batch.cu_seqlens, t)
                ref = boundary_scores(random_T, batch.phrase_start_T, batch.cu_seqlens, t)
                scores[t] = got if scores[t] is None else scores[t] + got
                chance[t] = ref if chance[t] is None else chance[t] + ref
    return {
        "router_grad": router_grad,
        "parser": dataclasses.asdict(config.parser),
        "threshold": float(model.parser.threshold),
        "steps": steps_done,
        "steps_planned": steps,
        "seed": seed,
        "device": device,
        "width": config.d_token,
        "parameters": sum(p.numel() for p in model.parameters()),
        "language": {"vocab_size": vocab_size, "n_phrases": n_phrases, "mean_phrase_length": target},
        "target_ratio": target,
        "eval_ratio": n_tokens / max(boundaries, 1.0),
        "train_ratio_last100": _mean_ratio(ratio_curve, steps_done - 100),
        "train_ce_first": ce_curve[0][1],
        "train_ce_last": ce_curve[-1][1],
        "eval_ce": nats / max(targets, 1.0),
        "mean_prob_at_phrase_starts": prob_start / max(count_start, 1.0),
        "mean_prob_elsewhere": prob_other / max(count_other, 1.0),
        "scores": {f"tol{t}": scores[t].to_dict() for t in TOLERANCES},
        "chance": {f"tol{t}": chance[t].to_dict() for t in TOLERANCES},
        "curves": {"ce": ce_curve, "ratio": ratio_curve},
        "train_s": train_s,
    }


def _mean_ratio(curve: list[list[float]], from_step: int) -> float:
    """Tokens per concept over the logged steps from ``from_step`` on (the mean boundary rate, inverted)."""
    rates = [1.0 / r for s, r in curve if s >= from_step]
    return 1.0 / (sum(rates) / len(rates)) if rates else math.nan


def format_result(r: dict[str, Any]) -> str:
    """One result as a short text block."""
    lines = [
        f"router_grad={r['router_grad']}: {r['steps']} steps, realised ratio {r['eval_ratio']:.3f} "
        f"(target {r['target_ratio']:.2f}), eval CE {r['eval_ce']:.3f} nats, "
        f"p at phrase starts {r['mean_prob_at_phrase_starts']:.3f} vs elsewhere {r['mean_prob_elsewhere']:.3f}"
    ]
    for key in r["scores"]:
        s, c = r["scores"][key], r["chance"][key]
        lines.append(
            f"  ±{s['tolerance']}: precision {s['precision']:.3f} recall {s['recall']:.3f} F1 {s['f1']:.3f}   "
            f"(chance: {c['precision']:.3f} / {c['recall']:.3f} / {c['f1']:.3f})"
        )
    return "\n".join(lines)


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``key=value`` strings to a dict of ``ParserConfig`` fields; values are JSON (0.1, null) or else strings."""
    fields = {f.name for f in dataclasses.fields(ParserConfig)}
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or key not in fields:
            raise SystemExit(f"--parser {item!r}: expected KEY=VALUE with KEY one of {', '.join(sorted(fields))}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--router-grad", nargs="+", default=["aux", "ste"], choices=["aux", "ste"])
    parser.add_argument("--steps", type=int, default=600, help="AdamW steps per model")
    parser.add_argument("--width", type=int, default=64, help="d_token (d_concept scales with it)")
    parser.add_argument("--tokens", type=int, default=1024, help="tokens per batch")
    parser.add_argument("--doc-len", type=int, default=128, help="tokens per document")
    parser.add_argument("--lr", type=float, default=3e-3, help="AdamW learning rate")
    parser.add_argument("--eval-batches", type=int, default=16, help="held-out batches scored")
    parser.add_argument("--seed", type=int, default=0, help="language, init, data and sampling seed")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    parser.add_argument("--max-seconds", type=float, default=None, help="stop each model's training after this")
    parser.add_argument("--parser", nargs="*", default=[], metavar="KEY=VALUE", help="parser config overrides")
    parser.add_argument("--out", type=Path, default=None, help="write the results (a list) as JSON here")
    args = parser.parse_args(argv)
    overrides = parse_overrides(args.parser)
    results = []
    for router_grad in args.router_grad:
        result = train_and_score(
            router_grad,
            args.steps,
            args.width,
            tokens=args.tokens,
            doc_len=args.doc_len,
            lr=args.lr,
            eval_batches=args.eval_batches,
            seed=args.seed,
            device=args.device,
            max_seconds=args.max_seconds,
            parser=overrides,
        )
        print(format_result(result), flush=True)
        results.append(result)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
