"""Frozen encoders for latent preparation: frames -> latents, captions -> text embeddings.

Three latent encoders share one interface (`encode`: uint8 RGB frames -> latents, `decode`: the
inverse, to pixels in [-1, 1]):
- `VAEEncoder`: a diffusers `AutoencoderKL` from a local directory (STIV's baseline is
  `sd-vae-ft-ema`, 4 channels, 8x down, scaling 0.18215; docs/recipe.md "Latents and text"),
  applied per frame (the paper's VAE is per-frame).
- `PixelEncoder`: parameter-free space-to-depth, so CPU runs can learn without pretrained weights.

`TextEncoder` wraps a CLIP text model from a local directory (transformers `CLIPTextModel` +
`CLIPTokenizer`) and returns token embeddings, the padding mask and the pooled embedding, which
is the last non-padding (EOS) token of the last layer (docs/recipe.md "The singleton condition").
Tiny random variants (`make_tiny_vae`, `make_tiny_text_encoder`) are saved to a directory and
loaded back through the same `from_pretrained` path, so tests exercise the production loader.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

import numpy as np
import torch
from einops import rearrange

EncoderKind = Literal["pixel", "vae"]


class LatentEncoder(Protocol):
    """What prepare and generation need from a frame encoder."""

    name: str  # provenance: what produced the latents (kind + source)
    latent_channels: int  # channels per latent frame
    downsample: int  # pixels per latent cell along height and width

    def encode(self, frames: np.ndarray) -> torch.Tensor: ...

    def decode(self, latents: torch.Tensor) -> torch.Tensor: ...


def frames_to_tensor(frames: np.ndarray) -> torch.Tensor:
    """(N, T, H, W, 3) uint8 -> (N, 3, T, H, W) float32 in [-1, 1]."""
    x = torch.from_numpy(np.ascontiguousarray(frames)).float() / 127.5 - 1.0
    return rearrange(x, "n t h w c -> n c t h w")


def tensor_to_frames(x: torch.Tensor) -> np.ndarray:
    """(N, 3, T, H, W) float in [-1, 1] -> (N, T, H, W, 3) uint8."""
    x = ((x.float().clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8)
    return rearrange(x, "n c t h w -> n t h w c").cpu().numpy()


# --------------------------------------------------------------------------- pixel


class PixelEncoder:
    """Space-to-depth: each `patch` x `patch` pixel block becomes 3 * patch^2 channels.

    No parameters and exactly invertible, so a tiny DiT can learn on a CPU without a pretrained
    VAE. Pixels are scaled to [-1, 1], which keeps latents near unit variance like a scaled VAE.
    """

    def __init__(self, patch: int = 2) -> None:
        if patch < 1:
            raise ValueError("encoder.pixel_patch: must be >= 1")
        self.patch = patch
        self.latent_channels = 3 * patch * patch
        self.downsample = patch
        self.name = f"pixel-s2d-{patch}"

    def encode(self, frames: np.ndarray) -> torch.Tensor:
        """(N, T, H, W, 3) uint8 -> (N, 3 p^2, T, H/p, W/p) float32."""
        x = frames_to_tensor(frames)
        p = self.patch
        return rearrange(x, "n c t (h p1) (w p2) -> n (c p1 p2) t h w", p1=p, p2=p)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """(N, 3 p^2, T, h, w) -> (N, 3, T, h p, w p) in [-1, 1]."""
        p = self.patch
        return rearrange(latents, "n (c p1 p2) t h w -> n c t (h p1) (w p2)", p1=p, p2=p)


# --------------------------------------------------------------------------- VAE


def _require_dir(path: str | Path | None, config_key: str) -> Path:
    if not path:
        raise FileNotFoundError(
            f"{config_key}: no local weight directory given (no model hub here)"
        )
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"{config_key}: {path} is not a model directory (no config.json); "
            "download the weights elsewhere and copy the directory here"
        )
    return path


class VAEEncoder:
    """A frozen diffusers `AutoencoderKL` applied frame by frame.

    Latents are the posterior mean times the VAE's `scaling_factor` (0.18215 for sd-vae-ft-ema):
    the mean makes prepare deterministic and resumable (a re-run writes identical latents).
    """

    def __init__(
        self,
        path: str | Path | None,
        config_key: str = "encoder.vae_path",
        device: str = "cpu",
        frames_per_batch: int = 16,
    ) -> None:
        from diffusers import AutoencoderKL

        directory = _require_dir(path, config_key)
        self.vae = AutoencoderKL.from_pretrained(str(directory)).to(device).eval()
        self.vae.requires_grad_(False)
        self.device = device
        self.frames_per_batch = frames_per_batch
        self.scaling_factor = float(self.vae.config.scaling_factor)
        self.latent_channels = int(self.vae.config.latent_channels)
        self.downsample = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.name = f"vae:{directory.name}"

    @torch.no_grad()
    def encode(self, frames: np.ndarray) -> torch.Tensor:
        """(N, T, H, W, 3) uint8 -> (N, C, T, H/d, W/d) float32."""
        x = frames_to_tensor(frames)
        n = x.shape[0]
        flat = rearrange(x, "n c t h w -> (n t) c h w")
        chunks = []
        for start in range(0, flat.shape[0], self.frames_per_batch):
            batch = flat[start : start + self.frames_per_batch].to(self.device)
            chunks.append(self.vae.encode(batch).latent_dist.mean.float().cpu())
        z = torch.cat(chunks) * self.scaling_factor
        return rearrange(z, "(n t) c h w -> n c t h w", n=n)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """(N, C, T, h, w) -> (N, 3, T, h d, w d) in [-1, 1]."""
        n = latents.shape[0]
        flat = rearrange(latents.float(), "n c t h w -> (n t) c h w") / self.scaling_factor
        chunks = []
        for start in range(0, flat.shape[0], self.frames_per_batch):
            batch = flat[start : start + self.frames_per_batch].to(self.device)
            chunks.append(self.vae.decode(batch).sample.float().cpu())
        return rearrange(torch.cat(chunks), "(n t) c h w -> n c t h w", n=n)


def make_tiny_vae(directory: str | Path, seed: int = 0) -> Path:
    """Save a randomly initialised 2-level AutoencoderKL (4 latent channels, 2x down)."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=32,
        scaling_factor=0.18215,
    )
    directory = Path(directory)
    vae.save_pretrained(str(directory))
    return directory


# --------------------------------------------------------------------------- text


@dataclass
class TextEmbedding:
    """Encoded captions.

    tokens: (N, L, D) float32 last-layer token embeddings
    mask:   (N, L) bool, True on real tokens (BOS..EOS), False on padding
    pooled: (N, D) float32 embedding of the last non-padding (EOS) token
    """

    tokens: torch.Tensor
    mask: torch.Tensor
    pooled: torch.Tensor


class TextEncoder:
    """A frozen CLIP text encoder (transformers) loaded from a local directory."""

    def __init__(
        self,
        path: str | Path | None,
        config_key: str = "encoder.text_path",
        max_length: int | None = None,
        device: str = "cpu",
    ) -> None:
        from transformers import CLIPTextModel, CLIPTokenizer

        directory = _require_dir(path, config_key)
        self.tokenizer = CLIPTokenizer.from_pretrained(str(directory))
        self.model = CLIPTextModel.from_pretrained(str(directory)).to(device).eval()
        self.model.requires_grad_(False)
        self.device = device
        positions = int(self.model.config.max_position_embeddings)
        self.max_length = min(max_length or positions, positions)
        self.dim = int(self.model.config.hidden_size)
        self.name = f"clip-text:{directory.name}"

    @torch.no_grad()
    def encode(self, captions: list[str]) -> TextEmbedding:
        """Captions -> token embeddings (padded to `max_length`), mask and pooled EOS token."""
        batch = self.tokenizer(
            list(captions),
            padding="max_length",
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
        )
        mask = batch["attention_mask"].bool()
        out = self.model(
            input_ids=batch["input_ids"].to(self.device),
            attention_mask=batch["attention_mask"].to(self.device),
        )
        tokens = out.last_hidden_state.float().cpu()
        # The pooled vector is the last real token (EOS), never a padding position
        # (docs/design-notes.md "Text encoder: pooled text and the empty prompt"); truncation
        # keeps EOS as the last real token.
        last = mask.sum(dim=1) - 1
        pooled = tokens[torch.arange(tokens.shape[0]), last]
        return TextEmbedding(tokens=tokens, mask=mask, pooled=pooled)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte-level alphabet: every byte maps to a printable unicode character."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in chars)))


def _bpe(pieces: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """Byte-pair merging as CLIP's tokenizer does it: merge the best-ranked adjacent pair until
    none is in `ranks`."""
    while len(pieces) > 1:
        pairs = [
            (ranks.get(pair, len(ranks)), i) for i, pair in enumerate(itertools.pairwise(pieces))
        ]
        rank, i = min(pairs)
        if rank == len(ranks):
            break
        pieces = [*pieces[:i], pieces[i] + pieces[i + 1], *pieces[i + 2 :]]
    return pieces


def make_tiny_text_encoder(
    directory: str | Path,
    hidden_size: int = 32,
    max_length: int = 48,
    seed: int = 0,
    words: Iterable[str] = (),
    embedding_std: float = 0.2,
) -> Path:
    """Save a randomly initialised 2-layer CLIP text model with an offline BPE tokenizer.

    The vocabulary is the 256 byte symbols, each also with the end-of-word marker, plus the two
    special tokens. Without `words` there are no merges, so every word splits into bytes. Each
    of `words` gets the chain of merges that makes it one token, as a real CLIP tokenizer does for
    common words: with bytes only, a word's identity is spread over a variable run of character
    tokens ("left" and "right" both end in "t</w>"), which a random 2-layer encoder hardly
    separates; the train-demo's direction words were lost that way.

    Token embeddings are drawn with `embedding_std` (transformers' CLIP init uses 0.02). At 0.02
    a token's own embedding is tiny next to the first attention layer's residual output, so
    every position ends up close to the causal mean of the tokens before it and a caption's
    late words hardly register (measured: "left" vs "right" in the 5th word position moved the
    encoding 3x less than "red" vs "blue" in the 2nd). A pretrained CLIP keeps each word's
    identity; 0.2 makes the random stand-in do the same (direction then differs about as much as
    colour).
    """
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    symbols = list(_bytes_to_unicode().values())
    vocab_list = symbols + [s + "</w>" for s in symbols] + ["<|startoftext|>", "<|endoftext|>"]
    # Merges are appended per word, each at a lower priority than all before it, so the words
    # already made single tokens keep their segmentation (BPE applies the best-ranked pair first).
    merges: dict[tuple[str, str], int] = {}
    byte_symbol = _bytes_to_unicode()
    words = list(dict.fromkeys(w.lower() for w in words))  # once: `words` may be an iterator
    for word in words:
        pieces = [byte_symbol[b] for b in word.encode("utf-8")]
        pieces[-1] += "</w>"
        pieces = _bpe(pieces, merges)
        while len(pieces) > 1:
            merges[(pieces[0], pieces[1])] = len(merges)
            vocab_list.append(pieces[0] + pieces[1])
            pieces = [pieces[0] + pieces[1], *pieces[2:]]
    vocab = {token: i for i, token in enumerate(vocab_list)}
    (directory / "vocab.json").write_text(json.dumps(vocab))
    lines = ["#version: 0.2", *(f"{a} {b}" for a, b in merges)]
    (directory / "merges.txt").write_text("\n".join(lines) + "\n")
    tokenizer = CLIPTokenizer(
        vocab=str(directory / "vocab.json"),
        merges=str(directory / "merges.txt"),
        model_max_length=max_length,
    )
    for word in words:
        pieces = tokenizer.tokenize(word)
        if len(pieces) != 1:
            raise ValueError(f"tiny tokenizer: {word!r} does not become one token: {pieces}")
    tokenizer.save_pretrained(str(directory))
    torch.manual_seed(seed)
    config = CLIPTextConfig(
        vocab_size=len(vocab),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=max_length,
        bos_token_id=vocab["<|startoftext|>"],
        eos_token_id=vocab["<|endoftext|>"],
        pad_token_id=vocab["<|endoftext|>"],
    )
    model = CLIPTextModel(config)
    embedding = model.get_input_embeddings()
    with torch.no_grad():
        embedding.weight.normal_(0.0, embedding_std)
    model.save_pretrained(str(directory))
    return directory


def build_latent_encoder(
    kind: EncoderKind,
    vae_path: str | None = None,
    pixel_patch: int = 2,
    device: str = "cpu",
) -> LatentEncoder:
    """The latent encoder a prepare or generate config names."""
    if kind == "pixel":
        return PixelEncoder(pixel_patch)
    if kind == "vae":
        return VAEEncoder(vae_path, device=device)
    raise ValueError(f"encoder.kind: unknown encoder {kind!r} (pixel | vae)")


# The caption words of demos/multiview.py's renders ("a red and blue cube"), written out here
# because library code does not import demos/ (docs/architecture.md "Import layers");
# tests/training/test_apps_generate.py checks that this list covers MULTIVIEW_CAPTION_WORDS.
MULTIVIEW_CAPTION_WORDS = (
    "a", "and", "red", "green", "blue", "yellow", "cube", "pyramid", "prism", "octahedron",
)  # fmt: skip
TINY_TEXT_DIR = "tiny-clip-text"  # the directory name pipelines/*-tiny-cpu*.yaml expect


def write_tiny_models(out: str | Path) -> dict[str, str]:
    """Write the seeded tiny encoders the tiny CPU pipelines name (`models/tiny-clip-text` in
    pipelines/prepare-tiny-cpu*.yaml): the CLIP text stand-in with the caption words of the
    train-demo's moving shapes and of the multi-view renders (docs/applications.md
    "Multi-view") as single tokens, 16 tokens long. Returns {name: directory}. Same seed, same
    files: rerunning overwrites with identical weights."""
    from training.shapes import CAPTION_WORDS

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--out: {out} exists and is not a directory")
    # Shape words first: their merges keep the ranks (and token ids) they had alone.
    words = (*CAPTION_WORDS, *MULTIVIEW_CAPTION_WORDS)
    text = make_tiny_text_encoder(out / TINY_TEXT_DIR, max_length=16, words=words)
    return {"text": str(text.absolute())}
