"""Training data: a deterministic, resumable, bucket-per-batch feed from the latents table.

Ray Data has no bucket batching and no resumable iterator (LESSONS.md, Ray), so both are built
here from *pre-batched rows*:
- `plan_epoch` (pure numpy, deterministic in (seed, epoch)) shuffles each bucket's row offsets,
  cuts them into global batches of `batch_size(bucket) * world_size`, drops each bucket's
  remainder, and interleaves the batches of all buckets in a seeded order. Step s of the epoch
  gives rank r the slice [r*B, (r+1)*B) of global batch s: every batch holds one shape (tensors
  stack) and every rank takes exactly the same number of steps (ZeRO collectives cannot hang).
- `rank_feed` turns the rank's remaining steps into a Ray Dataset of one item per step; a Ray
  Data map task reads that step's rows from the Lance table at the pinned version (`take`) and
  decodes them into stacked arrays, prefetched while the model computes. Resuming at step s is
  exact: the plan is recomputed and the feed starts at s.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

BATCH_COLUMNS = [
    "latents",
    "latent_shape",
    "text_tokens",
    "text_shape",
    "text_mask",
    "text_pooled",
    "micro_cond",
]


@dataclass(frozen=True)
class TableIndex:
    """Row offsets of each bucket at a pinned table version."""

    uri: str
    version: int
    buckets: dict[str, np.ndarray]  # bucket key -> sorted row offsets (int64)
    storage_dtype: str


def index_table(
    uri: str, version: int | None, storage_dtype: str, storage_options=None
) -> TableIndex:
    """Read only the `bucket` column to learn which rows belong to which bucket."""
    import lance

    ds = lance.dataset(uri, version=version, storage_options=storage_options)
    keys = np.asarray(ds.to_table(columns=["bucket"])["bucket"].to_pylist(), dtype=object)
    buckets = {str(k): np.flatnonzero(keys == k).astype(np.int64) for k in sorted(set(keys))}
    return TableIndex(uri, ds.version, buckets, storage_dtype)


def plan_epoch(
    buckets: dict[str, np.ndarray],
    batch_sizes: dict[str, int],
    world_size: int,
    seed: int,
    epoch: int,
) -> list[tuple[str, np.ndarray]]:
    """Global batches of one epoch: [(bucket, row offsets of length B * world_size)]."""
    rng = np.random.default_rng([seed, epoch])
    batches: list[tuple[str, np.ndarray]] = []
    for key in sorted(buckets):
        rows = rng.permutation(buckets[key])
        size = batch_sizes[key] * world_size
        for start in range(0, len(rows) - size + 1, size):
            batches.append((key, rows[start : start + size]))
    order = rng.permutation(len(batches))
    return [batches[i] for i in order]


def steps_per_epoch(
    buckets: dict[str, np.ndarray], batch_sizes: dict[str, int], world_size: int
) -> int:
    return sum(len(rows) // (batch_sizes[k] * world_size) for k, rows in buckets.items())


def decode_rows(table, storage_dtype: str) -> dict[str, np.ndarray]:
    """Lance rows of one bucket -> stacked float32/bool arrays (shapes equal by construction)."""
    cols = table.to_pydict()
    n = len(cols["latents"])
    lshape = [int(s) for s in cols["latent_shape"][0]]
    tshape = [int(s) for s in cols["text_shape"][0]]

    def stack(name: str, shape: list[int], dtype: str) -> np.ndarray:
        return np.stack([np.frombuffer(b, dtype).reshape(shape) for b in cols[name]]).astype(
            np.float32
        )

    return {
        "latents": stack("latents", lshape, storage_dtype),
        "text_tokens": stack("text_tokens", tshape, storage_dtype),
        "text_pooled": stack("text_pooled", tshape[-1:], storage_dtype),
        "text_mask": np.stack([np.frombuffer(b, np.uint8) for b in cols["text_mask"]]).astype(bool),
        "micro_cond": np.asarray(cols["micro_cond"], dtype=np.float32).reshape(n, -1),
    }


class FetchStep:
    """Ray Data map: a step item (row offsets) -> that step's stacked batch, read with Lance
    `take` at the pinned version. The dataset handle opens once per actor/task process."""

    def __init__(self, uri: str, version: int, storage_dtype: str, storage_options=None) -> None:
        self.uri, self.version, self.storage_dtype = uri, version, storage_dtype
        self.storage_options = storage_options
        self._ds = None

    def __call__(self, item: dict[str, Any]) -> dict[str, Any]:
        import lance

        if self._ds is None:
            self._ds = lance.dataset(
                self.uri, version=self.version, storage_options=self.storage_options
            )
        rows = self._ds.take(np.asarray(item["rows"], dtype=np.int64), columns=BATCH_COLUMNS)
        # One element per step: the whole batch, already stacked.
        return {
            "step": item["step"],
            **{k: v for k, v in decode_rows(rows, self.storage_dtype).items()},
        }


def rank_feed(
    index: TableIndex,
    batch_sizes: dict[str, int],
    world_size: int,
    rank: int,
    seed: int,
    start_step: int,
    max_steps: int,
    prefetch: int = 4,
    num_cpus: float = 0.25,
    storage_options=None,
    steps_per_dataset: int = 10_000,
) -> Iterator[tuple[int, dict[str, torch.Tensor]]]:
    """Yield (global step, batch tensors) for this rank from `start_step` to `max_steps`.

    Epochs follow one another (a new plan per epoch). Batches come through Ray Data, in order,
    prefetched `prefetch` steps ahead."""
    import ray

    per_epoch = steps_per_epoch(index.buckets, batch_sizes, world_size)
    if per_epoch == 0:
        raise ValueError(
            "data.batch_size: no bucket has enough rows for one global batch "
            f"(rows per bucket: { {k: len(v) for k, v in index.buckets.items()} }, world size {world_size})"
        )

    def step_items() -> Iterator[dict[str, Any]]:
        """This rank's rows for every step from start_step, epoch after epoch."""
        epoch = start_step // per_epoch
        while True:
            plan = plan_epoch(index.buckets, batch_sizes, world_size, seed, epoch)
            for i, (key, rows) in enumerate(plan):
                step = epoch * per_epoch + i
                if step >= max_steps:
                    return
                if step >= start_step:
                    b = batch_sizes[key]
                    yield {"step": step, "rows": rows[rank * b : (rank + 1) * b].tolist()}
            epoch += 1

    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True  # steps must arrive in plan order
    ctx.enable_progress_bars = False  # one bar per rank only clutters the training log
    pending = step_items()
    while True:
        # A bounded number of steps per Ray Dataset keeps the item list small at paper scale
        # (400k steps) while small tables do not restart the fetch actor every epoch.
        items = list(itertools.islice(pending, steps_per_dataset))
        if not items:
            return
        ds = ray.data.from_items(items, override_num_blocks=max(1, min(len(items), 200)))
        ds = ds.map(
            FetchStep,
            fn_constructor_kwargs={
                "uri": index.uri,
                "version": index.version,
                "storage_dtype": index.storage_dtype,
                "storage_options": storage_options,
            },
            compute=ray.data.ActorPoolStrategy(size=1),
            num_cpus=num_cpus,
        )
        # One Ray Data "batch" = one training step (the rows were pre-batched above).
        for item in ds.iter_batches(batch_size=1, batch_format="numpy", prefetch_batches=prefetch):
            yield (
                int(item["step"][0]),
                {k: torch.from_numpy(np.array(v[0])) for k, v in item.items() if k != "step"},
            )
