"""Prepare: snapshot clips -> bucketed latents with micro-conditions, through real Ray + Lance."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from data_engine.store import Database
from model.config import MICRO_COND_NAMES
from training.encoders import PixelEncoder
from training.prepare import run_prepare
from training.prepare_config import BucketConfig
from training.prepare_stages import (
    choose_bucket,
    crop_and_resize,
    crop_box,
    decode_windows,
    window_frames,
)


def _config(tmp_path, text_path: str, body: str) -> str:
    path = tmp_path / "prepare.yaml"
    path.write_text(body.format(text=text_path))
    return str(path)


VIDEO_CFG = """
latents_table: latents_video
frame_stride: 3
buckets:
  - {{num_frames: 8, height: 32, width: 32}}
  - {{num_frames: 8, height: 32, width: 48}}
encoder: {{kind: pixel, pixel_patch: 4, text_path: {text}, text_max_length: 48}}
encoder_num_cpus: 0.5
decode_num_cpus: 0.5
"""


@pytest.mark.slow
def test_prepare_pixel_video_buckets_micro_cond_and_resume(
    tmp_path, clips_db, tiny_encoders, ray_cluster
):
    """Guards the whole prepare contract: each clip lands in its aspect-closest bucket with one
    fixed latent shape, the crop box/original size/stride survive as micro-conditions, pixel
    latents decode back to the cropped frames, short/uncaptioned clips are skipped, and a rerun
    adds nothing (resumable, no duplicates)."""
    config = _config(tmp_path, tiny_encoders["text"], VIDEO_CFG)
    summary = run_prepare(clips_db, "all", config)
    assert summary["written"] == 3, summary
    assert summary["skipped_too_short"] == 1 and summary["skipped_no_caption"] == 1
    # An undecodable clip becomes a quarantine row (stage prepare), not a failed job.
    assert summary["quarantined"] == 1
    quarantine = Database(clips_db).query("quarantine", where="stage = 'prepare'").to_pylist()
    assert [q["clip_id"] for q in quarantine] == ["clip-broken"]
    # 64x48 clips (aspect 1.33) go to the 48x32 bucket (1.5), not the square one.
    assert summary["buckets"] == {"f8x32x48": 3}

    db = Database(clips_db)
    rows = db.table("latents_video").to_table().to_pylist()
    encoder = PixelEncoder(4)
    for row in rows:
        assert row["latent_shape"] == [48, 8, 8, 12]
        latents = np.frombuffer(row["latents"], np.float32).reshape(row["latent_shape"])
        micro = dict(zip(MICRO_COND_NAMES, row["micro_cond"]))
        # Original 48x64, aspect 1.5 crop: full width 64 -> height 43 (centred), stride 3.
        assert micro == {
            "orig_height": 48.0,
            "orig_width": 64.0,
            "crop_top": 2.0,
            "crop_left": 0.0,
            "crop_height": 43.0,
            "crop_width": 64.0,
            "frame_stride": 3.0,
        }
        length, dim = row["text_shape"]
        mask = np.frombuffer(row["text_mask"], np.uint8)
        assert mask.shape == (length,) and 0 < mask.sum() < length
        assert np.frombuffer(row["text_pooled"], np.float32).shape == (dim,)
        # The square is in the decoded frames: pixel latents invert exactly.
        frames = encoder.decode(torch.from_numpy(latents.copy())[None])
        assert frames.shape == (1, 3, 8, 32, 48)
    meta = db.table("latents_video_meta").to_table().to_pylist()[0]
    assert meta["latent_channels"] == 48 and meta["micro_cond_names"] == ",".join(MICRO_COND_NAMES)

    again = run_prepare(clips_db, "all", config)
    # The broken clip is retried (and quarantined again); done clips are skipped.
    assert again["written"] == 0 and again["already_done"] == 3 and again["quarantined"] == 1
    assert db.table("latents_video").count_rows() == 3


@pytest.mark.slow
def test_prepare_tiny_vae_images(tmp_path, clips_db, tiny_encoders, ray_cluster):
    """T2I data from single clip frames through the tiny AutoencoderKL loaded with
    from_pretrained: latent shape (4, 1, H/2, W/2), stride micro-condition 0 for images."""
    body = (
        "latents_table: latents_image\nmode: image\n"
        "buckets: [{{num_frames: 1, height: 16, width: 16}}]\n"
        "encoder: {{kind: vae, vae_path: " + tiny_encoders["vae"] + ", text_path: {text}}}\n"
        "encoder_num_cpus: 0.5\ndecode_num_cpus: 0.5\n"
    )
    summary = run_prepare(clips_db, "all", _config(tmp_path, tiny_encoders["text"], body))
    # Image mode needs only one frame, so the short clip is usable too.
    assert summary["written"] == 4 and summary["buckets"] == {"f1x16x16": 4}
    assert summary["quarantined"] == 1
    row = Database(clips_db).table("latents_image").to_table().to_pylist()[0]
    assert row["latent_shape"] == [4, 1, 8, 8]
    assert row["micro_cond"][-1] == 0.0
    assert np.isfinite(np.frombuffer(row["latents"], np.float32)).all()


@pytest.mark.slow
def test_prepare_image_directory(tmp_path, clips_db, tiny_encoders, ray_cluster):
    """T2I rows from an image directory: captions from same-stem .txt files, images without a
    caption skipped, crop/original size recorded from the image itself."""
    import cv2

    images = tmp_path / "images"
    images.mkdir()
    for i, colour in enumerate([(0, 0, 255), (0, 255, 0), (255, 0, 0)]):
        image = np.zeros((40, 60, 3), np.uint8)
        image[:] = colour
        cv2.imwrite(str(images / f"img{i}.png"), image)
        if i < 2:
            (images / f"img{i}.txt").write_text(f"a plain image number {i}\n")
    body = (
        "latents_table: latents_dir\nmode: image\nimage_source: dir\n"
        f"image_dir: {images}\n"
        "buckets: [{{num_frames: 1, height: 16, width: 16}}]\n"
        "encoder: {{kind: pixel, pixel_patch: 2, text_path: {text}}}\n"
        "encoder_num_cpus: 0.5\ndecode_num_cpus: 0.5\n"
    )
    summary = run_prepare(clips_db, None, _config(tmp_path, tiny_encoders["text"], body))
    assert summary["written"] == 2 and summary["skipped_no_caption"] == 1
    rows = Database(clips_db).table("latents_dir").to_table().to_pylist()
    assert sorted(r["caption"] for r in rows) == [
        "a plain image number 0",
        "a plain image number 1",
    ]
    assert rows[0]["micro_cond"] == [40.0, 60.0, 0.0, 10.0, 40.0, 40.0, 0.0]
    # Pixel latents of a pure-red image (BGR (0, 0, 255) on disk) decode to red.
    frames = PixelEncoder(2).decode(
        torch.from_numpy(
            np.frombuffer(rows[0]["latents"], np.float32).reshape(rows[0]["latent_shape"]).copy()
        )[None]
    )
    assert frames.shape == (1, 3, 1, 16, 16)


def test_bucket_choice_window_and_crop_boundaries():
    """Boundaries of the plain functions: a clip exactly long enough fits, one frame shorter
    does not; the window is centred; crops keep the bucket's aspect ratio."""
    buckets = [BucketConfig(8, 32, 32), BucketConfig(4, 32, 32)]
    assert choose_bucket(32, 32, 22, 3, buckets).num_frames == 8  # (8-1)*3+1 = 22
    assert choose_bucket(32, 32, 21, 3, buckets).num_frames == 4
    assert choose_bucket(32, 32, 9, 3, buckets) is None  # (4-1)*3+1 = 10
    assert window_frames(0, 22, 8, 3) == [0, 3, 6, 9, 12, 15, 18, 21]
    assert window_frames(10, 34, 8, 3) == [11, 14, 17, 20, 23, 26, 29, 32]
    assert crop_box(720, 1280, 256, 256) == (0, 280, 720, 720)
    frames = np.zeros((2, 720, 1280, 3), np.uint8)
    out, micro = crop_and_resize(frames, BucketConfig(2, 256, 256))
    assert out.shape == (2, 256, 256, 3) and micro == [720, 1280, 0, 280, 720, 720]


def test_decode_windows_exact_frames_one_pass(tmp_path):
    """Frames are counted like the split stage counts them (decode order), every window comes
    back even when windows overlap or arrive out of order, and a window past the end of the
    video is reported as truncated: the square's x position encodes the frame index."""
    from data_engine.video import VideoError
    from tests.training.conftest import write_video

    path = tmp_path / "v.mp4"
    write_video(path, (255, 0, 0), 30)
    windows = [[13, 16, 19], [0, 1, 2], [2, 27]]
    got = dict(decode_windows(str(path), windows))
    assert sorted(got) == [0, 1, 2]
    for w, frames in got.items():
        red_x = [int(np.where(f[22, :, 0] > 200)[0].min()) for f in frames]
        assert red_x == pytest.approx([2 + i for i in windows[w]], abs=1)
    with pytest.raises(VideoError, match="truncated"):
        list(decode_windows(str(path), [[28, 30]]))


def test_tiny_text_encoder_words_become_single_tokens(tmp_path):
    """The tiny tokenizer's merges make each listed word one token (as real CLIP BPE does for
    common words), other words still split into bytes, and prompts that differ only in such a
    word differ in that token's embedding."""
    from transformers import CLIPTokenizer

    from training.encoders import TextEncoder, make_tiny_text_encoder
    from training.shapes import CAPTION_WORDS

    path = make_tiny_text_encoder(tmp_path / "text", max_length=16, words=CAPTION_WORDS)
    tokenizer = CLIPTokenizer.from_pretrained(str(path))
    assert tokenizer.tokenize("a yellow triangle moving left") == [
        "a</w>", "yellow</w>", "triangle</w>", "moving</w>", "left</w>"]  # fmt: skip
    assert tokenizer.tokenize("a cat") == ["a</w>", "c", "a", "t</w>"]
    encoded = TextEncoder(path, max_length=16).encode(
        ["a green square moving up", "a green square moving down"]
    )
    diff = (encoded.tokens[0] - encoded.tokens[1]).abs().amax(-1)
    assert torch.all(diff[:5] == 0) and diff[5] > 0  # BOS a green square moving | up/down
    # The last word registers about as strongly as an early one (embedding_std; with the stock
    # 0.02 init the 5th word moved its position's encoding 3x less than the 2nd word did).
    colours = TextEncoder(path, max_length=16).encode(
        ["a red square moving up", "a blue square moving up"]
    )
    direction_change = (encoded.tokens[0, 5] - encoded.tokens[1, 5]).norm()
    colour_change = (colours.tokens[0, 2] - colours.tokens[1, 2]).norm()
    assert direction_change > 0.5 * colour_change


@pytest.mark.slow
def test_prepare_quarantine_upserts_counts_attempts_and_stops(tmp_path, tiny_encoders, ray_cluster):
    """A clip that keeps failing keeps ONE quarantine row (key video_id/clip_id/prepare) whose
    attempts count up on each rerun, and after `max_attempts` it is no longer tried; the good
    clip is prepared once. Before, every rerun appended another row with attempts 1."""
    import pyarrow as pa

    from data_engine.store import CLIPS
    from data_engine.video import write_video

    good = tmp_path / "good.mp4"
    frames = [np.full((48, 64, 3), 40 + 5 * i, np.uint8) for i in range(40)]
    write_video(good, frames, fps=24)
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"not a video" * 100)
    row = {"video_id": "v-good", "uri": str(good), "start_frame": 0, "end_frame": 40, "fps": 24.0,
           "width": 64, "height": 48, "duration_s": 40 / 24, "caption": "a red square"}  # fmt: skip
    db = Database(tmp_path / "db")
    db.write(CLIPS, pa.Table.from_pylist([
        {**row, "clip_id": "c-good"},
        {**row, "clip_id": "c-broken", "video_id": "v-broken", "uri": str(broken)},
    ]))  # fmt: skip
    db.create_snapshot("all", None)
    config = _config(tmp_path, tiny_encoders["text"], VIDEO_CFG + "max_attempts: 2\n")
    summaries = [run_prepare(db.uri, "all", config) for _ in range(3)]
    assert [s["quarantined"] for s in summaries] == [1, 1, 0]
    assert [s["written"] for s in summaries] == [1, 0, 0]
    assert summaries[2]["skipped_out_of_attempts"] == 1
    rows = db.query("quarantine").to_pylist()
    assert [(r["quarantine_id"], r["stage"], r["attempts"]) for r in rows] == [
        ("v-broken/c-broken/prepare", "prepare", 2)
    ]


def test_decode_concurrency_scales_with_the_cluster():
    """Decoding is no longer one actor for the whole cluster: by default every CPU left after
    the encoder pools decodes; a configured value wins."""
    from stiv_core.config import load_config
    from training.prepare import decode_concurrency
    from training.prepare_config import PrepareConfig

    def cfg(**fields):
        return load_config(PrepareConfig, base={"encoder": {"text_path": "t"}, **fields})

    ones = cfg(decode_num_cpus=1.0, encoder_num_cpus=1.0)
    assert decode_concurrency(ones, {"CPU": 2}) == 1
    assert decode_concurrency(ones, {"CPU": 64}) == 62
    assert decode_concurrency(cfg(decode_num_cpus=0.5, encoder_num_cpus=0.5), {"CPU": 2}) == 2
    assert decode_concurrency(cfg(decode_concurrency=5), {"CPU": 64}) == 5
