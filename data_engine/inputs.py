"""Turn `stiv curate INPUT...` into a list of video URIs.

INPUT is a video file, a directory (searched recursively by video extension) or a `.txt`
manifest of URIs (one per line, `#` comments). URIs stay opaque strings so object storage
(`s3://...`) can flow through unchanged; local paths are made absolute so a video's id does
not depend on the working directory.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from stiv_core.uris import is_local, local_path

VIDEO_EXTENSIONS = (
    ".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi", ".mpg", ".mpeg", ".ts", ".mts",
    ".m2ts", ".flv", ".wmv", ".3gp", ".ogv", ".y4m",
)  # fmt: skip


@dataclass
class ExpandedInputs:
    uris: list[str] = field(default_factory=list)
    """Video URIs in input order, without repeats."""
    notes: list[str] = field(default_factory=list)
    """Things the user should hear about that are not failures (an empty directory)."""


def list_prefix(uri: str, extensions: tuple[str, ...], storage_options: dict | None) -> list[str]:
    """Video URIs under an object-store prefix (`s3://bucket/raw/`), searched recursively like
    a directory, sorted."""
    import pyarrow.fs as pafs

    from data_engine.video import remote_filesystem

    fs, path = remote_filesystem(uri, storage_options)
    scheme = uri.split("://", 1)[0]
    selector = pafs.FileSelector(path.rstrip("/"), recursive=True, allow_not_found=True)
    found = [
        f"{scheme}://{info.path}"
        for info in fs.get_file_info(selector)
        if info.type == pafs.FileType.File and info.path.lower().endswith(extensions)
    ]
    return sorted(found)


def expand_inputs(
    inputs: list[str],
    extensions: tuple[str, ...] = VIDEO_EXTENSIONS,
    storage_options: dict | None = None,
) -> ExpandedInputs:
    """Expand files, directories, object-store prefixes and manifests. A path that does not
    exist is kept as a URI so the pipeline quarantines it with its reason instead of silently
    dropping it. An object-store URI without a video extension (or ending in `/`) is a prefix,
    listed as a directory is."""
    out = ExpandedInputs()
    seen: set[str] = set()

    def add(uri: str) -> None:
        if uri not in seen:
            seen.add(uri)
            out.uris.append(uri)

    exts = tuple(e.lower() for e in extensions)
    for item in inputs:
        if not is_local(item):
            if item.endswith("/") or not item.lower().endswith(exts):
                found = list_prefix(item, exts, storage_options)
                if not found:
                    out.notes.append(f"no videos found under {item}")
                for uri in found:
                    add(uri)
            else:
                add(item)
            continue
        path = Path(local_path(item))
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in exts)
            if not found:
                out.notes.append(f"no videos found in directory {path}")
            for p in found:
                add(str(p))
        elif path.suffix.lower() == ".txt" and path.is_file():
            lines = [ln.strip() for ln in path.read_text().splitlines()]
            entries = [ln for ln in lines if ln and not ln.startswith("#")]
            if not entries:
                out.notes.append(f"manifest {path} lists no videos")
            for entry in entries:
                if not is_local(entry):
                    add(entry)
                else:
                    p = Path(entry).expanduser()
                    add(str(p if p.is_absolute() else (path.parent / p).absolute()))
        else:
            add(str(path))
    return out
