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
# Ray Train's controller polls its workers every 2 s, so each run ends (and each failure is
# seen) up to 2 s after the fact; the suite starts Ray Train about 20 times. Ray passes this
# to the controller and workers, embedded or on the test clusters (they copy this env).
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")


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
