"""`make apps-demo`: STIV's applications trained and measured on the CPU, after the train-demo.

    the train-demo's TI2V run (runs/demo/runs/ti2v; trained first when missing)
    + 50-frame moving shapes (training/shapes.py) and multi-view renders (demos/multiview.py)
      -> stiv curate (the renders with pipelines/curate-multiview.yaml) -> snapshot "apps"
      -> stiv prepare at frame_stride 1: one table, buckets f50x32x32 and f7x32x32
      -> stiv train: v2v, tup, keyframe (keyframes + fill + extend), multiview, all-tasks,
         each from the TI2V run (pipelines/train-*-tiny-cpu.yaml)
      -> generate on held-out prompts, clips and objects; measure (docs/applications.md)

The last line printed is one JSON object with exactly the issue's keys; the line before it
holds the details (baselines, call counts, the T2V direction before upsampling).

    python -m demos.apps_demo [--root runs/demo] [--steps-scale 1.0] [--seeds-per-prompt 4]

Held out: the train-demo's 8 (colour, shape, direction) combinations never appear in the apps
training videos either, every clip is a new render (new seeds), and the multi-view objects are
(shape, palette) combinations no training object has (`demos.multiview.specs_split`).
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from demos.train_demo import GEN_SIZE, held_out_combos, training_specs
from training.shapes import ShapeSpec

VIDEO_SIZE = 64  # rendered and curated videos (px); prepare resizes to the 32 px buckets
SOURCE_FRAMES = 56  # rendered; the split trims 2 frames at each end, prepare centres 50
APPS_FRAMES = 50  # prepared frames per shape clip: one keyframe window (8 at stride 7)
TRAVEL = 0.65  # of the frame over the rendered clip (training/shapes.py render)
WINDOW = 8  # latent frames per training window and sampling call (the model's native length)
KEYFRAMES, KEYFRAME_GAP = 8, 7  # long video: (8 - 1) * 7 + 1 = 50 frames
CONTEXT = 4  # prediction and rollout: frames given
CFG_SCALE = 2.0  # the train-demo's chosen scale (README, train-demo); one scale, no sweep
STAGES = ("v2v", "tup", "keyframe", "multiview", "all-tasks")
# Step caps; each stage's YAML sets max_minutes (5 + 4 + 8 + 4 + 12 = 33), so the training
# keeps to the 45 minutes beyond the train-demo with data and sampling.
STAGE_STEPS = {"v2v": 3000, "tup": 3000, "keyframe": 5000, "multiview": 3000, "all-tasks": 8000}
STAGE_MINUTES = {"v2v": 5, "tup": 4, "keyframe": 8, "multiview": 4, "all-tasks": 12}
MULTIVIEW_TRAIN, MULTIVIEW_HELD_OUT = 60, 8
BUCKETS = "[{num_frames: 50, height: 32, width: 32}, {num_frames: 7, height: 32, width: 32}]"


def _resize(frames: np.ndarray, size: int) -> np.ndarray:
    import cv2

    return np.stack([cv2.resize(f, (size, size), interpolation=cv2.INTER_AREA) for f in frames])


def build_apps_data(root: Path, videos_per_combo: int, multiview_objects: int) -> dict[str, Any]:
    """Long shape videos and multi-view renders -> curated clips -> snapshot -> one latents
    table at stride 1 (docs/applications.md "Preparing the latents")."""
    from data_engine.config import load_curate_config
    from data_engine.pipeline import run_curate
    from data_engine.store import Database
    from demos import multiview
    from training.encoders import write_tiny_models
    from training.prepare import run_prepare
    from training.shapes import write_dataset

    db_path = root / "apps_db"
    specs = training_specs(videos_per_combo, seed=50_000)
    write_dataset(root / "apps_videos", specs, SOURCE_FRAMES, VIDEO_SIZE, fps=8, travel=TRAVEL)
    objects, _ = multiview.specs_split(multiview_objects, 0, seed=0)
    multiview.write_dataset(root / "multiview_videos", objects, size=VIDEO_SIZE, fps=7)
    shapes_cfg = load_curate_config(
        None,
        ["split.min_clip_s=1.0", "caption.backend=sidecar", "sampling.frames_per_clip=3"],
        "probe,split,motion,clarity,caption",
    )
    shape_clips = run_curate([str(root / "apps_videos")], str(db_path), shapes_cfg).clips
    views_cfg = load_curate_config("pipelines/curate-multiview.yaml")
    view_clips = run_curate([str(root / "multiview_videos")], str(db_path), views_cfg).clips
    db = Database(db_path)
    if "apps" not in {s.name for s in db.list_snapshots()}:
        db.create_snapshot("apps", "caption IS NOT NULL")
    text_dir = write_tiny_models(root / "models")["text"]
    sets = [
        f"encoder.text_path={text_dir}",
        "encoder.text_max_length=16",
        "latents_table=latents_tiny_apps",
        "frame_stride=1",
        f"buckets={BUCKETS}",
    ]
    latents = run_prepare(str(db_path), "apps", "pipelines/prepare-tiny-cpu.yaml", sets)
    return {
        "shape_videos": len(specs),
        "multiview_objects": len(objects),
        "clips": {"shapes": shape_clips, "multiview": view_clips},
        "latents": latents.get("written"),
    }


def ensure_base(root: Path, base_steps_scale: float, videos_per_combo: int) -> float:
    """The train-demo's T2I -> T2V -> TI2V runs the apps start from; trained (without the
    train-demo's evaluation) when `root/runs/ti2v` has no checkpoint. Returns minutes spent."""
    from demos.train_demo import build_data, train_stages
    from training.checkpoint import list_checkpoints

    if list_checkpoints(root / "runs" / "ti2v"):
        return 0.0
    started = time.monotonic()
    build_data(root, videos_per_combo)
    train_stages(root, base_steps_scale)
    return (time.monotonic() - started) / 60.0


def train_apps(
    root: Path, steps_scale: float, minutes_scale: float, batch_size: int | None
) -> float:
    """Every application stage from the TI2V run; returns the training wall time in minutes."""
    from training.train import run_train

    started = time.monotonic()
    for stage in STAGES:
        steps = max(int(STAGE_STEPS[stage] * steps_scale), 2)
        sets = [
            f"db={root / 'apps_db'}",
            f"run_dir={root / 'runs' / stage}",
            f"init_from.run_dir={root / 'runs' / 'ti2v'}",
            f"max_steps={steps}",
            f"max_minutes={STAGE_MINUTES[stage] * minutes_scale}",
            f"checkpoint_every={max(steps // 2, 1)}",
        ]
        if batch_size:
            sets.append(f"data.batch_size={batch_size}")
        run_train(f"pipelines/train-{stage}-tiny-cpu.yaml", sets)
    return (time.monotonic() - started) / 60.0


# ------------------------------------------------------------------------------ evaluation


def held_out_clips(seeds_per_prompt: int) -> tuple[list[ShapeSpec], np.ndarray]:
    """Held-out specs (8 combinations x seeds) and their clips as training sees them:
    (N, 50, 32, 32, 3), the centred 50 of the rendered frames at the generation size."""
    from training.shapes import render

    specs = [
        ShapeSpec(c, s, d, 90_000 + i * 101 + k)
        for i, (c, s, d) in enumerate(held_out_combos())
        for k in range(seeds_per_prompt)
    ]
    first = (SOURCE_FRAMES - APPS_FRAMES) // 2
    clips = np.stack(
        [
            _resize(render(spec, SOURCE_FRAMES, VIDEO_SIZE, TRAVEL)[first : first + APPS_FRAMES],
                    GEN_SIZE)
            for spec in specs
        ]
    )  # fmt: skip
    return specs, clips


def run_loader(runs: dict[str, Path]) -> Callable[[str], Any]:
    """role -> the `Generator` of that role's run directory, one model in memory at a time."""
    from training.generate import Generator

    cache: dict[Path, Generator] = {}

    def load(role: str) -> Generator:
        path = runs[role]
        if path not in cache:
            cache.clear()
            cache[path] = Generator(str(path))
        return cache[path]

    return load


def measure_model(
    load: Callable[[str], Any],
    specs: list[ShapeSpec],
    clips: np.ndarray,
    objects: list,
    steps: int,
) -> tuple[dict[str, Any], dict[str, Any], dict[str, np.ndarray]]:
    """The issue's figures for one model per role (`load(role)` -> a Generator; roles:
    predict, upsample, long, multiview, t2v). Returns (figures, details, strip videos)."""
    from demos import multiview
    from training.generate import (
        long_videos,
        multiview_videos,
        rollout_calls,
        rollout_videos,
        upsample_videos,
    )
    from training.shapes import (
        MIDPOINT_TOLERANCE_PX,
        direction_consistent,
        measure_colour_kept,
        measure_direction,
        midpoint_errors,
    )

    prompts = [s.caption for s in specs]
    truth = [(s.colour, s.direction) for s in specs]
    sampling = {"height": GEN_SIZE, "width": GEN_SIZE, "cfg_scale": CFG_SCALE, "steps": steps}

    def fraction(hits) -> float:
        return round(float(np.mean(list(hits))), 4)

    figures: dict[str, Any] = {}
    details: dict[str, Any] = {}
    videos: dict[str, np.ndarray] = {}

    # Prediction (V2V): the first 4 frames at the task's stride given; direction measured over
    # the generated frames (from the last given one on).
    gen = load("predict")
    stride = gen.task_stride("predict")
    given = {i: clips[:, i * stride] for i in range(CONTEXT)}
    predicted = gen.sample(prompts, frames=WINDOW, given_pixels=given, frame_stride=stride,
                           seed=11, **sampling)  # fmt: skip
    figures["prediction_direction_accuracy"] = fraction(
        measure_direction(v[CONTEXT - 1 :], c) == d for v, (c, d) in zip(predicted, truth)
    )
    videos["predict"] = predicted

    # Interpolation with the TUP: a held-out clip's frames at stride 2 x the TUP stride given
    # at the even positions; each generated frame between two given ones must lie within 2 px
    # of their centroids' midpoint. Copying the frame before is the baseline.
    tup = load("upsample")
    stride = tup.task_stride("upsample")
    window = clips[:, : WINDOW * stride : stride]
    given = {i: window[:, i] for i in range(0, WINDOW, 2)}
    filled = tup.sample(prompts, frames=WINDOW, given_pixels=given, frame_stride=stride, seed=12,
                        **sampling)  # fmt: skip
    inner = list(range(1, WINDOW - 1, 2))
    copied = window.copy()
    copied[:, 1::2] = window[:, 0::2]
    # Each batch's centroids are measured once: the share within 2 px (the figure) and,
    # since that test cannot tell a good fill from a copy when shapes move slowly, the mean
    # distance to the midpoint (px; frames without a centroid left out). A real interpolator
    # beats the copy on the mean.
    measured = (
        (filled, figures, "interpolation_midpoint_accuracy", "interpolation_mean_error_px"),
        (copied, details, "interpolation_copy_previous_baseline",
         "interpolation_copy_previous_mean_error_px"),
        (window, details, "interpolation_true_frames", "interpolation_true_frames_mean_error_px"),
    )  # fmt: skip
    for batch, into, share_key, mean_key in measured:
        errors = [e for v, (c, _) in zip(batch, truth) for e in midpoint_errors(v, c, inner)]
        found = [e for e in errors if e is not None]
        into[share_key] = fraction(e is not None and e <= MIDPOINT_TOLERANCE_PX for e in errors)
        details[mean_key] = round(float(np.mean(found)), 3) if found else None
    videos["interpolate"] = filled

    # TUP cascaded after T2V: the T2V sample's frames doubled; direction before and after.
    t2v_gen = load("t2v")
    t2v = t2v_gen.sample(prompts, frames=WINDOW, frame_stride=t2v_gen.task_stride("t2v"),
                         seed=13, **sampling)  # fmt: skip
    tup = load("upsample")
    upsampled = upsample_videos(tup, prompts, t2v, window=WINDOW, seed=14, **sampling)
    details["t2v_direction_accuracy_before_tup"] = fraction(
        measure_direction(v, c) == d for v, (c, d) in zip(t2v, truth)
    )
    figures["tup_direction_accuracy"] = fraction(
        measure_direction(v, c) == d for v, (c, d) in zip(upsampled, truth)
    )
    figures["tup_frames_factor"] = upsampled.shape[1] / t2v.shape[1]
    videos["upsample"] = upsampled

    # Long video: keyframes from the held-out first frame, then every gap filled; against an
    # autoregressive rollout from the clip's first 4 frames to the same length.
    gen = load("long")
    long = long_videos(gen, prompts, clips[:, 0], keyframes=KEYFRAMES, gap=KEYFRAME_GAP, seed=15,
                       **sampling)  # fmt: skip
    figures["long_video_frames"] = int(long.shape[1])
    figures["long_video_direction_accuracy"] = fraction(
        direction_consistent(v, c, d) for v, (c, d) in zip(long, truth)
    )
    figures["long_video_colour_kept"] = fraction(
        measure_colour_kept(v, c) for v, (c, _) in zip(long, truth)
    )
    rollout = rollout_videos(gen, prompts, clips[:, :CONTEXT], long.shape[1], window=WINDOW,
                             seed=16, **sampling)  # fmt: skip
    figures["rollout_direction_accuracy"] = fraction(
        direction_consistent(v, c, d) for v, (c, d) in zip(rollout, truth)
    )
    details["rollout_colour_kept"] = fraction(
        measure_colour_kept(v, c) for v, (c, _) in zip(rollout, truth)
    )
    details["long_video_sampling_windows"] = 1 + (KEYFRAMES - 1)
    details["rollout_sampling_windows"] = rollout_calls(long.shape[1], CONTEXT, WINDOW)
    details["native_frames"] = WINDOW
    videos["long"], videos["rollout"] = long, rollout

    # Multi-view on held-out objects: silhouette IoU of the six generated views with the true
    # renders, against copying the input view six times.
    gen = load("multiview")
    true = np.stack([_resize(multiview.render_views(o, VIDEO_SIZE), GEN_SIZE) for o in objects])
    views = multiview_videos(gen, [o.caption for o in objects], true[:, 0], window=WINDOW,
                             seed=17, **sampling)  # fmt: skip
    copies = np.repeat(true[:, :1], multiview.NUM_FRAMES, axis=1)
    figures["multiview_iou"] = round(
        float(np.mean([multiview.silhouette_iou(v[1:], t[1:]) for v, t in zip(views, true)])), 4
    )
    figures["multiview_copy_baseline_iou"] = round(
        float(np.mean([multiview.silhouette_iou(c[1:], t[1:]) for c, t in zip(copies, true)])), 4
    )
    videos["multiview"] = np.concatenate([views, true], axis=1)  # generated, then the truth
    return figures, details, videos


def write_strips(videos: dict[str, np.ndarray], figures_dir: Path, rows: int = 4) -> list[str]:
    """One PNG per mode: the first `rows` samples (one per held-out prompt), frames across."""
    from training.generate import write_strip

    figures_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for mode, batch in videos.items():
        step = max(len(batch) // rows, 1)
        picked = batch[::step][:rows]
        path = figures_dir / f"apps-{mode}.png"
        write_strip(path, np.concatenate(list(picked), axis=1), scale=2)
        written.append(str(path))
    return written


def evaluate(root: Path, seeds_per_prompt: int, steps: int, figures_dir: Path) -> dict[str, Any]:
    from demos import multiview

    specs, clips = held_out_clips(seeds_per_prompt)
    _, objects = multiview.specs_split(0, MULTIVIEW_HELD_OUT, seed=0)
    run = root / "runs"
    single = {"predict": run / "v2v", "upsample": run / "tup", "long": run / "keyframe",
              "multiview": run / "multiview", "t2v": run / "all-tasks"}  # fmt: skip
    figures, details, videos = measure_model(run_loader(single), specs, clips, objects, steps)
    strips = write_strips(videos, figures_dir)
    everything = dict.fromkeys(single, run / "all-tasks")
    all_figures, all_details, _ = measure_model(
        run_loader(everything), specs, clips, objects, steps
    )
    figures["all_tasks"] = all_figures
    details["all_tasks"] = all_details
    details["strips"] = strips
    details["held_out_prompts"] = sorted({s.caption for s in specs})
    details["samples_per_prompt"] = seeds_per_prompt
    details["held_out_objects"] = [o.caption for o in objects]
    details["sampling_steps"], details["cfg_scale"] = steps, CFG_SCALE
    return {"figures": figures, "details": details}


FIGURE_KEYS = (
    "prediction_direction_accuracy",
    "interpolation_midpoint_accuracy",
    "tup_direction_accuracy",
    "tup_frames_factor",
    "long_video_frames",
    "long_video_direction_accuracy",
    "long_video_colour_kept",
    "rollout_direction_accuracy",
    "multiview_iou",
    "multiview_copy_baseline_iou",
)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default="runs/demo", help="the train-demo's root")
    parser.add_argument(
        "--steps-scale", type=float, default=1.0, help="of every apps stage's steps"
    )
    parser.add_argument("--minutes-scale", type=float, default=1.0, help="of every time cap")
    parser.add_argument("--base-steps-scale", type=float, default=1.0,
                        help="train-demo stages' steps when the TI2V run is missing")  # fmt: skip
    parser.add_argument("--videos-per-combo", type=int, default=6)
    parser.add_argument("--multiview-objects", type=int, default=MULTIVIEW_TRAIN)
    parser.add_argument("--seeds-per-prompt", type=int, default=4)
    parser.add_argument("--sampling-steps", type=int, default=25)
    parser.add_argument("--batch-size", type=int, help="per-rank batch for every apps stage")
    parser.add_argument("--figures", default="docs", help="where the PNG strips go")
    args = parser.parse_args(argv)
    root = Path(args.root).absolute()
    base_minutes = ensure_base(root, args.base_steps_scale, args.videos_per_combo)
    started = time.monotonic()
    data = build_apps_data(root, args.videos_per_combo, args.multiview_objects)
    data_minutes = (time.monotonic() - started) / 60.0
    minutes = train_apps(root, args.steps_scale, args.minutes_scale, args.batch_size)
    started = time.monotonic()
    result = evaluate(root, args.seeds_per_prompt, args.sampling_steps, Path(args.figures))
    details = result["details"]
    details.update(
        data=data,
        base_minutes=round(base_minutes, 2),
        data_minutes=round(data_minutes, 2),
        eval_minutes=round((time.monotonic() - started) / 60.0, 2),
    )
    figures = {key: result["figures"][key] for key in FIGURE_KEYS}
    figures["all_tasks"] = {key: result["figures"]["all_tasks"][key] for key in FIGURE_KEYS}
    figures["apps_train_minutes"] = round(minutes, 2)
    print(json.dumps({"details": details}))
    print(json.dumps(figures))
    return {"figures": figures, "details": details}


if __name__ == "__main__":
    main()
