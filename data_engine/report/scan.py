"""The one streaming scan behind the report's histograms, and the clip sample behind its strips.

Memory stays bounded however large the clips table is: the scan reads only the score columns
(column projection) in batches of `SCAN_BATCH_ROWS`, keeps per column a fixed number of counts
(`FINE_BINS`) and a bottom-k uniform sample of `sample_rows` row ids with their values; nothing
grows with the row count. Two passes: the first finds each column's range, the second counts.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import lance
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from data_engine.store import Database, StoreError

SCAN_BATCH_ROWS = 1 << 16  # rows per scanned batch (64 Ki: the store's own filter batch size)
FINE_BINS = 1280  # counts kept per column; the charts merge them into DISPLAY_BINS
DISPLAY_BINS = 40  # bars per histogram (FINE_BINS is a multiple of it)


@dataclass(frozen=True)
class HistogramSpec:
    """One histogram: what it shows and how its value comes from the clip columns."""

    key: str  # anchor and id in the report; a clip column name where one exists
    title: str
    unit: str  # axis label: what one unit of the value means
    columns: tuple[str, ...]  # clip columns the value is computed from (projection)
    value: Callable[[pa.RecordBatch], np.ndarray]  # float64 per row, NaN where unknown


def _column(name: str) -> Callable[[pa.RecordBatch], np.ndarray]:
    def value(batch: pa.RecordBatch) -> np.ndarray:
        return _as_float(batch.column(name))

    return value


def _as_float(array: pa.Array) -> np.ndarray:
    return array.cast(pa.float64()).to_numpy(zero_copy_only=False)


def _short_side_px(batch: pa.RecordBatch) -> np.ndarray:
    return np.fmin(_as_float(batch.column("width")), _as_float(batch.column("height")))


def _aspect(batch: pa.RecordBatch) -> np.ndarray:
    width, height = _as_float(batch.column("width")), _as_float(batch.column("height"))
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(height > 0, width / height, np.nan)


# Units as README.md defines them.
HISTOGRAMS: tuple[HistogramSpec, ...] = (
    HistogramSpec(
        "motion_score",
        "Motion",
        "mean optical flow, % of short side per second",
        ("motion_score",),
        _column("motion_score"),
    ),
    HistogramSpec(
        "clarity_score",
        "Clarity",
        "variance of the Laplacian at 256 px short side",
        ("clarity_score",),
        _column("clarity_score"),
    ),
    HistogramSpec(
        "aesthetic_score",
        "Aesthetic",
        "aesthetic head output",
        ("aesthetic_score",),
        _column("aesthetic_score"),
    ),
    HistogramSpec(
        "ocr_text_area",
        "OCR text area",
        "fraction of the frame covered by text",
        ("ocr_text_area",),
        _column("ocr_text_area"),
    ),
    HistogramSpec(
        "temporal_consistency",
        "Temporal consistency",
        "cosine similarity of consecutive frames' CLIP embeddings",
        ("temporal_consistency",),
        _column("temporal_consistency"),
    ),
    HistogramSpec("duration_s", "Duration", "seconds", ("duration_s",), _column("duration_s")),
    HistogramSpec(
        "resolution", "Resolution", "short side, pixels", ("width", "height"), _short_side_px
    ),
    HistogramSpec("aspect", "Aspect", "width / height", ("width", "height"), _aspect),
    HistogramSpec("fps", "Frame rate", "frames per second", ("fps",), _column("fps")),
)
CATEGORY = "category"
DURATION = "duration_s"


# ------------------------------------------------------------------------------------------
# Selection: which rows the report describes


@dataclass(frozen=True)
class Selection:
    """The clips the report describes: a table version and a filter on it."""

    dataset: lance.LanceDataset
    where: str | None  # Lance SQL filter; None for every row
    label: str  # how the report names the selection


def select_clips(db: Database, where: str | None, snapshot: str | None) -> Selection:
    """The clips table filtered by `where`, or a snapshot's rows at its pinned version.

    Raises StoreError for a missing table or snapshot and a filter that does not parse.
    """
    if snapshot:
        dataset, snap = db.snapshot_dataset(snapshot)
        label = f"snapshot {snap.name!r}: {snap.table} v{snap.version}, where {snap.where or 'all'}"
        return Selection(dataset, snap.where or None, label)
    if not db.has_table("clips"):
        raise StoreError(f"--db {db.uri}: no clips table (run `stiv curate` first)")
    db.validate_filter("clips", where)
    dataset = db.table("clips")
    label = (
        f"clips v{dataset.version}, where {where}" if where else f"all clips, v{dataset.version}"
    )
    return Selection(dataset, where or None, label)


def and_filter(where: str | None, extra: str) -> str:
    """`(where) AND (extra)`, or `extra` alone when there is no selection filter."""
    return f"({where}) AND ({extra})" if where else extra


def iter_batches(
    dataset: lance.LanceDataset,
    columns: list[str],
    where: str | None,
    with_row_id: bool = False,
    limit: int | None = None,
) -> Iterator[pa.RecordBatch]:
    """Batches of the projected columns of the selected rows."""
    try:
        scanner = dataset.scanner(
            columns=columns,
            filter=where,
            with_row_id=with_row_id,
            batch_size=SCAN_BATCH_ROWS,
            limit=limit,
        )
        yield from scanner.to_batches()
    except (ValueError, OSError, RuntimeError) as err:
        raise StoreError(f"scan of {columns} where {where!r}: {err}") from None


def count_rows(dataset: lance.LanceDataset, where: str | None) -> int:
    """Selected rows, counted from a row-id-only scan (as `Database.count` does)."""
    scanner = dataset.scanner(
        filter=where, columns=[], with_row_id=True, batch_size=SCAN_BATCH_ROWS
    )
    return scanner.count_rows()


def fetch_rows(dataset: lance.LanceDataset, row_ids: np.ndarray, columns: list[str]) -> pa.Table:
    """The given rows (Lance `_rowid`s from a scan) with the wanted columns."""
    if len(row_ids) == 0:
        return dataset.schema.empty_table().select(columns)
    ids = ",".join(str(int(i)) for i in row_ids)
    return dataset.to_table(columns=columns, filter=f"_rowid IN ({ids})", with_row_id=True)


def sql_string(value: str) -> str:
    """A SQL string literal (single quotes doubled)."""
    return "'" + value.replace("'", "''") + "'"


# ------------------------------------------------------------------------------------------
# Snapshot thresholds


@dataclass(frozen=True)
class Threshold:
    """One bound a filter puts on a column: `column op value`."""

    column: str
    op: str  # ">", ">=", "<", "<=", "=", "!="
    value: float


_NUMBER = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?"
_BETWEEN = re.compile(
    rf"\b([A-Za-z_]\w*)\s+(NOT\s+)?BETWEEN\s+({_NUMBER})\s+AND\s+({_NUMBER})", re.IGNORECASE
)
_COMPARE = re.compile(rf"\b([A-Za-z_]\w*)\s*(>=|<=|!=|<>|=|>|<)\s*({_NUMBER})(?![\w.])")
_COMPARE_REVERSED = re.compile(rf"(?<![\w.])({_NUMBER})\s*(>=|<=|!=|<>|=|>|<)\s*([A-Za-z_]\w*)\b")
_FLIP = {">": "<", "<": ">", ">=": "<=", "<=": ">=", "=": "=", "!=": "!="}


def parse_thresholds(where: str) -> list[Threshold]:
    """Numeric bounds in a filter's text: `col > 2`, `2 < col`, `col BETWEEN a AND b`.

    Only for marking charts: string literals are blanked first so a quoted '> 3' is no bound.
    """
    text = re.sub(r"'(?:[^']|'')*'", "''", where)
    found: list[Threshold] = []
    for match in _BETWEEN.finditer(text):
        column, low, high = match.group(1), float(match.group(3)), float(match.group(4))
        found += [Threshold(column, ">=", low), Threshold(column, "<=", high)]
    text = _BETWEEN.sub(" ", text)
    for match in _COMPARE.finditer(text):
        op = "!=" if match.group(2) == "<>" else match.group(2)
        found.append(Threshold(match.group(1), op, float(match.group(3))))
    for match in _COMPARE_REVERSED.finditer(text):
        op = "!=" if match.group(2) == "<>" else match.group(2)
        found.append(Threshold(match.group(3), _FLIP[op], float(match.group(1))))
    return found


# ------------------------------------------------------------------------------------------
# The scan


@dataclass
class Histogram:
    """Counts of one value over the selected rows, in FINE_BINS equal bins over [low, high]."""

    spec: HistogramSpec
    low: float = np.inf
    high: float = -np.inf
    counts: np.ndarray = field(default_factory=lambda: np.zeros(FINE_BINS, np.int64))
    missing: int = 0  # selected rows whose value is null or NaN

    @property
    def total(self) -> int:
        return int(self.counts.sum())

    def bounds(self) -> tuple[float, float]:
        """The binned range: [low, high], or one unit around a constant value."""
        if self.high > self.low:
            return self.low, self.high
        return self.low - 0.5, self.low + 0.5

    def edges(self) -> np.ndarray:
        return np.linspace(*self.bounds(), FINE_BINS + 1)

    def display(self) -> tuple[np.ndarray, np.ndarray]:
        """(edges (DISPLAY_BINS + 1,), counts (DISPLAY_BINS,)) for the chart."""
        merged = self.counts.reshape(DISPLAY_BINS, FINE_BINS // DISPLAY_BINS).sum(axis=1)
        return self.edges()[:: FINE_BINS // DISPLAY_BINS], merged

    def quantile(self, q: float) -> float:
        """The q-quantile (0..1) to within one fine bin: its bin's centre, kept in range."""
        cumulative = np.cumsum(self.counts)
        index = min(int(np.searchsorted(cumulative, q * cumulative[-1])), FINE_BINS - 1)
        edges = self.edges()
        return float(np.clip((edges[index] + edges[index + 1]) / 2, self.low, self.high))


@dataclass
class Sample:
    """A uniform sample of selected rows: their `_rowid`s and each histogram's value."""

    row_ids: np.ndarray  # (k,) uint64
    values: dict[str, np.ndarray]  # histogram key -> (k,) float64


@dataclass
class ScanResult:
    """What the score scan learned about the selection."""

    num_rows: int
    hours: float  # summed clip duration_s / 3600 (0 without a duration_s column)
    histograms: list[Histogram]  # one per present HistogramSpec, in HISTOGRAMS order
    absent: list[HistogramSpec]  # specs whose columns the table lacks
    categories: dict[str, int] | None  # category -> clips; None without a category column
    sample: Sample


def present_specs(schema: pa.Schema) -> tuple[list[HistogramSpec], list[HistogramSpec]]:
    """(specs whose columns exist, specs with a missing column)."""
    names = set(schema.names)
    present = [s for s in HISTOGRAMS if all(c in names for c in s.columns)]
    return present, [s for s in HISTOGRAMS if s not in present]


def scan_scores(selection: Selection, sample_rows: int, seed: int = 0) -> ScanResult:
    """Two streaming passes over the score columns of the selected rows."""
    schema = selection.dataset.schema
    specs, absent = present_specs(schema)
    columns = sorted({c for s in specs for c in s.columns})
    histograms = [Histogram(s) for s in specs]
    num_rows, hours = _range_pass(selection, columns, histograms)
    has_category = CATEGORY in schema.names
    categories, sample = _count_pass(
        selection, columns + ([CATEGORY] if has_category else []), histograms, sample_rows, seed
    )
    return ScanResult(
        num_rows, hours, histograms, absent, categories if has_category else None, sample
    )


def _range_pass(
    selection: Selection, columns: list[str], histograms: list[Histogram]
) -> tuple[int, float]:
    num_rows, duration_s = 0, 0.0
    for batch in iter_batches(selection.dataset, columns or [], selection.where, with_row_id=True):
        num_rows += batch.num_rows
        for hist in histograms:
            values = hist.spec.value(batch)
            finite = values[np.isfinite(values)]
            hist.missing += len(values) - len(finite)
            if len(finite):
                hist.low = min(hist.low, float(finite.min()))
                hist.high = max(hist.high, float(finite.max()))
        if DURATION in batch.schema.names:
            duration_s += float(pc.sum(batch.column(DURATION)).as_py() or 0.0)
    return num_rows, duration_s / 3600.0


def _count_pass(
    selection: Selection,
    columns: list[str],
    histograms: list[Histogram],
    sample_rows: int,
    seed: int,
) -> tuple[dict[str, int], Sample]:
    rng = np.random.default_rng(seed)
    categories: dict[str, int] = {}
    keys = np.empty(0)  # bottom-k sampling: the k rows with the smallest random keys
    row_ids = np.empty(0, np.uint64)
    values = {h.spec.key: np.empty(0) for h in histograms}
    for batch in iter_batches(selection.dataset, columns, selection.where, with_row_id=True):
        batch_values = {}
        for hist in histograms:
            batch_values[hist.spec.key] = v = hist.spec.value(batch)
            if hist.high >= hist.low:
                finite = v[np.isfinite(v)]
                hist.counts += np.histogram(finite, FINE_BINS, hist.bounds())[0]
        if CATEGORY in batch.schema.names:
            for item in pc.value_counts(batch.column(CATEGORY).fill_null("(none)")).to_pylist():
                categories[item["values"]] = categories.get(item["values"], 0) + item["counts"]
        keys = np.concatenate([keys, rng.random(batch.num_rows)])
        row_ids = np.concatenate([row_ids, batch.column("_rowid").to_numpy()])
        for key, v in batch_values.items():
            values[key] = np.concatenate([values[key], v])
        if len(keys) > sample_rows:
            keep = np.argpartition(keys, sample_rows)[:sample_rows]
            keys, row_ids = keys[keep], row_ids[keep]
            values = {key: v[keep] for key, v in values.items()}
    return categories, Sample(row_ids, values)
