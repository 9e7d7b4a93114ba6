"""A sweep's rows as table cells, plot series, each worker's traffic as table cells, and the same JSON file
`ikctl bench --json` writes."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from engine.bench import SweepRow, WorkerTraffic, rows_as_dicts
from engine.errors import IkctlError

COLUMNS = ("PP", "TG", "N_KV", "T_PP s", "S_PP t/s", "T_TG s", "S_TG t/s")
# what WorkerTraffic.line() says in a sentence, in columns that fit 80 with a worker's endpoint: "ms/trip net" is
# each round trip's time beyond the worker's compute (network, both sides' overheads)
TRAFFIC_COLUMNS = ("worker", "round trips", "ms/trip net", "compute s", "MB sent", "MB recv")


def row_cells(row: SweepRow) -> tuple[str, ...]:
    """One table row, formatted as `ikctl bench` prints it."""
    return (str(row.pp), str(row.tg), str(row.n_kv), f"{row.t_pp:.3f}", f"{row.speed_pp:.2f}", f"{row.t_tg:.3f}",
            f"{row.speed_tg:.2f}")


def traffic_cells(t: WorkerTraffic) -> tuple[str, ...]:
    """One worker's part of a sweep as a row of TRAFFIC_COLUMNS, with the figures of `ikctl bench`'s line."""
    beyond = (t.run_seconds - t.worker_seconds) / max(t.round_trips, 1)
    return (t.device, str(t.round_trips), f"{beyond * 1e3:.3f}", f"{t.worker_seconds:.2f}",
            f"{t.bytes_sent / 1e6:.2f}", f"{t.bytes_received / 1e6:.2f}")


def series(rows: Sequence[SweepRow]) -> tuple[list[int], list[float], list[float]]:
    """N_KV, S_PP and S_TG as lists for the plot."""
    return [r.n_kv for r in rows], [r.speed_pp for r in rows], [r.speed_tg for r in rows]


def bench_document(settings: dict[str, Any], rows: Sequence[SweepRow],
                   workers: Sequence[WorkerTraffic] = ()) -> dict[str, Any]:
    return {**settings, "rows": rows_as_dicts(list(rows)), "workers": [asdict(t) for t in workers]}


def save_json(path: str | Path, settings: dict[str, Any], rows: Sequence[SweepRow],
              workers: Sequence[WorkerTraffic] = ()) -> Path:
    """Write the document `ikctl bench --json` writes; an OSError becomes a one-line IkctlError."""
    p = Path(path).expanduser()
    try:
        with open(p, "w") as f:
            json.dump(bench_document(settings, rows, workers), f, indent=1)
            f.write("\n")
    except OSError as e:
        raise IkctlError(f"cannot write {p}: {e.strerror}") from None
    return p
