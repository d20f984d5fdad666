"""Training step time fed from the latents table (Ray Data + Lance) vs from in-memory tensors.

Both runs execute the same steps (same plan, model, seeds) in one process; the only difference
is where batches come from. If loading is hidden behind compute, the ratio is ~1.0
(target on CPU: <= 1.10x). Prints one JSON object.

    .venv/bin/python bench/train_input.py [--steps 40] [--rows 256] [--batch 8]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model.config import get_preset
from model.flow import training_loss
from model.network import STIV
from training.data import index_table, plan_epoch, rank_feed
from training.latents import LATENTS_SCHEMA, decode_rows
from training.optim import AdaFactor


def write_table(
    uri: str, rows: int, latent_shape: tuple[int, ...], text_shape: tuple[int, int]
) -> None:
    """A latents table in prepare's schema (random values: the bench measures input, not prepare)."""
    import lance

    rng = np.random.default_rng(0)
    length, dim = text_shape
    mask = np.zeros(length, np.uint8)
    mask[:6] = 1
    data = {
        "clip_id": [f"clip-{i}" for i in range(rows)],
        "caption": ["a red square moves left"] * rows,
        "bucket": ["f8x32x32"] * rows,
        "num_frames": [8] * rows,
        "height": [32] * rows,
        "width": [32] * rows,
        "latents": [rng.standard_normal(latent_shape, np.float32).tobytes() for _ in range(rows)],
        "latent_shape": [list(latent_shape)] * rows,
        "text_tokens": [rng.standard_normal(text_shape, np.float32).tobytes() for _ in range(rows)],
        "text_shape": [[length, dim]] * rows,
        "text_mask": [mask.tobytes()] * rows,
        "text_pooled": [rng.standard_normal(dim, np.float32).tobytes() for _ in range(rows)],
        "micro_cond": [[32.0, 32.0, 0.0, 0.0, 32.0, 32.0, 2.0]] * rows,
    }
    lance.write_dataset(pa.table(data, schema=LATENTS_SCHEMA), uri, mode="create")


class Trainer:
    """One model + optimizer; `step(batch)` runs one training step and returns its seconds,
    counted from the end of the previous step (so the wait for the batch is included)."""

    def __init__(self, cfg) -> None:
        torch.manual_seed(0)
        self.model = STIV(cfg).train()
        self.opt = AdaFactor(self.model.parameters(), lr=1e-4)

    def step(self, step: int, batch: dict[str, torch.Tensor]) -> None:
        loss, _ = training_loss(
            self.model,
            batch["latents"],
            batch["text_tokens"],
            batch["text_mask"],
            batch["text_pooled"],
            batch["micro_cond"],
            generator=torch.Generator().manual_seed(step),
        )
        self.opt.zero_grad()
        loss.backward()
        self.opt.step()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--rows", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=5, help="steps excluded from the median")
    args = parser.parse_args()

    import ray

    torch.set_num_threads(2)  # as the tiny stages' 1.5-CPU Ray Train rank does
    cfg = get_preset("stiv-tiny-cpu", in_channels=48, text_dim=128, max_text_tokens=16)
    latent_shape, text_shape = (48, 8, 8, 8), (16, 128)
    with tempfile.TemporaryDirectory() as tmp:
        uri = str(Path(tmp) / "latents.lance")
        write_table(uri, args.rows, latent_shape, text_shape)
        index = index_table(uri, None, "float32")
        batch_sizes = {k: args.batch for k in index.buckets}
        total = args.steps + args.warmup

        # In memory: decode every row once, then index the same plan.
        import lance

        decoded = decode_rows(lance.dataset(uri).to_table(), "float32")
        tensors = {k: torch.from_numpy(v) for k, v in decoded.items()}

        def memory_batches():
            step, epoch = 0, 0
            while True:
                for _, rows in plan_epoch(index.buckets, batch_sizes, 1, 0, epoch):
                    yield step, {k: v[torch.from_numpy(rows)] for k, v in tensors.items()}
                    step += 1
                epoch += 1

        # Phases: in memory (no feed alive) -> fed from the table -> in memory again. The
        # baseline is the mean of the two in-memory medians, so slow background load affects
        # both sides. Phases, not interleaved steps: the feed's own costs (Ray Data's executor
        # thread in this process, read tasks) must not also slow the baseline's steps.
        memory_model, table_model = Trainer(cfg), Trainer(cfg)
        memory_iter = memory_batches()
        memory_times, table_times = [], []

        def memory_phase() -> list[float]:
            times = []
            for _ in range(total):
                start = time.perf_counter()
                step, batch = next(memory_iter)
                memory_model.step(step, batch)
                times.append(time.perf_counter() - start)
            return times[args.warmup :]

        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
        try:
            memory_times += memory_phase()
            feed = rank_feed(
                index, batch_sizes, 1, 0, 0, 0, total, prefetch=32, num_cpus=0.5, steps_per_fetch=8
            )
            try:
                for _ in range(total):
                    start = time.perf_counter()
                    step, batch = next(feed)
                    table_model.step(step, batch)
                    table_times.append(time.perf_counter() - start)
            finally:
                feed.close()  # stop the feed before Ray goes away
            table_times = table_times[args.warmup :]
            memory_times += memory_phase()
        finally:
            ray.shutdown()

    half = len(memory_times) // 2
    memory_s = (statistics.median(memory_times[:half]) + statistics.median(memory_times[half:])) / 2
    table_s = statistics.median(table_times)
    print(
        json.dumps(
            {
                "device": "cpu",
                "model": cfg.name,
                "batch": args.batch,
                "steps_measured": len(table_times),
                "step_s_in_memory": round(memory_s, 4),
                "step_s_latents_table": round(table_s, 4),
                "ratio": round(table_s / memory_s, 3),
                "target_ratio": 1.10,
                "mean_s_in_memory": round(statistics.mean(memory_times), 4),
                "mean_s_latents_table": round(statistics.mean(table_times), 4),
            }
        )
    )


if __name__ == "__main__":
    main()
