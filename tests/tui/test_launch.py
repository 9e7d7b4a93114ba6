"""`ikctl launch` / `ikctl stop` over real SSH into network namespaces, inference across the launched workers,
and each failure's one-line reason."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from engine import load_model
from engine.cluster import Cluster, ClusterWorker, read_cluster, write_cluster
from engine.placement import CPU
from engine.synth import SynthSpec, write_model
from rpcnode.client import Client, RPCError
from tests.tui.conftest import SshdCluster, checkout_python, these_packages_pth_line, venv_site_packages
from tui.inventory import Host
from tui.launch import LaunchOptions, WorkerPlan, launch_host, plan_workers
from tui.probe import Gpu, HostFacts
from tui.ssh import LocalTransport, SSHOptions, SSHTransport
from tui.stop import STATUSES, stop_workers

REPO = Path(__file__).resolve().parents[2]
PROMPT = [1, 5, 9, 20, 33, 7, 100, 3]


# ---- helpers ----------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ikctl_python(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A python that imports this checkout's ikctl from any directory (the remote shells start in $HOME)."""
    return checkout_python(tmp_path_factory.mktemp("venv") / "ikctl")


def ikctl(*args: str, cache: Path, cwd: Path = REPO, home: Path | None = None) -> subprocess.CompletedProcess[str]:
    """The real command line, as a user runs it (from `cwd`, with $HOME `home`)."""
    env = {**os.environ, "IKCTL_CACHE": str(cache), "PYTHONPATH": str(REPO)}
    if home is not None:
        env["HOME"] = str(home)
    return subprocess.run([sys.executable, "-m", "tui.cli", *args], capture_output=True, text=True, timeout=300,
                          cwd=cwd, env=env)


def hosts_toml(entries: list[dict[str, object]]) -> str:
    def value(v: object) -> str:
        return "[" + ", ".join(value(x) for x in v) + "]" if isinstance(v, list) else \
            (str(v) if isinstance(v, int) else f'"{v}"')
    return "".join("[[host]]\n" + "".join(f"{k} = {value(v)}\n" for k, v in e.items()) + "\n" for e in entries)


def entry(cluster: SshdCluster, i: int, python: str, tmp: Path, **fields: object) -> dict[str, object]:
    h = cluster.hosts[i]
    return {"name": h.netns, "ssh": h.ssh, "identity": str(cluster.client_key), "python": python, "threads": 1,
            "cache_dir": str(tmp / f"cache-{i}"), **fields}


def launch_cli(tmp: Path, entries: list[dict[str, object]], known_hosts: Path, *extra: str
               ) -> tuple[subprocess.CompletedProcess[str], dict[str, list[str]]]:
    """`ikctl launch`; its table as {host name: [device, endpoint, memory, threads, status]} (one worker each)."""
    hosts = tmp / "hosts.toml"
    hosts.write_text(hosts_toml(entries))
    proc = ikctl("launch", "--hosts", str(hosts), "-o", str(tmp / "cluster.json"), "--known-hosts", str(known_hosts),
                 "--remote-dir", str(tmp / "remote"), "--timeout", "5", *extra, cache=tmp / "cache")
    lines = proc.stdout.splitlines()
    assert lines and lines[0].split() == ["HOST", "DEVICE", "ENDPOINT", "MEMORY", "THREADS", "STATUS"], proc
    rows = {}
    for ln in lines[1:]:
        name, device, ep, *rest = ln.split()
        if rest[-1] == "ok":  # the memory column is "23.6 GiB"
            rows[name] = [device, ep, f"{rest[0]} {rest[1]}", rest[2], "ok"]
        else:
            rows[name] = [device, ep, rest[0], rest[1], " ".join(rest[2:])]
    return proc, rows


def cmdlines() -> dict[int, str]:
    """Every process's command line, NULs as spaces."""
    out = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            with contextlib.suppress(OSError):  # gone meanwhile
                out[int(d.name)] = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    return out


def workers_running(workers: tuple[ClusterWorker, ...]) -> list[int]:
    procs = cmdlines()
    return [w.pid for w in workers if "rpcnode" in procs.get(w.pid, "") and w.token_file in procs.get(w.pid, "")]


@pytest.fixture(autouse=True)
def no_stray_workers(tmp_path: Path) -> Iterator[None]:
    """After a failed test, kill the workers it launched (their token files are under its tmp_path)."""
    yield
    for pid, line in cmdlines().items():
        if "rpcnode" in line and f" --token-file {tmp_path}/" in line:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)


@pytest.fixture
def listener(sshd_cluster: SshdCluster) -> Iterator[tuple[str, int]]:
    """Something else listening on a port inside namespace 1."""
    addr, port = sshd_cluster.hosts[1].addr, 50070
    code = f"import socket,time; s=socket.socket(); s.bind(('{addr}', {port})); s.listen(); print(1, flush=True); " \
           "time.sleep(120)"
    proc = subprocess.Popen(["ip", "netns", "exec", sshd_cluster.hosts[1].netns, sys.executable, "-c", code],
                            stdout=subprocess.PIPE)
    assert proc.stdout is not None and proc.stdout.readline().strip() == b"1"
    yield addr, port
    proc.kill()
    proc.wait()


# ---- planning (pure) --------------------------------------------------------------------------------------------

GPUS = (Gpu("RTX 3090", 24 << 30, 23 << 30), Gpu("RTX 3090", 24 << 30, 24 << 30))
FACTS = HostFacts(os="Linux", arch="x86_64", cores=16, mem_total_bytes=64 << 30, mem_free_bytes=60 << 30, gpus=GPUS,
                  python="/usr/bin/python3", python_version="3.11.7", ikctl_version="0.1.0", ikctl_importable=True)


def test_plan_one_worker_per_gpu_and_a_cpu_worker_with_the_other_cores() -> None:
    plans = plan_workers(Host(name="h", ssh="h"), FACTS)
    assert plans == [WorkerPlan("cuda0", 1, 24 << 30, None), WorkerPlan("cuda1", 1, 24 << 30, None),
                     WorkerPlan("cpu", 14, None, None)]
    assert [p.device_flag for p in plans] == ["cuda:0", "cuda:1", "cpu"]
    no_gpu = replace(FACTS, gpus=())
    assert plan_workers(Host(name="h", ssh="h"), no_gpu) == [WorkerPlan("cpu", 16, None, None)]


def test_plan_host_settings_override() -> None:
    host = Host(name="h", ssh="h", devices=("cpu", "cuda1", "cuda2"), threads=6, mem_bytes=32 << 30,
                cache_dir="/scratch/c")
    assert plan_workers(host, FACTS) == [
        WorkerPlan("cpu", 6, 32 << 30, "/scratch/c"),
        WorkerPlan("cuda1", 1, 24 << 30, "/scratch/c"),
        WorkerPlan("cuda2", 1, None, "/scratch/c", "no cuda2 on this host (nvidia-smi lists 2 GPUs)"),
    ]


# ---- the embedded default: local workers on loopback, same code path --------------------------------------------

def test_checkout_python_imports_what_a_venv_has_installed(tmp_path: Path) -> None:
    """The README's test command run from a fresh venv: the workers' python sees the venv's packages, not only the
    base interpreter's (`venv --system-site-packages` from a venv's python gives the latter)."""
    outer = tmp_path / "fresh-venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(outer)], check=True)
    installed = tmp_path / "installed"  # a package this venv has and its base interpreter lacks
    installed.mkdir()
    (installed / "only_in_this_venv.py").write_text("")
    # with pytest and ikctl's dependencies, as pip would have put them there
    (venv_site_packages(outer) / "deps.pth").write_text(f"{installed}\n{these_packages_pth_line()}")
    made = subprocess.run([str(outer / "bin" / "python"), "-c", "import sys; from pathlib import Path; "
                           "from tests.tui.conftest import checkout_python; print(checkout_python(Path(sys.argv[1])))",
                           str(tmp_path / "workers-venv")], cwd=REPO, capture_output=True, text=True, check=True)
    check = subprocess.run([made.stdout.strip(), "-c", "import only_in_this_venv, numpy, rpcnode.server"],
                           cwd=tmp_path, capture_output=True, text=True)
    assert check.returncode == 0, check.stderr


def test_local_transport_launch_and_stop(tmp_path: Path, ikctl_python: str) -> None:
    host = Host(name="here", ssh="localhost", python=ikctl_python, threads=1, cache_dir=str(tmp_path / "cache"),
                port_range=(50080, 50089))
    options = LaunchOptions(remote_dir=str(tmp_path / "remote"))

    async def two() -> list[ClusterWorker]:
        # two launches on one machine at once, as the TUI's default cluster does: they take turns for ports
        a, b = await asyncio.gather(launch_host(LocalTransport(), host, options),
                                    launch_host(LocalTransport(), replace(host, name="there"), options))
        return [*a.running, *b.running]

    workers = asyncio.run(two())
    assert sorted(w.endpoint for w in workers) == ["127.0.0.1:50080", "127.0.0.1:50081"]
    assert len({w.token for w in workers}) == 2
    assert all(w.ssh is None and w.threads == 1 for w in workers)
    # loopback needs no token, but the workers have one: a client without it is refused
    with pytest.raises(RPCError, match="requires a token"):
        Client.connect(workers[0].endpoint)
    assert "auth on" in Path(workers[0].log).read_text()
    results = asyncio.run(stop_workers(LocalTransport(), workers))
    assert [r.status for r in results] == [STATUSES["stopped"]] * 2
    assert workers_running(tuple(workers)) == []
    assert not any(Path(w.token_file).exists() for w in workers)


def test_stop_leaves_a_reused_pid_alone(tmp_path: Path) -> None:
    # the pid of a worker that has exited now belongs to another process: stop must not kill it
    other = subprocess.Popen(["sleep", "30"])
    try:
        w = ClusterWorker(host="here", device="cpu", endpoint="127.0.0.1:50099", token="t", mem_bytes=1, threads=1,
                          pid=other.pid, log="/nonexistent.log", token_file=str(tmp_path / "t.token"), ssh=None)
        (r,) = asyncio.run(stop_workers(LocalTransport(), [w]))
        assert r.status == STATUSES["not-running"] and r.done
        assert other.poll() is None
    finally:
        other.kill()
        other.wait()


# ---- over SSH ---------------------------------------------------------------------------------------------------

def assert_same_logits(got: np.ndarray, want: np.ndarray) -> None:
    assert got.shape == want.shape
    assert np.max(np.abs(got - want)) <= 1e-6 * np.max(np.abs(want)), np.max(np.abs(got - want))


def test_launch_run_and_stop_across_namespaces(sshd_cluster: SshdCluster, known_hosts: Path, tmp_path: Path,
                                               ikctl_python: str) -> None:
    n = len(sshd_cluster.hosts)
    entries = [entry(sshd_cluster, i, ikctl_python, tmp_path, port_range=[50052, 50060]) for i in range(n)]
    start = time.monotonic()
    proc, rows = launch_cli(tmp_path, entries, known_hosts)
    assert proc.returncode == 0, proc.stderr
    assert time.monotonic() - start < 20
    for h in sshd_cluster.hosts:  # each worker listens on the address its host was reached at
        assert rows[h.netns][:2] == ["cpu", f"{h.addr}:50052"] and rows[h.netns][3:] == ["1", "ok"], rows
    path = tmp_path / "cluster.json"
    assert path.stat().st_mode & 0o777 == 0o600
    assert f"wrote {path}" in proc.stderr
    cluster = read_cluster(path)
    workers = cluster.workers
    assert [w.host for w in workers] == [h.netns for h in sshd_cluster.hosts]
    assert all(w.ssh == h.ssh and w.identity == str(sshd_cluster.client_key) and w.mem_bytes > 0
               for w, h in zip(workers, sshd_cluster.hosts, strict=True))
    # the workers outlived the SSH sessions that started them; their tokens are in no process's command line
    assert workers_running(workers) == [w.pid for w in workers]
    procs = cmdlines()
    assert not any(w.token in line for w in workers for line in procs.values())
    assert all(Path(w.token_file).stat().st_mode & 0o777 == 0o600 for w in workers)
    with pytest.raises(RPCError):  # not loopback: the token is needed, and another one is refused
        Client.connect(workers[0].endpoint, "wrong-token")

    # inference from this namespace: one layer on each worker, the same logits as a local run
    model = write_model(tmp_path / "tiny.gguf", SynthSpec(layers=3, dense_layers=1, seed=11))
    want = load_model(model, ctx_size=64).logits(PROMPT)
    rules = [rf"blk\.{i}\.={w.device_name}" for i, w in enumerate(workers)]
    remote = load_model(model, ctx_size=64, cluster=str(path), override_tensor=rules)
    assert [s.device for s in remote.net.segments if s.device != CPU] == [w.device_name for w in workers]
    assert_same_logits(remote.logits(PROMPT), want)
    # across a network both sides spin briefly for the next message of a generation (never on loopback: the
    # cores are shared there; tests/rpcnode)
    assert [c.poll_s for c in remote.net.clients.values()] == [0.01] * n
    assert all("between segments it polls up to 10 ms" in Path(w.log).read_text() for w in workers)
    remote.net.close()
    # and from the command line: every layer on the workers, greedy, the same text as a local run
    common = ["run", "-m", str(model), "-c", "64", "-p", "hi", "-n", "6", "--temp", "0", "-no-cnv"]
    local_run = ikctl(*common, cache=tmp_path / "cache")
    cluster_run = ikctl(*common, "--cluster", str(path), "-ngl", "99", cache=tmp_path / "cache")
    assert local_run.returncode == 0 and cluster_run.returncode == 0, cluster_run.stderr
    assert cluster_run.stdout == local_run.stdout

    # stop reaches each host as launch did (user, port, key, known_hosts: in the cluster file), from anywhere: no
    # --known-hosts, another directory, and a $HOME whose ~/.ssh knows nothing
    assert all(w.known_hosts == str(known_hosts) for w in workers)
    (tmp_path / "elsewhere").mkdir()
    proc = ikctl("stop", "--cluster", str(path), cache=tmp_path / "cache", cwd=tmp_path / "elsewhere",
                 home=tmp_path / "elsewhere")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert [ln.split()[-1] for ln in proc.stdout.splitlines()[1:]] == ["stopped"] * n
    assert not path.exists()
    assert workers_running(workers) == []
    assert not [c for c in cmdlines().values() if "rpcnode" in c and any(w.token_file in c for w in workers)]


def test_each_failure_has_its_reason(sshd_cluster: SshdCluster, known_hosts: Path, tmp_path: Path,
                                     ikctl_python: str, listener: tuple[str, int]) -> None:
    h0, h1, h2 = sshd_cluster.hosts
    busy_addr, busy_port = listener
    entries = [
        entry(sshd_cluster, 0, ikctl_python, tmp_path, name="good"),
        entry(sshd_cluster, 0, ikctl_python, tmp_path, name="refused", ssh=f"root@{h0.addr}:2222"),
        entry(sshd_cluster, 0, ikctl_python, tmp_path, name="badkey", identity=str(sshd_cluster.other_key)),
        entry(sshd_cluster, 1, "/nonexistent/python3", tmp_path, name="nopython"),
        entry(sshd_cluster, 1, ikctl_python, tmp_path, name="busy", port_range=[busy_port, busy_port]),
        entry(sshd_cluster, 2, ikctl_python, tmp_path, name="badcache", cache_dir="/dev/null/cache"),
        entry(sshd_cluster, 2, ikctl_python, tmp_path, name="nogpu", devices=["cuda0"]),
    ]
    proc, rows = launch_cli(tmp_path, entries, known_hosts)
    assert proc.returncode == 0, proc.stderr  # one worker runs
    assert rows["good"][:2] == ["cpu", f"{h0.addr}:50052"] and rows["good"][-1] == "ok"
    assert rows["refused"] == ["-", "-", "-", "-", "unreachable: connection refused"]
    assert rows["badkey"] == ["-", "-", "-", "-", "authentication failed"]
    assert rows["nopython"] == ["-", "-", "-", "-", "no python at /nonexistent/python3"]
    busy = f"port in use: no free port in {busy_port}-{busy_port} on {busy_addr}"
    assert rows["busy"] == ["cpu", "-", "-", "-", busy]
    log = tmp_path / "remote" / "workers" / f"{h2.addr}-50052.log"
    assert rows["badcache"] == ["cpu", "-", "-", "-", "worker exited at start (status 1): rpcnode: error: cannot "
                                "use /dev/null/cache: Not a directory"]
    assert rows["nogpu"] == ["cuda0", "-", "-", "-", "no cuda0 on this host (nvidia-smi lists 0 GPUs)"]
    # the failed worker's log tail follows the table
    assert f"badcache cpu: the end of {log}:\n    rpcnode: error: cannot use /dev/null/cache" in proc.stderr
    cluster = read_cluster(tmp_path / "cluster.json")
    assert [w.host for w in cluster.workers] == ["good"]
    assert "1 worker on 1 of 7 hosts" in proc.stderr

    # stopping: an unreachable host keeps its worker in the file, so that stop can be run again
    lost = ClusterWorker(host="gone", device="cpu", endpoint=f"{h1.addr}:50099", token="x", mem_bytes=1, threads=1,
                         pid=1, log="-", token_file="-", ssh=f"root@{h1.addr}:2222",
                         identity=str(sshd_cluster.client_key))
    write_cluster(tmp_path / "cluster.json", Cluster((*cluster.workers, lost)))
    proc = ikctl("stop", "--cluster", str(tmp_path / "cluster.json"), "--known-hosts", str(known_hosts),
                 cache=tmp_path / "cache")
    assert proc.returncode == 1
    assert [ln.split(None, 4)[-1] for ln in proc.stdout.splitlines()[1:]] == ["stopped",
                                                                            "unreachable: connection refused"]
    assert read_cluster(tmp_path / "cluster.json").workers == (lost,)
    assert workers_running(cluster.workers) == []


def test_nothing_started_writes_no_file(sshd_cluster: SshdCluster, known_hosts: Path, tmp_path: Path) -> None:
    proc, rows = launch_cli(tmp_path, [entry(sshd_cluster, 0, "/nonexistent/python3", tmp_path)], known_hosts)
    assert proc.returncode == 1 and list(rows.values()) == [["-", "-", "-", "-", "no python at /nonexistent/python3"]]
    assert proc.stderr.endswith(f"ikctl: no worker started; {tmp_path / 'cluster.json'} not written\n")
    assert not (tmp_path / "cluster.json").exists()


def test_existing_cluster_file_is_not_overwritten(tmp_path: Path) -> None:
    (tmp_path / "hosts.toml").write_text('[[host]]\nssh = "root@198.51.100.2"\n')
    (tmp_path / "cluster.json").write_text("{}")
    proc = ikctl("launch", "--hosts", str(tmp_path / "hosts.toml"), "-o", str(tmp_path / "cluster.json"),
                 cache=tmp_path / "cache")
    assert proc.returncode == 1
    assert proc.stderr == f"ikctl: error: {tmp_path / 'cluster.json'} exists: stop its workers first (ikctl stop " \
                          f"--cluster {tmp_path / 'cluster.json'}) or give another -o\n"


def test_install_into_a_venv(sshd_cluster: SshdCluster, known_hosts: Path, tmp_path: Path) -> None:
    # a python without ikctl (nor its dependencies); --install creates the host's venv from it, reusing the
    # host's site-packages for the dependencies (the namespaces have no network for pip)
    bare = tmp_path / "bare"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(bare)], check=True)
    venv = tmp_path / "ikctl-venv"
    entries = [entry(sshd_cluster, 0, str(bare / "bin" / "python"), tmp_path, venv=str(venv))]
    proc, rows = launch_cli(tmp_path, entries, known_hosts)
    assert proc.returncode == 1 and rows[sshd_cluster.hosts[0].netns][-1] == "no python at " \
                                                                            f"{venv}/bin/python"
    entries = [entry(sshd_cluster, 0, str(bare / "bin" / "python"), tmp_path)]
    proc, rows = launch_cli(tmp_path, entries, known_hosts)
    assert rows[sshd_cluster.hosts[0].netns][-1] == f"ikctl is not installed for {bare}/bin/python (--install " \
                                                    "installs it, or set python/venv in the hosts file)"

    # the host's site-packages holds the dependencies: `venv --system-site-packages` reuses the *base*
    # interpreter's, which lacks them when these tests run from a venv; a .pth put where the venv will be (pip
    # installs the dependencies it cannot find, and the namespaces have no network) stands in for them
    site = venv_site_packages(venv)
    site.mkdir(parents=True)
    (site / "host-packages.pth").write_text(these_packages_pth_line())
    entries = [entry(sshd_cluster, 0, str(bare / "bin" / "python"), tmp_path, venv=str(venv))]
    proc, rows = launch_cli(tmp_path, entries, known_hosts, "--install")
    assert proc.returncode == 0, proc.stderr
    assert rows[sshd_cluster.hosts[0].netns][-1] == "ok"
    wheels = list((tmp_path / "cache" / "wheels").glob("*/ikctl-*.whl"))  # built here once, cached
    assert len(wheels) == 1
    assert (tmp_path / "remote" / "wheels" / wheels[0].name).read_bytes() == wheels[0].read_bytes()  # sent by sftp
    (w,) = read_cluster(tmp_path / "cluster.json").workers
    # the worker runs on the venv's python, from the installed wheel rather than this checkout
    assert cmdlines()[w.pid].startswith(f"{venv}/bin/python -m rpcnode ")
    found = subprocess.run([f"{venv}/bin/python", "-c", "import rpcnode; print(rpcnode.__file__)"], cwd="/",
                           capture_output=True, text=True, check=True).stdout
    assert found.startswith(str(venv / "lib"))
    proc = ikctl("stop", "--cluster", str(tmp_path / "cluster.json"), "--known-hosts", str(known_hosts),
                 cache=tmp_path / "cache")
    assert proc.returncode == 0, proc.stderr
    assert workers_running((w,)) == []


def test_worker_unreachable_from_here_is_stopped(sshd_cluster: SshdCluster, known_hosts: Path, tmp_path: Path,
                                                 ikctl_python: str) -> None:
    # bound to the namespace's own loopback: it starts there, but this namespace cannot reach it
    host = Host(**entry(sshd_cluster, 0, ikctl_python, tmp_path), port_range=(50140, 50149))  # type: ignore[arg-type]
    options = LaunchOptions(bind="127.0.0.1", remote_dir=str(tmp_path / "remote"), hello_timeout=5)
    transport = SSHTransport(SSHOptions(known_hosts=str(known_hosts)))
    result = asyncio.run(launch_host(transport, host, options))
    (w,) = result.workers
    assert result.running == () and w.error is not None
    assert re.fullmatch(r"started \(pid \d+\) but does not answer from here: RPC\[127\.0\.0\.1:5014\d\]: cannot "
                        r"connect: .*", w.error), w.error
    pid = int(w.error.split()[2].rstrip(")"))
    assert "rpcnode" not in cmdlines().get(pid, "")  # stopped, since no cluster file lists it
