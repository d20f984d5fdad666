"""One STIV training step (forward + backward): MaskDiT, gradient checkpointing, temporal patch.

Usage:
    python bench/model_step.py [--preset stiv-bench-cpu] [--batch 2] [--frames 8] [--size 32]
                               [--rounds 2] [--iters 2] [--threads 1] [--device cpu|cuda]
                               [--json OUT.json]

Each configuration runs in a fresh subprocess (so memory high-water marks do not leak between
them), `rounds` times, the configurations interleaved round-robin (so a noisy neighbour on a
shared machine hits all of them alike). Reported:
- time: seconds of one forward+backward (flow-matching loss through `model.flow.training_loss`,
  TI2V frame replacement, after one warm-up step), the minimum over all rounds and `iters`. On
  CPU this is the process CPU time (`time.process_time()`, user + system) with one torch thread:
  on a shared, loaded machine wall-clock times swing 2-3x from run to run while CPU time of a
  single-threaded process does not (wall-clock minima are reported alongside). On CUDA it is
  wall-clock time after `torch.cuda.synchronize()`;
- peak memory, two ways:
  * tensor peak (the headline number; exact): on CPU, the torch profiler's memory timeline
    (`profile(profile_memory=True, record_shapes=True, with_stack=True)._memory_profile()`) of
    one extra, separately run forward+backward: the maximum over time of the bytes of live CPU
    tensors, counted from the start of the step (parameters and inputs included, gradients
    included). On CUDA: `torch.cuda.max_memory_allocated()` over the step.
  * RSS growth (CPU only, a cross-check): `ru_maxrss` (kernel high-water mark, from
    `resource.getrusage`) minus the RSS read from /proc/self/statm just before the first step.
    It includes glibc allocator slack (freed memory kept mapped), so it overstates what
    gradient checkpointing saves.

Configurations (all else equal): baseline (unmasked, no checkpointing, temporal patch 2),
MaskDiT 50%, gradient checkpointing (keep only self-attention outputs), MaskDiT 50% + checkpointing,
temporal patch 1. Ratios are printed against the baseline.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CONFIGS = {
    "baseline": {},
    "maskdit50": {"mask_ratio": 0.5},
    "grad_ckpt": {"grad_checkpointing": True},
    "maskdit50+ckpt": {"mask_ratio": 0.5, "grad_checkpointing": True},
    "tpatch1": {"temporal_patch_size": 1},
}


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _maxrss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def _profiled_peak(step) -> int:
    """Peak bytes of live CPU tensors during `step()`, from the profiler's memory timeline."""
    from torch.profiler import ProfilerActivity, profile
    from torch.profiler._memory_profiler import Action

    with profile(
        activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True
    ) as prof:
        step()
    cur = peak = 0
    for _, action, (key, _), size in prof._memory_profile().timeline:
        if key.device.type != "cpu":
            continue
        if action in (Action.CREATE, Action.PREEXISTING):
            cur += size
        elif action == Action.DESTROY:
            cur -= size
        peak = max(peak, cur)
    return peak


def child(args: argparse.Namespace, overrides: dict) -> dict:
    sys.path.insert(0, str(ROOT))
    import torch

    from model.config import get_preset
    from model.flow import training_loss
    from model.network import STIV

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dev = torch.device(args.device)
    cfg = get_preset(args.preset, **overrides)
    model = STIV(cfg).to(dev).train()
    b, c, t, s = args.batch, cfg.in_channels, args.frames, args.size
    x1 = torch.randn(b, c, t, s, s, device=dev)
    tokens = torch.randn(b, cfg.max_text_tokens, cfg.text_dim, device=dev)
    mask = torch.ones(b, cfg.max_text_tokens, dtype=torch.bool, device=dev)
    pooled = torch.randn(b, cfg.text_dim, device=dev)
    micro = torch.tensor([[256.0, 256, 0, 0, 256, 256, 3]] * b, device=dev)
    given = torch.zeros(b, t, dtype=torch.bool, device=dev)
    given[:, 0] = True

    def step() -> None:
        loss, _ = training_loss(model, x1, tokens, mask, pooled, micro, given_frames=given)
        loss.backward()
        model.zero_grad(set_to_none=True)

    rss_growth = None
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        mem_how = "torch.cuda.max_memory_allocated"
    else:
        base = _rss_bytes()
        step()
        rss_growth = _maxrss_bytes() - base
        peak = _profiled_peak(step) if args._memory else None
        mem_how = "torch profiler memory timeline: peak live CPU tensor bytes"
    times, cpu_times = [], []
    for _ in range(args.iters):
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0, c0 = time.perf_counter(), time.process_time()
        step()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        cpu_times.append(time.process_time() - c0)
    return {
        "times_s": cpu_times if dev.type == "cpu" else times,
        "wall_times_s": times,
        "time_measure": "process CPU time" if dev.type == "cpu" else "wall clock",
        "peak_mem_bytes": peak,
        "rss_growth_bytes": rss_growth,
        "memory_measure": mem_how,
        "tokens_per_sample": (t // cfg.temporal_patch_size) * (s // cfg.patch_size) ** 2,
        "threads": torch.get_num_threads(),
    }


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--preset", default="stiv-bench-cpu")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--frames", type=int, default=8, help="latent frames")
    ap.add_argument("--size", type=int, default=32, help="latent height = width")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--iters", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (0 = torch's default)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated subset")
    ap.add_argument("--json", default="", help="also write the results here")
    ap.add_argument("--_child", default="", help=argparse.SUPPRESS)
    ap.add_argument("--_memory", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args._child:
        print(json.dumps(child(args, json.loads(args._child))))
        return

    from model.info import model_info

    info = model_info(args.preset)
    print(
        f"preset {args.preset}: {info['blocks']} blocks ({info['masked_blocks']} masked + "
        f"{info['unmasked_tail_blocks']} unmasked), hidden {info['config']['hidden_size']}, "
        f"{info['parameters'] / 1e6:.2f}M parameters; batch {args.batch}, {args.frames} latent "
        f"frames of {args.size}x{args.size}, device {args.device}"
    )
    names = args.configs.split(",")
    runs: dict[str, list[dict]] = {n: [] for n in names}
    for rnd in range(args.rounds):
        for name in names:
            cmd = [sys.executable, __file__, "--_child", json.dumps(CONFIGS[name])]
            for k in ("preset", "batch", "frames", "size", "iters", "threads", "device"):
                cmd += [f"--{k}", str(getattr(args, k))]
            if rnd == 0:  # the profiled memory step is deterministic: once is enough
                cmd.append("--_memory")
            out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=ROOT)
            runs[name].append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(
                f"  round {rnd + 1}/{args.rounds} {name:<15} {min(runs[name][-1]['times_s']):7.3f} s",
                flush=True,
            )
    results = {}
    for name in names:
        rs = runs[name]
        all_t = [t for r in rs for t in r["times_s"]]
        rss = [r["rss_growth_bytes"] for r in rs if r["rss_growth_bytes"] is not None]
        peaks = [r["peak_mem_bytes"] for r in rs if r["peak_mem_bytes"] is not None]
        results[name] = {
            "time_s": min(all_t),
            "time_measure": rs[0]["time_measure"],
            "wall_time_s": min(t for r in rs for t in r["wall_times_s"]),
            "time_median_s": statistics.median(all_t),
            "times_s": all_t,
            "peak_mem_bytes": max(peaks),
            "rss_growth_bytes": int(statistics.median(rss)) if rss else None,
            "memory_measure": rs[0]["memory_measure"],
            "tokens_per_sample": rs[0]["tokens_per_sample"],
            "threads": rs[0]["threads"],
        }
    print("per configuration (time: min over rounds; RSS growth: median over rounds):")
    for name, r in results.items():
        rss = (
            ""
            if r["rss_growth_bytes"] is None
            else f"  RSS growth {r['rss_growth_bytes'] / 2**20:7.1f} MiB"
        )
        print(
            f"  {name:<15} tokens/sample {r['tokens_per_sample']:>5}  fwd+bwd {r['time_s']:7.3f} s "
            f"(median {r['time_median_s']:.3f}, wall min {r['wall_time_s']:.3f})  peak tensor mem {r['peak_mem_bytes'] / 2**20:7.1f} MiB{rss}"
        )
    base = results.get("baseline")
    ratios = {}
    if base:
        print(
            f"ratios vs baseline (time: {base['time_measure']}; memory: {base['memory_measure']}):"
        )
        for name, r in results.items():
            if name == "baseline":
                continue
            ratios[name] = {
                "time": r["time_s"] / base["time_s"],
                "memory": r["peak_mem_bytes"] / max(base["peak_mem_bytes"], 1),
            }
            line = f"  {name:<15} time x{ratios[name]['time']:.3f}  memory x{ratios[name]['memory']:.3f}"
            if r["rss_growth_bytes"] is not None and base["rss_growth_bytes"]:
                ratios[name]["rss_growth"] = r["rss_growth_bytes"] / base["rss_growth_bytes"]
                line += f"  (RSS growth x{ratios[name]['rss_growth']:.3f})"
            print(line)
        if "maskdit50" in ratios:
            ok = ratios["maskdit50"]["time"] <= 0.65
            print(
                f"MaskDiT 50% time ratio {ratios['maskdit50']['time']:.3f} (target <= 0.65): {'OK' if ok else 'MISSED'}"
            )
    if args.json:
        Path(args.json).write_text(
            json.dumps({"args": vars(args), "results": results, "ratios": ratios}, indent=2)
        )


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
