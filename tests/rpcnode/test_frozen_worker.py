"""A frozen worker (SIGSTOP: its socket stays open, nothing comes back) is named within its deadline; a busy one
(it answers the liveness probe on a second connection) is waited for."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

from engine import IkctlError, load_model
from engine.synth import SynthSpec, write_model
from rpcnode import client as client_module
from rpcnode.client import Client, RPCError, WorkerGone, probe
from tests.rpcnode.conftest import WorkerProc

PROMPT = [1, 5, 9, 20, 33, 7, 100, 3, 42, 11]


@pytest.fixture(scope="module")
def synth_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("synth") / "synth-q8.gguf"
    return write_model(path, SynthSpec(layers=4, dense_layers=1, dtype="Q8_0", seed=7))


@contextmanager
def stopped(w: WorkerProc) -> Iterator[None]:
    """The worker SIGSTOPped for the block's duration (and continued however it ends, so teardown can kill it)."""
    os.kill(w.proc.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(w.proc.pid, signal.SIGCONT)


def stop_after(w: WorkerProc, after_s: float) -> threading.Timer:
    """SIGSTOP the worker after `after_s` (mid-generation; the caller continues it)."""
    t = threading.Timer(after_s, os.kill, (w.proc.pid, signal.SIGSTOP))
    t.start()
    return t


def test_probe_tells_a_stopped_worker_from_a_live_one(workers: Callable[..., WorkerProc]) -> None:
    w = workers()
    host, port = w.endpoint.rsplit(":", 1)
    assert probe(host, int(port), 5.0) is None
    with stopped(w):
        t0 = time.monotonic()
        assert probe(host, int(port), 0.5) == "did not answer a liveness probe within 0.5 s"
        assert time.monotonic() - t0 < 2
    assert probe(host, int(port), 5.0) is None
    w.kill()
    assert re.match(r"did not answer a liveness probe \(.*refused", probe(host, int(port), 1.0) or "")


def test_a_worker_with_a_token_answers_the_probe_quietly(workers: Callable[..., WorkerProc], tmp_path: Path) -> None:
    """The probe needs no token (it ends at the worker's first reply) and leaves no warning in the worker's log."""
    token_file = tmp_path / "token"
    token_file.write_text("s3cret-token-of-some-length\n")
    token_file.chmod(0o600)
    w = workers("--token-file", str(token_file))
    host, port = w.endpoint.rsplit(":", 1)
    assert [probe(host, int(port), 5.0) for _ in range(3)] == [None, None, None]
    with Client.connect(w.endpoint, "s3cret-token-of-some-length") as c:  # the worker served the probes first
        c.telemetry()
    lines = w.log_text().splitlines()
    assert all(re.fullmatch(r"rpcnode: (listening on .*|connection from 127\.0\.0\.1:\d+)", ln) for ln in lines), lines
    assert len(lines) == 1 + 3 + 1


def test_a_frozen_worker_is_named_within_its_deadline(workers: Callable[..., WorkerProc], synth_model: Path) -> None:
    """SIGSTOP mid-generation: after --rpc-timeout without a reply the coordinator probes the worker on a second
    connection, gets no answer within --rpc-probe-timeout, and ends with one error naming the worker, instead of
    waiting out the 600 s a run may take."""
    w = workers()
    model = load_model(synth_model, rpc=w.endpoint, override_tensor=[f"exps={w.device}"], rpc_timeout=1,
                       rpc_probe_timeout=1, failover=False)  # failover: tests/rpcnode/test_failover.py
    cache = model.new_cache(512)
    model.eval(PROMPT, cache)
    model.eval([1], cache)  # a decode step first: on a cold numba cache it compiles the decode kernels here
    freezer = stop_after(w, 0.3)
    try:
        t0 = time.monotonic()
        with pytest.raises(RPCError) as err:
            for k in range(400):
                model.eval([k % 200], cache)
                assert time.monotonic() - t0 < 30, "the worker was never stopped mid-generation"
        waited = time.monotonic() - t0
    finally:
        freezer.join()
        os.kill(w.proc.pid, signal.SIGCONT)
    message = str(err.value)
    assert "\n" not in message
    assert re.fullmatch(rf"RPC\[{re.escape(w.endpoint)}\]: worker sent no reply for [0-9.]+ s and did not answer a "
                        r"liveness probe within 1 s: it is frozen \(stopped, or swapping\) or its host is gone; "
                        r"check that it is still running", message), message
    # stopped at 0.3 s, then 1 s before the probe, 1 s for it; generous for a loaded machine
    assert waited < 8, waited


def test_a_frozen_worker_that_takes_no_more_bytes_is_named(workers: Callable[..., WorkerProc]) -> None:
    """A big request to a stopped worker fills the socket buffers and the send blocks: probed like a late reply."""
    w = workers()
    client = Client.connect(w.endpoint, reply_floor=0.5, probe_timeout=1)
    with stopped(w):
        t0 = time.monotonic()
        with pytest.raises(WorkerGone, match=rf"^RPC\[{re.escape(w.endpoint)}\]: worker took no bytes of a request "
                           r"for [0-9.]+ s and did not answer a liveness probe within 1 s: it is frozen"):
            client.upload("ab" * 32, bytes(32 << 20))
        assert time.monotonic() - t0 < 8
    assert not client.connected


def test_a_worker_stopped_shorter_than_the_probe_window_is_waited_for(workers: Callable[..., WorkerProc],
                                                                      synth_model: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Stopped for 1.5 s mid-generation with --rpc-timeout 0.3 and --rpc-probe-timeout 5: the probe is answered
    once the worker runs again, so the generation goes on, with the logits a steady worker gives."""
    w = workers()
    answers = count_probes(monkeypatch)
    opts = {"rpc": w.endpoint, "override_tensor": [f"exps={w.device}"], "rpc_timeout": 0.3, "rpc_probe_timeout": 5}
    steps = list(range(40, 50))
    want = decode_all(load_model(synth_model, **opts), steps)
    answers.clear()
    model = load_model(synth_model, **opts)
    cache = model.new_cache(512)
    model.eval(PROMPT, cache)
    got = [model.eval([t], cache) for t in steps[:5]]
    os.kill(w.proc.pid, signal.SIGSTOP)
    waker = threading.Timer(1.5, os.kill, (w.proc.pid, signal.SIGCONT))
    waker.start()
    try:
        t0 = time.monotonic()
        got += [model.eval([t], cache) for t in steps[5:]]
        assert time.monotonic() - t0 > 1.4
    finally:
        waker.join()
    assert answers and all(a is None for a in answers), answers  # probed while stopped, and it answered
    np.testing.assert_array_equal(np.stack(got), np.stack(want))


def test_a_busy_worker_is_probed_and_waited_for(workers: Callable[..., WorkerProc], synth_model: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """A prefill that takes longer than --rpc-timeout (the previous attempt's false alarm: a worker compiling its
    kernels for its first segment): the worker answers the probes meanwhile and the run succeeds."""
    w = workers()
    answers = count_probes(monkeypatch)
    model = load_model(synth_model, rpc=w.endpoint, n_gpu_layers=99, ubatch_size=512, rpc_timeout=0.05,
                       rpc_probe_timeout=5)
    cache = model.new_cache(1024)
    for _ in range(3):
        cache.clear()
        model.eval([k % 200 for k in range(512)], cache)
    assert answers and all(a is None for a in answers), answers


@pytest.mark.slow
def test_a_worker_compiling_its_kernels_is_waited_for(workers: Callable[..., WorkerProc], synth_model: Path,
                                                      tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What made the first attempt (a deadline alone) fail in CI: a worker with no compiled kernels compiles them
    on first use, tens of seconds for its first segment and again for the first decode step, after it has answered
    fast segments. Compiling holds the GIL only in slices, so the worker answers every probe (in ~1 s at worst on
    a loaded 2-core VM) and the run goes on, with 0.2 s between probes and 5 s for each."""
    with monkeypatch.context() as env:
        env.setenv("NUMBA_CACHE_DIR", str(tmp_path / "numba"))  # the worker's kernels only
        w = workers()
    answers = count_probes(monkeypatch)
    model = load_model(synth_model, rpc=w.endpoint, override_tensor=[f"exps={w.device}"], rpc_timeout=0.2,
                       rpc_probe_timeout=5)
    cache = model.new_cache(64)
    model.eval(PROMPT, cache)
    model.eval([4], cache)
    assert len(answers) > 10 and all(a is None for a in answers), answers


def test_cli_names_a_frozen_worker_in_one_line(workers: Callable[..., WorkerProc], synth_model: Path) -> None:
    """`ikctl run --rpc-timeout 1 --rpc-probe-timeout 1 --no-failover`, its worker SIGSTOPped once tokens flow:
    exit 1 and one error line naming the worker."""
    w = workers()
    cmd = [sys.executable, "-m", "tui.cli", "run", "-m", str(synth_model), "-p", "hi", "-n", "2000", "-c", "2048",
           "-no-cnv", "--rpc", w.endpoint, "-ot", f"exps={w.device}", "--rpc-timeout", "1",
           "--rpc-probe-timeout", "1", "--no-failover"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        proc.stdout.read(4)  # generation is under way
        with stopped(w):
            t0 = time.monotonic()
            _, err = proc.communicate(timeout=30)
            waited = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 1
    assert re.fullmatch(rf"ikctl: error: RPC\[{re.escape(w.endpoint)}\]: worker sent no reply for [0-9.]+ s and "
                        r"did not answer a liveness probe within 1 s: .*\n", err), err
    assert waited < 10, waited


def test_timeouts_are_checked() -> None:
    from engine.model import Options

    with pytest.raises(IkctlError, match="--rpc-timeout 0 must be more than 0"):
        Options(rpc_timeout=0).validated()
    with pytest.raises(IkctlError, match="--rpc-probe-timeout -1 must be more than 0"):
        Options(rpc_probe_timeout=-1).validated()
    help_text = subprocess.run([sys.executable, "-m", "tui.cli", "run", "--help"], capture_output=True, text=True,
                               timeout=60).stdout
    assert "--rpc-timeout S" in help_text and "--rpc-probe-timeout S" in help_text


# ---- helpers ----------------------------------------------------------------------------------------------------


def count_probes(monkeypatch: pytest.MonkeyPatch) -> list[str | None]:
    """Record what each liveness probe the coordinator sends finds (None: the worker answered)."""
    answers: list[str | None] = []
    real = client_module.probe

    def counted(host: str, port: int, timeout: float = client_module.PROBE_TIMEOUT_S) -> str | None:
        answers.append(real(host, port, timeout))
        return answers[-1]

    monkeypatch.setattr(client_module, "probe", counted)
    return answers


def decode_all(model: object, steps: list[int]) -> list[np.ndarray]:
    """The prompt, then `steps` decoded one at a time; their logits."""
    cache = model.new_cache(512)  # type: ignore[attr-defined]
    model.eval(PROMPT, cache)  # type: ignore[attr-defined]
    return [model.eval([t], cache) for t in steps]  # type: ignore[attr-defined]
