"""Training and validation data for every task; one cache folder for all of them."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional


def cache_root(cache_dir: Optional[str] = None) -> Path:
    """Where every dataset's cache lives: data.cache_dir, else $SIFT_CACHE, else ~/.cache/sift-train."""
    root = Path(cache_dir or os.environ.get("SIFT_CACHE") or Path.home() / ".cache" / "sift-train").expanduser()
    root.mkdir(parents=True, exist_ok=True)
    return root
