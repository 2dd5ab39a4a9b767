"""Where data sets live: outside the repository, in the user's cache unless told otherwise."""

from __future__ import annotations

import os
from pathlib import Path


def default_data_dir() -> Path:
    """``$EMCAPS_DATA_DIR``, else ``$XDG_CACHE_HOME/emcaps``, else ``~/.cache/emcaps``."""
    explicit = os.environ.get("EMCAPS_DATA_DIR")
    if explicit:
        return Path(explicit).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME")
    base = Path(cache).expanduser() if cache else Path.home() / ".cache"
    return base / "emcaps"
