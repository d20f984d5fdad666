"""Training: Ray Train + DeepSpeed ZeRO-2 on 2 CPU workers, resume equality, worker recovery,
stage initialisation, data plan, optimizer and configs."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from model.config import get_preset
from model.network import STIV
from stiv_core.config import ConfigError, load_config
from tests.helpers.runs import write_checkpoint
from training.checkpoint import (
    export_ema,
    latest_checkpoint,
    list_checkpoints,
    load_ema_model,
    load_encoders,
)
from training.config import TrainConfig
from training.data import plan_epoch, steps_per_epoch
from training.loop import initialise_from
from training.optim import EMA, AdaFactor, optimizer_state_bytes, warmup_constant
from training.plan import resolve_model_config, resolve_scaling
from training.prepare_config import PrepareConfig

PIPELINES = Path(__file__).resolve().parents[2] / "pipelines"


def _train_yaml(tmp_path: Path, db: str) -> str:
    path = tmp_path / "train.yaml"
    path.write_text(
        f"""
db: {db}
latents_table: latents
run_dir: {tmp_path / "runs" / "reference"}
max_steps: 6
model: {{preset: stiv-tiny}}
optimizer: {{warmup_steps: 2, lr: 1.0e-3}}
data: {{batch_size: 2}}
scaling: {{num_workers: 2, zero_stage: 2, max_failures: 2}}
log_every: 1
checkpoint_every: 2
ema_warmup: true
"""
    )
    return str(path)


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_ray_train_zero2_resume_and_worker_recovery(tmp_path, train_db, ray_cluster):
    """The training contract in three real Ray Train + DeepSpeed ZeRO-2 runs (2 CPU workers):
    (1) an uninterrupted 6-step run writes the run-directory layout, per-rank ZeRO shards and
    metrics; (2) a run whose rank 1 dies at step 3 is restarted by FailureConfig from the step-2
    checkpoint and (3) resumed with resume="require" from its step-4 checkpoint to step 6. Losses and
    final EMA weights must equal the uninterrupted run's exactly: data order, noise and
    optimizer state all survive a restart."""
    from training.train import run_train

    config = _train_yaml(tmp_path, train_db)
    reference = tmp_path / "runs" / "reference"
    interrupted = tmp_path / "runs" / "interrupted"
    summary = run_train(config)
    first = run_train(
        config,
        [f"run_dir={interrupted}", "max_steps=4", "debug_kill_rank=1", "debug_kill_at_step=2"],
    )
    resumed = run_train(config, [f"run_dir={interrupted}"], resume="require")

    assert (
        summary["steps"] == 6 and summary["num_workers"] == 2 and summary["cpus_per_worker"] == 0.5
    )
    assert (reference / "resolved_config.yaml").is_file()
    assert list((reference / "tensorboard").glob("events.out.tfevents.*"))
    metrics = _metrics(reference)
    assert [m["step"] for m in metrics] == [1, 2, 3, 4, 5, 6]
    for m in metrics:
        assert {"loss", "lr", "grad_norm", "samples_per_s", "tokens_per_s"} <= set(m)
        assert math.isfinite(m["loss"]) and m["samples_per_s"] > 0
    assert metrics[0]["lr"] == pytest.approx(
        1e-3
    )  # warm-up factor (0+1)/2 applied before step 1's update
    ckpt = latest_checkpoint(reference)
    shards = sorted(p.name for p in (ckpt / "ds" / "state").iterdir())
    assert "zero_pp_rank_0_mp_rank_00_optim_states.pt" in shards
    assert "zero_pp_rank_1_mp_rank_00_optim_states.pt" in shards
    assert [s for s, _ in list_checkpoints(reference)] == [2, 4, 6]

    assert (interrupted / ".killed_rank1_step2").exists()  # the worker really died once
    assert first["steps"] == 4 and resumed["resumed_from_step"] == 4 and resumed["steps"] == 6
    assert [m["loss"] for m in _metrics(interrupted)] == [m["loss"] for m in metrics]
    ema_a = load_file(str(ckpt / "ema.safetensors"))
    ema_b = load_file(str(latest_checkpoint(interrupted) / "ema.safetensors"))
    assert all(torch.equal(ema_a[k], ema_b[k]) for k in ema_a)

    # The consolidated EMA loads into a model, and an exported file reloads identically.
    model, model_cfg = load_ema_model(reference)
    exported = export_ema(reference, tmp_path / "model.safetensors")
    again, _ = load_ema_model(tmp_path / "model.safetensors")
    assert exported["step"] == 6 and model_cfg.in_channels == 12
    info, null = load_encoders(reference)
    info_file, null_file = load_encoders(tmp_path / "model.safetensors")
    assert info == info_file and info["encoder_kind"] == "pixel" and info["pixel_patch"] == 2
    assert all(torch.equal(a, b) for a, b in zip(null, null_file))
    assert null[0].shape == (48, 32) and int(null[1].sum()) == 2  # "" encodes as BOS + EOS
    assert all(
        torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values())
    )


def _budget_rank(rank: int, init_file: str, run_dir: str, results: str) -> None:
    """One of two gloo ranks logging step 1 under a spent (or no) time budget."""
    import torch.distributed as dist

    from training.loop import MetricLog, Place

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    # What MetricLog.log reads of the DeepSpeed engine and its schedule.
    trained = SimpleNamespace(
        engine=SimpleNamespace(get_global_grad_norm=lambda: 1.0),
        scheduler=SimpleNamespace(get_last_lr=lambda: [1e-3]),
    )
    stops = []
    for minutes in (1e-6, 0.0):
        cfg = load_config(
            TrainConfig, base={"db": run_dir, "run_dir": run_dir, "max_minutes": minutes}
        )
        log = MetricLog(cfg, get_preset("stiv-tiny"), Place(rank, 2, torch.device("cpu"), False), 0)
        time.sleep(0.01)
        stops.append(log.log(1, torch.tensor(1.0), trained, None))  # type: ignore[arg-type]
        log.close()
    Path(results, f"rank{rank}.json").write_text(json.dumps(stops))
    dist.destroy_process_group()


def test_spent_time_budget_stops_every_rank_at_the_same_step(tmp_path):
    """`max_minutes`: only rank 0's clock decides, and the metric line's all-reduce tells every
    rank, so all ranks stop at the same step instead of one waiting forever in a collective
    (real gloo, 2 processes). The loop's stop and its last checkpoint run end to end in
    test_tiny_pipelines.py."""
    import torch.multiprocessing as mp

    mp.spawn(
        _budget_rank,
        args=(str(tmp_path / "init"), str(tmp_path / "run"), str(tmp_path)),
        nprocs=2,
        join=True,
    )
    for rank in (0, 1):
        assert json.loads((tmp_path / f"rank{rank}.json").read_text()) == [True, False]


def test_stage_initialisation_modes(tmp_path):
    """Each init_from mode loads what the recipe says: t2v_from_t2i copies the T2I weights with
    the patch embedding inflated and temporal gates at zero (so a repeated-image video gives the
    image output), plain loads the parent exactly, both takes temporal attention from the second
    run; the child also inherits the parent's RoPE base so positions interpolate."""
    torch.manual_seed(0)
    meta = {"latent_channels": 4, "text_dim": 16, "text_len": 8}
    image_cfg = get_preset(
        "stiv-tiny", temporal_patch_size=1, temporal_attention=False, rope_base_grid=(2, 2)
    )
    image = STIV(image_cfg)
    for p in image.parameters():  # non-trivial weights (the final layer starts at zero)
        p.data.normal_(std=0.05)
    write_checkpoint(tmp_path / "t2i", image)
    cfg = load_config(
        TrainConfig,
        base={
            "db": "x",
            "run_dir": str(tmp_path / "t2v"),
            "model": {"preset": "stiv-tiny"},
            "init_from": {"run_dir": str(tmp_path / "t2i"), "mode": "t2v_from_t2i"},
        },
    )
    video_cfg = resolve_model_config(cfg, meta)
    assert video_cfg.rope_base_grid == (2, 2)  # inherited from the parent
    video = STIV(video_cfg)
    initialise_from(video, cfg.init_from)
    assert all(
        torch.count_nonzero(v) == 0
        for k, v in video.state_dict().items()
        if k.endswith("temporal.gate")
    )
    frame = torch.randn(1, 4, 1, 8, 8)
    args = (
        torch.tensor([0.3]),
        torch.randn(1, 8, 16),
        torch.ones(1, 8, dtype=torch.bool),
        torch.randn(1, 16),
        torch.rand(1, 7),
    )
    with torch.no_grad():
        out_image = image(frame, *args)
        out_video = video(frame.repeat(1, 1, 4, 1, 1), *args)
    torch.testing.assert_close(out_video, out_image.repeat(1, 1, 4, 1, 1), rtol=1e-4, atol=1e-5)

    write_checkpoint(tmp_path / "t2v", video)
    plain = load_config(
        TrainConfig,
        base={
            "db": "x",
            "run_dir": str(tmp_path / "ti2v"),
            "model": {"preset": "stiv-tiny"},
            "init_from": {"run_dir": str(tmp_path / "t2v"), "mode": "plain"},
        },
    )
    child = STIV(resolve_model_config(plain, meta))
    initialise_from(child, plain.init_from)
    assert all(torch.equal(child.state_dict()[k], v) for k, v in video.state_dict().items())

    other = STIV(video_cfg)
    for p in other.parameters():
        p.data.normal_(std=0.05)
    write_checkpoint(tmp_path / "t2v-other", other)
    both = load_config(
        TrainConfig,
        base={
            "db": "x",
            "run_dir": str(tmp_path / "both"),
            "model": {"preset": "stiv-tiny"},
            "init_from": {
                "run_dir": str(tmp_path / "t2v"),
                "mode": "both",
                "temporal_run_dir": str(tmp_path / "t2v-other"),
            },
        },
    )
    merged = STIV(resolve_model_config(both, meta))
    initialise_from(merged, both.init_from)
    for key, value in merged.state_dict().items():
        source = other if ".temporal." in f".{key}" else video
        assert torch.equal(value, source.state_dict()[key]), key


def test_plan_one_bucket_per_batch_equal_steps():
    """Every global batch holds one bucket and splits evenly over ranks, remainders are dropped,
    the plan is a pure function of (seed, epoch): a resumed run sees the same batches."""
    buckets = {"a": np.arange(0, 10), "b": np.arange(10, 17)}
    plan = plan_epoch(buckets, {"a": 2, "b": 3}, world_size=2, seed=1, epoch=0)
    assert len(plan) == steps_per_epoch(buckets, {"a": 2, "b": 3}, 2) == 2 + 1
    for key, rows in plan:
        assert len(rows) == {"a": 4, "b": 6}[key] and set(rows) <= set(buckets[key])
    assert len({int(r) for _, rows in plan for r in rows}) == 14  # no row twice in an epoch
    again = plan_epoch(buckets, {"a": 2, "b": 3}, world_size=2, seed=1, epoch=0)
    assert all(k1 == k2 and np.array_equal(r1, r2) for (k1, r1), (k2, r2) in zip(plan, again))
    other = plan_epoch(buckets, {"a": 2, "b": 3}, world_size=2, seed=1, epoch=1)
    assert any(not np.array_equal(r1, r2) for (_, r1), (_, r2) in zip(plan, other))


def test_rank_feed_reads_planned_batches_across_datasets_and_epochs(train_db, ray_cluster):
    """The Ray Data feed delivers, in step order, exactly the rows the plan gives each rank,
    stacked in one bucket's shape, across read windows, read tasks and epoch boundaries, and a
    feed started mid-way (resume) continues with identical batches."""
    from data_engine.store import Database
    from training.data import index_table, rank_feed

    db = Database(train_db)
    index = index_table(db.uri_for("latents"), None, "float32")
    sizes = {k: 2 for k in index.buckets}  # 2 buckets x 8 rows, world 2 -> 4 steps per epoch
    feeds = [
        list(rank_feed(index, sizes, 2, r, 7, 0, 6, prefetch=5, steps_per_fetch=2)) for r in (0, 1)
    ]
    for rank, feed in enumerate(feeds):
        assert [step for step, _ in feed] == list(range(6))
        for step, batch in feed:
            epoch, i = divmod(step, 4)
            key, rows = plan_epoch(index.buckets, sizes, 2, 7, epoch)[i]
            frames, height, width = (int(v) for v in key[1:].split("x"))
            assert batch["latents"].shape == (2, 12, frames, height // 2, width // 2)
            assert batch["text_mask"].dtype == torch.bool and batch["micro_cond"].shape == (2, 7)
            expected = db.table("latents").take(
                rows[rank * 2 : rank * 2 + 2].tolist(), columns=["latents"]
            )
            first = np.frombuffer(expected["latents"][0].as_py(), np.float32)
            assert np.array_equal(batch["latents"][0].numpy().ravel(), first)
    resumed = list(rank_feed(index, sizes, 2, 1, 7, 6, 10))
    assert [s for s, _ in resumed] == [6, 7, 8, 9]
    assert all(
        torch.equal(a["latents"], b["latents"]) for (_, a), (_, b) in zip(resumed, feeds[1][6:])
    )


def test_resolve_scaling_leaves_cpus_for_data():
    """On the 2-core machine, 2 workers must not take both CPUs (docs/design-notes.md "The 2-core
    trap")."""
    from training.config import ScalingSection

    assert resolve_scaling(ScalingSection(num_workers=2), {"CPU": 2}) == {
        "num_workers": 2,
        "cpus_per_worker": 0.5,
        "use_gpu": False,
    }
    assert resolve_scaling(ScalingSection(), {"CPU": 2})["num_workers"] == 1
    gpu = resolve_scaling(ScalingSection(), {"CPU": 16, "GPU": 8})
    assert (
        gpu["use_gpu"]
        and gpu["num_workers"] == 8
        and gpu["cpus_per_worker"] == pytest.approx(15 / 8)
    )
    with pytest.raises(ValueError, match="scaling"):
        resolve_scaling(ScalingSection(num_workers=4, cpus_per_worker=1.0), {"CPU": 2})


def test_adafactor_factored_state_and_learning():
    """Factored AdaFactor keeps row/column second-moment factors (far smaller than the
    unfactored moment ZeRO's flat partitions force), and both variants reduce a regression loss."""
    torch.manual_seed(0)
    target = torch.randn(64, 32)
    sizes = {}
    for factored in (True, False):
        weight = torch.nn.Parameter(torch.zeros(64, 32))
        opt = AdaFactor([weight], lr=0.05, factored=factored)
        losses = []
        for _ in range(100):
            loss = (weight - target).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        assert losses[-1] < 0.1 * losses[0]
        sizes[factored] = optimizer_state_bytes(opt)
    assert sizes[True] == 4 * (64 * 32 + 64 + 32)  # momentum + row + column
    assert sizes[False] == 4 * 2 * 64 * 32  # momentum + full second moment


def test_warmup_then_constant_and_ema():
    """LR: linear warm-up then constant; EMA: fp32, decay ramp when warm-up is on."""
    factor = warmup_constant(4)
    assert [factor(s) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    model = torch.nn.Linear(2, 2)
    ema = EMA(model, decay=0.9, warmup=False)
    with torch.no_grad():
        model.weight.add_(1.0)
    before = ema.state_dict()["weight"].clone()
    ema.update(model, step=1)
    torch.testing.assert_close(
        ema.state_dict()["weight"], 0.9 * before + 0.1 * model.weight.detach()
    )
    assert EMA(model, 0.9999, warmup=True).decay_at(0) == pytest.approx(0.1)


def test_flops_estimate_matches_six_n_d_and_masking():
    """The MFU numerator: for a wide model, FLOPs per token are ~6 x block parameters (the
    standard 6ND rule) plus attention; MaskDiT at 50% roughly halves the main blocks' share."""
    from model.info import flops_per_sample

    cfg = get_preset("stiv-xl")
    shape = [4, 20, 32, 32]  # 20 latent frames at 256 px through an 8x VAE
    tokens = 10 * 16 * 16
    d, hidden = cfg.hidden_size, cfg.mlp_hidden
    # Weights applied per video token: spatial and temporal attention (4 d^2 each), the cross
    # attention's query and output (2 d^2; its keys/values act on text tokens), the MLP.
    linear_per_block = 4 * d * d * 2 + 2 * d * d + 2 * d * hidden
    six_nd = 6 * linear_per_block * cfg.num_blocks * tokens
    full = flops_per_sample(cfg, shape, 77)
    assert six_nd < full < 1.5 * six_nd
    masked = flops_per_sample(cfg.replace(mask_ratio=0.5), shape, 77)
    assert 0.5 * full < masked < 0.65 * full


def test_every_pipeline_yaml_loads_and_validates():
    """Every prepare-*/train-* YAML in pipelines/ is a valid config (a bad field fails here, not
    hours into a job), and the recipe's stages are all written down."""
    names = {p.name for p in PIPELINES.glob("*.yaml")}
    for required in (
        "prepare-tiny-cpu.yaml",
        "train-t2i-tiny-cpu.yaml",
        "train-t2v-tiny-cpu.yaml",
        "train-ti2v-tiny-cpu.yaml",
        "prepare-256.yaml",
        "train-t2i-xl-256.yaml",
        "train-t2v-xl-256.yaml",
        "train-stiv-xl-256.yaml",
        "train-t2i-xl-512.yaml",
        "train-t2v-xl-512-both.yaml",
    ):
        assert required in names
    for path in sorted(PIPELINES.glob("prepare-*.yaml")):
        assert isinstance(load_config(PrepareConfig, path), PrepareConfig), path
    modes = set()
    for path in sorted(PIPELINES.glob("train-*.yaml")):
        cfg = load_config(TrainConfig, path)
        modes.add(cfg.init_from.mode)
    assert modes == {"none", "plain", "t2v_from_t2i", "both"}
    with pytest.raises(ConfigError, match=r"scaling\.zero_stage"):
        load_config(TrainConfig, PIPELINES / "train-t2v-tiny-cpu.yaml", ["scaling.zero_stage=3"])
    with pytest.raises(ConfigError, match="init_from"):
        load_config(TrainConfig, PIPELINES / "train-t2v-tiny-cpu.yaml", ["init_from.run_dir="])
    with pytest.raises(ConfigError, match="max_minutes"):
        load_config(TrainConfig, PIPELINES / "train-t2v-tiny-cpu.yaml", ["max_minutes=-1"])
