"""FSDP2 on CPU: two real gloo processes through Lightning's ModelParallelStrategy and dlcm's configure_model.

One spawn runs, on each rank: a network-level check (meta-device build → checkpointing → ``fully_shard`` →
materialisation; one rank with a single concept), then three ``fit``s through the real CLI: the micro-batch-scope
run with full activation checkpointing, compared with one process on the union batch (as in
``test_distributed``); a global-scope run whose network is built on the meta device and which saves sharded
checkpoints; and its resumption from the step-2 checkpoint. Rank 0 finally runs the memory benchmark's
measurement in a world of one. The parent process consolidates the sharded checkpoint and validates it on one
device.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor

from bench.fsdp_memory import measure
from dlcm.cli import main
from dlcm.model.presets import build_model, tiny_dlcm
from dlcm.train.checkpoint_io import AtomicModelParallelStrategy, require_sharded_checkpoint
from dlcm.train.cli import run_cli
from dlcm.train.consolidate import consolidate
from dlcm.train.execution import ExecutionConfig, apply_execution, data_parallel_mesh
from dlcm.train.materialize import materialize
from tests.model.test_ratio_loss import run_bounded
from tests.train.test_distributed import RECIPE, STEPS, Record, args, run_single_reference

WORLD = 2
FSDP = [
    "--trainer.strategy=dlcm.train.checkpoint_io.AtomicModelParallelStrategy",
    f"--trainer.strategy.data_parallel_size={WORLD}",
    "--trainer.strategy.tensor_parallel_size=1",
    f"--trainer.devices={WORLD}",
    "--model.init_args.execution.fsdp_param_dtype=float32",  # fp32 compute: comparable with one process
]
SHARDED_CHECKPOINTS = [
    "--checkpoint.every_n_train_steps=2",
    "--checkpoint.save_top_k=-1",
    "--trainer.val_check_interval=2",
    "--trainer.limit_val_batches=2",  # validation under FSDP too: equal batch counts on every rank
]
VALIDATE = ["--data.tokens_per_batch=256", "--trainer.limit_val_batches=4", "--trainer.logger=false"]


def network_config():
    cfg = tiny_dlcm(vocab_size=257)  # 257 rows: embedding and head shard unevenly over two ranks
    return dataclasses.replace(
        cfg, parser=dataclasses.replace(cfg.parser, ratio_scope="batch", boundary_mode="threshold")
    )


def rank_batch(rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank 0: two random documents. Rank 1: one document of a repeated token, so one concept (p = 0 inside)."""
    if rank == 0:
        ids = torch.randint(0, 257, (64,), generator=torch.Generator().manual_seed(10))
        return ids, torch.tensor([0, 20, 64], dtype=torch.int32)
    return torch.full((64,), 7), torch.tensor([0, 64], dtype=torch.int32)


def network_loss(model: torch.nn.Module, rank: int) -> tuple[torch.Tensor, int]:
    out = model(*rank_batch(rank))
    return out.logits_TV.float().logsumexp(-1).mean() + out.aux_loss, out.layout.num_concepts


def check_sharded_network(rank: int, compile_blocks: bool = False) -> dict:
    """Meta build + full checkpointing (+ compile) + FSDP2 + materialisation vs an eager build, and gradients."""
    mesh = init_device_mesh("cpu", (WORLD, 1), mesh_dim_names=("data_parallel", "tensor_parallel"))
    torch.manual_seed(5)
    eager = build_model(network_config()).train()
    with torch.device("meta"):
        sharded = build_model(network_config()).train()
    execution = ExecutionConfig(
        activation_checkpointing="full", compile_blocks=compile_blocks, fsdp_param_dtype="float32"
    )
    apply_execution(sharded, execution, data_parallel_mesh(mesh))
    torch.manual_seed(5)
    materialize(sharded, "cpu")
    params = dict(sharded.named_parameters())
    init_mismatches = [n for n, p in eager.named_parameters() if not torch.equal(params[n].full_tensor(), p)]

    loss, concepts = network_loss(sharded, rank)
    loss.backward()  # FSDP2 averages the two ranks' gradients (reduce-scatter in fp32)
    reference = sum(network_loss(eager, r)[0] for r in range(WORLD)) / WORLD
    reference.backward()
    grad_error = max(
        ((params[n].grad.full_tensor() - p.grad).abs().max() / p.grad.abs().max().clamp(min=1e-12)).item()
        for n, p in eager.named_parameters()
    )
    try:
        data_parallel_mesh(init_device_mesh("cpu", (1, WORLD), mesh_dim_names=("data_parallel", "tensor_parallel")))
        tp_error = ""
    except ValueError as err:
        tp_error = str(err)
    return {"init_mismatches": init_mismatches, "concepts": concepts, "grad_error": grad_error, "tp_error": tp_error}


class RecordGrads(Record):
    """Also saves each optimizer step's (accumulated, unclipped) full gradients from rank 0."""

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        grads = {
            n: p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad.clone()
            for n, p in pl_module.network.named_parameters()
        }
        if trainer.global_rank == 0:
            torch.save(grads, self.out / f"grads-{trainer.global_step}.pt")


class RecordDraws(Record):
    """Also draws from the global torch generator each step (what dropout would consume), from a rank-specific
    seed, so a resumed run draws the same numbers only if every rank's generator state was restored."""

    def __init__(self, out: Path, reseed: bool) -> None:
        super().__init__(out)
        self.reseed = reseed
        self.draws: dict[int, float] = {}

    def on_train_start(self, trainer, pl_module) -> None:
        if self.reseed:
            torch.manual_seed(100 + trainer.global_rank)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.draws[trainer.global_step] = torch.rand(()).item()

    def on_train_end(self, trainer, pl_module) -> None:
        super().on_train_end(trainer, pl_module)
        (self.out / f"draws-{trainer.global_rank}.json").write_text(json.dumps(self.draws))


def fit(root: Path, scope: str, callback: Record, *extra: str, ckpt_path: str | None = None, meta: bool = False):
    cli = run_cli(args(root, scope, *FSDP, *extra), run=False)
    if meta:  # as a large model is built: nothing allocated until configure_model materialises the shards
        with torch.device("meta"):
            cli.model.network = build_model(cli.model.config)
    cli.trainer.callbacks.append(callback)
    cli.trainer.fit(cli.model, cli.datamodule, ckpt_path=ckpt_path)
    return cli


def step_checkpoint(root: Path, step: int) -> Path:
    (path,) = (root / "checkpoints").glob(f"step{step:07d}-*.ckpt")
    return path


def _worker(rank: int, tmp: str) -> None:
    """One rank of every multi-process scenario (spawned; results go to files)."""
    torch.set_num_threads(1)  # two ranks on a small CPU box: avoid oversubscription
    os.environ["LOCAL_RANK"] = str(rank)  # Lightning: processes are launched externally (as by torchrun)
    root = Path(tmp)
    dist.init_process_group("gloo", init_method=f"file://{root / 'rendezvous'}", rank=rank, world_size=WORLD)
    try:
        torch.save(check_sharded_network(rank), root / f"network-{rank}.pt")
        checkpointed = "--model.init_args.execution.activation_checkpointing=full"
        cli = fit(root / "equal", "batch", RecordGrads(root / "equal"), checkpointed)
        ratio_group = cli.model.network.ratio_loss.process_group
        (root / f"group-{rank}.json").write_text(
            json.dumps(ratio_group is data_parallel_mesh(cli.model.device_mesh).get_group())
        )
        fit(root / "global", "global", RecordDraws(root / "global", reseed=True), *SHARDED_CHECKPOINTS, meta=True)
        fit(
            root / "resume",
            "global",
            RecordDraws(root / "resume", reseed=False),
            *SHARDED_CHECKPOINTS,
            ckpt_path=str(step_checkpoint(root / "global", 2)),
            meta=True,
        )
    finally:
        dist.destroy_process_group()
    if rank == 0:  # the memory benchmark's measurement, on CPU in a world of one (Lightning starts its own group)
        torch.save(measure("tiny_dlcm", "full", 128, 64, 1, False, "float32"), root / "bench.pt")


def _compiled_worker(rank: int, tmp: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{Path(tmp) / 'rendezvous'}", rank=rank, world_size=WORLD)
    try:
        torch.save(check_sharded_network(rank, compile_blocks=True), Path(tmp) / f"compiled-{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_compiled_checkpointed_sharded_blocks_match_eager(tmp_path: Path) -> None:
    run_bounded(_compiled_worker, (str(tmp_path),), WORLD, timeout_s=900.0)
    for rank in range(WORLD):
        result = torch.load(tmp_path / f"compiled-{rank}.pt")
        assert result["init_mismatches"] == [] and result["grad_error"] < 1e-5


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not (dist.is_available() and dist.is_gloo_available()):
        pytest.skip("torch.distributed with gloo is not available")
    root = tmp_path_factory.mktemp("fsdp")
    for name in ("equal", "global", "resume", "single"):
        (root / name).mkdir()
    run_single_reference(root / "single", RecordGrads)  # first: it also builds the corpus cache the ranks then share
    run_bounded(_worker, (str(root),), WORLD, timeout_s=300.0)
    return root


def read_json(path: Path) -> dict | list:
    return json.loads(path.read_text())


def test_meta_build_materialises_to_the_eager_init_even_sharded(runs: Path) -> None:
    for rank in range(WORLD):
        result = torch.load(runs / f"network-{rank}.pt")
        assert result["init_mismatches"] == []  # exact: μP stds, identity router, uneven shards included


def test_every_rank_runs_every_module_with_one_concept_and_gradients_match(runs: Path) -> None:
    results = [torch.load(runs / f"network-{rank}.pt") for rank in range(WORLD)]
    assert results[1]["concepts"] == 1 and results[0]["concepts"] > 2  # no hang with a near-empty concept stream
    assert all(r["grad_error"] < 1e-5 for r in results)  # full checkpointing + FSDP2 = one process, fp32


def test_tensor_parallelism_is_rejected_with_the_recipe_key(runs: Path) -> None:
    message = torch.load(runs / "network-0.pt")["tp_error"]
    assert "trainer.strategy.tensor_parallel_size=2 is not allowed" in message


def test_fsdp2_ranks_equal_one_process_on_the_union_batch(runs: Path) -> None:
    # Losses: rank r's micro-batch of step k is the single process's micro-batch 2k + r (reported halved).
    single = read_json(runs / "single" / "losses-0.json")
    for rank in range(WORLD):
        losses = read_json(runs / "equal" / f"losses-{rank}.json")
        assert losses == pytest.approx([2 * single[2 * k + rank] for k in range(STEPS)], rel=1e-5)
    # Gradients of every step, gathered, against the accumulated ones. At init thresholding gives one concept per
    # document, so some cross-attention gradients are pure rounding noise: compare on the scale of the largest
    # gradient (Adam turns such noise into small weight differences, which is why weights are not compared).
    for step in range(STEPS):
        fsdp, reference = (
            torch.load(runs / "equal" / f"grads-{step}.pt"),
            torch.load(runs / "single" / f"grads-{step}.pt"),
        )
        scale = max(g.abs().max().item() for g in reference.values())
        assert scale > 0
        assert max((fsdp[n] - g).abs().max().item() for n, g in reference.items()) < 1e-5 * scale, step
    assert all(read_json(runs / f"group-{r}.json") for r in range(WORLD))  # F all-reduced over the mesh's DP group


def test_global_ratio_statistics_are_identical_on_every_rank(runs: Path) -> None:
    rates = [read_json(runs / "global" / f"rates-{r}.json") for r in range(WORLD)]
    assert len(rates[0]) == STEPS
    assert rates[0] == rates[1]


def test_meta_built_network_trains_from_the_eager_init_through_lightning(runs: Path) -> None:
    # The global-scope run built its network on the meta device; Lightning re-seeds before configure_model, which
    # materialised the shards. Its first micro-batch CE equals the eagerly built equal-run's on the same batch.
    for rank in range(WORLD):
        meta_ce = read_json(runs / "global" / f"ces-{rank}.json")[0]
        assert meta_ce == pytest.approx(read_json(runs / "equal" / f"ces-{rank}.json")[0], rel=1e-6), rank


def test_resume_from_a_sharded_checkpoint_reproduces_the_loss_curve_and_generators(runs: Path) -> None:
    for rank in range(WORLD):
        full = read_json(runs / "global" / f"losses-{rank}.json")
        resumed = read_json(runs / "resume" / f"losses-{rank}.json")
        assert len(full) == STEPS and resumed == pytest.approx(full[2:], rel=1e-6, abs=1e-7), rank
        full_draws = read_json(runs / "global" / f"draws-{rank}.json")
        resumed_draws = read_json(runs / "resume" / f"draws-{rank}.json")
        assert sorted(resumed_draws) == ["2", "3"]  # keyed by the global step the batch starts at
        assert resumed_draws == {step: full_draws[step] for step in resumed_draws}, rank
    assert read_json(runs / "global" / "draws-0.json") != read_json(runs / "global" / "draws-1.json")


def test_sharded_checkpoint_holds_optimizer_scheduler_data_position_and_generators(runs: Path) -> None:
    checkpoint = consolidate(step_checkpoint(runs / "global", 2))
    assert checkpoint["global_step"] == 2
    (adam,) = checkpoint["optimizer_states"]
    buffers = [k for k in checkpoint["state_dict"] if k.startswith("network.parser.threshold")]  # τ: no optimizer
    assert len(buffers) == 2
    assert int(checkpoint["state_dict"]["network.parser.threshold_updates"]) == 2  # one τ fold per optimizer step
    assert len(adam["state"]) == len(checkpoint["state_dict"]) - 2  # exp_avg/exp_avg_sq of every parameter
    assert all(float(s["step"]) == 2 for s in adam["state"].values())
    assert sum(s["exp_avg"].abs().sum() for s in adam["state"].values()) > 0
    assert checkpoint["lr_schedulers"][0]["last_epoch"] == 2
    position = checkpoint["PackedDataModule"]
    assert (position["epoch"], position["batches_done"], position["world_size"]) == (0, 2, WORLD)
    assert len(checkpoint["rng_states"]) == WORLD


def test_consolidated_checkpoint_has_the_sharded_weights_and_validates_on_one_device(runs: Path) -> None:
    last = runs / "global" / "checkpoints" / "last.ckpt"
    out, weights_file = runs / "consolidated.ckpt", runs / "consolidated.safetensors"
    assert main(["consolidate", str(last), str(out), "--safetensors", str(weights_file)]) == 0
    trained = torch.load(runs / "global" / "params-0.pt")
    checkpoint = torch.load(out, weights_only=False)
    assert checkpoint["global_step"] == STEPS
    weights = load_file(str(weights_file))
    assert sorted(weights) == sorted(trained)
    for name, value in trained.items():
        assert torch.equal(checkpoint["state_dict"][f"network.{name}"], value), name
        assert torch.equal(weights[name], value), name

    validated = run_cli(
        [
            "validate",
            f"--config={RECIPE}",
            *VALIDATE,
            f"--trainer.default_root_dir={runs}",
            f"--ckpt_path={out}",
            # The settings it was trained with (validate refuses a recipe that differs from its checkpoint).
            "--model.init_args.config.parser.boundary_mode=threshold",
            "--model.init_args.schedule.warmup_steps=0",
        ]
    )
    from_file = validated.trainer.callback_metrics["val/loss"].item()
    validated.model.network.load_state_dict(trained)  # the weights as the ranks held them, gathered
    expected = validated.trainer.validate(validated.model, validated.datamodule)[0]["val/loss"]
    assert from_file == pytest.approx(expected, rel=1e-6)

    # Optimizer states were re-keyed to torch.optim's format: training resumes from the file on one device.
    longer = [f"--trainer.max_steps={STEPS + 1}", "--extend_run=true"]
    longer.append(f"--model.init_args.schedule.total_steps={STEPS}")  # the checkpoint's schedule, extended
    resumed = run_cli(
        [*args(runs / "one_device", "global", *longer), "--data.resume_on_new_layout=true"], run=False
    )  # saved on 2 ranks
    resumed.trainer.fit(resumed.model, resumed.datamodule, ckpt_path=str(out))
    assert resumed.trainer.global_step == STEPS + 1


def test_sharded_checkpoint_loads_in_one_process_with_dlcm_load(runs: Path) -> None:
    from dlcm.infer.load import load, network_state

    sharded = step_checkpoint(runs / "global", 2)
    model = load(sharded)
    reference = build_model(model.config).eval()
    reference.load_state_dict(network_state(consolidate(sharded), sharded))
    ids_T, cu = rank_batch(0)
    with torch.no_grad():
        assert torch.equal(model.network(ids_T, cu).logits_TV, reference(ids_T, cu).logits_TV)
    assert model.record["global_step"] == 2


def test_missing_and_incomplete_checkpoint_directories_are_explained(runs: Path, capsys) -> None:
    with pytest.raises(FileNotFoundError, match=r"nowhere\.ckpt does not exist"):
        require_sharded_checkpoint(runs / "nowhere.ckpt")
    incomplete = runs / "incomplete.ckpt"
    incomplete.mkdir()
    (incomplete / "__0_0.distcp").write_bytes(b"")
    with pytest.raises(
        ValueError, match=r"incomplete\.ckpt is not a complete sharded checkpoint: \.metadata, meta\.pt"
    ):
        consolidate(incomplete)
    assert main(["consolidate", str(incomplete), str(runs / "x.ckpt")]) == 2
    assert "not a complete sharded checkpoint" in capsys.readouterr().err
    corrupt = runs / "corrupt.ckpt"
    source = runs / "global" / "checkpoints" / "last.ckpt"
    corrupt.mkdir()
    for file in source.iterdir():
        data = file.read_bytes()
        (corrupt / file.name).write_bytes(data[: len(data) // 2] if file.suffix == ".distcp" else data)
    with pytest.raises(ValueError, match=r"corrupt\.ckpt cannot be read"):
        consolidate(corrupt)


def test_memory_bench_measures_through_the_fsdp2_path(runs: Path) -> None:
    result = torch.load(runs / "bench.pt")
    assert result["activation_checkpointing"] == "full" and result["peak_rss_gib"] > 0
    assert len(result["losses"]) == 1 and all(map(math.isfinite, result["losses"]))


def test_fsdp2_fragment_composes_with_a_recipe() -> None:
    fragment = Path(RECIPE).parent / "fragments" / "strategy_fsdp2.yaml"
    cli = run_cli([f"--config={RECIPE}", f"--config={fragment}", "--trainer.logger=false"], run=False)
    strategy = cli.trainer.strategy
    assert isinstance(strategy, AtomicModelParallelStrategy)
    assert (strategy._data_parallel_size, strategy._tensor_parallel_size) == ("auto", 1)  # the launch decides
    assert cli.model.execution_cfg.fsdp_param_dtype == "bfloat16" and cli.model.execution_cfg.sharding == "full"
    assert cli.model.config.encoder.width == 128  # the recipe's own keys survive the overlay


def test_meta_build_materialises_to_the_eager_init_on_one_device() -> None:
    torch.manual_seed(3)
    eager = build_model(network_config())
    with torch.device("meta"):
        lazy = build_model(network_config())
    torch.manual_seed(3)
    materialize(lazy, "cpu")
    reference = dict(eager.named_parameters())
    for name, p in lazy.named_parameters():
        assert torch.equal(p, reference[name]), name  # children first = the eager build's RNG order
