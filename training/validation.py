"""Validation samples during training: every `eval.every_steps`, rank 0 samples fixed prompts
(and, for TI2V, a fixed first frame) with a fixed seed from the current EMA weights, writes an
MP4 and a PNG strip per prompt into `run_dir/validation/step_XXXXXXXX/` and the strips into
TensorBoard. The sampling model is built for the call and freed after it, so the memory peak
does not grow from one validation to the next (tests/training/test_validation.py)."""

from __future__ import annotations

import gc
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch


@dataclass
class EvalSection:
    """Validation samples written while training."""

    every_steps: int = 0  # steps between validations (0 = none)
    prompts: list[str] = field(default_factory=list)  # fixed captions sampled at each validation
    image: str = ""  # TI2V/prediction stages: the fixed first frame (PNG/JPEG path)
    frames: int = 0  # pixel frames per sample (0 = the first bucket's)
    height: int = 0  # pixels (0 = the first bucket's)
    width: int = 0  # pixels (0 = the first bucket's)
    steps: int = 20  # sampling steps (Euler)
    cfg_scale: float = 2.0  # JIT-CFG scale (1.0 = conditional only)
    seed: int = 0  # sampling noise: the same at every validation, so samples compare

    def __post_init__(self) -> None:
        if self.every_steps < 0 or self.steps < 1:
            raise ValueError("eval.every_steps/steps: must be >= 0 / >= 1")
        if self.every_steps and not self.prompts:
            raise ValueError("eval.prompts: give at least one prompt when eval.every_steps > 0")
        if min(self.frames, self.height, self.width) < 0 or self.cfg_scale <= 0:
            raise ValueError("eval.frames/height/width/cfg_scale: must be >= 0 / > 0")


class Validator:
    """Rank 0's sampler: prompt embeddings and the frozen latent decoder are set up once; each
    call builds the EMA model, samples, writes, and frees it."""

    def __init__(
        self,
        cfg: EvalSection,
        model_cfg: Any,
        meta: dict[str, Any],
        null: tuple,
        run_dir: Path,
        shape: tuple[int, int, int],
        device: str = "cpu",
    ) -> None:
        from training.generate import Generator, read_image

        info = {k: v for k, v in meta.items() if not isinstance(v, bytes)}
        self.generator = Generator.from_parts(None, model_cfg, info, null, device)
        self.cfg, self.model_cfg, self.run_dir = cfg, model_cfg, run_dir
        self.frames, self.height, self.width = (
            cfg.frames or shape[0],
            cfg.height or shape[1],
            cfg.width or shape[2],
        )
        self.given = None
        if cfg.image:
            self.given = {0: read_image(cfg.image, self.height, self.width)[None]}

    def __call__(self, ema_state: dict[str, torch.Tensor], step: int, writer: Any = None) -> Path:
        import numpy as np

        from model.network import STIV
        from training.generate import write_mp4, write_strip

        out_dir = self.run_dir / "validation" / f"step_{step:08d}"
        out_dir.mkdir(parents=True, exist_ok=True)
        model = STIV(self.model_cfg).to(self.generator.device)
        model.load_state_dict(ema_state, strict=True)
        self.generator.model = model.eval()
        try:
            with torch.no_grad():
                for index, prompt in enumerate(self.cfg.prompts):
                    given = None
                    if self.given is not None:
                        given = {k: v for k, v in self.given.items() if k < self.frames}
                    video = self.generator.sample(
                        [prompt], frames=self.frames, height=self.height, width=self.width,
                        cfg_scale=self.cfg.cfg_scale, steps=self.cfg.steps, seed=self.cfg.seed,
                        given_pixels=given,
                    )[0]  # fmt: skip
                    write_mp4(out_dir / f"prompt_{index}.mp4", video, fps=8)
                    strip = write_strip(out_dir / f"prompt_{index}.png", video, scale=1)
                    if writer is not None:
                        image = np.concatenate(list(video), axis=1)
                        writer.add_image(
                            f"validation/prompt_{index}", image, step, dataformats="HWC"
                        )
                    del video, strip
        finally:
            self.generator.model = None
            del model
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        return out_dir
