"""Moved to `stiv_core.config` (the leaf package, so libraries need not import the CLI
package). This re-export stays only while `training/` still imports `stiv.config`."""

from stiv_core.config import (
    ConfigError,
    load_config,
    parse_overrides,
    save_config,
    to_dict,
)

__all__ = ["ConfigError", "load_config", "parse_overrides", "save_config", "to_dict"]
