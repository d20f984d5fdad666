"""The leaf package every other package of ours may import, and which imports none of them.

- `stiv_core.config`: typed configs (dataclasses) loaded from YAML plus `--set` overrides;
- `stiv_core.ray_connect`: the one way a driver joins a Ray cluster or starts an embedded one;
- `stiv_core.uris`: whether a path or URI is local.

Layers (docs/architecture.md "Import layers"): stiv_core < model < data_engine < training < stiv.
"""
