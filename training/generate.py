"""`stiv generate`: T2V, TI2V, interpolation and prediction from a trained STIV checkpoint.

All four modes are frame replacement (STIV sec. 3): the given frames' clean latents are put
back at every sampling step, and the model fills the rest.

    T2V            prompt only
    TI2V           --image FIRST.png          frame 0 given
    interpolation  --image F.png --last-image L.png   first and last latent frames given
    prediction     --video CLIP.mp4           the clip's first `--given-frames` latent frames

`--checkpoint` is a run directory (the latest checkpoint's consolidated EMA weights) or a file
written by `stiv export`. The latents are decoded with the encoder the training data was
prepared with (recorded in the checkpoint), written as an MP4 and a PNG strip of the frames.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from model.config import MICRO_COND_NAMES


@dataclass
class GenerateRequest:
    checkpoint: str
    prompt: str
    image: str | None = None  # first frame (TI2V, interpolation)
    last_image: str | None = None  # last frame (interpolation)
    video: str | None = None  # prediction: condition on this clip's first frames
    given_frames: int = 1  # prediction: latent frames taken from --video
    cfg_scale: float = 7.5  # JIT-CFG scale; 1.0 = conditional only
    steps: int = 50
    solver: str = "euler"
    seed: int = 0
    shift: float | None = None  # time-grid shift; None = the model's training shift
    frames: int = 8  # pixel frames to generate
    height: int = 32
    width: int = 32
    fps: int = 8
    out: str = "generated.mp4"

    def __post_init__(self) -> None:
        if self.last_image and not self.image:
            raise ValueError(
                "--last-image needs --image (interpolation gives first and last frames)"
            )
        if self.video and (self.image or self.last_image):
            raise ValueError("--video (prediction) cannot be combined with --image/--last-image")
        if self.frames < 1 or self.height < 8 or self.width < 8 or self.steps < 1:
            raise ValueError("--frames, --height, --width and --steps must be positive")
        if self.given_frames < 1:
            raise ValueError("--given-frames must be >= 1")
        if self.shift is not None and not self.shift > 0:
            raise ValueError("--shift must be > 0")


class Generator:
    """A loaded checkpoint with its encoders, ready to sample many prompts."""

    def __init__(self, checkpoint: str, device: str = "cpu") -> None:
        from training.checkpoint import load_ema_model, load_encoders

        model, config = load_ema_model(checkpoint, device=device)
        self._setup(model, config, *load_encoders(checkpoint), device)

    @classmethod
    def from_parts(
        cls, model: Any, config: Any, info: dict[str, Any], null: tuple, device: str = "cpu"
    ) -> Generator:
        """A generator around an in-memory model (validation during training); `model` may be
        None until a sampling call needs it."""
        generator = cls.__new__(cls)
        generator._setup(model, config, info, null, device)
        return generator

    def _setup(self, model: Any, config: Any, info: dict[str, Any], null: tuple, device: str):
        from training.encoders import TextEncoder, build_latent_encoder

        self.model, self.config, self.info = model, config, info
        self.null_tokens, self.null_mask, self.null_pooled = (x.to(device) for x in null)
        self.text = TextEncoder(self.info["text_path"], "encoders.text_path (from the checkpoint)",
                                int(self.info["text_len"]), device=device)  # fmt: skip
        self.latent = build_latent_encoder(
            self.info["encoder_kind"],
            self.info.get("vae_path"),
            int(self.info["pixel_patch"]),
            device,
        )
        self.frame_stride = int(self.info.get("frame_stride") or 1)
        self.device = device

    def micro_cond(self, batch: int, height: int, width: int, num_frames: int) -> torch.Tensor:
        """Micro-conditions of an uncropped clip at the output size (MICRO_COND_NAMES order)."""
        values = {
            "orig_height": height, "orig_width": width, "crop_top": 0, "crop_left": 0,
            "crop_height": height, "crop_width": width,
            "frame_stride": self.frame_stride if num_frames > 1 else 0,
        }  # fmt: skip
        row = [float(values[name]) for name in MICRO_COND_NAMES]
        return torch.tensor([row] * batch, dtype=torch.float32)

    def encode_frames(self, frames: np.ndarray) -> torch.Tensor:
        """(N, T, H, W, 3) uint8 -> latents (N, C, T, h, w)."""
        return self.latent.encode(frames).to(self.device)

    def sample(
        self,
        prompts: list[str],
        *,
        frames: int,
        height: int,
        width: int,
        cfg_scale: float,
        steps: int,
        seed: int,
        solver: str = "euler",
        given_pixels: dict[int, np.ndarray] | None = None,
        shift: float | None = None,
    ) -> np.ndarray:
        """Generate (N, frames, height, width, 3) uint8 videos. `given_pixels` maps a pixel
        frame index to (N, H, W, 3) frames that are held fixed (frame replacement)."""
        from model.sampling import sample

        down = self.latent.downsample
        if height % down or width % down:
            raise ValueError(f"--height/--width must be multiples of the encoder's {down}")
        n = len(prompts)
        latent_shape = (n, self.latent.latent_channels, frames, height // down, width // down)
        text = self.text.encode(prompts)
        given_latents = given_mask = None
        if given_pixels:
            video = np.zeros((n, frames, height, width, 3), dtype=np.uint8)
            given_mask = torch.zeros(n, frames, dtype=torch.bool)
            for index, pixels in given_pixels.items():
                video[:, index] = pixels
                given_mask[:, index] = True
            given_latents = self.encode_frames(video)
        latents = sample(
            self.model,
            shape=latent_shape,
            text_tokens=text.tokens,
            text_mask=text.mask,
            text_pooled=text.pooled,
            null_text_tokens=self.null_tokens,
            null_text_mask=self.null_mask,
            null_text_pooled=self.null_pooled,
            micro_cond=self.micro_cond(n, height, width, frames),
            given_latents=given_latents,
            given_mask=given_mask,
            cfg_scale=None if cfg_scale == 1.0 else cfg_scale,
            steps=steps,
            solver=solver,
            seed=seed,
            shift=shift,
        )
        from training.encoders import tensor_to_frames

        return tensor_to_frames(self.latent.decode(latents.cpu()))


def _read_image(path: str, height: int, width: int) -> np.ndarray:
    import cv2

    image = cv2.imread(path, cv2.IMREAD_COLOR)
    if image is None:
        raise FileNotFoundError(f"{path}: not a readable image")
    image = cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA)
    return image[..., ::-1].copy()  # BGR -> RGB


def _read_video_frames(path: str, count: int, stride: int, height: int, width: int) -> np.ndarray:
    """The clip's first `count` frames at `stride`, (count, height, width, 3) uint8 RGB.

    Decoded like `stiv prepare` decodes training clips (`training.prepare.decode_windows`):
    local paths and object stores (`s3://...`, credentials from `AWS_*`), frames rotated for
    display by their rotation metadata, so a portrait phone clip conditions as it is seen."""
    import cv2

    from data_engine.store import storage_options_from_env
    from data_engine.video import VideoError
    from stiv_core.config import ConfigError
    from training.prepare import decode_windows

    window = [i * stride for i in range(count)]
    try:
        (_, frames), *_ = decode_windows(path, [window], storage_options_from_env(path))
    except VideoError as err:
        raise ConfigError(
            f"--video: needs {count} frames at stride {stride} ({err.message})"
        ) from None
    return np.stack([cv2.resize(f, (width, height), interpolation=cv2.INTER_AREA) for f in frames])


def peek_checkpoint(path: str) -> tuple[Any, dict[str, Any]]:
    """(STIVConfig, encoder info) of a run's latest checkpoint or an exported file, read from
    its small JSON parts only (no weights), so bad requests fail at once."""
    import json

    from safetensors import safe_open

    from model.config import STIVConfig
    from training.checkpoint import (
        ENCODERS_FILE,
        MODEL_CONFIG_FILE,
        CheckpointError,
        latest_checkpoint,
    )

    if Path(path).is_file():
        with safe_open(path, "pt") as handle:
            metadata = handle.metadata() or {}
        if "stiv_config" not in metadata or "encoders" not in metadata:
            raise CheckpointError(f"{path}: not an exported STIV weights file")
        config, info = json.loads(metadata["stiv_config"]), json.loads(metadata["encoders"])
    else:
        ckpt = latest_checkpoint(path)
        config = json.loads((ckpt / MODEL_CONFIG_FILE).read_text())
        info = json.loads((ckpt / ENCODERS_FILE).read_text())
    return STIVConfig.from_dict(config), info


def check_shape(request: GenerateRequest, config: Any, downsample: int) -> None:
    """Refuse sizes the model cannot take, naming the flag: latent height and width must
    divide by the spatial patch, and a video's frames by the temporal patch (one frame is an
    image, which every model takes)."""
    from stiv_core.config import ConfigError

    cell = downsample * config.patch_size
    for flag, value in (("--height", request.height), ("--width", request.width)):
        if value % cell:
            raise ConfigError(
                f"{flag}: {value} is not a multiple of {cell} (encoder downsample "
                f"{downsample} x patch {config.patch_size}); try {max(cell, value // cell * cell)}"
            )
    pt = config.temporal_patch_size
    if request.frames > 1 and request.frames % pt:
        raise ConfigError(
            f"--frames: {request.frames} is not a multiple of the temporal patch {pt}; "
            f"try {max(pt, request.frames // pt * pt)}"
        )


def write_mp4(path: str | Path, frames: np.ndarray, fps: int) -> Path:
    """(T, H, W, 3) uint8 -> H.264 MP4 (PyAV); playable by any player."""
    from data_engine.video import write_video

    return write_video(path, list(frames), fps=fps)


def write_strip(path: str | Path, frames: np.ndarray, scale: int = 4) -> Path:
    """The frames side by side in one PNG, scaled up for a quick look."""
    import cv2

    strip = np.concatenate(list(frames), axis=1)
    strip = cv2.resize(strip, (strip.shape[1] * scale, strip.shape[0] * scale),
                       interpolation=cv2.INTER_NEAREST)  # fmt: skip
    cv2.imwrite(str(path), strip[..., ::-1])
    return Path(path)


def run_generate(request: GenerateRequest) -> dict[str, Any]:
    """Generate one video for `request`; write MP4 + PNG strip; return what was written."""
    config, info = peek_checkpoint(request.checkpoint)
    check_shape(request, config, int(info["downsample"]))  # before any weights load
    gen = Generator(request.checkpoint)
    h, w, t = request.height, request.width, request.frames
    given: dict[int, np.ndarray] = {}
    mode = "t2v"
    if request.image:
        given[0] = _read_image(request.image, h, w)[None]
        mode = "ti2v"
    if request.last_image:
        given[t - 1] = _read_image(request.last_image, h, w)[None]
        mode = "interpolation"
    if request.video:
        clip = _read_video_frames(request.video, request.given_frames, gen.frame_stride, h, w)
        given = {i: clip[i][None] for i in range(request.given_frames)}
        mode = "prediction"
    video = gen.sample(
        [request.prompt], frames=t, height=h, width=w, cfg_scale=request.cfg_scale,
        steps=request.steps, seed=request.seed, solver=request.solver, given_pixels=given or None,
        shift=request.shift,
    )[0]  # fmt: skip
    out = Path(request.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_mp4(out, video, request.fps)
    strip = write_strip(out.with_suffix(".png"), video)
    return {
        "mode": mode,
        "out": str(out),
        "strip": str(strip),
        "frames": t,
        "height": h,
        "width": w,
    }
