"""Optimizer-state memory per rank: AdaFactor/AdamW with and without DeepSpeed ZeRO partitioning.

ZeRO-1/2 hand the optimizer flat 1-D partitions, so AdaFactor cannot factor its second moment
there (docs/design-notes.md "AdaFactor under ZeRO"). This measures, on 2 real gloo ranks (CPU)
with DeepSpeed, the bytes each rank holds for: the client optimizer's state (moments, factors)
and ZeRO's fp32 partition copy.
It checks the measurement against `training.optim.analytic_optimizer_bytes` and extrapolates to
the paper presets at 8 and 64 ranks. Prints one JSON object.

    .venv/bin/python bench/optimizer_memory.py [--preset stiv-tiny-cpu]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

import torch
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

OPTIONS = [  # (label, optimizer, zero stage, factored)
    ("adafactor-factored-zero0", "adafactor", 0, True),
    ("adafactor-zero2", "adafactor", 2, True),
    ("adamw-zero2", "adamw", 2, False),
    ("adamw-zero0", "adamw", 0, False),
]


def _measure(rank: int, world: int, preset: str, port: int, out: dict) -> None:
    import deepspeed
    import torch.distributed as dist

    from model.config import get_preset
    from model.network import STIV
    from training.optim import build_optimizer, optimizer_state_bytes

    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
    )
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    cfg = get_preset(preset)
    for label, name, stage, factored in OPTIONS:
        torch.manual_seed(0)
        model = STIV(cfg)
        opt = build_optimizer(model.parameters(), name, 1e-4, 0.9, 0.999, 0.0, factored)
        engine, opt, _, _ = deepspeed.initialize(
            model=model,
            optimizer=opt,
            config={
                "train_micro_batch_size_per_gpu": 1,
                "gradient_clipping": 1.0,
                "zero_optimization": {"stage": stage},
                "zero_allow_untested_optimizer": True,
                "steps_per_print": 10**9,
            },
        )
        for p in engine.module.parameters():  # one step with a synthetic gradient
            p.grad = None
        loss = sum(p.float().square().sum() for p in engine.module.parameters())
        engine.backward(loss)
        engine.step()
        client = getattr(opt, "optimizer", opt)
        partitions = getattr(opt, "single_partition_of_fp32_groups", [])
        if rank == 0:
            out[label] = {
                "optimizer_state_bytes": optimizer_state_bytes(client),
                "zero_fp32_partition_bytes": sum(t.numel() * t.element_size() for t in partitions),
            }
        dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="stiv-tiny-cpu")
    parser.add_argument("--port", type=int, default=29533)
    args = parser.parse_args()

    from model.config import get_preset
    from model.info import param_shapes
    from training.optim import analytic_optimizer_bytes

    world = 2
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_measure, args=(world, args.preset, args.port, out), nprocs=world, join=True)
        measured = dict(out)
    shapes = param_shapes(get_preset(args.preset))
    analytic = {
        "adafactor-factored-zero0": analytic_optimizer_bytes(shapes, "adafactor-factored", world),
        "adafactor-zero2": analytic_optimizer_bytes(shapes, "adafactor-zero2", world),
        "adamw-zero2": analytic_optimizer_bytes(shapes, "adamw-zero2", world),
        "adamw-zero0": analytic_optimizer_bytes(shapes, "adamw-replicated", world),
    }
    paper = {}
    for preset in ("stiv-xl", "stiv-xxl", "stiv-m"):
        s = param_shapes(get_preset(preset))
        paper[preset] = {
            "parameters": sum(math.prod(x) for x in s),
            **{
                f"{option}_gib_per_rank_at_{n}": round(
                    analytic_optimizer_bytes(s, option, n) / 2**30, 3
                )
                for option in ("adafactor-factored", "adafactor-zero2")
                for n in (8, 64)
            },
            # ZeRO-1/2 also keep an fp32 copy of each rank's parameter partition (P/N).
            **{
                f"adafactor-zero2+fp32-partition_gib_per_rank_at_{n}": round(
                    (
                        analytic_optimizer_bytes(s, "adafactor-zero2", n)
                        + 4 * math.ceil(sum(math.prod(x) for x in s) / n)
                    )
                    / 2**30,
                    3,
                )
                for n in (8, 64)
            },
        }
    print(
        json.dumps(
            {
                "preset": args.preset,
                "parameters": sum(math.prod(x) for x in shapes),
                "world_size": world,
                "measured_rank0": measured,
                "analytic_optimizer_state_bytes": analytic,
                "paper_presets": paper,
            }
        )
    )


if __name__ == "__main__":
    main()
