"""`stiv train`'s driver, through the command a user types: `--resume` on a fresh run, relative
paths in a "both" stage, resume refused on another world size, token-budget batch sizes."""

from __future__ import annotations

import dataclasses
import json
import typing

import pytest
import torch
import yaml

from model.network import STIV
from stiv.cli import main
from stiv_core.config import ConfigError, load_config
from tests.helpers.runs import write_checkpoint
from training.checkpoint import list_checkpoints, load_ema_state
from training.config import TRAIN_PATH_FIELDS, TrainConfig, load_train_config
from training.latents import read_meta
from training.plan import resolve_model_config, resume_checkpoint


def _path_like_fields(cls, prefix: str = "") -> list[str]:
    """Dotted names of every string field that names a file, directory or database."""
    found = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp, name = hints[f.name], f"{prefix}{f.name}"
        if dataclasses.is_dataclass(tp):
            found += _path_like_fields(tp, f"{name}.")
        elif tp is str and (f.name in ("db", "image") or f.name.endswith(("_dir", "_path"))):
            found.append(name)
    return found


def test_every_path_field_is_resolved_on_the_driver(tmp_path, monkeypatch):
    """Workers run in their own directories: every path field of a train config (a new one
    included, found by name) must come back absolute from the driver's one loader, URIs kept."""
    assert sorted(_path_like_fields(TrainConfig)) == sorted(TRAIN_PATH_FIELDS)
    monkeypatch.chdir(tmp_path)
    cfg = load_train_config(
        None,
        ["db=s3://bucket/db", "run_dir=runs/x", "init_from.mode=both",
         "init_from.run_dir=runs/t2i-512", "init_from.temporal_run_dir=runs/t2v-256"],
    )  # fmt: skip
    assert cfg.db == "s3://bucket/db"
    assert cfg.run_dir == str(tmp_path / "runs/x")
    assert cfg.init_from.run_dir == str(tmp_path / "runs/t2i-512")
    assert cfg.init_from.temporal_run_dir == str(tmp_path / "runs/t2v-256")


def test_resume_modes_and_world_size_check(tmp_path):
    """`auto` (what `--resume` means) starts fresh without a checkpoint; `require` fails with a
    line naming the run; a checkpoint from 2 ranks is refused on 1 with what differs."""
    assert resume_checkpoint(tmp_path / "fresh", "auto", 1, 0) is None
    with pytest.raises(ConfigError, match="--resume=require: no checkpoint"):
        resume_checkpoint(tmp_path / "fresh", "require", 1, 0)
    model = STIV(_tiny())
    write_checkpoint(tmp_path / "run", model, step=4, world_size=2, seed=0)
    assert resume_checkpoint(tmp_path / "run", "auto", 2, 0)[0] == 4
    with pytest.raises(ConfigError, match="2 ranks, this run has 1"):
        resume_checkpoint(tmp_path / "run", "auto", 1, 0)
    with pytest.raises(ConfigError, match="seed 0, this run has 3"):
        resume_checkpoint(tmp_path / "run", "require", 2, 3)


def _tiny():
    from model.config import get_preset

    return get_preset("stiv-tiny", in_channels=4, text_dim=16, max_text_tokens=8)


@pytest.mark.slow
def test_cli_resume_on_fresh_run_and_relative_both_init(
    tmp_path, monkeypatch, train_db, ray_cluster, capsys
):
    """The shipped RayJob passes `--resume` on a fresh run_dir: it must train from step 0.
    The stage is a "both" initialisation given by relative paths (as the *-both.yaml files
    are), which must reach the Ray Train workers resolved. Two ranks train; resuming that run
    on one rank is refused with one line (the data position depends on the world size), and
    `--resume=require` on an empty run_dir keeps the strict error. Validation samples and
    tokens per step are logged on the way."""
    monkeypatch.chdir(tmp_path)
    base = {"db": train_db, "run_dir": "runs/x", "model": {"preset": "stiv-tiny"}}
    model_cfg = resolve_model_config(
        load_config(TrainConfig, base=base), read_meta(train_db, "latents")
    )
    torch.manual_seed(1)
    spatial, temporal = STIV(model_cfg), STIV(model_cfg)
    for p in [*spatial.parameters(), *temporal.parameters()]:
        p.data.normal_(std=0.05)
    write_checkpoint(tmp_path / "runs/t2i-512", spatial)
    write_checkpoint(tmp_path / "runs/t2v-256", temporal)
    config = tmp_path / "both.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                **base,
                "run_dir": "runs/t2v-both",
                "max_steps": 2,
                "init_from": {"mode": "both", "run_dir": "runs/t2i-512",
                              "temporal_run_dir": "runs/t2v-256"},
                "optimizer": {"warmup_steps": 1, "lr": 1.0e-9},
                "data": {"batch_size": 2},
                "scaling": {"num_workers": 2, "zero_stage": 2},
                "log_every": 1,
                "checkpoint_every": 2,
                "ema_decay": 0.0,
                "eval": {"every_steps": 2, "prompts": ["a red square"], "steps": 2},
            }
        )
    )  # fmt: skip
    assert main(["train", "--config", "both.yaml", "--resume"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["steps"] == 2 and summary["resumed_from_step"] == 0
    # At lr 1e-9 the weights stay the merged ones: temporal attention from the T2V run.
    ema, _ = load_ema_state(tmp_path / "runs/t2v-both")
    for key, value in ema.items():
        source = temporal if ".temporal." in f".{key}" else spatial
        torch.testing.assert_close(value, source.state_dict()[key], atol=1e-6, rtol=0), key
    assert [s for s, _ in list_checkpoints(tmp_path / "runs/t2v-both")] == [2]
    # Validation samples from the EMA weights at step 2 (eval.every_steps), in the run.
    samples = tmp_path / "runs/t2v-both/validation/step_00000002"
    assert (samples / "prompt_0.mp4").stat().st_size > 0 and (samples / "prompt_0.png").is_file()
    # Tokens per step over both ranks: 2 ranks x 2 samples x 64 (f8x16x16) or 96 (f8x16x24).
    metrics = [json.loads(ln) for ln in (tmp_path / "runs/t2v-both/metrics.jsonl").open()]
    assert {m["tokens_per_step"] for m in metrics} <= {256.0, 384.0} and len(metrics) == 2

    assert main(["train", "--config", "both.yaml", "--set", "scaling.num_workers=1",
                 "--set", "max_steps=4"]) == 2  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "2 ranks, this run has 1" in err[0], err
    assert main(["train", "--config", "both.yaml", "--resume=require",
                 "--set", "run_dir=runs/empty"]) == 2  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--resume=require: no checkpoint" in err[0], err


def test_token_budget_batch_sizes_trade_resolution_against_frames():
    """With `data.max_tokens_per_rank`, each bucket gets as many samples as fit the budget (the
    VideoX-Fun trade of 512^2 x 49 against 768^2 x 21 and 1024^2 x 9 at one token length);
    an explicit bucket_batch_size wins; a budget below one sample names the field."""
    from model.config import get_preset
    from training.config import DataSection
    from training.plan import bucket_batch_sizes, bucket_tokens

    xl = get_preset("stiv-xl")  # patch 2, temporal patch 2; an 8x VAE
    keys = ["f49x512x512", "f21x768x768", "f9x1024x1024", "f1x256x256"]
    assert [bucket_tokens(xl, k, 8) for k in keys] == [24 * 32 * 32, 10 * 48 * 48, 4 * 64 * 64, 256]
    sizes = bucket_batch_sizes(DataSection(max_tokens_per_rank=49152), keys, xl, 8)
    assert sizes == {"f49x512x512": 2, "f21x768x768": 2, "f9x1024x1024": 3, "f1x256x256": 192}
    given = DataSection(max_tokens_per_rank=49152, bucket_batch_size={"f1x256x256": 64})
    assert bucket_batch_sizes(given, keys, xl, 8)["f1x256x256"] == 64
    assert bucket_batch_sizes(DataSection(batch_size=5), keys, xl, 8) == dict.fromkeys(keys, 5)
    with pytest.raises(ConfigError, match=r"data\.max_tokens_per_rank: 20000 is below one sample"):
        bucket_batch_sizes(DataSection(max_tokens_per_rank=20000), keys, xl, 8)
