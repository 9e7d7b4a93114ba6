"""`ikctl hosts` end to end against real sshd servers in network namespaces."""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys
from pathlib import Path

from tests.tui.conftest import SshdCluster
from tui.inventory import load_hosts

REPO = Path(__file__).parents[2]
# asserts after the command that the headless path never imported textual
NO_TEXTUAL = ("import sys; from tui.cli import main; rc = main(sys.argv[1:]); "
              "assert 'textual' not in sys.modules, 'ikctl hosts imported textual'; sys.exit(rc)")


def ikctl(*args: str, home: Path | None = None) -> subprocess.CompletedProcess[str]:
    # `python -m`/-c from the checkout rather than the console script: the same code in CI and in a worktree
    env = {**os.environ, "HOME": str(home)} if home else None
    env = {k: v for k, v in (env or os.environ).items() if k != "SSH_AUTH_SOCK"}  # no agent keys: only ours
    return subprocess.run([sys.executable, "-c", NO_TEXTUAL, "hosts", *args], capture_output=True, text=True,
                          timeout=120, cwd=REPO, env=env)


def _hosts_file(tmp_path: Path, cluster: SshdCluster, extra: str = "") -> Path:
    path = tmp_path / "hosts.toml"
    entries = "".join(f'[[host]]\nname = "{h.netns}"\nssh = "{h.ssh}"\n' for h in cluster.hosts)
    path.write_text(f'[defaults]\nidentity = "{cluster.client_key}"\npython = "{sys.executable}"\n'
                    f"{entries}{extra}")
    return path


def _rows(stdout: str) -> dict[str, str]:
    return {line.split()[0]: line for line in stdout.splitlines()[1:]}


def test_hosts_table_and_save_round_trip(sshd_cluster: SshdCluster, known_hosts: Path, tmp_path: Path) -> None:
    refused = f'[[host]]\nname = "refused"\nssh = "root@{sshd_cluster.hosts[0].addr}:2222"\n'
    hosts_file = _hosts_file(tmp_path, sshd_cluster, refused)
    saved = tmp_path / "saved.toml"
    proc = ikctl("--hosts", str(hosts_file), "--known-hosts", str(known_hosts), "--save", str(saved))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[0].split()[:4] == ["HOST", "STATUS", "OS", "CORES"]
    rows = _rows(proc.stdout)
    version = importlib.metadata.version("ikctl")
    for h in sshd_cluster.hosts:
        assert rows[h.netns].split()[1] == "ok" and rows[h.netns].endswith(version), proc.stdout
    assert "unreachable: connection refused" in rows["refused"]
    assert f"{len(sshd_cluster.hosts)} of {len(sshd_cluster.hosts) + 1} hosts reachable" in proc.stderr
    # the saved file holds exactly the reachable hosts, with their settings, and probes the same again
    assert load_hosts(saved) == tuple(h for h in load_hosts(hosts_file) if h.name != "refused")
    again = ikctl("--hosts", str(saved), "--known-hosts", str(known_hosts))
    assert again.returncode == 0 and len(_rows(again.stdout)) == len(sshd_cluster.hosts), again.stderr


def test_exit_1_when_no_host_is_reachable(sshd_cluster: SshdCluster, tmp_path: Path) -> None:
    # an empty known_hosts: every host key is unknown, and nothing is accepted without the flag
    empty = tmp_path / "known_hosts"
    proc = ikctl("--hosts", str(_hosts_file(tmp_path, sshd_cluster)), "--known-hosts", str(empty),
                 "--save", str(tmp_path / "saved.toml"))
    assert proc.returncode == 1
    assert all("host key not verifiable" in row for row in _rows(proc.stdout).values()), proc.stdout
    assert not (tmp_path / "saved.toml").exists()


def test_invalid_hosts_file_is_one_line_error(tmp_path: Path) -> None:
    bad = tmp_path / "hosts.toml"
    bad.write_text('[[host]]\nssh = "a"\ndevices = ["tpu0"]\n')
    proc = ikctl("--hosts", str(bad))
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr == f"ikctl: error: {bad}: host 'a': field 'devices': unknown device 'tpu0' " \
                          "(devices are cpu, cuda0, cuda1, ...)\n"


def test_discovers_ssh_config_aliases(sshd_cluster: SshdCluster, tmp_path: Path) -> None:
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True)
    (home / ".ssh" / "config").write_text("Host *\n  ConnectTimeout 5\n" + "".join(
        f"Host ns{i}\n  HostName {h.addr}\n  User root\n  IdentityFile {sshd_cluster.client_key}\n"
        for i, h in enumerate(sshd_cluster.hosts)))
    (home / ".ssh" / "known_hosts").write_text(sshd_cluster.known_hosts_text())
    saved = tmp_path / "saved.toml"
    proc = ikctl("--save", str(saved), home=home)
    rows = _rows(proc.stdout)
    assert list(rows) == [f"ns{i}" for i in range(len(sshd_cluster.hosts))], proc.stdout + proc.stderr
    # the remote PATH's python3 may or may not exist; either answer means SSH through the alias worked
    assert all(r.split()[1] == "ok" or "no python3 on PATH" in r for r in rows.values()), proc.stdout
    if proc.returncode == 0:
        assert [h.ssh for h in load_hosts(saved)] == list(rows)
