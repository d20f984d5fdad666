"""Small seeded models for tests and for `make demo` on machines without real weights.

The files are written exactly like real ones (an open_clip architecture JSON plus a checkpoint,
an aesthetic head state dict) so they go through the same loaders users use. Their safetensors
metadata carries `stiv_seeded_test_weights = "true"`, which every score they produce repeats in
its provenance: their values are meaningless and must never pass for real aesthetic scores.
"""

from __future__ import annotations

import json
from pathlib import Path

import open_clip
import torch
from safetensors.torch import save_file

from data_engine.stages.clip_config import SEEDED_TEST_WEIGHTS_KEY
from data_engine.stages.clip_model import AestheticHead, create_model_quietly

TINY_CLIP_NAME = "stiv-tiny-clip"

# A ViT small enough to run in milliseconds on a CPU. The vocabulary stays at CLIP's 49,408 so
# open_clip's bundled BPE tokenizer works unchanged (offline).
TINY_CLIP_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "head_width": 32, "patch_size": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}


# One metadata key only: safetensors writes metadata from a hash map, so with several keys their
# order (and the file's sha256, which provenance records) would change from run to run.
SEEDED_METADATA = {SEEDED_TEST_WEIGHTS_KEY: "true"}


def make_tiny_open_clip(directory: str | Path, seed: int = 0) -> tuple[str, Path, Path]:
    """Write a tiny open_clip architecture JSON and seeded random weights into `directory`.

    Returns (model_name, checkpoint_path, config_path) ready for `load_open_clip`. The same
    seed gives byte-identical weights; the global torch RNG is left untouched.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config_path = directory / f"{TINY_CLIP_NAME}.json"
    config_path.write_text(json.dumps(TINY_CLIP_CONFIG, indent=2))
    known = open_clip.get_model_config(TINY_CLIP_NAME)
    if known is None:
        open_clip.add_model_config(config_path)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = create_model_quietly(TINY_CLIP_NAME)
    checkpoint_path = directory / f"{TINY_CLIP_NAME}-seed{seed}.safetensors"
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(checkpoint_path), metadata=SEEDED_METADATA)
    return TINY_CLIP_NAME, checkpoint_path, config_path


def make_tiny_aesthetic_head(path: str | Path, embed_dim: int, seed: int = 0) -> Path:
    """Write a seeded random LAION-layout aesthetic head for `embed_dim`-wide embeddings."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head = AestheticHead(embed_dim)
    state = {k: v.contiguous() for k, v in head.state_dict().items()}
    save_file(state, str(path), metadata=SEEDED_METADATA)
    return path
