"""Compression-aware scaling law (paper Eq. 22, docs/design.md): fit, predict, and allocate compute over (R, P).

    L(N, D, R, P) = E0 + A_tok / (N(1−P) + t_tok)^δ1 + A_con · R^γ / (N·P + t_con)^δ2 + A_data / (D + t_data)^α

N total parameters, D training tokens, R compression ratio (tokens per concept), P fraction of parameters in the
concept backbone. The paper publishes no coefficients, so they are fitted here to observations.

Fit. The eleven coefficients are optimised in float64 with L-BFGS (strong-Wolfe line search) on the Huber loss of
log-loss residuals ``log L_pred − log L_obs`` (as Chinchilla's fit: relative errors, robust to a few diverged
points). Positivity of E0, the A's, the t's and the exponents δ1, δ2, α comes from optimising their logarithms; γ is
free in sign. N and D are rescaled to billions inside the optimiser so every log-parameter is O(1); reported
coefficients are in raw units (parameters, tokens). Restarts start from a deterministic grid over the four
exponents and the best objective wins.

Uncertainty. A nonparametric bootstrap over observations (rows resampled with replacement, fixed seed), each
resample refitted warm-started from the best fit; the reported ± is the bootstrap standard deviation. Points of
one training curve are correlated, so this understates the spread a bootstrap over runs would give.

Readers. :func:`read_csv` takes one observation per row with columns ``N,D,R,P,loss`` (extra columns such as a
run name are ignored). :func:`read_runs` takes TensorBoard run directories, each holding a ``scaling.json``
sidecar (see :data:`SIDECAR_KEYS`) and event files anywhere below it; every logged ``val/loss`` point becomes an
observation with ``D = step × tokens_per_step``.
"""

from __future__ import annotations

import csv
import dataclasses
import itertools
import json
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from dlcm.research.run_metrics import event_files, read_scalars

ArrayLike = float | np.ndarray  # N, D, R, P arguments broadcast like numpy arrays
PARAM_NAMES = ("E0", "A_tok", "t_tok", "delta1", "A_con", "t_con", "delta2", "gamma", "A_data", "t_data", "alpha")
CSV_COLUMNS = ("N", "D", "R", "P", "loss")
# scaling.json: required keys N (total parameters), R, P, tokens_per_step (tokens per logged step: global batch
# × sequence length × gradient accumulation); optional tag (scalar name, default "val/loss").
SIDECAR_KEYS = {"N": True, "R": True, "P": True, "tokens_per_step": True, "tag": False}

# Internal units: billions of parameters / tokens keep (N(1−P) + t)^δ and the log-parameters near 1.
N_SCALE = 1e9
D_SCALE = 1e9


@dataclasses.dataclass
class Observations:
    """Columns of observations (float64 arrays of equal length); ``source`` names file and row for messages."""

    N: np.ndarray
    D: np.ndarray
    R: np.ndarray
    P: np.ndarray
    loss: np.ndarray
    source: list[str] = dataclasses.field(default_factory=list)

    def __len__(self) -> int:
        return len(self.loss)

    @staticmethod
    def concat(parts: Sequence[Observations]) -> Observations:
        """Join several observation sets (e.g. a CSV and TensorBoard runs)."""
        cols = {k: np.concatenate([getattr(p, k) for p in parts]) for k in CSV_COLUMNS}
        return Observations(**cols, source=[s for p in parts for s in p.source])

    def take(self, idx: np.ndarray) -> Observations:
        """The rows ``idx`` (bootstrap resamples)."""
        cols = {k: getattr(self, k)[idx] for k in CSV_COLUMNS}
        return Observations(**cols, source=[self.source[i] for i in idx] if self.source else [])


@dataclasses.dataclass
class ScalingFit:
    """Fitted coefficients in raw units (N in parameters, D in tokens) with bootstrap standard deviations."""

    coefficients: dict[str, float]
    stderr: dict[str, float]
    r2: float  # of the loss itself (not its log) over the fitted observations
    objective: float  # mean Huber loss of log residuals at the optimum
    n_obs: int
    n_bootstrap: int
    seed: int
    theta: list[float]  # optimiser parameters (log-space, internal units); warm starts and exact reproduction

    def to_dict(self) -> dict:
        """JSON-ready form."""
        return dataclasses.asdict(self)


@dataclasses.dataclass
class Allocation:
    """Best (R, P) for a compute budget, with the model size and tokens that realise it."""

    R: float
    P: float
    N: float
    D: float
    loss: float
    budget: float
    table: list[dict[str, float]]  # per (R, P): the best N, D and predicted loss


def _check_value(name: str, value: float, where: str) -> None:
    ok = (
        math.isfinite(value)
        and {
            "N": value > 0,
            "D": value > 0,
            "R": value >= 1,
            "P": 0 < value < 1,
            "loss": value > 0,
        }[name]
    )
    if not ok:
        rule = {"N": "> 0", "D": "> 0", "R": ">= 1", "P": "in (0, 1)", "loss": "> 0"}[name]
        raise ValueError(f"{where}: {name}={value!r} must be finite and {rule}")


def read_csv(path: str | Path) -> Observations:
    """Observations from a CSV with header ``N,D,R,P,loss`` (any order, extra columns ignored)."""
    path = Path(path)
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        header = reader.fieldnames or []
        missing = [c for c in CSV_COLUMNS if c not in header]
        if missing:
            raise ValueError(f"{path}: missing column(s) {', '.join(missing)}; need {', '.join(CSV_COLUMNS)}")
        rows: dict[str, list[float]] = {c: [] for c in CSV_COLUMNS}
        sources = []
        # Row numbers are file lines (header is line 1) so an editor jumps straight to the bad one.
        for line, row in enumerate(reader, start=2):
            where = f"{path}:{line}"
            for c in CSV_COLUMNS:
                text = (row.get(c) or "").strip()
                try:
                    value = float(text)
                except ValueError:
                    raise ValueError(f"{where}: column {c} has non-numeric value {text!r}") from None
                _check_value(c, value, where)
                rows[c].append(value)
            sources.append(where)
    if not sources:
        raise ValueError(f"{path}: no observations")
    return Observations(**{c: np.asarray(v, dtype=np.float64) for c, v in rows.items()}, source=sources)


def _read_sidecar(run_dir: Path) -> dict:
    path = run_dir / "scaling.json"
    if not path.is_file():
        raise ValueError(f"{run_dir}: no scaling.json sidecar (keys {', '.join(SIDECAR_KEYS)})")
    meta = json.loads(path.read_text())
    unknown = [k for k in meta if k not in SIDECAR_KEYS]
    if unknown:
        raise ValueError(f"{path}: unknown key(s) {', '.join(unknown)}; allowed {', '.join(SIDECAR_KEYS)}")
    missing = [k for k, required in SIDECAR_KEYS.items() if required and k not in meta]
    if missing:
        raise ValueError(f"{path}: missing key(s) {', '.join(missing)}")
    for k in ("N", "R", "P"):
        _check_value(k, float(meta[k]), str(path))
    if not float(meta["tokens_per_step"]) > 0:
        raise ValueError(f"{path}: tokens_per_step={meta['tokens_per_step']!r} must be > 0")
    return meta


def read_runs(run_dirs: Sequence[str | Path]) -> Observations:
    """Observations from TensorBoard runs: ``scaling.json`` gives N, R, P, tokens per step; events give the loss."""
    parts = []
    for run in map(Path, run_dirs):
        meta = _read_sidecar(run)
        tag = meta.get("tag", "val/loss")
        # A resumed run logs some steps twice; the later event file wins (read_scalars merges in file order).
        points = read_scalars(run, [tag]).get(tag, {})
        points = {s: v for s, v in points.items() if s > 0}  # step 0 is D = 0, before any training
        if not points:
            raise ValueError(f"{run}: no '{tag}' scalars at step > 0 in {len(event_files(run))} event file(s)")
        steps = np.asarray(sorted(points), dtype=np.float64)
        loss = np.asarray([points[int(s)] for s in steps], dtype=np.float64)
        for s, v in zip(steps, loss, strict=True):
            _check_value("loss", float(v), f"{run} step {int(s)}")
        n = len(steps)
        parts.append(
            Observations(
                N=np.full(n, float(meta["N"])),
                D=steps * float(meta["tokens_per_step"]),
                R=np.full(n, float(meta["R"])),
                P=np.full(n, float(meta["P"])),
                loss=loss,
                source=[f"{run} step {int(s)}" for s in steps],
            )
        )
    return Observations.concat(parts)


def _law_torch(theta: torch.Tensor, n: torch.Tensor, d: torch.Tensor, r: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """Eq. 22 in internal units (n, d in billions) from log-space parameters ``theta``."""
    le0, la_t, lt_t, ld1, la_c, lt_c, ld2, gamma, la_d, lt_d, lal = theta.unbind(-1)
    tok = torch.exp(la_t - ld1.exp() * torch.log(n * (1 - p) + lt_t.exp()))
    con = torch.exp(la_c + gamma * torch.log(r) - ld2.exp() * torch.log(n * p + lt_c.exp()))
    dat = torch.exp(la_d - lal.exp() * torch.log(d + lt_d.exp()))
    return le0.exp() + tok + con + dat


def _tensors(obs: Observations) -> tuple[torch.Tensor, ...]:
    f = lambda a: torch.as_tensor(a, dtype=torch.float64)  # noqa: E731
    return f(obs.N / N_SCALE), f(obs.D / D_SCALE), f(obs.R), f(obs.P), f(obs.loss)


def _huber(x: torch.Tensor, delta: float) -> torch.Tensor:
    a = x.abs()
    return torch.where(a <= delta, 0.5 * x * x, delta * (a - 0.5 * delta))


def _minimise(theta0: torch.Tensor, data: tuple[torch.Tensor, ...], delta: float, max_iter: int) -> tuple:
    n, d, r, p, loss = data
    log_loss = loss.log()
    theta = theta0.clone().requires_grad_(True)
    opt = torch.optim.LBFGS(
        [theta],
        lr=1.0,
        max_iter=max_iter,
        history_size=50,
        tolerance_grad=1e-14,
        tolerance_change=1e-16,
        line_search_fn="strong_wolfe",
    )

    def objective() -> torch.Tensor:
        opt.zero_grad()
        # Divided by delta² so the objective stays O(residual²/δ²) and L-BFGS tolerances mean the same for any δ.
        value = _huber(torch.log(_law_torch(theta, n, d, r, p)) - log_loss, delta).mean() / delta**2
        if not torch.isfinite(value):
            # A step into overflow: a huge value with zero gradient makes the line search back off.
            value = 0.0 * theta.sum() + 1e30
        value.backward()
        return value

    opt.step(objective)
    with torch.no_grad():
        value = _huber(torch.log(_law_torch(theta, n, d, r, p)) - log_loss, delta).mean().item()
    return theta.detach(), value if math.isfinite(value) else math.inf


def _initial_grid(obs: Observations) -> list[torch.Tensor]:
    """Deterministic restarts: low/high model exponent (δ1 = δ2), low/high data exponent α, γ ∈ {0, 0.3}.

    Eight starts; on the paper's grid every one of them reaches the same optimum for noise-free data, so more
    would only cost time (each is ~0.3 s on a CPU).
    """
    e0 = 0.5 * float(obs.loss.min())
    starts = []
    for delta, alpha, gamma in itertools.product((0.2, 0.6), (0.2, 0.6), (0.0, 0.3)):
        vals = [math.log(e0), 0.0, math.log(0.1), math.log(delta), 0.0, math.log(0.1), math.log(delta), gamma]
        vals += [0.0, math.log(0.1), math.log(alpha)]
        starts.append(torch.tensor(vals, dtype=torch.float64))
    return starts


def _raw_coefficients(theta: torch.Tensor) -> dict[str, float]:
    """Internal log-space parameters → raw-unit coefficients: A/(n+t)^δ = A·S^δ/(N + t·S)^δ for n = N/S."""
    v = dict(zip(PARAM_NAMES, theta.tolist(), strict=True))
    c = {k: (v[k] if k == "gamma" else math.exp(v[k])) for k in PARAM_NAMES}
    c["A_tok"] *= N_SCALE ** c["delta1"]
    c["A_con"] *= N_SCALE ** c["delta2"]
    c["A_data"] *= D_SCALE ** c["alpha"]
    c["t_tok"] *= N_SCALE
    c["t_con"] *= N_SCALE
    c["t_data"] *= D_SCALE
    return c


def fit_scaling_law(
    obs: Observations,
    n_bootstrap: int = 100,
    seed: int = 0,
    huber_delta: float = 1e-3,
    max_iter: int = 500,
) -> ScalingFit:
    """Fit Eq. 22 to ``obs``; ± from ``n_bootstrap`` resamples of the rows (0 disables them, stderr is NaN)."""
    if len(obs) < len(PARAM_NAMES):
        raise ValueError(f"{len(obs)} observations cannot determine {len(PARAM_NAMES)} coefficients")
    data = _tensors(obs)
    best_theta, best_value = None, math.inf
    for start in _initial_grid(obs):
        theta, value = _minimise(start, data, huber_delta, max_iter)
        if value < best_value:
            best_theta, best_value = theta, value
    if best_theta is None:
        raise RuntimeError("every restart diverged; check the observations")

    coefficients = _raw_coefficients(best_theta)
    rng = np.random.default_rng(seed)
    samples = []
    for _ in range(n_bootstrap):
        idx = rng.integers(0, len(obs), size=len(obs))
        theta, value = _minimise(best_theta, _tensors(obs.take(idx)), huber_delta, max_iter)
        if math.isfinite(value):
            samples.append(_raw_coefficients(theta))
    spread = (lambda k: float(np.std([s[k] for s in samples], ddof=1))) if len(samples) > 1 else (lambda k: math.nan)
    stderr = {k: spread(k) for k in PARAM_NAMES}

    pred = predict_coefficients(coefficients, obs.N, obs.D, obs.R, obs.P)
    ss_res = float(np.sum((obs.loss - pred) ** 2))
    ss_tot = float(np.sum((obs.loss - obs.loss.mean()) ** 2))
    r2 = 1.0 - ss_res / ss_tot if ss_tot > 0 else math.nan
    return ScalingFit(coefficients, stderr, r2, best_value, len(obs), n_bootstrap, seed, best_theta.tolist())


def predict_coefficients(c: dict[str, float], N: ArrayLike, D: ArrayLike, R: ArrayLike, P: ArrayLike) -> np.ndarray:
    """Eq. 22 with raw-unit coefficients ``c``; arguments broadcast as numpy arrays."""
    N, D, R, P = (np.asarray(x, dtype=np.float64) for x in (N, D, R, P))
    tok = c["A_tok"] / (N * (1 - P) + c["t_tok"]) ** c["delta1"]
    con = c["A_con"] * R ** c["gamma"] / (N * P + c["t_con"]) ** c["delta2"]
    dat = c["A_data"] / (D + c["t_data"]) ** c["alpha"]
    return c["E0"] + tok + con + dat


def predict(fit: ScalingFit, N: ArrayLike, D: ArrayLike, R: ArrayLike, P: ArrayLike) -> np.ndarray:
    """Predicted loss at (N parameters, D tokens, ratio R, backbone fraction P); numpy broadcasting."""
    return predict_coefficients(fit.coefficients, N, D, R, P)


def train_flops(N: ArrayLike, D: ArrayLike, R: ArrayLike, P: ArrayLike) -> np.ndarray:
    """Training compute C = 6 · N_eff · D with N_eff = N(1−P) + N·P/R.

    The token-level stacks (encoder, decoder: N(1−P) parameters) run once per token; the concept backbone (N·P)
    runs once per concept, i.e. once per R tokens. 6 = 2 FLOPs per multiply-add × (forward + 2× backward).
    Attention, embeddings and the cross-attention's context length are ignored: a parameter-count model, like
    Chinchilla's C ≈ 6ND, meant for comparing allocations, not for wall-clock estimates (see dlcm.model.flops).
    """
    N, D, R, P = (np.asarray(x, dtype=np.float64) for x in (N, D, R, P))
    return 6.0 * (N * (1 - P) + N * P / R) * D


def best_allocation(
    fit: ScalingFit,
    compute_budget: float,
    ratios: Sequence[float] = (2, 4, 8),
    fractions: Sequence[float] = tuple(np.round(np.arange(0.1, 0.91, 0.05), 2)),
    n_params: float | None = None,
    n_grid: Sequence[float] | None = None,
) -> Allocation:
    """The (R, P) on the grid with the lowest predicted loss when spending ``compute_budget`` FLOPs.

    For each (R, P) the budget fixes D = C / (6 · N_eff) (:func:`train_flops`). With ``n_params`` the model size
    is fixed; otherwise N is chosen from ``n_grid`` (default 10⁷…10¹² parameters, 241 log-spaced points), so each
    cell is that (R, P)'s compute-optimal model. Ties go to the first grid point.
    """
    if not compute_budget > 0:
        raise ValueError(f"compute_budget={compute_budget!r} must be > 0")
    if n_params is not None:
        sizes = np.asarray([n_params], dtype=np.float64)
    else:
        sizes = np.asarray(np.logspace(7, 12, 241) if n_grid is None else n_grid, dtype=np.float64)
    table = []
    for r in ratios:
        for p in fractions:
            d = compute_budget / train_flops(sizes, 1.0, r, p)
            loss = predict(fit, sizes, d, r, p)
            i = int(np.argmin(loss))
            table.append({"R": float(r), "P": float(p), "N": float(sizes[i]), "D": float(d[i]), "loss": float(loss[i])})
    best = min(table, key=lambda row: row["loss"])
    return Allocation(best["R"], best["P"], best["N"], best["D"], best["loss"], float(compute_budget), table)
