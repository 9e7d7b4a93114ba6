"""The hosts file: layering, every error naming file/host/field, saving, and ~/.ssh/config discovery."""

from __future__ import annotations

from pathlib import Path

import pytest

from tui.inventory import (
    DEFAULT_PORT_RANGE,
    Host,
    InventoryError,
    load_hosts,
    parse_destination,
    parse_hosts,
    save_hosts,
    scan_hosts,
    ssh_config_hosts,
)

EXAMPLE = Path(__file__).parents[2] / "examples" / "hosts.toml"


def test_example_file_loads_with_defaults_layered() -> None:
    gpu, ram, lab = load_hosts(EXAMPLE)
    assert (gpu.name, gpu.destination, gpu.devices, gpu.mem_bytes) == (
        "gpu-box", ("me", "198.51.100.10", 22), ("cuda0", "cuda1", "cpu"), 96 << 30)
    assert gpu.python_path == "~/venvs/ikctl/bin/python"
    assert ram.identity == "~/.ssh/id_ed25519" and ram.port_range == (50052, 50099) and ram.threads == 32
    assert (lab.name, lab.ssh, lab.identity, lab.destination) == ("lab3", "lab3", "~/.ssh/lab_key",
                                                                  (None, "lab3", None))


def test_minimal_host_gets_every_default() -> None:
    (h,) = parse_hosts('[[host]]\nssh = "box"\n')
    assert h == Host(name="box", ssh="box") and h.port_range == DEFAULT_PORT_RANGE and h.devices == "all"


@pytest.mark.parametrize(("text", "message"), [
    ("[[host]\n", "f.toml: not valid TOML: "),
    ("", "f.toml: no [[host]] entries"),
    ("[groups]\n", "f.toml: unknown table 'groups'"),
    ("[[host]]\nname = 'a'\nssh = 'a'\nport = 22\n", "f.toml: host 'a': unknown field 'port'"),
    ("[[host]]\nthreads = 4\n", "f.toml: host #1: field 'ssh' is missing"),
    ("[[host]]\nssh = 'a@b:99999'\n", "f.toml: host 'a@b:99999': field 'ssh': 'a@b:99999' is not an ssh destination"),
    ("[[host]]\nssh = 'a'\ndevices = ['gpu0']\n", "f.toml: host 'a': field 'devices': unknown device 'gpu0'"),
    ("[[host]]\nssh = 'a'\ndevices = 'some'\n", "f.toml: host 'a': field 'devices': expected \"all\" or a list"),
    ("[[host]]\nssh = 'a'\nport_range = [6000, 5000]\n", "f.toml: host 'a': field 'port_range': expected [lo, hi]"),
    ("[[host]]\nssh = 'a'\nthreads = 0\n", "f.toml: host 'a': field 'threads': expected a positive integer"),
    ("[[host]]\nssh = 'a'\nmem = 'lots'\n", "f.toml: host 'a': field 'mem': expected a size like \"32GiB\""),
    ("[[host]]\nssh = 'a'\npython = 3\n", "f.toml: host 'a': field 'python': expected a non-empty string"),
    ("[defaults]\nthreads = -1\n[[host]]\nssh = 'a'\n", "f.toml: [defaults]: field 'threads'"),
    ("[defaults]\nssh = 'a'\n[[host]]\nssh = 'a'\n", "f.toml: [defaults]: field 'ssh' belongs in a [[host]]"),
    ("[[host]]\nssh = 'a'\n[[host]]\nssh = 'u@a'\n", "f.toml: host 'a': field 'name': the name is used twice"),
    ("host = 3\n", "f.toml: write [defaults] once and each host as [[host]]"),
    ("host = [1]\n", "f.toml: host #1: write each host as a [[host]] table"),
])
def test_parse_errors_name_file_host_and_field(text: str, message: str) -> None:
    with pytest.raises(InventoryError) as e:
        parse_hosts(text, "f.toml")
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


def test_missing_file() -> None:
    with pytest.raises(InventoryError, match=r"^cannot read hosts file /nonexistent\.toml: No such file"):
        load_hosts("/nonexistent.toml")


@pytest.mark.parametrize(("dest", "parsed"), [
    ("box", (None, "box", None)),
    ("me@box", ("me", "box", None)),
    ("me@198.51.100.2:2222", ("me", "198.51.100.2", 2222)),
    ("[2001:db8::1]:22", (None, "2001:db8::1", 22)),
    ("2001:db8::1", (None, "2001:db8::1", None)),
])
def test_parse_destination(dest: str, parsed: tuple[str | None, str, int | None]) -> None:
    assert parse_destination(dest) == parsed


def test_save_round_trip(tmp_path: Path) -> None:
    hosts = load_hosts(EXAMPLE)
    path = tmp_path / "saved.toml"
    save_hosts(path, hosts, {"gpu-box": "probed: 2 GPUs"})
    assert load_hosts(path) == hosts
    assert "# probed: 2 GPUs\n[[host]]\nname = \"gpu-box\"" in path.read_text()


def test_ssh_config_discovery_keeps_concrete_hosts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / ".ssh").mkdir()
    (tmp_path / ".ssh" / "config").write_text(
        "Host *\n  ServerAliveInterval 30\n"
        "Host gpu1 gpu2\n  User me\n"
        "host=lab3\n"
        "Host *.internal !bastion db-?\n"
        "Match host foo\n  User x\n"
        "  # Host commented\n"
        "Host gpu1\n")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert [h.name for h in ssh_config_hosts()] == ["gpu1", "gpu2", "lab3"]
    assert ssh_config_hosts(tmp_path / "missing") == ()


def test_scan_names_hosts_by_host_part() -> None:
    hosts = scan_hosts(["me@198.51.100.2:22", "198.51.100.2:2222", "box", "box"])
    assert [(h.name, h.ssh) for h in hosts] == [("198.51.100.2", "me@198.51.100.2:22"),
                                               ("198.51.100.2:2222", "198.51.100.2:2222"), ("box", "box")]
    with pytest.raises(InventoryError, match=r"^--scan: 'a:b' is not an ssh destination"):
        scan_hosts(["a:b"])
