"""The GPU suite in one command: every ``gpu`` test and every GPU benchmark, each part time-boxed, into one folder.

Parts run one after another as child processes (a crash or an out-of-memory in one keeps the others), each with
its own time limit, writing ``<part>.log`` and, for benchmarks, ``<part>.json`` into ``--out``. ``summary.json``
records every part's command, exit status, seconds and whether it ran out of time; ``summary.txt`` is the one-screen
digest printed at the end (``bench/table.py`` renders any part's JSON in full). The default limits add up to
11 minutes (most of it compilation and the ``gpu`` tests); ``--parts`` picks a subset for a shorter call,
``--scale`` stretches every limit.

    make gpu-check OUT=/tmp/gpu_check              # installs the carried wheels first (make wheels), then this
    python bench/gpu_check.py --out /tmp/gpu_check --parts train_2048 prefill
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable


@dataclass(frozen=True)
class Part:
    """One time-boxed step of the suite: a command run from the repository root."""

    name: str
    command: tuple[str, ...]
    seconds: int
    writes_json: bool = True


def parts(out: Path, eval_dir: str | None) -> list[Part]:
    def bench(script: str, *args: str) -> tuple[str, ...]:
        return (PY, f"bench/{script}.py", *args)

    def json_of(name: str) -> str:
        return str(out / f"{name}.json")

    train = ("--pairs", "paper", "--compile", "on", "--profile")
    steps = [
        Part("tests", (PY, "-m", "pytest", "-q", "-m", "gpu", "-rs", "-p", "no:cacheprovider"), 180, False),
        Part("cross_entropy", bench("linear_cross_entropy", "--out", json_of("cross_entropy")), 40),
        Part("train_2048", bench("train_throughput", *train, "--context", "2048", "--out", json_of("train_2048")), 130),
        Part("train_8192", bench("train_throughput", *train, "--context", "8192", "--out", json_of("train_8192")), 130),
        Part("prefill", bench("prefill", "--iters", "5", "--out", json_of("prefill")), 60),
        Part("decode", bench("decode", "--new-tokens", "64", "--out", json_of("decode")), 50),
        Part("stall", bench("checkpoint_stall", "--saves", "2", "--out", json_of("stall")), 60),
    ]
    if eval_dir is not None:
        eval_args = ("--data-dir", eval_dir, "--task", "piqa", "--limit", "500", "--iters", "2")
        steps.append(Part("eval", bench("eval_throughput", *eval_args, "--out", json_of("eval")), 40))
    return steps


def run_part(part: Part, out: Path, scale: float) -> dict:
    limit = int(part.seconds * scale)
    start = time.perf_counter()
    env = os.environ | {"PYTHONUNBUFFERED": "1", "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}
    with open(out / f"{part.name}.log", "w") as log:
        try:
            proc = subprocess.run(part.command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, timeout=limit, env=env)
            rc, timed_out = proc.returncode, False
        except subprocess.TimeoutExpired:
            rc, timed_out = None, True
    return {
        "part": part.name,
        "command": " ".join(Path(c).name if c == PY else c for c in part.command),
        "rc": rc,
        "timed_out": timed_out,
        "limit_s": limit,
        "seconds": round(time.perf_counter() - start, 1),
    }


def headline(name: str, data: dict) -> list[str]:
    """A few lines per benchmark JSON: the numbers the speed goals are stated in."""
    records = data.get("records", [])
    lines = []
    if name.startswith("train"):
        for r in records:
            lines.append(
                f"  {r['model']:<14} ctx {r['context']:>5} {r['attn_backend']:<16} {r['median_step_ms']:7.1f} ms "
                f"{r['tokens_per_sec'] / 1e3:6.1f}k tok/s MFU {r['mfu']:.1%} peak {r['peak_memory_gib'] or 0:.1f} GiB"
            )
    elif name == "cross_entropy":
        for r in records:
            if "ms" in r:
                lines.append(
                    f"  {r['impl']:<17} {r['ms']:6.1f} ms +{r['peak_extra_gib']:5.2f} GiB "
                    f"err loss {r['loss_rel_err']:.1e} dx {r['dx_err']:.1e} dW {r['dw_err']:.1e}"
                )
            else:
                lines.append(f"  {r['impl']:<17} {r.get('skipped') or r.get('error', '')[:80]}")
    elif name in ("prefill", "decode"):
        key = "prefill_ms" if name == "prefill" else "decode_tokens_per_s"
        for r in records:
            shape = f"prompt {r.get('prompt_len', '')} batch {r['batch']}"
            lines.append(f"  {r['pair']:<5} {r['family']:<8} {shape:<22} {key} {r[key]:.1f}")
    elif name == "eval":
        lines += [f"  {r['family']:<8} {r['items_per_s']:.1f} items/s" for r in records]
    else:
        lines.append("  " + json.dumps(data)[:200])
    return lines


def summarise(results: list[dict], out: Path) -> str:
    lines = []
    for result in results:
        state = "timed out" if result["timed_out"] else f"rc {result['rc']}"
        lines.append(f"{result['part']:<14} {state:<10} {result['seconds']:6.1f} s (limit {result['limit_s']} s)")
        path = out / f"{result['part']}.json"
        if path.exists():
            try:
                lines += headline(result["part"], json.loads(path.read_text()))
            except (KeyError, TypeError, ValueError) as err:  # a partial file must not hide the others
                lines.append(f"  (unreadable: {err!r})")
        if result["part"] == "tests":
            log = (out / "tests.log").read_text().strip().splitlines()
            lines.append("  " + (log[-1] if log else "(no output)"))
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder for the logs, JSONs and summary (created)")
    parser.add_argument("--parts", nargs="+", default=None, help="run only these parts, in the suite's order")
    parser.add_argument("--eval-dir", default=None, help="folder holding piqa.jsonl (the eval part needs it)")
    parser.add_argument("--scale", type=float, default=1.0, help="multiply every part's time limit")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    suite = parts(out.resolve(), args.eval_dir)
    known = [p.name for p in suite]
    unknown = sorted(set(args.parts or []) - set(known))
    if unknown:
        parser.error(f"--parts {' '.join(unknown)} is not allowed: choose from {' '.join(known)}")
    if args.scale <= 0:
        parser.error(f"--scale {args.scale} is not allowed: a positive factor")
    results = []
    for part in suite:
        if args.parts and part.name not in args.parts:
            continue
        results.append(run_part(part, out, args.scale))
        print(f"{part.name}: {'timed out' if results[-1]['timed_out'] else results[-1]['rc']}", flush=True)
        (out / "summary.json").write_text(json.dumps(results, indent=1))
    text = summarise(results, out)
    (out / "summary.txt").write_text(text + "\n")
    print(text)
    return 0 if all(r["rc"] == 0 for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
