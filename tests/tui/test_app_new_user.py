"""What a new user meets in the app (issue 13): a missing model, the coordinator's CPU row, worker memory in
--device-mem, a host seen for the first time, workers left running on quit, local workers' capacity and temp dirs."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
from textual.widgets import Input, Static

from engine.cluster import Cluster, ClusterWorker, write_cluster
from engine.placement import PlacementRules
from engine.synth import SynthSpec, write_model
from tests.tui.conftest import SshdCluster
from tests.tui.test_app import cache_dir, run_async, settle, text_of  # noqa: F401 (cache_dir is a fixture)
from tui.app import main, make_app
from tui.host_board import HostBoard
from tui.inventory import Host
from tui.local_workers import LocalWorkers, ram_share, sweep_stale
from tui.screens.confirm import Confirm
from tui.ssh import HostError, SSHOptions, SSHTransport, trust_host_key

REPO = Path(__file__).resolve().parents[2]

SIZE = (80, 24)
RPC = "127.0.0.1:50052"


@run_async
async def test_a_missing_model_is_one_clear_error_line(tmp_path: Path) -> None:
    missing = str(tmp_path / "missing.gguf")
    app = make_app(missing)
    async with app.run_test(size=SIZE) as pilot:
        await settle(app, pilot)
        line = text_of(app, "#model-line")
        assert line.startswith(f"✗ model file not found: {missing}")
        assert "reading the model header" not in text_of(app, "#map")
        assert text_of(app, "#plan-status") == f"✗ cannot read the model header: model file not found: {missing} " \
                                               "(check the -m path)"


def test_a_missing_model_is_refused_before_the_app_opens(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = str(tmp_path / "missing.gguf")
    assert main(["-m", missing]) == 1
    assert capsys.readouterr().err == f"ikctl: error: model file not found: {missing} (check the -m path)\n"


@run_async
async def test_the_cpu_row_says_its_capacity_is_unknown(cache_dir: Path) -> None:  # noqa: F811
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await settle(app, pilot)
        bars = text_of(app, "#bars")
        assert "N/A" not in bars
        assert "capacity unknown" in bars


@run_async
async def test_worker_memory_shows_in_human_units(cache_dir: Path) -> None:  # noqa: F811
    app = make_app(rules=PlacementRules(rpc=(RPC,)), capacities={f"RPC[{RPC}]": 24683584 << 10})
    async with app.run_test(size=SIZE) as pilot:
        await settle(app, pilot)
        assert app.screen.query_one("#device-mem", Input).value == f"RPC[{RPC}]=23.5GiB"


# ---- the app's own local workers --------------------------------------------------------------------------------

def _listening_mem(log: Path) -> int:
    m = re.search(r"memory (\d+) bytes", log.read_text())
    assert m, log.read_text()
    return int(m[1])


def test_local_workers_share_the_machines_ram() -> None:
    workers = LocalWorkers(threads=1)
    try:
        started = workers.start(2)
        more = workers.start(1)
        total = psutil.virtual_memory().total
        claims = [_listening_mem(w.log) for w in [*started, *more]]
        assert sum(claims[:2]) <= total and claims[2] <= total // 3 + (1 << 20), claims
    finally:
        workers.close()
    assert ram_share(24 << 30, running=0, starting=2) == 12 << 30
    assert ram_share(24 << 30, running=2, starting=1) == 8 << 30


def _app_with_a_worker(tmp_path: Path) -> tuple[subprocess.Popen[bytes], Path, int]:
    """`ikctl -m tiny --local 1` on a pseudo-terminal, its temp dir under tmp_path: (app, worker dir, worker pid)."""
    model = write_model(tmp_path / "tiny.gguf", SynthSpec(layers=2, dense_layers=1, seed=3))
    master, slave = os.openpty()
    env = {**os.environ, "TMPDIR": str(tmp_path), "TERM": "xterm-256color", "PYTHONPATH": str(REPO),
           "IKCTL_CACHE": str(tmp_path / "cache")}
    app = subprocess.Popen([sys.executable, "-m", "tui.app", "-m", str(model), "--local", "1"], stdin=slave,
                           stdout=slave, stderr=slave, env=env, cwd=tmp_path, start_new_session=True)
    os.close(slave)
    threading.Thread(target=_drain, args=(master,), daemon=True).start()  # a full terminal would block the app
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        dirs = list(tmp_path.glob(f"ikctl-workers-{app.pid}-*"))
        logs = [log for d in dirs for log in d.glob("worker-*.log") if "listening" in log.read_text()]
        if logs:
            pid = next(int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit() and
                       _stdout_is(p, logs[0]))
            time.sleep(1.0)  # the app is up
            return app, dirs[0], pid
        time.sleep(0.1)
    app.kill()
    raise AssertionError("the app's worker did not start")


def _drain(fd: int) -> None:
    with contextlib.suppress(OSError):
        while os.read(fd, 1 << 16):
            pass
    os.close(fd)


def _stdout_is(proc_dir: Path, log: Path) -> bool:
    try:
        return os.readlink(proc_dir / "fd" / "1") == str(log)
    except OSError:
        return False


def _gone(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"
    except OSError:
        return True


@pytest.mark.slow
def test_a_closed_terminal_stops_the_workers_and_removes_their_dir(tmp_path: Path) -> None:
    app, directory, worker = _app_with_a_worker(tmp_path)
    try:
        app.send_signal(signal.SIGHUP)  # what closing its terminal sends
        app.wait(30)
        assert not directory.exists()
        assert _gone(worker)
    finally:
        app.kill()
        with contextlib.suppress(OSError):
            os.kill(worker, signal.SIGKILL)


@pytest.mark.slow
def test_what_a_killed_app_left_is_removed_by_the_next(tmp_path: Path) -> None:
    app, directory, worker = _app_with_a_worker(tmp_path)
    try:
        app.kill()
        app.wait(30)
        assert directory.exists() and not _gone(worker)  # SIGKILL: nothing could run
        (tmp_path / f"ikctl-workers-{os.getpid()}-alive").mkdir()  # a running app's: kept
        assert sweep_stale(tmp_path) == [directory]
        assert not directory.exists() and (tmp_path / f"ikctl-workers-{os.getpid()}-alive").exists()
        deadline = time.monotonic() + 10
        while not _gone(worker) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _gone(worker)
    finally:
        with contextlib.suppress(OSError):
            os.kill(worker, signal.SIGKILL)


# ---- quitting with workers launched over SSH ----------------------------------------------------------------------

def _board_with_a_launched_worker(tmp_path: Path) -> HostBoard:
    """A board whose cluster file lists one worker (on this machine, with a pid that is no rpcnode: stopping it finds
    it gone without SSH)."""
    worker = ClusterWorker(host="box1", device="cpu", endpoint="127.0.0.1:50999", token="t" * 16, mem_bytes=1 << 30,
                           threads=1, pid=os.getpid(), log="-", token_file=str(tmp_path / "token"), ssh=None)
    cluster_file = tmp_path / "tui-cluster.json"
    write_cluster(cluster_file, Cluster((worker,)))
    return HostBoard((), None, cluster_file=cluster_file)


@pytest.mark.parametrize(("key", "running_after", "exit_message"), [
    ("c", True, None),
    ("escape", True, None),
    ("l", False, "ikctl: 1 worker launched over SSH still running: ikctl stop --cluster {file}"),
    ("s", False, "ikctl: stopped 1 of 1 launched workers"),
])
def test_quit_says_what_keeps_running_and_offers_to_stop_it(tmp_path: Path, cache_dir: Path, key: str,  # noqa: F811
                                                            running_after: bool, exit_message: str | None) -> None:
    board = _board_with_a_launched_worker(tmp_path)

    async def body() -> None:
        app = make_app(board=board)
        async with app.run_test(size=SIZE) as pilot:
            await settle(app, pilot)
            await pilot.press("ctrl+q")
            await pilot.pause()
            assert isinstance(app.screen, Confirm)
            text = str(app.screen.query_one("#confirm-text", Static).render())
            assert text.startswith("1 worker launched over SSH still runs on box1; they keep running after the app "
                                   f"ends.\n`ikctl stop --cluster {board.cluster_file}` stops them later.")
            await pilot.press(key)
            await app.workers.wait_for_complete()
            await pilot.pause()
            assert app.is_running == running_after
            assert [str(m) for m in app._exit_renderables] == ([exit_message.format(file=board.cluster_file)]
                                                               if exit_message else [])

    asyncio.run(body())
    if key == "s":
        assert board.launched_workers() == [] and not board.cluster_file.exists()  # type: ignore[union-attr]


# ---- a host seen for the first time ------------------------------------------------------------------------------

@run_async
async def test_a_new_hosts_key_is_shown_to_check_and_trust(sshd_cluster: SshdCluster, tmp_path: Path,
                                                           cache_dir: Path) -> None:  # noqa: F811
    known = tmp_path / "known_hosts"  # none yet: every host is new
    h = sshd_cluster.hosts[0]
    board = HostBoard((Host(name="box1", ssh=h.ssh, identity=str(sshd_cluster.client_key)),), None,
                      transport=SSHTransport(SSHOptions(known_hosts=str(known))))
    (tmp_path / "host_key_line").write_text(h.host_key_line)
    fingerprint = subprocess.run(["ssh-keygen", "-lf", str(tmp_path / "host_key_line")], capture_output=True,
                                 text=True, check=True).stdout.split()[1]
    app = make_app(board=board, start_mode="hosts")
    async with app.run_test(size=(120, 40)) as pilot:
        await settle(app, pilot)
        assert "box1: its host key is not known here: k shows the key, to check and trust it" in \
            text_of(app, "#hosts-status")
        await pilot.press("k")
        await settle(app, pilot)
        assert isinstance(app.screen, Confirm)
        text = str(app.screen.query_one("#confirm-text", Static).render())
        assert text.startswith(f"box1 ({h.addr}, port 22) presents this ssh-ed25519 key:\n\n  {fingerprint}\n")
        await pilot.press("t")
        await settle(app, pilot)  # trusted, then probed again
        assert known.read_text() == h.host_key_line
        assert board.probes["box1"].ok
        assert "host key" not in text_of(app, "#hosts-status")
        # a host known_hosts already has an entry for is never written again from here (a changed key: an attack?)
        new = await board.host_key(board.hosts[0])
        with pytest.raises(HostError, match="a changed key is never replaced here"):
            trust_host_key(known, new)
