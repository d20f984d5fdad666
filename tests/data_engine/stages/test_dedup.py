"""Near-duplicate detection over a real Lance table, exact and through the IVF_PQ index."""

from __future__ import annotations

import lance
import numpy as np
import pyarrow as pa
import pytest

from data_engine.stages.dedup import DedupConfig, find_duplicates

DIM = 32


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def write_clips(
    path, embeddings: np.ndarray, uris: list[str], starts: list[int]
) -> lance.LanceDataset:
    n = len(embeddings)
    table = pa.table(
        {
            "clip_id": [f"clip{i:04d}" for i in range(n)],
            "uri": uris,
            "start_frame": pa.array(starts, pa.int64()),
            "clip_embedding": pa.FixedSizeListArray.from_arrays(pa.array(embeddings.ravel()), DIM),
        }
    )
    return lance.write_dataset(table, str(path))


def near_copy(vec: np.ndarray, rng: np.random.Generator, scale: float = 0.02) -> np.ndarray:
    return unit(vec + scale * rng.normal(size=vec.shape))


@pytest.fixture
def table_with_copies(tmp_path):
    """300 random clips plus near-copies: clip 5 re-uploaded twice, clip 42 once.

    The copies are written *before* their originals in file order but sort *after* them
    (uri z_...), so keeping "the earliest by uri, start_frame" is really tested.
    """
    rng = np.random.default_rng(0)
    base = unit(rng.normal(size=(300, DIM)))
    copies = np.stack([near_copy(base[5], rng), near_copy(base[5], rng), near_copy(base[42], rng)])
    embeddings = np.concatenate([copies, base])
    uris = ["z_reupload.mp4"] * 3 + [f"v{i // 10:03d}.mp4" for i in range(300)]
    starts = [0, 100, 200] + [(i % 10) * 50 for i in range(300)]
    ds = write_clips(tmp_path / "clips.lance", embeddings, uris, starts)
    # ids: copies are clip0000..clip0002, base clip i is clip{i+3}
    expected = {"clip0000": "clip0008", "clip0001": "clip0008", "clip0002": "clip0045"}
    return ds, expected


def test_exact_search_finds_near_copies_and_keeps_the_earliest(table_with_copies):
    """Small tables: exact search flags exactly the planted copies, pointing at the original."""
    ds, expected = table_with_copies
    assert find_duplicates(ds, 0.01) == expected


def test_index_path_finds_the_same_duplicates(table_with_copies):
    """Forcing the index path (low row threshold) must build an IVF_PQ cosine index and find
    the same pairs: this is the path that scales past memory."""
    ds, expected = table_with_copies
    cfg = DedupConfig(index_min_rows=10, num_neighbors=8, nprobes=32, refine_factor=10)
    assert find_duplicates(ds, 0.01, cfg=cfg) == expected
    indices = lance.dataset(ds.uri).describe_indices()
    assert [(i.index_type, i.field_names) for i in indices] == [("IVF_PQ", ["clip_embedding"])]
    assert find_duplicates(lance.dataset(ds.uri), 0.01, cfg=cfg) == expected  # reuses the index


def test_threshold_boundary(tmp_path):
    """Distance exactly at the threshold counts as duplicate; just over it does not."""
    a = np.zeros(DIM, np.float32)
    a[0] = 1.0
    b = np.zeros(DIM, np.float32)
    b[0], b[1] = 0.75, np.sqrt(1 - 0.75**2)  # cosine 0.75 -> distance 0.25 (exact in float)
    ds = write_clips(tmp_path / "t.lance", np.stack([a, b]), ["a.mp4", "b.mp4"], [0, 0])
    assert find_duplicates(ds, 0.25) == {"clip0001": "clip0000"}
    assert find_duplicates(ds, 0.2499) == {}


def test_chain_points_to_a_kept_clip(tmp_path):
    """A~B, B~C but A!~C: B is a duplicate of A, C is kept (its only neighbour B was dropped),
    so following dup_of never lands on another duplicate."""
    angles = np.radians([0.0, 20.0, 40.0])
    vecs = np.zeros((3, DIM), np.float32)
    vecs[:, 0], vecs[:, 1] = np.cos(angles), np.sin(angles)
    ds = write_clips(tmp_path / "c.lance", vecs, ["a.mp4"] * 3, [0, 10, 20])
    threshold = 1 - np.cos(np.radians(25.0))
    assert find_duplicates(ds, float(threshold)) == {"clip0001": "clip0000"}


def test_config_validation():
    with pytest.raises(ValueError, match=r"dedup\.max_cosine_distance"):
        DedupConfig(max_cosine_distance=-0.1)
    with pytest.raises(ValueError, match=r"dedup\.nprobes"):
        DedupConfig(nprobes=0)
