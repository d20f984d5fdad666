"""The CLI contract's error promise: a command that cannot run exits 2 with one line on stderr,
never a traceback (docs/architecture.md "CLI contract"), through the console script and `main`."""

from __future__ import annotations

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
STIV = [sys.executable, "-m", "stiv.cli"]


def _cases(run: dict[str, Path], tmp: Path) -> dict[str, list[str]]:
    db, plain, checkpoint = str(run["db"]), str(run["plain_db"]), str(run["run"])
    generate = ["generate", "--checkpoint", checkpoint, "--prompt", "x", "--steps", "1"]
    return {
        "curate: bad --set": ["curate", str(tmp), "--db", str(tmp / "db"),
                              "--set", "split.min_clip_s=-1"],
        "query: unknown column in --where": ["query", "--db", plain, "--where", "nope > 1"],
        "query --text: bad --where": ["query", "--db", plain, "--text", "a dog",
                                      "--where", "nope > 1"],
        "curate: backfill of split": ["curate", "--db", plain, "--stages", "split"],
        "report: --out is a file": ["report", "--db", plain,
                                    "--out", str(run["root"] / "prepare.yaml")],
        "snapshot create: bad --where": ["snapshot", "create", "--db", plain, "--name", "s",
                                         "--where", "nope > 1"],
        "model-info: unknown preset": ["model-info", "--preset", "stiv-nope"],
        "dsg-report: no DSG columns": ["dsg-report", "--db", plain],
        "prepare: no caption column": ["prepare", "--db", plain, "--snapshot", "all",
                                       "--config", "pipelines/prepare-tiny-cpu.yaml"],
        "train: bad zero stage": ["train", "--config", "pipelines/train-t2v-tiny-cpu.yaml",
                                  "--set", "scaling.zero_stage=3"],
        "train: no latents table yet": [
            "train", "--config", "pipelines/train-t2v-tiny-cpu.yaml", "--resume=require",
            "--set", f"db={db}", "--set", f"run_dir={tmp / 'fresh'}"],
        "generate: odd frame count": [*generate, "--frames", "7", "--height", "16", "--width", "16"],
        "generate: odd size": [*generate, "--frames", "4", "--height", "18", "--width", "16"],
        "generate: missing run": ["generate", "--checkpoint", str(tmp / "none"), "--prompt", "x"],
        "generate: mode without its input": [*generate, "--mode", "multiview"],
        "generate: long with an odd fill window": [*generate, "--mode", "long",
                                                   "--keyframe-stride", "4"],
        **({} if torch.cuda.is_available() else
           {"generate: cuda without a GPU": [*generate, "--device", "cuda", "--frames", "4",
                                             "--height", "16", "--width", "16"]}),
        "train --dry-run: bad --bucket": ["train", "--config", "pipelines/train-t2v-xl-256.yaml",
                                          "--dry-run", "--bucket", "20x256"],
        "tiny-models: --out is a file": ["tiny-models", "--out", str(run["root"] / "prepare.yaml")],
        "export: missing run": ["export", "--run", str(tmp / "none"), "--out", str(tmp / "m.safetensors")],
    }  # fmt: skip


# Through the console script in subprocesses, as a user runs it: one per stack (data engine,
# training, generation), which also shows that importing each prints nothing on stderr. The
# other cases call `main()` in this process, the same code once imported: a subprocess costs
# about 8 s of imports on 2 cores.
SUBPROCESS_CASES = ("curate: bad --set", "train: bad zero stage", "generate: odd frame count")


def _one_line_error(name: str, code: int | None, stderr: str) -> str | None:
    """What is wrong with one case's outcome, or None: exit 2, one stderr line "stiv ...", no
    traceback."""
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    if code == 2 and len(lines) == 1 and lines[0].startswith("stiv ") and "Traceback" not in stderr:
        return None
    return f"{name}: rc={code} stderr={stderr[-600:]!r}"


@pytest.mark.slow
def test_every_subcommand_fails_with_one_line(relative_run, tmp_path, monkeypatch, capsys):
    """Each subcommand with arguments that parse but cannot work (unknown preset, missing
    columns, odd shapes, missing runs, ...): exit code 2, exactly one stderr line naming the
    problem, no traceback."""
    from stiv.cli import main

    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONWARNINGS": "ignore"}

    def run(args: list[str]) -> subprocess.CompletedProcess:
        return subprocess.run(
            [*STIV, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
        )

    cases = _cases(relative_run, tmp_path)
    assert set(SUBPROCESS_CASES) <= set(cases)
    failures = []
    with ThreadPoolExecutor(max_workers=len(SUBPROCESS_CASES)) as pool:
        spawned = {name: pool.submit(run, cases[name]) for name in SUBPROCESS_CASES}
        monkeypatch.chdir(REPO)  # the cases' relative paths are the repository's
        for name, args in cases.items():
            if name in SUBPROCESS_CASES:
                continue
            try:
                code: int | None = main(args)
            except BaseException as err:  # a traceback (or an exit) the user would have seen
                code = None
                print(f"{type(err).__name__}: {err}", file=sys.stderr)
            failures.append(_one_line_error(name, code, capsys.readouterr().err))
        for name, future in spawned.items():
            result = future.result()
            failures.append(_one_line_error(name, result.returncode, result.stderr))
    failures = [f for f in failures if f]
    assert not failures, "\n".join(failures)
