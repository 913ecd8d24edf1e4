"""Decoupled μP (paper Eqs. 18–21, docs/design.md): the optimizer side, i.e. the parameter-group rules.

The init σ (``mup_std``) and the logit multiplier ``1/s_token`` live in the model (``reset_parameters`` and
``LMHead``) because they must survive meta-device materialisation. What the model cannot own is the optimizer side:
per-group Adam learning rates and ε, which live here beside :mod:`dlcm.train.optim`. :func:`mup_rules` turns a
model config and the μP settings into :class:`MuPRules`: a group function for the LightningModule's
``param_groups_fn`` (called by ``configure_optimizers``), a check of the optimizer it produced and the group table
for TensorBoard. The callback :class:`dlcm.callbacks.mup.DecoupledMuP` is how a recipe switches them on; without it
training uses ``dlcm.train.optim.default_param_groups``.

Groups, with ``s_token = d_token/d_base`` and ``s_concept = d_concept/d_base``:

    group           members                                                 Adam lr               ε            wd
    token_hidden    encoder/decoder/baseline matrices, parser W_q/W_k,      lr_token/s_token      ε/s_token    wd
                    pooling W_up, Ψ W_Q/W_O, Ψ's SwiGLU (fan-in d_token)
    concept_hidden  backbone matrices, Ψ W_K/W_V (fan-in d_concept)         lr_concept/s_concept  ε/s_concept  wd
    embeddings      token embedding table                                   lr_others             ε            wd
    norms           RMSNorm gains, Ψ null concept                           lr_others             ε            0
    readout         LM head                                                 lr_readout            ε/s_token    wd

Choices the paper leaves open, decided here:

- **Readout LR is width-independent** (``lr_readout``, default ``lr_token``). The head already multiplies its logits
  by ``1/s_token`` (Eq. 21), so an Adam step of fixed size η on every weight moves the logits by
  ``η·d_token/s_token = η·d_base``: width-independent. Dividing the LR by ``s_token`` as well would count the width
  twice and freeze the readout in wide models (the microsoft/mup ``MuReadout`` convention is the same: output
  multiplier, vector-like LR). At ``s_token = 1`` the head trains at the token rate, which is what the proxy tunes.
- **Readout ε is ε/s_token**: the multiplier scales the head's gradient by ``1/s_token``, so ε must follow or it
  would start to dominate Adam's denominator at large width.
- **Embeddings and norms are width-independent in everything** (lr_others, unscaled ε): the paper's "others"
  keep a fixed η; their inits are fixed too (σ_base, ones). The norm group mixes token and concept widths, so no
  single ``1/s`` would fit it; with ε = 1e-8 far below their gradient RMS the choice does not matter in practice.
- **Weight decay**: matrices (hidden, readout) and the embedding table decay with ``weight_decay`` — the same
  classes ``default_param_groups`` decays, so switching μP on changes only what μP prescribes. Norm gains and the
  null concept do not (decay would pull gains towards 0 rather than their init 1). The value is not rescaled
  with width: ``torch.optim.AdamW`` shrinks by ``lr·wd`` per step, and AdamW's equilibrium weight RMS
  ≈ ``sqrt(lr/(2·wd))`` then scales as ``1/sqrt(s)``, like the μP init σ (microsoft/mup's ``decoupled_wd=True``;
  its default ``wd × s`` keeps ``lr·wd`` fixed and would pull hidden weights to ``1/s``). ``group_weight_decay``
  overrides any group's value.

Rules match parameter *names* (FSDP2 keeps FQNs; Parameter attributes would be lost), after removing wrapper
segments that ``torch.compile`` and activation checkpointing insert. The first matching rule wins; a parameter no
rule matches is an error, so a new module cannot silently land in a wrong group.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fnmatch import fnmatchcase

import torch
from torch import nn

from dlcm.model.config import BaselineConfig, DLCMConfig, require
from dlcm.model.linear import Embedding, Linear
from dlcm.model.norm import RMSNorm
from dlcm.train.optim import OptimizerConfig

GROUPS = ("token_hidden", "concept_hidden", "embeddings", "norms", "readout")
# Wrapper segments in parameter names: torch.compile (OptimizedModule), activation checkpointing
# (CheckpointWrapper) and FSDP1 (FlatParameter wrapper with use_orig_params). FSDP2 inserts none.
WRAPPER_SEGMENTS = frozenset({"_orig_mod", "_checkpoint_wrapped_module", "_fsdp_wrapped_module"})


@dataclass(frozen=True)
class Rule:
    """``pattern`` (``fnmatch``, whole canonical name) assigns a parameter to ``group``."""

    pattern: str
    group: str


# Ordered: first match wins. Norm gains come first because they sit inside every stack.
RULES: tuple[Rule, ...] = (
    Rule("*norm.weight", "norms"),  # stack pre-norms and final norms, Ψ q/k/ffn norms
    Rule("cross.null_concept", "norms"),  # a learned vector, fixed σ_base init
    Rule("embed.weight", "embeddings"),
    Rule("head.proj.weight", "readout"),
    Rule("backbone.*", "concept_hidden"),
    Rule("cross.wk.weight", "concept_hidden"),  # bridge, fan-in d_concept
    Rule("cross.wv.weight", "concept_hidden"),  # bridge, fan-in d_concept
    Rule("encoder.*", "token_hidden"),
    Rule("decoder.*", "token_hidden"),
    Rule("stack.*", "token_hidden"),  # the dense baseline's single stack
    Rule("parser.wq.weight", "token_hidden"),  # router, fan-in d_token
    Rule("parser.wk.weight", "token_hidden"),
    Rule("pooling.w_up.weight", "token_hidden"),  # bridge, fan-in d_token (σ uses s_token too)
    Rule("cross.wq.weight", "token_hidden"),  # bridge, fan-in d_token
    Rule("cross.wo.weight", "token_hidden"),  # bridge, fan-in N·H = d_token
    Rule("cross.ffn.*", "token_hidden"),  # Ψ's SwiGLU runs on the token stream
)
# Expected tensor rank per group: a vector in a matrix group means a rule caught something it was not written for.
GROUP_NDIM = {"token_hidden": 2, "concept_hidden": 2, "embeddings": 2, "norms": 1, "readout": 2}


def canonical_name(name: str) -> str:
    """``name`` without wrapper segments: ``encoder._checkpoint_wrapped_module.layers.0…`` → ``encoder.layers.0…``."""
    return ".".join(part for part in name.split(".") if part not in WRAPPER_SEGMENTS)


def group_of(name: str) -> str:
    """Group of the parameter called ``name`` (raw or canonical) under :data:`RULES`."""
    canonical = canonical_name(name)
    for rule in RULES:
        if fnmatchcase(canonical, rule.pattern):
            return rule.group
    raise ValueError(
        f"μP: no rule matches parameter {name!r} (canonical {canonical!r}); add one to RULES in "
        "dlcm/train/mup.py so it gets a deliberate learning rate, ε and weight decay"
    )


@dataclass(frozen=True)
class GroupHParams:
    """Optimizer hyper-parameters of one named group (the values at schedule multiplier 1)."""

    lr: float
    eps: float
    weight_decay: float


@dataclass(frozen=True)
class WidthMultipliers:
    """``s = width / d_base`` per stream; ``s_concept`` is ``None`` for the dense baseline."""

    d_base: int
    d_token: int
    d_concept: int | None

    @property
    def s_token(self) -> float:
        return self.d_token / self.d_base

    @property
    def s_concept(self) -> float | None:
        return None if self.d_concept is None else self.d_concept / self.d_base


def width_multipliers(config: DLCMConfig | BaselineConfig, d_base: int) -> WidthMultipliers:
    """Read the stream widths from a model config, requiring its ``d_base`` (init σ, logit scale) to be ours."""
    if config.d_base != d_base:
        raise ValueError(
            f"μP d_base mismatch: DecoupledMuP(d_base={d_base}) but the model config has d_base={config.d_base}. "
            "The init σ (mup_std) and the logit multiplier are built from the model's d_base and the learning "
            f"rates from the callback's; set model.init_args.config.d_base={d_base} (or the callback's d_base to "
            "the model's)"
        )
    d_concept = config.d_concept if isinstance(config, DLCMConfig) else None
    return WidthMultipliers(d_base, config.d_token, d_concept)


@dataclass(frozen=True)
class MuPParamGroups:
    """``param_groups_fn`` for ``LanguageModelModule``: named AdamW groups from :data:`RULES` and a group table."""

    table: dict[str, GroupHParams]

    def __call__(self, network: nn.Module, optimizer_cfg: OptimizerConfig | None = None) -> list[dict]:
        # optimizer_cfg.lr/eps/weight_decay are superseded by the table; betas still come from it (build_optimizer).
        members: dict[str, list[nn.Parameter]] = {name: [] for name in self.table}
        for name, p in network.named_parameters():
            if not p.requires_grad:
                continue
            group = group_of(name)
            if group not in self.table:
                raise ValueError(f"μP: parameter {name!r} falls in group {group!r}, which this model has no width for")
            if p.ndim != GROUP_NDIM[group]:
                raise ValueError(
                    f"μP: parameter {name!r} has {p.ndim} dims but group {group!r} holds {GROUP_NDIM[group]}-dim "
                    "tensors; a rule in RULES matches more than it should"
                )
            members[group].append(p)
        return [
            {"name": name, "params": params, **vars(self.table[name])} for name, params in members.items() if params
        ]


@dataclass(frozen=True)
class MuPSettings:
    """What a recipe sets for decoupled μP: the arguments of :class:`dlcm.callbacks.mup.DecoupledMuP`, which
    documents each one (rates and ε at width ``d_base``)."""

    d_base: int
    lr_token: float
    lr_concept: float
    lr_others: float
    lr_readout: float | None = None
    eps: float = 1e-8
    weight_decay: float = 0.1
    group_weight_decay: dict[str, float] | None = None


def group_table(widths: WidthMultipliers, settings: MuPSettings) -> dict[str, GroupHParams]:
    """Per-group lr, ε and weight decay (Eqs. 19–20; the readout/others choices of the module docstring)."""
    group_weight_decay = settings.group_weight_decay or {}
    for key, value in group_weight_decay.items():
        require(key in GROUPS, "DecoupledMuP.group_weight_decay", key, f"a group name: {', '.join(GROUPS)}")
        require(value >= 0, f"DecoupledMuP.group_weight_decay[{key!r}]", value, "a number >= 0")
    lr_token, lr_concept, lr_others, eps = settings.lr_token, settings.lr_concept, settings.lr_others, settings.eps
    lr_readout, weight_decay = settings.lr_readout, settings.weight_decay
    s_tok, s_cpt = widths.s_token, widths.s_concept
    wd = {name: 0.0 if name == "norms" else weight_decay for name in GROUPS} | group_weight_decay
    table = {
        "token_hidden": GroupHParams(lr_token / s_tok, eps / s_tok, wd["token_hidden"]),
        "embeddings": GroupHParams(lr_others, eps, wd["embeddings"]),
        "norms": GroupHParams(lr_others, eps, wd["norms"]),
        "readout": GroupHParams(lr_token if lr_readout is None else lr_readout, eps / s_tok, wd["readout"]),
    }
    if s_cpt is not None:
        table["concept_hidden"] = GroupHParams(lr_concept / s_cpt, eps / s_cpt, wd["concept_hidden"])
    return {name: table[name] for name in GROUPS if name in table}


def check_optimizer_groups(
    optimizer: torch.optim.Optimizer, network: nn.Module, table: dict[str, GroupHParams], when: str = ""
) -> None:
    """Raise ``ValueError`` unless ``optimizer`` holds every trainable parameter of ``network`` exactly once, in
    the group its name's rule gives, with that group's lr, ε and weight decay.

    ``LambdaLR`` stores the base rate as ``initial_lr`` and scales ``lr`` by the step-0 multiplier at construction;
    base rates are compared through ``initial_lr``, and ``lr/initial_lr`` must be one multiplier for all groups
    (relative schedules keep the μP ratios).
    """
    names = {id(p): name for name, p in network.named_parameters() if p.requires_grad}
    problems: list[str] = []
    seen: dict[int, str] = {}
    multipliers: dict[str, float] = {}
    for group in optimizer.param_groups:
        label = group.get("name")
        if label not in table:
            problems.append(f"optimizer group {label!r} is not a μP group (expected one of {', '.join(table)})")
            continue
        want = table[label]
        base_lr = group.get("initial_lr", group["lr"])
        for key, got, expected in (
            ("lr", base_lr, want.lr),
            ("eps", group["eps"], want.eps),
            ("weight_decay", group["weight_decay"], want.weight_decay),
        ):
            if not math.isclose(got, expected, rel_tol=1e-9, abs_tol=0.0):
                problems.append(f"group {label!r}: {key}={got!r}, the rule gives {expected!r}")
        if base_lr > 0:
            multipliers[label] = group["lr"] / base_lr
        for p in group["params"]:
            name = names.get(id(p))
            if name is None:
                problems.append(
                    f"group {label!r} holds a tensor of shape {tuple(p.shape)} that is not a trainable "
                    "parameter of the network"
                )
            elif id(p) in seen:
                problems.append(f"{name!r} is in group {seen[id(p)]!r} and again in {label!r}")
            elif group_of(name) != label:
                problems.append(f"{name!r} is in group {label!r}, the rules put it in {group_of(name)!r}")
            seen.setdefault(id(p), label)
    problems += [f"{name!r} is in no optimizer group" for pid, name in names.items() if pid not in seen]
    if multipliers and not math.isclose(max(multipliers.values()), min(multipliers.values()), rel_tol=1e-9):
        problems.append(f"groups run different schedule multipliers {multipliers}: schedules must be relative")
    if problems:
        shown = "\n  ".join(problems[:12]) + (f"\n  … and {len(problems) - 12} more" if len(problems) > 12 else "")
        raise ValueError(f"μP: the optimizer's parameter groups{when} do not follow the rules:\n  {shown}")


def init_description(network: nn.Module, name: str) -> str:
    """How the parameter ``name`` was initialised, read from its owning module (``Linear.std`` etc.)."""
    owner_path, _, attr = name.rpartition(".")
    owner = network.get_submodule(owner_path) if owner_path else network
    if isinstance(owner, Linear):
        return "identity" if owner.identity_init else f"{owner.std:.4g}"
    if isinstance(owner, Embedding):
        return f"{owner.std:.4g}"
    if isinstance(owner, RMSNorm):
        return "ones"
    null_std = getattr(owner, "null_std", None)
    if attr == "null_concept" and null_std is not None:
        return f"{null_std:.4g}"
    return "?"


def format_group_table(optimizer: torch.optim.Optimizer, network: nn.Module, widths: WidthMultipliers) -> str:
    """Markdown table (TensorBoard renders it): group, tensors, parameters, base lr, ε, weight decay, init σ."""
    names = {id(p): name for name, p in network.named_parameters()}
    s_cpt = "–" if widths.s_concept is None else f"{widths.s_concept:g} (d_concept {widths.d_concept})"
    lines = [
        f"Decoupled μP, d_base {widths.d_base}: s_token {widths.s_token:g} (d_token {widths.d_token}), "
        f"s_concept {s_cpt}; logits × 1/s_token = {1 / widths.s_token:.4g}.",
        "",
        "| group | tensors | parameters | lr | ε | weight decay | init σ |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for group in optimizer.param_groups:
        params = group["params"]
        sigmas = sorted({init_description(network, names[id(p)]) for p in params if id(p) in names})
        lines.append(
            f"| {group.get('name')} | {len(params)} | {sum(p.numel() for p in params):,} | "
            f"{group.get('initial_lr', group['lr']):.4g} | {group['eps']:.4g} | {group['weight_decay']:g} | "
            f"{', '.join(sigmas)} |"
        )
    return "\n".join(lines)


@dataclass(frozen=True)
class MuPRules:
    """The μP optimizer side for one model: its width multipliers and group table, the ``param_groups_fn`` built
    from them, the check of an optimizer against them and the table as text."""

    widths: WidthMultipliers
    table: dict[str, GroupHParams]

    @property
    def param_groups(self) -> MuPParamGroups:
        return MuPParamGroups(self.table)

    def check(self, optimizer: torch.optim.Optimizer, network: nn.Module, when: str = "") -> None:
        check_optimizer_groups(optimizer, network, self.table, when)

    def describe(self, optimizer: torch.optim.Optimizer, network: nn.Module) -> str:
        return format_group_table(optimizer, network, self.widths)


def mup_rules(config: DLCMConfig | BaselineConfig, settings: MuPSettings) -> MuPRules:
    """The rules for ``config`` under ``settings``."""
    widths = width_multipliers(config, settings.d_base)
    return MuPRules(widths, group_table(widths, settings))
