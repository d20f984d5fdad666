"""`stiv generate`: every application of STIV from a trained checkpoint.

Every mode is frame replacement (STIV sec. 3; docs/applications.md "Generating"): the given
frames' clean latents are put back at every sampling step, and the model fills the rest. The
frame-stride micro-condition of each sampling call is the stride the run's matching task was
trained at (read from the run's resolved config; `--frame-stride` overrides it).

    t2v          prompt only
    ti2v         --image FIRST.png                   frame 0 given
    interpolate  --image F.png --last-image L.png    first and last frames given
    predict      --video CLIP.mp4                    the clip's first `--given-frames` frames
    upsample     --video LOW.mp4                     the clip's frames at every other position
                                                     (TUP: doubles the frames)
    long         [--image FIRST.png]                 `--keyframes N` at `--keyframe-stride S`
                                                     first, then every gap filled: (N-1)S+1
    multiview    --image INPUT.png                   input view + six Zero123++ views

`--upsampler RUN` cascades a TUP run after any mode (doubling its frames). `--checkpoint` is a
run directory (the latest checkpoint's consolidated EMA weights) or a file written by `stiv
export`. The latents are decoded with the encoder the training data was prepared with
(recorded in the checkpoint), written as one MP4 and a PNG strip of the frames.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from model.config import MICRO_COND_NAMES

MODES = ("t2v", "ti2v", "predict", "interpolate", "upsample", "long", "multiview")
NUM_VIEWS = 6  # Zero123++'s novel views after the input image (docs/applications.md)
# Which trained task sets each sampling call's stride: preferred task names, then the given
# pattern (training/tasks.py). "keyframe" and "fill" are the two calls of `long`, "extend" the
# windows of an autoregressive rollout.
MODE_TASKS: dict[str, tuple[tuple[str, ...], str]] = {
    "t2v": (("t2v",), "none"),
    "ti2v": (("ti2v",), "first"),
    "predict": (("predict",), "first_k"),
    "interpolate": (("interpolate", "fill"), "endpoints"),
    "upsample": (("upsample", "tup"), "every_other"),
    "keyframe": (("keyframe",), "first"),
    "fill": (("fill", "interpolate"), "endpoints"),
    "extend": (("extend",), "first_k"),
    "multiview": (("multiview",), "views"),
}
# The inputs each mode takes: (needs, may take).
MODE_INPUTS: dict[str, tuple[set[str], set[str]]] = {
    "t2v": (set(), set()),
    "ti2v": ({"image"}, set()),
    "interpolate": ({"image", "last_image"}, set()),
    "predict": ({"video"}, set()),
    "upsample": ({"video"}, set()),
    "long": (set(), {"image"}),
    "multiview": ({"image"}, set()),
}
FLAGS = {"image": "--image", "last_image": "--last-image", "video": "--video"}


@dataclass
class GenerateRequest:
    """One `stiv generate` call; the CLI's defaults are these (stiv/cli.py reads them)."""

    checkpoint: str  # run directory or exported .safetensors
    prompt: str
    mode: str = ""  # one of MODES; "" = from the inputs (t2v, ti2v, interpolate or predict)
    image: str | None = None  # first frame (ti2v, interpolate, long) or input view (multiview)
    last_image: str | None = None  # last frame (interpolate)
    video: str | None = None  # predict: the clip whose first frames are given; upsample: input
    given_frames: int = 4  # predict: frames taken from --video (STIV-V2V: 4)
    upsampler: str | None = None  # a TUP run cascaded after the mode (doubles the frames)
    keyframes: int = 0  # long: keyframes generated first (0 = --frames)
    keyframe_stride: int = 0  # long: frames from one keyframe to the next (0 = --frames - 1)
    frame_stride: int = 0  # frame-stride micro-condition in source frames (0 = the run's task)
    device: str = "cpu"  # cpu | cuda
    cfg_scale: float = 7.5  # JIT-CFG scale; 1.0 = conditional only
    steps: int = 50  # sampling steps per call
    solver: str = "euler"  # euler | heun
    seed: int = 0
    shift: float | None = None  # time-grid shift; None = the model's training shift
    frames: int = 8  # frames per sampling window (the model's native length)
    height: int = 32
    width: int = 32
    fps: int = 8
    out: str = "generated.mp4"

    def __post_init__(self) -> None:
        if self.mode and self.mode not in MODES:
            raise ValueError(f"--mode: must be one of {', '.join(MODES)}, got {self.mode!r}")
        if not self.mode:
            if self.video and (self.image or self.last_image):
                raise ValueError(
                    "--video (prediction) cannot be combined with --image/--last-image"
                )
            if self.last_image and not self.image:
                raise ValueError(
                    "--last-image needs --image (interpolation gives first and last frames)"
                )
            self.mode = (
                "predict" if self.video else "interpolate" if self.last_image
                else "ti2v" if self.image else "t2v"
            )  # fmt: skip
        needs, may = MODE_INPUTS[self.mode]
        given = {name for name in FLAGS if getattr(self, name)}
        for name in sorted(needs - given):
            raise ValueError(f"--mode {self.mode}: needs {FLAGS[name]}")
        for name in sorted(given - needs - may):
            raise ValueError(f"--mode {self.mode}: does not take {FLAGS[name]}")
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"--device: must be cpu or cuda, got {self.device!r}")
        if self.frames < 1 or self.height < 8 or self.width < 8 or self.steps < 1:
            raise ValueError("--frames, --height, --width and --steps must be positive")
        if self.given_frames < 1:
            raise ValueError("--given-frames must be >= 1")
        if self.mode == "predict" and self.given_frames >= self.frames:
            raise ValueError(f"--given-frames: {self.given_frames} leaves nothing to predict "
                             f"in --frames {self.frames}")  # fmt: skip
        if self.keyframes < 0 or self.keyframe_stride < 0 or self.frame_stride < 0:
            raise ValueError("--keyframes, --keyframe-stride and --frame-stride must be >= 0")
        if self.mode == "long":
            if self.keyframes == 1:
                raise ValueError("--keyframes: a long video needs at least 2 keyframes")
            if self.keyframe_stride == 1:
                raise ValueError("--keyframe-stride: must be >= 2 (1 leaves no gap to fill)")
        if self.shift is not None and not self.shift > 0:
            raise ValueError("--shift must be > 0")

    @property
    def num_keyframes(self) -> int:
        return self.keyframes or self.frames

    @property
    def gap(self) -> int:
        """long: frames from one keyframe to the next (a fill window is gap + 1 frames)."""
        return self.keyframe_stride or self.frames - 1

    @property
    def output_frames(self) -> int:
        """Frames of the written video (before an --upsampler doubles them)."""
        if self.mode == "long":
            return (self.num_keyframes - 1) * self.gap + 1
        if self.mode == "multiview":
            return 1 + NUM_VIEWS
        if self.mode == "upsample":
            return 0  # twice the input clip's frames: known once it is read
        return self.frames


class Generator:
    """A loaded checkpoint with its encoders, ready to sample many prompts."""

    def __init__(self, checkpoint: str, device: str = "cpu") -> None:
        from training.checkpoint import load_ema_model, load_encoders, run_tasks

        model, config = load_ema_model(checkpoint, device=device)
        self._setup(model, config, *load_encoders(checkpoint), device)
        self.tasks = run_tasks(checkpoint)

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
        self.frame_stride = int(self.info.get("frame_stride") or 1)  # the prepare stride
        self.device = device
        self.tasks: list[dict[str, Any]] = []  # the run's training tasks (checkpoint.run_tasks)

    def task_stride(self, mode: str) -> int:
        """The frame-stride micro-condition (source frames) a sampling call of `mode` (a key of
        MODE_TASKS) uses: the prepare stride times the stride of the run's matching task, by
        name first, then by given pattern; the prepare stride when no task matches (T2V/TI2V
        stages)."""
        names, pattern = MODE_TASKS[mode]
        by_name = {t["name"]: t for t in self.tasks}
        task = next((by_name[n] for n in names if n in by_name), None)
        if task is None:
            task = next((t for t in self.tasks if t.get("given_frames") == pattern), None)
        return self.frame_stride * int(task.get("frame_stride", 1) if task else 1)

    def micro_cond(
        self,
        batch: int,
        height: int,
        width: int,
        num_frames: int,
        frame_stride: int | None = None,
    ) -> torch.Tensor:
        """Micro-conditions of an uncropped clip at the output size (MICRO_COND_NAMES order);
        `frame_stride` (source frames) defaults to the prepare stride."""
        stride = self.frame_stride if frame_stride is None else frame_stride
        values = {
            "orig_height": height, "orig_width": width, "crop_top": 0, "crop_left": 0,
            "crop_height": height, "crop_width": width,
            "frame_stride": stride if num_frames > 1 else 0,
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
        frame_stride: int | None = None,
    ) -> np.ndarray:
        """Generate (N, frames, height, width, 3) uint8 videos. `given_pixels` maps a pixel
        frame index to (N, H, W, 3) frames that are held fixed (frame replacement);
        `frame_stride` is the stride micro-condition (None = the prepare stride)."""
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
            micro_cond=self.micro_cond(n, height, width, frames, frame_stride),
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


# ---------------------------------------------------------------------------- applications
# Batched over N prompts; each returns (N, frames, H, W, 3) uint8. `sampling` holds the
# keyword arguments of Generator.sample that every call shares (height, width, cfg_scale,
# steps, seed, solver, shift).


def upsample_videos(
    tup: Generator,
    prompts: list[str],
    videos: np.ndarray,
    *,
    window: int,
    frame_stride: int | None = None,
    **sampling: Any,
) -> np.ndarray:
    """Temporal upsampler (STIV-TUP): (N, T) frames -> (N, 2T) frames, the inputs at the even
    positions, the TUP run filling the odd ones.

    The 2T positions are covered by windows of `window` frames starting at even positions,
    each with its even frames given (as the TUP trained: every other frame). Consecutive
    windows overlap by 2 so that an odd position is generated between two given neighbours
    wherever one exists; only the video's last frame has none. All windows of all videos are
    one batch. `frame_stride`: the TUP's micro-condition (default: its trained stride)."""
    n, t = videos.shape[:2]
    total = 2 * t
    if window % 2 or window < 4:
        raise ValueError(f"upsampler window: {window} frames must be even and >= 4")
    if total < window:
        raise ValueError(f"upsample: {t} input frames give {total}, fewer than one window "
                         f"of {window}; pass at least {window // 2}")  # fmt: skip
    starts = list(range(0, total - window + 1, window - 2))
    if starts[-1] != total - window:
        starts.append(total - window)
    out = np.zeros((n, total, *videos.shape[2:]), dtype=np.uint8)
    out[:, 0::2] = videos
    given = {
        local: np.concatenate([videos[:, (s + local) // 2] for s in starts])
        for local in range(0, window, 2)
    }
    stride = tup.task_stride("upsample") if frame_stride is None else frame_stride
    window_prompts = [prompts[i] for _ in starts for i in range(n)]  # window-major, as given
    filled = tup.sample(window_prompts, frames=window, given_pixels=given, frame_stride=stride,
                        **sampling)  # fmt: skip
    done = np.zeros(total, dtype=bool)
    for w, s in enumerate(starts):
        last = w == len(starts) - 1
        for local in range(1, window, 2):
            pos = s + local
            if done[pos] or (local == window - 1 and not last):
                continue  # a later window has this frame between two given ones
            out[:, pos] = filled[w * n : (w + 1) * n, local]
            done[pos] = True
    return out


def long_videos(
    gen: Generator,
    prompts: list[str],
    first_frames: np.ndarray | None,
    *,
    keyframes: int,
    gap: int,
    keyframe_stride: int | None = None,
    fill_stride: int | None = None,
    **sampling: Any,
) -> np.ndarray:
    """Hierarchical long video (STIV's long-video application): `keyframes` frames `gap`
    frames apart first (first frame given when `first_frames` (N, H, W, 3) is), then every gap
    filled by the fill mode with its two keyframes given: (keyframes - 1) * gap + 1 frames.
    The micro-condition changes between the two calls: the keyframe stride, then the fill
    stride (defaults: the run's trained ones)."""
    n = len(prompts)
    if keyframes < 2 or gap < 2:
        raise ValueError("long video: needs >= 2 keyframes and a gap of >= 2 frames")
    key_stride = gen.task_stride("keyframe") if keyframe_stride is None else keyframe_stride
    fill = gen.task_stride("fill") if fill_stride is None else fill_stride
    given = None if first_frames is None else {0: first_frames}
    keys = gen.sample(prompts, frames=keyframes, given_pixels=given, frame_stride=key_stride,
                      **sampling)  # fmt: skip
    gaps = keyframes - 1
    fill_prompts = [prompts[i] for _ in range(gaps) for i in range(n)]
    ends = {
        0: np.concatenate([keys[:, g] for g in range(gaps)]),
        gap: np.concatenate([keys[:, g + 1] for g in range(gaps)]),
    }
    filled = gen.sample(fill_prompts, frames=gap + 1, given_pixels=ends, frame_stride=fill,
                        **sampling)  # fmt: skip
    out = np.zeros((n, gaps * gap + 1, *keys.shape[2:]), dtype=np.uint8)
    for g in range(gaps):
        out[:, g * gap : (g + 1) * gap] = filled[g * n : (g + 1) * n, :gap]
    out[:, -1] = keys[:, -1]
    return out


def rollout_videos(
    gen: Generator,
    prompts: list[str],
    context: np.ndarray,
    total_frames: int,
    *,
    window: int,
    frame_stride: int | None = None,
    **sampling: Any,
) -> np.ndarray:
    """Autoregressive rollout, the baseline the paper's hierarchical long video beat: from
    `context` (N, k, H, W, 3), each window of `window` frames is predicted with its first k
    frames given (the last k frames so far), until `total_frames`. Returns the frames and
    costs ceil((total - k) / (window - k)) sampling calls."""
    k = context.shape[1]
    if not 0 < k < window:
        raise ValueError(f"rollout: context of {k} frames must be shorter than the window")
    stride = gen.task_stride("extend") if frame_stride is None else frame_stride
    frames = list(np.moveaxis(context, 1, 0))
    while len(frames) < total_frames:
        given = {i: frames[len(frames) - k + i] for i in range(k)}
        step = gen.sample(prompts, frames=window, given_pixels=given, frame_stride=stride,
                          **sampling)  # fmt: skip
        frames.extend(np.moveaxis(step[:, k:], 1, 0))
    return np.stack(frames[:total_frames], axis=1)


def rollout_calls(total_frames: int, context: int, window: int) -> int:
    """Sampling calls `rollout_videos` makes."""
    return math.ceil(max(total_frames - context, 0) / (window - context))


def multiview_videos(
    gen: Generator,
    prompts: list[str],
    inputs: np.ndarray,
    *,
    window: int,
    frame_stride: int | None = None,
    **sampling: Any,
) -> np.ndarray:
    """Multi-view: the input image (N, H, W, 3) as frame 0, the six views generated after it;
    the window's frames past the seventh are given copies of the input (the padding the run
    trained with, training/tasks.py "views"). Returns (N, 7, H, W, 3)."""
    if window < 1 + NUM_VIEWS:
        raise ValueError(f"multiview: a window of {window} frames has no room for 6 views")
    given = {0: inputs, **{i: inputs for i in range(1 + NUM_VIEWS, window)}}
    stride = gen.task_stride("multiview") if frame_stride is None else frame_stride
    views = gen.sample(prompts, frames=window, given_pixels=given, frame_stride=stride,
                       **sampling)  # fmt: skip
    return views[:, : 1 + NUM_VIEWS]


def read_image(path: str, height: int, width: int) -> np.ndarray:
    import cv2

    image = cv2.imread(path, cv2.IMREAD_COLOR)
    if image is None:
        raise FileNotFoundError(f"{path}: not a readable image")
    image = cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA)
    return image[..., ::-1].copy()  # BGR -> RGB


def read_video_frames(path: str, count: int, stride: int, height: int, width: int) -> np.ndarray:
    """The clip's first `count` frames at `stride`, (count, height, width, 3) uint8 RGB.

    Decoded like `stiv prepare` decodes training clips (`training.prepare_stages.decode_windows`):
    local paths and object stores (`s3://...`, credentials from `AWS_*`), frames rotated for
    display by their rotation metadata, so a portrait phone clip conditions as it is seen."""
    import cv2

    from data_engine.store import storage_options_from_env
    from data_engine.video import VideoError
    from stiv_core.config import ConfigError
    from training.prepare_stages import decode_windows

    window = [i * stride for i in range(count)]
    try:
        (_, frames), *_ = decode_windows(path, [window], storage_options_from_env(path))
    except VideoError as err:
        raise ConfigError(
            f"--video: needs {count} frames at stride {stride} ({err.message})"
        ) from None
    return np.stack([cv2.resize(f, (width, height), interpolation=cv2.INTER_AREA) for f in frames])


def read_all_frames(path: str, height: int, width: int) -> np.ndarray:
    """Every frame of a clip (upsample's input), decoded as `read_video_frames` does."""
    from data_engine.store import storage_options_from_env
    from data_engine.video import VideoError, probe
    from stiv_core.config import ConfigError

    try:
        count = probe(path, storage_options_from_env(path)).num_frames
    except VideoError as err:
        raise ConfigError(f"--video: {err.message}") from None
    return read_video_frames(path, count, 1, height, width)


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


def check_device(device: str) -> str:
    """The torch device to sample on; `cuda` without a usable GPU is refused in one line."""
    from stiv_core.config import ConfigError

    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            "--device cuda: no CUDA device is available here (torch.cuda.is_available() is "
            "False); use --device cpu"
        )
    return device


def _check_window(flag: str, frames: int, config: Any) -> None:
    from stiv_core.config import ConfigError

    pt = config.temporal_patch_size
    if frames > 1 and frames % pt:
        raise ConfigError(f"{flag}: gives windows of {frames} frames, not a multiple of the "
                          f"temporal patch {pt}")  # fmt: skip


def run_generate(request: GenerateRequest) -> dict[str, Any]:
    """Generate one video for `request`; write MP4 + PNG strip; return what was written."""
    from stiv_core.config import ConfigError

    config, info = peek_checkpoint(request.checkpoint)
    check_shape(request, config, int(info["downsample"]))  # before any weights load
    mode, h, w, t = request.mode, request.height, request.width, request.frames
    if mode == "long":
        _check_window("--keyframes", request.num_keyframes, config)
        _check_window("--keyframe-stride", request.gap + 1, config)
    window = math.ceil((1 + NUM_VIEWS) / config.temporal_patch_size) * config.temporal_patch_size
    if request.upsampler:
        peek_checkpoint(request.upsampler)  # a missing TUP run fails before sampling
    device = check_device(request.device)
    gen = Generator(request.checkpoint, device=device)
    prompts = [request.prompt]
    sampling = {
        "height": h, "width": w, "cfg_scale": request.cfg_scale, "steps": request.steps,
        "seed": request.seed, "solver": request.solver, "shift": request.shift,
    }  # fmt: skip
    override = request.frame_stride or None
    if mode == "long":
        first = read_image(request.image, h, w)[None] if request.image else None
        video = long_videos(gen, prompts, first, keyframes=request.num_keyframes,
                            gap=request.gap, **sampling)[0]  # fmt: skip
    elif mode == "multiview":
        view = read_image(request.image, h, w)[None]
        video = multiview_videos(gen, prompts, view, window=window, frame_stride=override,
                                 **sampling)[0]  # fmt: skip
    elif mode == "upsample":
        clip = read_all_frames(request.video, h, w)
        video = upsample_videos(gen, prompts, clip[None], window=t, frame_stride=override,
                                **sampling)[0]  # fmt: skip
    else:
        given: dict[int, np.ndarray] = {}
        if mode in ("ti2v", "interpolate"):
            given[0] = read_image(request.image, h, w)[None]
        if mode == "interpolate":
            given[t - 1] = read_image(request.last_image, h, w)[None]
        stride = override or gen.task_stride(mode)
        if mode == "predict":
            clip = read_video_frames(request.video, request.given_frames, stride, h, w)
            given = {i: clip[i][None] for i in range(request.given_frames)}
        video = gen.sample(prompts, frames=t, given_pixels=given or None, frame_stride=stride,
                           **sampling)[0]  # fmt: skip
    upsampled = False
    if request.upsampler:
        del gen  # one model in memory at a time
        tup = Generator(request.upsampler, device=device)
        if len(video) * 2 < t:
            raise ConfigError(f"--upsampler: {len(video)} frames are fewer than half of one "
                              f"TUP window ({t} frames)")  # fmt: skip
        video = upsample_videos(tup, prompts, video[None], window=t, **sampling)[0]
        upsampled = True
    out = Path(request.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_mp4(out, video, request.fps)
    strip = write_strip(out.with_suffix(".png"), video)
    return {
        "mode": mode,
        "upsampled": upsampled,
        "out": str(out),
        "strip": str(strip),
        "frames": len(video),
        "height": h,
        "width": w,
        "device": device,
    }
