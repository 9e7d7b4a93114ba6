"""The cluster file: round trip, mode 0600, atomic writes, one-line errors, and `ikctl plan --cluster`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import asdict, replace
from pathlib import Path

import pytest

from engine.cluster import Cluster, ClusterFileError, ClusterWorker, read_cluster, write_cluster
from tests.refs import V3

REPO = Path(__file__).resolve().parents[2]

A = ClusterWorker(host="box-a", device="cpu", endpoint="198.51.100.2:50052", token="tok-a", mem_bytes=3 << 20,
                  threads=4, pid=1234, log="/root/.cache/ikctl/workers/198.51.100.2-50052.log",
                  token_file="/root/.cache/ikctl/workers/198.51.100.2-50052.token", ssh="root@198.51.100.2:22",
                  identity="/keys/id", known_hosts="/keys/known_hosts")
B = replace(A, host="box-b", endpoint="198.51.100.6:50053", token="tok-b", mem_bytes=5 << 30, pid=99, ssh=None,
            identity=None, known_hosts=None)


def test_round_trip_mode_and_methods(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "cluster.json"
    write_cluster(path, Cluster((A, B)))
    assert path.stat().st_mode & 0o777 == 0o600
    assert os.listdir(path.parent) == ["cluster.json"]  # no temp file left behind
    got = read_cluster(path)
    assert got == Cluster((A, B))
    assert got.endpoints() == ["198.51.100.2:50052", "198.51.100.6:50053"]
    assert got.tokens() == {"198.51.100.2:50052": "tok-a", "198.51.100.6:50053": "tok-b"}
    assert got.capacities() == {"RPC[198.51.100.2:50052]": 3 << 20, "RPC[198.51.100.6:50053]": 5 << 30}
    assert "tok-a" not in repr(got)  # tokens stay out of reprs and tracebacks


def test_a_file_without_the_optional_ssh_fields_reads(tmp_path: Path) -> None:
    """Files written before workers recorded their key and known_hosts file still read."""
    doc = {k: v for k, v in asdict(A).items() if k not in ("identity", "known_hosts")}
    path = _write(tmp_path / "cluster.json", {"version": 1, "workers": [doc]})
    assert read_cluster(path).workers == (replace(A, identity=None, known_hosts=None),)


def test_rewrite_replaces_whole_file_keeping_mode(tmp_path: Path) -> None:
    path = tmp_path / "cluster.json"
    write_cluster(path, Cluster((A, B)))
    write_cluster(path, Cluster((B,)))
    assert read_cluster(path).workers == (B,)
    assert path.stat().st_mode & 0o777 == 0o600


def _write(path: Path, doc: object, mode: int = 0o600) -> Path:
    path.write_text(doc if isinstance(doc, str) else json.dumps(doc))
    path.chmod(mode)
    return path


@pytest.mark.parametrize(("doc", "message"), [
    ("{not json", "not valid JSON (line 1: Expecting property name enclosed in double quotes)"),
    ([], "expected an object with a 'workers' list"),
    ({"version": 1, "workers": []}, "no workers"),
    ({"version": 7, "workers": [asdict(A)]}, "format version 7, this ikctl reads 1; launch the workers again"),
    ({"version": 1, "workers": [{k: v for k, v in asdict(A).items() if k != "token"}]},
     "worker #1: field 'token' is missing"),
    ({"version": 1, "workers": [asdict(A), {**asdict(B), "pid": "99"}]},
     "worker #2: field 'pid': expected int, got '99'"),
    ({"version": 1, "workers": [{**asdict(A), "mem_bytes": True}]},
     "worker #1: field 'mem_bytes': expected int, got True"),
    ({"version": 1, "workers": [{**asdict(A), "colour": "red"}]}, "worker #1: unknown field 'colour'"),
    ({"version": 1, "workers": [{**asdict(A), "token": ""}]}, "worker #1: field 'token' is empty"),
    ({"version": 1, "workers": [asdict(A), asdict(A)]}, "endpoint 198.51.100.2:50052 is listed twice"),
])
def test_malformed_files(tmp_path: Path, doc: object, message: str) -> None:
    path = _write(tmp_path / "c.json", doc)
    with pytest.raises(ClusterFileError) as e:
        read_cluster(path)
    assert str(e.value) == f"cluster file {path}: {message}"


def test_missing_unreadable_and_open_to_others(tmp_path: Path) -> None:
    with pytest.raises(ClusterFileError, match=r"cluster file .*/nope.json not found; `ikctl launch --hosts FILE -o"):
        read_cluster(tmp_path / "nope.json")
    with pytest.raises(ClusterFileError, match=r"cannot read cluster file .*: Is a directory"):
        read_cluster(tmp_path)
    path = _write(tmp_path / "c.json", {"version": 1, "workers": [asdict(A)]}, mode=0o644)
    with pytest.raises(ClusterFileError) as e:
        read_cluster(path)
    # it holds tokens: refused like ssh refuses a private key others can read, with the fix in the message
    assert str(e.value) == f"cluster file {path} is accessible by others (mode 0644) and holds worker tokens: " \
                           f"chmod 600 {path}"


def test_write_error_is_one_line(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(ClusterFileError, match=r"^cannot write cluster file .*/file/c.json: File exists$"):
        write_cluster(blocker / "c.json", Cluster((A,)))


def _ikctl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "tui.cli", *args], capture_output=True, text=True, timeout=120,
                          cwd=REPO)


def test_plan_with_cluster_uses_endpoints_and_capacities(tmp_path: Path) -> None:
    # plan reads only the GGUF header: the workers need not run
    path = tmp_path / "c.json"
    write_cluster(path, Cluster((A, B)))
    proc = _ikctl("plan", "-m", str(V3), "--cluster", str(path), "-ot", f"exps={A.device_name}", "-ngl", "99",
                  "-ts", "0,1")
    assert proc.returncode == 0, proc.stderr
    rows = {ln.split()[0]: ln for ln in proc.stdout.splitlines() if ln.startswith(("RPC[", "CPU"))}
    assert set(rows) == {"CPU", A.device_name, B.device_name}
    # the capacity column holds each worker's memory from the file
    assert " 3.0 MiB " in rows[A.device_name] and " 5.0 GiB " in rows[B.device_name]
    # the file's first worker holds the experts (1.1 MiB, within its 3 MiB), the second the other layers
    assert rows[A.device_name].split()[1:4] == ["6", "1.1", "MiB"]
    assert rows[B.device_name].split()[-2:] == ["0-2", "output"]


def test_plan_cluster_overflow_and_bad_file(tmp_path: Path) -> None:
    path = tmp_path / "c.json"
    write_cluster(path, Cluster((replace(A, mem_bytes=1 << 20),)))
    proc = _ikctl("plan", "-m", str(V3), "--cluster", str(path), "-ngl", "99")
    assert proc.returncode == 1
    assert proc.stderr.startswith("ikctl: error: ") and A.device_name in proc.stderr and len(
        proc.stderr.splitlines()) == 1, proc.stderr
    path.chmod(0o640)
    proc = _ikctl("plan", "-m", str(V3), "--cluster", str(path))
    assert proc.returncode == 1 and proc.stderr == f"ikctl: error: cluster file {path} is accessible by others " \
                                                   f"(mode 0640) and holds worker tokens: chmod 600 {path}\n"
