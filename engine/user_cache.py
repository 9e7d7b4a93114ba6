"""The user's ikctl cache directory: generated models, digests of model files, cluster files, workers' tensors."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """$IKCTL_CACHE, else $XDG_CACHE_HOME/ikctl, else ~/.cache/ikctl."""
    if os.environ.get("IKCTL_CACHE"):
        return Path(os.environ["IKCTL_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "ikctl"
