"""Failover with real worker processes: one of two workers SIGKILLed or SIGSTOPped during a greedy generation, and
the generation goes on over the devices left with the tokens an uninterrupted run gives."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from engine import IkctlError, load_model
from engine.distributed import DistributedNet, Failover
from engine.model import Model
from engine.synth import SynthSpec, write_model
from rpcnode.client import WorkerGone
from tests.rpcnode.conftest import WorkerProc, start_worker

PROMPT = [1, 5, 9, 20, 33, 7, 100, 3, 42, 11]
N_PREDICT = 40


@pytest.fixture(scope="module")
def synth_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("synth") / "synth-q8.gguf"
    return write_model(path, SynthSpec(layers=4, dense_layers=1, dtype="Q8_0", seed=7))


def placements(a: WorkerProc, b: WorkerProc) -> dict[str, dict[str, object]]:
    rpc = f"{a.endpoint},{b.endpoint}"
    return {
        "layer split": {"rpc": rpc, "n_gpu_layers": 99, "tensor_split": "1,1"},
        "expert parallel": {"rpc": rpc, "override_tensor": [f"exps={a.device},{b.device}"]},
        "experts by layer": {"rpc": rpc, "override_tensor": [rf"blk\.[12]\.ffn_.*_exps={a.device}",
                                                             f"exps={b.device}"]},
    }


def greedy(model: Model, on_token: Callable[[int], None] = lambda k: None) -> list[int]:
    out = []
    for k, t in enumerate(model.generate(PROMPT, n_predict=N_PREDICT, temp=0.0, stop_at_eos=False)):
        out.append(t.id)
        on_token(k)
    return out


def reported(model: Model) -> list[Failover]:
    events: list[Failover] = []
    model.on_failover(events.append)
    return events


@pytest.mark.parametrize("layout", ["layer split", "expert parallel", "experts by layer"])
def test_sigkill_mid_generation_gives_the_uninterrupted_text(workers: Callable[..., WorkerProc], synth_model: Path,
                                                             layout: str) -> None:
    a, b = workers(), workers()
    opts = placements(a, b)[layout]
    want = greedy(load_model(synth_model, ctx_size=256, **opts))  # type: ignore[arg-type]
    model = load_model(synth_model, ctx_size=256, **opts)  # type: ignore[arg-type]
    events = reported(model)
    got = greedy(model, lambda k: b.kill() if k == 12 else None)
    assert got == want
    assert len(events) == 1, events  # said once
    e = events[0]
    assert e.device == b.device and "closed the connection" in e.reason
    assert e.tokens_replayed == len(PROMPT) + 12  # the prompt and the tokens decoded before the loss
    assert b.device not in " ".join(e.flags) and a.endpoint in " ".join(e.flags)
    assert isinstance(model.net, DistributedNet)
    assert b.device not in model.net.placement.devices_used()
    assert a.device in model.net.placement.devices_used()  # the worker left still works
    assert model.net.clients[a.device].counters.runs > 0


def test_sigstop_is_a_loss_within_the_deadline(workers: Callable[..., WorkerProc], synth_model: Path) -> None:
    """A frozen worker (its socket open, nothing coming back) is given up after --rpc-timeout and a probe of
    --rpc-probe-timeout, then failed over like a dead one."""
    a, b = workers(), workers()
    opts = {**placements(a, b)["layer split"], "rpc_timeout": 1, "rpc_probe_timeout": 1}
    want = greedy(load_model(synth_model, ctx_size=256, **opts))  # type: ignore[arg-type]
    model = load_model(synth_model, ctx_size=256, **opts)  # type: ignore[arg-type]
    events = reported(model)
    try:
        got = greedy(model, lambda k: os.kill(b.proc.pid, signal.SIGSTOP) if k == 8 else None)
    finally:
        os.kill(b.proc.pid, signal.SIGCONT)
    assert got == want
    assert [e.device for e in events] == [b.device]
    assert "it is frozen" in events[0].reason
    assert events[0].seconds < 8, events[0]  # 1 s before the probe, 1 s for it; generous for a loaded machine


def test_several_sequences_are_rebuilt_when_next_used(workers: Callable[..., WorkerProc], synth_model: Path) -> None:
    """Three sequences (as serve's slots): after the loss, each is rebuilt from its own tokens when it is next
    used; one truncated meanwhile is rebuilt from what it kept; the logits are those of a run without a loss (to
    float32 rounding: a rebuilt cache comes from one prefill pass of its tokens, not the passes that first filled
    it)."""
    a, b = workers(), workers()
    opts = placements(a, b)["expert parallel"]

    def run(kill: Callable[[], None]) -> list[np.ndarray]:
        model = load_model(synth_model, ctx_size=256, **opts)  # type: ignore[arg-type]
        caches = [model.new_cache() for _ in range(3)]
        model.eval_batch([(PROMPT[: 4 + k], c) for k, c in enumerate(caches)])
        kill()
        out = [model.eval_batch([([7], caches[0]), ([8], caches[1])])[1]]
        caches[2].truncate(3)
        out.append(model.eval([9, 10], caches[2]))
        out.append(model.eval([11], caches[0]))
        return out

    want = run(lambda: None)
    got = run(b.kill)
    for g, w in zip(got, want, strict=True):  # rebuilt by a prefill of its tokens: equal to float32 rounding
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-4)
        assert np.argmax(g) == np.argmax(w)


def test_a_loss_mid_prefill_runs_the_call_again_from_where_it_began(workers: Callable[..., WorkerProc],
                                                                   synth_model: Path) -> None:
    """Killed while a long prompt goes through in micro-batches: the passes that had finished are undone (their
    rows would otherwise be run twice), the cache is rebuilt from the tokens before the call, and the call's
    logits are a steady run's."""
    a, b = workers(), workers()
    opts = {**placements(a, b)["layer split"], "ubatch_size": 8, "ctx_size": 1024}
    prompt = [int(v) for v in np.random.default_rng(3).integers(3, 200, 600)]
    steady = load_model(synth_model, **opts)  # type: ignore[arg-type]
    cache = steady.new_cache()
    steady.eval(PROMPT, cache)
    want = steady.eval(prompt, cache)
    model = load_model(synth_model, **opts)  # type: ignore[arg-type]
    events = reported(model)
    cache = model.new_cache()
    model.eval(PROMPT, cache)

    def kill_once_passes_landed() -> None:  # the kernels release the GIL: this thread sees the passes land
        deadline = time.monotonic() + 60
        while cache.n_past < len(PROMPT) + 80 and time.monotonic() < deadline:
            time.sleep(0.0005)
        b.kill()

    killer = threading.Thread(target=kill_once_passes_landed)
    killer.start()
    try:
        got = model.eval(prompt, cache)
    finally:
        killer.join()
    assert [e.device for e in events] == [b.device], "the worker was not killed during the call"
    assert events[0].tokens_replayed == len(PROMPT)  # only what the cache held before the call
    assert cache.n_past == len(PROMPT) + len(prompt) and cache.tokens == PROMPT + prompt
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert np.argmax(got) == np.argmax(want)


def test_nothing_fits_without_the_lost_worker(workers: Callable[..., WorkerProc], synth_model: Path) -> None:
    """Both workers with just room for their half: the one left cannot take the other's layers, so the run stops
    with one line naming the lost worker and the shortfall."""
    probe = load_model(synth_model, ctx_size=256)
    size = synth_model.stat().st_size
    del probe
    a, b = workers("-m", str(size // 2 + (1 << 20))), workers("-m", str(size // 2 + (1 << 20)))
    model = load_model(synth_model, ctx_size=256, **placements(a, b)["layer split"])  # type: ignore[arg-type]
    cache = model.new_cache()
    model.eval(PROMPT, cache)
    b.kill()
    with pytest.raises(IkctlError) as err:
        model.eval([4], cache)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(f"{b.device} was lost and the model no longer fits on the devices left: ")
    assert re.search(rf"{re.escape(a.device)} would hold .* but has", message), message


def test_no_failover_keeps_the_error(workers: Callable[..., WorkerProc], synth_model: Path) -> None:
    a, b = workers(), workers()
    model = load_model(synth_model, ctx_size=256, failover=False,
                       **placements(a, b)["layer split"])  # type: ignore[arg-type]
    cache = model.new_cache()
    model.eval(PROMPT, cache)
    b.kill()
    with pytest.raises(WorkerGone, match=re.escape(b.device)):
        model.eval([4], cache)


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGSTOP], ids=["SIGKILL", "SIGSTOP"])
def test_cli_run_goes_on_and_says_so_once(workers: Callable[..., WorkerProc], synth_model: Path,
                                          sig: signal.Signals) -> None:
    """`ikctl run` over two workers, one SIGKILLed (or SIGSTOPped: frozen, named after --rpc-timeout and a probe)
    once tokens flow: the same text as an uninterrupted run, exit 0, one line naming the worker and the recovery
    time."""
    a, b = workers(), workers()

    def cmd(*extra: str) -> list[str]:
        return [sys.executable, "-m", "tui.cli", "run", "-m", str(synth_model), "-p", "hi", "-n", "60", "-c", "256",
                "-no-cnv", "--temp", "0", "--ignore-eos", "--rpc", f"{a.endpoint},{b.endpoint}", "-ngl", "99",
                "--rpc-timeout", "1", "--rpc-probe-timeout", "1", *extra]

    want = subprocess.run(cmd(), capture_output=True, text=True, timeout=120, check=True).stdout
    proc = subprocess.Popen(cmd(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    head = proc.stdout.read(4)  # generation is under way
    os.kill(b.proc.pid, sig)
    try:
        rest, err = proc.communicate(timeout=120)
    finally:
        if sig == signal.SIGSTOP:
            os.kill(b.proc.pid, signal.SIGCONT)
    assert proc.returncode == 0, err
    assert head + rest == want
    lost = [ln for ln in err.splitlines() if "was lost" in ln]
    assert len(lost) == 1, err
    assert re.fullmatch(rf"ikctl: {re.escape(b.device)} was lost \(.*\); continuing without it \(--rpc "
                        rf"{re.escape(a.endpoint)} -ngl 99\), recovered in [0-9.]+ s \(\d+ cached tokens run again\)",
                        lost[0]), lost[0]
    if sig == signal.SIGSTOP:
        assert "it is frozen" in lost[0]


def test_a_worker_that_answers_again_is_taken_back(workers: Callable[..., WorkerProc], synth_model: Path,
                                                  tmp_path: Path) -> None:
    """After a failover, the lost worker restarted at its endpoint (its disk cache kept) is taken back by
    rejoin(): the load's placement again, the sequence rebuilt, the logits a steady run's."""
    a, b = workers(), workers()
    opts = placements(a, b)["expert parallel"]
    steady = load_model(synth_model, ctx_size=256, **opts)  # type: ignore[arg-type]
    cache = steady.new_cache()
    want = [steady.eval(PROMPT, cache), steady.eval([4], cache), steady.eval([5], cache)]
    model = load_model(synth_model, ctx_size=256, **opts)  # type: ignore[arg-type]
    net = model.net
    assert isinstance(net, DistributedNet)
    cache = model.new_cache()
    got = [model.eval(PROMPT, cache)]
    b.kill()
    got.append(model.eval([4], cache))
    assert net.lost == [b.device] and model.rejoin() is None  # still down
    port = int(b.endpoint.rsplit(":", 1)[1])
    back = start_worker(b.cache.parent, cache=b.cache, port=port)
    try:
        back_in = net.rejoin(every=0)
        assert back_in is not None and back_in.devices == (b.device,)
        assert back_in.line() == f"{b.device} answered again and was taken back ({' '.join(back_in.flags)})"
        assert net.lost == [] and b.device in net.placement.devices_used()
        assert model.placement_flags() == list(net.loaded_spec.rules.flags())
        got.append(model.eval([5], cache))
        assert net.clients[b.device].counters.runs > 0
    finally:
        back.kill()
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-4)
