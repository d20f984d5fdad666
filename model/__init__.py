"""STIV model: pure torch (+ einops). No Ray, no files, no network.

Where each item of the recipe (docs/recipe.md "Presets" onwards) lives:

- config.py    STIVConfig (validated, to_dict/from_dict), presets stiv-xl / stiv-xxl / stiv-m
               (Table 1) + stiv-tiny / stiv-tiny-cpu / stiv-bench-cpu, MICRO_COND_NAMES.
- layers.py    stateless LayerNorm, QK-norm (RMSNorm before RoPE), 2D / 1D RoPE with position
               interpolation, SDPA attention (self / cross with padding mask), sinusoidal
               embeddings, last-token (EOS) text pooling.
- network.py   STIV: patch embedding (spatial 2, temporal 2 for video, 1 for an image), the
               factorised block (spatial -> temporal (no AdaLN, zero-init gate) -> cross -> MLP)
               with sandwich norms, the singleton condition and the shared AdaLN-single, MaskDiT
               (shared spatial keep-mask, mask token, unmasked tail blocks), unpatchify,
               selective gradient checkpointing (keeps only self-attention outputs), the
               clean-sample -> velocity switch (`STIV.velocity`).
- flow.py      flow matching (x_t = t x1 + (1 - t) eps, target x1 - eps), timestep samplers,
               masked loss (replaced frames, MaskDiT-visible tokens), frame replacement,
               condition dropout, MaskDiT keep-masks, `training_loss` (one full step).
- sampling.py  Euler / Heun from t = 0 to 1, JIT-CFG (batched), CFG renormalisation, frame
               replacement at every step, noised frame 0 in the unconditional pass, seeding.
- init.py      T2I -> T2V inflation (temporal branch exactly zero), "both" initialisation,
               RoPE base inheritance.
- info.py      parameter counts on the meta device (`stiv model-info`).
"""
