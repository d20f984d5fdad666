"""Shared fixtures: one real embedded Ray for the whole session, temp databases."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Tests run offline and must never try a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")


@pytest.fixture(scope="session")
def ray_session():
    """A real embedded Ray with this machine's 2 CPUs, started once for every test that needs it."""
    import ray

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    # Left running until the interpreter exits: other session-scoped users may follow.


@pytest.fixture
def db_dir(tmp_path: Path) -> Path:
    return tmp_path / "db"
