"""Training data: a deterministic, resumable, bucket-per-batch feed from the latents table.

Ray Data has no bucket batching and no resumable iterator (docs/design-notes.md
"Training input: buckets and resume are ours"), so both are built here from *pre-batched rows*:
- `plan_epoch` (pure numpy, deterministic in (seed, epoch)) shuffles each bucket's row offsets,
  cuts them into global batches of `batch_size(bucket) * world_size`, drops each bucket's
  remainder, and interleaves the batches of all buckets in a seeded order. Step s of the epoch
  gives rank r the slice [r*B, (r+1)*B) of global batch s: every batch holds one shape (tensors
  stack) and every rank takes exactly the same number of steps (ZeRO collectives cannot hang).
- `rank_feed` reads the rank's remaining steps in windows: each window is a Ray Dataset whose
  flat_map tasks read a few steps' rows from the Lance table at the pinned version (`take`)
  and decode them into stacked arrays; the next window is materialized in the background while
  the model trains on the current one. Resuming at step s is exact: the plan is recomputed and
  the feed starts at s.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from training.latents import BATCH_COLUMNS, decode_rows


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


def fetch_steps(
    item: dict[str, Any], uri: str, version: int, storage_dtype: str, storage_options=None
) -> list[dict[str, Any]]:
    """Ray Data flat_map: a chunk of steps (each with its row offsets) -> one row per step
    holding that step's stacked batch. The chunk's rows are read with one Lance `take` at the
    pinned version."""
    import lance

    ds = lance.dataset(uri, version=version, storage_options=storage_options)
    rows = [np.asarray(r, dtype=np.int64) for r in item["rows"]]
    table = ds.take(np.concatenate(rows), columns=BATCH_COLUMNS)
    out, start = [], 0
    for step, step_rows in zip(item["steps"], rows):
        out.append({"step": step, **decode_rows(table.slice(start, len(step_rows)), storage_dtype)})
        start += len(step_rows)
    return out


def _read_window(
    index: TableIndex,
    items: list[dict[str, Any]],
    steps_per_fetch: int,
    num_cpus: float,
    storage_options,
):
    """One window of steps as a materialized Ray Dataset: a read task per `steps_per_fetch`
    steps, blocks in step order."""
    import ray

    chunks = [
        {
            "steps": [it["step"] for it in items[i : i + steps_per_fetch]],
            "rows": [it["rows"] for it in items[i : i + steps_per_fetch]],
        }
        for i in range(0, len(items), steps_per_fetch)
    ]
    ds = ray.data.from_items(chunks, override_num_blocks=len(chunks))
    ds = ds.flat_map(
        fetch_steps,
        fn_kwargs={
            "uri": index.uri,
            "version": index.version,
            "storage_dtype": index.storage_dtype,
            "storage_options": storage_options,
        },
        num_cpus=num_cpus,
    )
    return ds.materialize()


def _window_batches(window) -> Iterator[tuple[int, dict[str, torch.Tensor]]]:
    import ray
    from ray.data.block import BlockAccessor

    for bundle in window.iter_internal_ref_bundles():
        for block_ref in bundle.block_refs:
            block = BlockAccessor.for_block(ray.get(block_ref)).to_batch_format("numpy")
            for i, step in enumerate(block["step"]):
                yield (
                    int(step),
                    {k: torch.from_numpy(np.array(v[i])) for k, v in block.items() if k != "step"},
                )


def rank_feed(
    index: TableIndex,
    batch_sizes: dict[str, int],
    world_size: int,
    rank: int,
    seed: int,
    start_step: int,
    max_steps: int,
    prefetch: int = 16,
    num_cpus: float = 0.25,
    storage_options=None,
    steps_per_fetch: int = 4,
) -> Iterator[tuple[int, dict[str, torch.Tensor]]]:
    """Yield (global step, batch tensors) for this rank from `start_step` to `max_steps`.

    Epochs follow one another (a new plan per epoch). Steps are read in windows of `prefetch`
    steps, each a Ray Dataset (`steps_per_fetch` steps per read task) materialized in the
    background while the model trains on the previous window.

    Why windows and not one streaming `iter_batches`: Ray Data's streaming executor runs in
    the training process, and while its output is backpressured (reads faster than the model,
    the normal case) its scheduling loop spins, holding the GIL and most of a core. On the
    2-core machine that made a tiny model's Ray Train steps 6x slower (9.8 against 60 samples/s,
    one rank with 2 threads). A materialized window's executor stops once its reads are done."""
    from concurrent.futures import ThreadPoolExecutor

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
    per_fetch = max(1, min(steps_per_fetch, prefetch))

    def next_window():
        items = list(itertools.islice(pending, prefetch))
        return _read_window(index, items, per_fetch, num_cpus, storage_options) if items else None

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="rank-feed") as reader:
        future = reader.submit(next_window)
        while True:
            window = future.result()
            if window is None:
                return
            future = reader.submit(next_window)  # read ahead while this window trains
            yield from _window_batches(window)
            del window  # its blocks leave the object store
