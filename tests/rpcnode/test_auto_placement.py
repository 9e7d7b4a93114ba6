"""--auto with real workers: measured, planned, loaded and run; the choice printed as flags; failover re-chooses."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from engine import IkctlError, load_model
from engine.distributed import DistributedNet
from engine.gguf_file import GGUFFile
from engine.placement import CPU
from engine.synth import SynthSpec, write_model
from rpcnode.client import Client
from tests.rpcnode.conftest import WorkerProc
from tui.cli import build_parser
from tui.flags import load_options

PROMPT = [1, 5, 9, 20, 33, 7, 100, 3, 42, 11]


@pytest.fixture(scope="module")
def synth_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("synth") / "synth-q8.gguf"
    return write_model(path, SynthSpec(layers=6, dense_layers=1, dtype="Q8_0", seed=11))


def test_workers_too_small_for_the_model_alone_get_it_split(workers: Callable[..., WorkerProc], synth_model: Path,
                                                           tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """This machine offers a tenth of the model (--device-mem CPU=…), each worker 60% of it (-m, plus its segment
    programs): only a split over both workers fits, and --auto finds one; the logits are the local ones."""
    monkeypatch.setenv("IKCTL_CACHE", str(tmp_path / "ikctl-cache"))  # this machine's calibration file
    size = synth_model.stat().st_size
    # 60% of the weights and room for the segment programs (~0.9 MiB for this model's layers): not all of it
    mem = str(int(0.6 * size) + (900 << 10))
    a, b = (calibrated(workers, synth_model, "-m", mem) for _ in range(2))
    opts = {"rpc": f"{a.endpoint},{b.endpoint}", "auto": True, "device_mem": [f"CPU={size // 10}"],
            "ctx_size": 256}
    model = load_model(synth_model, **opts)  # type: ignore[arg-type]
    assert model.auto is not None
    net = model.net
    assert isinstance(net, DistributedNet)
    used = net.placement.devices_used()
    assert {a.device, b.device} <= used, model.auto.chosen
    fits = [c for c in model.auto.weighed if c.problem is None]
    assert model.auto.chosen is fits[0]
    assert {"all on this machine", f"every layer on {a.device}"} <= {c.name for c in model.auto.weighed
                                                                      if c.problem is not None}
    assert (tmp_path / "ikctl-cache" / "calibration.json").is_file()  # this machine's speed, kept
    local = load_model(synth_model, ctx_size=256)
    np.testing.assert_allclose(model.logits(PROMPT), local.logits(PROMPT), rtol=1e-5, atol=1e-5)
    # the flags printed, typed on a command line, pin the same placement
    typed = build_parser().parse_args(["run", "-c", "256", *shlex.split(" ".join(model.placement_flags()))])
    pinned = load_model(synth_model, **load_options(typed))
    assert isinstance(pinned.net, DistributedNet)
    assert pinned.net.placement.device_of == net.placement.device_of


def calibrated(workers: Callable[..., WorkerProc], model: Path, *extra: str) -> WorkerProc:
    """A worker whose cache dir already holds its calibration for the model's types (measured by a first process
    with room for the scratch): one with a -m below the 32 MiB scratch answers from it."""
    first = workers()
    types = sorted({t.qtype for t in GGUFFile(model).tensors.values()})
    with Client.connect(first.endpoint) as c:
        assert all(v > 0 for v in c.calibrate(types).gbps)
    first.kill()
    return workers(*extra, cache=first.cache)


def test_plan_auto_verbose_prints_the_candidates_and_the_flags(workers: Callable[..., WorkerProc],
                                                               synth_model: Path, tmp_path: Path) -> None:
    a, b = workers(), workers()
    size = synth_model.stat().st_size
    env = {**os.environ, "IKCTL_CACHE": str(tmp_path / "ikctl-cache")}
    cmd = [sys.executable, "-m", "tui.cli", "plan", "-m", str(synth_model), "-c", "256", "--auto", "-v",
           "--rpc", f"{a.endpoint},{b.endpoint}", "--device-mem", f"CPU={size // 10}"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env, cwd=Path(__file__).parents[2])
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert "| candidate | predicted | round trips / token | wire / token | flags |" in lines
    chosen = [ln for ln in lines if ln.startswith("--auto chose ")]
    assert len(chosen) == 1
    assert re.match(r"--auto chose .+ \(predicted [0-9.]+ t/s; .+\): --rpc ", chosen[0]), chosen[0]
    assert any(ln.startswith("| all on this machine | – |") and "not used: CPU would hold" in ln for ln in lines)
    bold = [ln for ln in lines if ln.startswith("| **")]
    assert len(bold) == 1  # the chosen row


def test_auto_refuses_hand_placement_flags(synth_model: Path) -> None:
    with pytest.raises(IkctlError, match=r"^--auto chooses -ot, -ngl and -ts itself"):
        load_model(synth_model, auto=True, n_gpu_layers=99, rpc="127.0.0.1:1")
    with pytest.raises(IkctlError, match=r"^--recalibrate measures the devices for --auto; add --auto$"):
        load_model(synth_model, recalibrate=True, rpc="127.0.0.1:1")


def test_failover_chooses_again_among_the_devices_left(workers: Callable[..., WorkerProc], synth_model: Path,
                                                       tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IKCTL_CACHE", str(tmp_path / "ikctl-cache"))
    size = synth_model.stat().st_size
    a, b = workers(), workers()
    opts = {"rpc": f"{a.endpoint},{b.endpoint}", "auto": True, "device_mem": [f"CPU={size // 10}"],
            "ctx_size": 256}
    want = [t.id for t in load_model(synth_model, **opts).generate(PROMPT, n_predict=30, temp=0.0,  # type: ignore[arg-type]
                                                                   stop_at_eos=False)]
    model = load_model(synth_model, **opts)  # type: ignore[arg-type]
    assert isinstance(model.net, DistributedNet)
    victim = next(w for w in (a, b) if w.device in model.net.placement.devices_used())
    left = b if victim is a else a
    got = []
    for k, t in enumerate(model.generate(PROMPT, n_predict=30, temp=0.0, stop_at_eos=False)):
        got.append(t.id)
        if k == 8:
            victim.kill()
    assert got == want
    assert model.net.lost == [victim.device]
    used = model.net.placement.devices_used()
    assert victim.device not in used and left.device in used and CPU in used
    assert model.net.auto is not None and all(victim.endpoint not in f for f in model.placement_flags())
