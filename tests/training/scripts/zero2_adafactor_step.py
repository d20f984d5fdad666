"""Run under torchrun: a few AdaFactor steps of a small model under DeepSpeed ZeRO-2 (gloo on
the CPU), the global batch split over the ranks; rank 0 writes the final weights.

    python -m torch.distributed.run --nproc_per_node N zero2_adafactor_step.py OUT.pt [--no-attach]
"""

from __future__ import annotations

import sys

import deepspeed
import torch
import torch.distributed as dist

from training.loop import skip_shm_comm_build
from training.optim import AdaFactor, attach_zero_partitions

GLOBAL_BATCH, STEPS = 8, 4


def model_and_data() -> tuple[torch.nn.Module, list[tuple[torch.Tensor, torch.Tensor]]]:
    """Odd parameter sizes, so a rank boundary falls inside a parameter; batches whose scale
    changes per step, so the per-parameter RMS of the update differs and clipping bites."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(7, 13), torch.nn.Tanh(), torch.nn.Linear(13, 5))
    batches = [
        (torch.randn(GLOBAL_BATCH, 7) * (1 + 3 * s), torch.randn(GLOBAL_BATCH, 5))
        for s in range(STEPS)
    ]
    return model, batches


def main() -> None:
    out, attach = sys.argv[1], "--no-attach" not in sys.argv
    skip_shm_comm_build()
    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    model, batches = model_and_data()
    optimizer = AdaFactor(model.parameters(), lr=0.05, clip_threshold=0.5)
    per_rank = GLOBAL_BATCH // world
    config = {
        "train_micro_batch_size_per_gpu": per_rank,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": 2},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
    }
    engine, zero, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    if attach:
        assert attach_zero_partitions(zero, engine.module)
    for x, y in batches:
        mine = slice(rank * per_rank, (rank + 1) * per_rank)
        loss = torch.nn.functional.mse_loss(engine(x[mine]), y[mine])
        engine.backward(loss)
        engine.step()
    if rank == 0:
        torch.save({k: v.detach().clone() for k, v in engine.module.state_dict().items()}, out)


if __name__ == "__main__":
    main()
