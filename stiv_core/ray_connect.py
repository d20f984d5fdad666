"""The one Ray connect of the project: every driver (curation, backfill, prepare, train) joins
the cluster named by `--address` or `$RAY_ADDRESS`, else starts an embedded Ray of its own."""

from __future__ import annotations

import logging
import os


def connect_ray(address: str | None = None, verbose: bool = False) -> bool:
    """Join the cluster at `address` (or $RAY_ADDRESS), else start an embedded Ray. True when
    this call initialised Ray (the caller owns it and may shut it down); False when Ray was
    already initialised, e.g. by a test's session fixture.

    Without an address it is always a private embedded Ray (`address="local"`): a bare
    `ray.init()` would join whatever cluster was started last on this machine
    (/tmp/ray/ray_current_cluster). Ray Data's per-dataset INFO lines and progress bars go to
    Ray's log directory unless `verbose`."""
    import ray

    started = False
    if not ray.is_initialized():
        address = address or os.environ.get("RAY_ADDRESS") or None
        level = logging.INFO if verbose else logging.WARNING
        if address:
            ray.init(address=address, log_to_driver=verbose, logging_level=level)
        else:
            ray.init(
                address="local", include_dashboard=False, log_to_driver=verbose, logging_level=level
            )
        started = True
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = verbose
    ctx.print_on_execution_start = verbose
    logging.getLogger("ray.data").setLevel(logging.INFO if verbose else logging.WARNING)
    # Our own progress bar replaces Ray Data's; its notice that they are off is not news.
    logging.getLogger("ray.data._internal.progress").setLevel(
        logging.INFO if verbose else logging.ERROR
    )
    return started
