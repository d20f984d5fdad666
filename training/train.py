"""`stiv train`: one stage of the progressive recipe with Ray Train + DeepSpeed ZeRO.

The driver (`run_train`) loads and checks the stage config (`training.config`), fixes what every
rank must agree on (`training.plan`: the run it resumes, the model shape from the preset, the
latents table's encoders and the parent run, the buckets and batch sizes, the workers sized
from the cluster's resources), and starts a `TorchTrainer` whose workers run
`training.loop.train_worker`. `stiv train --dry-run` is `training.dry_run`.

Numbers (docs/recipe.md "Training"): AdaFactor beta1 0.9 / beta2 0.999 without weight decay,
gradient clipping 1.0, constant LR 2e-4 after 1k linear warm-up steps, fp32 EMA 0.9999.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from stiv_core.config import ConfigError, save_config, to_dict
from training.config import RESUME_MODES, load_train_config
from training.latents import read_meta
from training.plan import (
    WorkerPlan,
    bucket_batch_sizes,
    check_tasks_fit,
    resolve_model_config,
    resolve_scaling,
    resume_checkpoint,
    select_buckets,
)


def run_train(
    config_path: str | Path | None,
    overrides: list[str] | None = None,
    address: str | None = None,
    resume: str = "auto",
) -> dict[str, Any]:
    """Train one stage; returns a summary (steps, final loss, run dir, seconds, scaling).

    Rerunning the same command continues from the run's latest checkpoint (`resume="auto"`,
    also what `--resume` means); `resume="require"` additionally insists that one exists."""
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    from data_engine.store import Database
    from model.info import param_shapes
    from stiv_core.ray_connect import connect_ray
    from training.checkpoint import RESOLVED_CONFIG_FILE, list_checkpoints
    from training.loop import train_worker

    start_s = time.time()
    cfg = load_train_config(config_path, overrides)
    if resume not in RESUME_MODES:
        raise ConfigError(f"--resume: must be one of {list(RESUME_MODES)}, got {resume!r}")
    run_dir = Path(cfg.run_dir)
    meta = read_meta(cfg.db, cfg.latents_table)
    model_cfg = resolve_model_config(cfg, meta)
    db = Database(cfg.db)
    table_version = cfg.data.table_version or db.table(cfg.latents_table).version

    started = connect_ray(address)
    try:
        scaling = resolve_scaling(cfg.scaling, ray.cluster_resources())
        keys = sorted(set(db.table(cfg.latents_table, table_version).to_table(columns=["bucket"])
                          ["bucket"].to_pylist()))  # fmt: skip
        keys = select_buckets(cfg.data, keys)
        batch_sizes = bucket_batch_sizes(cfg.data, keys, model_cfg, int(meta["downsample"]))
        check_tasks_fit(cfg.objective, keys)
        resumed = resume_checkpoint(run_dir, resume, scaling["num_workers"], cfg.seed, batch_sizes)
        checkpoints = [resumed] if resumed else []
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / RESOLVED_CONFIG_FILE)
        (run_dir / "model_config.json").write_text(json.dumps(model_cfg.to_dict(), indent=1))
        plan = WorkerPlan(
            config=to_dict(cfg),
            model_config=model_cfg.to_dict(),
            meta=meta,
            latents_uri=db.uri_for(cfg.latents_table),
            storage_options=db.storage_options,
            table_version=table_version,
            resume_path=str(checkpoints[-1][1]) if checkpoints else "",
            micro_batch=max(batch_sizes.values()),
            **scaling,
        )
        resources = {"CPU": scaling["cpus_per_worker"]}
        if scaling["use_gpu"]:
            resources["GPU"] = 1
        trainer = TorchTrainer(
            train_worker,
            train_loop_config=plan.to_loop_config(),
            scaling_config=ray.train.ScalingConfig(
                num_workers=scaling["num_workers"],
                use_gpu=scaling["use_gpu"],
                resources_per_worker=resources,
                placement_strategy=cfg.scaling.placement_strategy,
            ),
            run_config=ray.train.RunConfig(
                name=run_dir.name,
                storage_path=str(run_dir.parent),
                failure_config=ray.train.FailureConfig(max_failures=cfg.scaling.max_failures),
                checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.keep_checkpoints),
            ),
        )
        trainer.fit()
    finally:
        if started:
            ray.shutdown()
    metrics = [
        json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines() if ln.strip()
    ]
    final = list_checkpoints(run_dir)
    return {
        "run_dir": str(run_dir),
        "steps": final[-1][0] if final else 0,
        "final_loss": metrics[-1]["loss"] if metrics else None,
        "resumed_from_step": checkpoints[-1][0] if checkpoints else 0,
        "checkpoint": str(final[-1][1]) if final else None,
        "num_workers": scaling["num_workers"],
        "batch_sizes": batch_sizes,
        "cpus_per_worker": scaling["cpus_per_worker"],
        "use_gpu": scaling["use_gpu"],
        "parameters": int(sum(np.prod(s) for s in param_shapes(model_cfg))),
        "seconds": round(time.time() - start_s, 1),
    }
