"""Where llama.cpp's reference set (`shared/refs`: tiny deepseek2 GGUFs, logits, intermediates) lies.

It ships beside the repository checkout (`../shared/refs`). A clone made elsewhere (CI in a temporary directory)
finds it beside the repository it was cloned from; `$IKCTL_REFS` names it outright.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _origin() -> Path | None:
    """The local repository this checkout was cloned from, if any."""
    try:
        url = subprocess.run(["git", "-C", str(REPO), "config", "--get", "remote.origin.url"],
                             capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    path = Path(url.removeprefix("file://")) if url and "://" not in url.removeprefix("file://") else None
    return path if path is not None and path.is_dir() else None


def _find() -> Path:
    if os.environ.get("IKCTL_REFS"):
        return Path(os.environ["IKCTL_REFS"])
    beside = REPO.parent / "shared" / "refs"
    origin = _origin()
    if not beside.is_dir() and origin is not None and (origin.parent / "shared" / "refs").is_dir():
        return origin.parent / "shared" / "refs"
    return beside


REFS = _find()
V3 = REFS / "open-v3.gguf"
