"""`make apps-demo` (demos/apps_demo.py): its measuring on an untrained in-memory model, and
the whole driver end to end at a tiny scale (every application stage config through Ray
Train for two steps)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from demos import apps_demo, multiview
from demos.train_demo import held_out_combos, training_specs
from training.checkpoint import export_ema, list_checkpoints, run_tasks
from training.generate import Generator


def test_held_out_clips_are_unseen_combinations_at_the_generation_size() -> None:
    specs, clips = apps_demo.held_out_clips(seeds_per_prompt=2)
    assert clips.shape == (16, apps_demo.APPS_FRAMES, 32, 32, 3) and clips.dtype == np.uint8
    trained = {(s.colour, s.shape, s.direction) for s in training_specs(1, seed=50_000)}
    assert {(s.colour, s.shape, s.direction) for s in specs} == set(held_out_combos())
    assert not trained & set(held_out_combos())


def test_measuring_reports_every_figure(apps_generator, tmp_path) -> None:
    """Every issue figure is computed (fractions in [0, 1]), the long video is 50 frames (6.25x
    the native 8), TUP doubles the frames, and a strip is written per mode. The model is
    untrained: the values themselves mean nothing here."""
    specs, clips = apps_demo.held_out_clips(seeds_per_prompt=1)
    _, objects = multiview.specs_split(0, 2, seed=0)
    figures, details, videos = apps_demo.measure_model(
        lambda role: apps_generator, specs[:4], clips[:4], objects, steps=1
    )
    assert set(figures) == set(apps_demo.FIGURE_KEYS)
    assert figures["long_video_frames"] == 50 and figures["tup_frames_factor"] == 2.0
    for key in apps_demo.FIGURE_KEYS:
        if key not in ("long_video_frames", "tup_frames_factor"):
            assert 0.0 <= figures[key] <= 1.0, key
    # The true frames move linearly: they pass the midpoint test the model is held to.
    assert details["interpolation_true_frames"] == 1.0
    assert details["rollout_sampling_windows"] == 12 and details["long_video_sampling_windows"] == 8
    strips = apps_demo.write_strips(videos, tmp_path)
    assert {p.split("/")[-1] for p in strips} == {
        f"apps-{m}.png"
        for m in ("predict", "interpolate", "upsample", "long", "rollout", "multiview")
    }


@pytest.mark.slow
def test_apps_demo_end_to_end_at_a_tiny_scale(tmp_path, demo_run, capsys) -> None:
    """The driver on a copy of the train-demo fixture's root (so its TI2V run is found and not
    trained again): the apps data curated and prepared at stride 1, every application stage
    config (pipelines/train-*-tiny-cpu.yaml) run for two steps through Ray Train from the TI2V
    weights, then the evaluation; the last line holds exactly the issue's keys."""
    root = tmp_path / "demo"
    shutil.copytree(demo_run[0] / "runs" / "ti2v", root / "runs" / "ti2v")
    result = apps_demo.main(
        ["--root", str(root), "--steps-scale", "0.0001", "--base-steps-scale", "0.0001",
         "--videos-per-combo", "1", "--multiview-objects", "8", "--seeds-per-prompt", "1",
         "--sampling-steps", "1", "--batch-size", "2", "--figures", str(tmp_path / "figures")]
    )  # fmt: skip
    assert result["details"]["base_minutes"] == 0.0  # the copied TI2V run was used as it is
    for stage in apps_demo.STAGES:  # two steps, a checkpoint every step, two kept
        assert [s for s, _ in list_checkpoints(root / "runs" / stage)] == [1, 2], stage
        metrics = (root / "runs" / stage / "metrics.jsonl").read_text().splitlines()
        assert metrics and all(json.loads(m)["loss"] > 0 for m in metrics), stage
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert last == result["figures"]
    assert set(last) == {*apps_demo.FIGURE_KEYS, "all_tasks", "apps_train_minutes"}
    assert set(last["all_tasks"]) == set(apps_demo.FIGURE_KEYS)
    assert last["long_video_frames"] == 50 and last["apps_train_minutes"] > 0
    latents = result["details"]["data"]
    assert latents["clips"]["multiview"] == 8 and latents["latents"] == 48
    assert (tmp_path / "figures" / "apps-long.png").is_file()
    # An exported file carries its run's tasks: it samples the TUP at the run's stride.
    weights = tmp_path / "tup.safetensors"
    export_ema(root / "runs" / "tup", weights)
    assert run_tasks(weights) == run_tasks(root / "runs" / "tup") != []
    assert Generator(str(weights)).task_stride("upsample") == 2  # prepare stride 1 x task 2
