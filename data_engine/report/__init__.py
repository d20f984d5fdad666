"""`stiv report`: a self-contained HTML curation report, opened from disk with no server.

It shows what the scores mean before anyone picks thresholds: one histogram per score with the
thresholds of every snapshot marked and clip thumbnails from its low, middle and high deciles,
then the snapshots, DSG-Video, quarantine and near-duplicates.

Why inline SVG written by `charts.py` itself: the page needs no script at all, so it passes a
Content-Security-Policy that forbids every remote load; SVG stays sharp and small (text kept as
text), and its bars are elements a browser test can count. Vega-Lite or Plotly would need their
JavaScript bundles inlined (megabytes) to render offline; matplotlib, which drew the charts
first, cost about 2 s of import and layout per report (`charts.py` says why it was replaced).

Cost on a large table (see bench/report.py): histograms come from one projected scan of the
score columns (two streaming passes, bounded memory, `scan.py`); thumbnails come from a uniform
sample and are capped by `max_thumbnails`; every other section reads a bounded number of rows.

Modules: `scan` (selection, streaming score scan, sample, snapshot thresholds), `sections` (what
each section says), `thumbs` (PyAV decoding), `charts` (SVG), `page` (HTML), `build`
(`write_report`, which `stiv report` calls). This package file imports nothing, so the
thumbnail decoder loads alone (bench/report.py times it alone).
"""
