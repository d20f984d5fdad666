"""Every curation YAML in pipelines/ loads and validates (the config is the contract)."""

from __future__ import annotations

from pathlib import Path

import pytest

from data_engine.config import load_curate_config
from stiv_core.config import ConfigError

PIPELINES = Path(__file__).resolve().parents[1] / "pipelines"


@pytest.mark.parametrize("path", sorted(PIPELINES.glob("curate*.yaml")), ids=lambda p: p.name)
def test_curate_yaml_loads(path: Path) -> None:
    """A typo in a shipped config must fail here, not in a user's job."""
    cfg = load_curate_config(path)
    assert cfg.stages[:2] == ["probe", "split"]


def test_overrides_are_validated_like_the_file() -> None:
    """`--set` values go through the same validation and name the field."""
    cfg = load_curate_config(
        PIPELINES / "curate.yaml", ["split.max_clip_s=8", "resources.model_actors=2"]
    )
    assert cfg.split.max_clip_s == 8.0 and cfg.resources.model_actors == 2
    with pytest.raises(ConfigError, match=r"split\.max_clip_s"):
        load_curate_config(PIPELINES / "curate.yaml", ["split.max_clip_s=1"])
    with pytest.raises(ConfigError, match=r"resources\.model_actors"):
        load_curate_config(None, ["resources.model_actors=many"])
