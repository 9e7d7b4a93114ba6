"""tui.flags: the shared flags become load_model keywords."""

from __future__ import annotations

import argparse

from engine.model import Options
from tui.flags import add_model_flags, add_placement_flags, load_options


def test_no_pipeline_becomes_the_pipeline_load_option() -> None:
    p = argparse.ArgumentParser()
    add_model_flags(p)
    add_placement_flags(p)
    on = load_options(p.parse_args(["--rpc", "127.0.0.1:50052", "-ngl", "99"]))
    off = load_options(p.parse_args(["--rpc", "127.0.0.1:50052", "-ngl", "99", "--no-pipeline"]))
    assert Options(**on).pipeline is True  # type: ignore[arg-type]
    assert Options(**off).pipeline is False  # type: ignore[arg-type]
