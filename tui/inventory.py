"""Host inventory: the TOML hosts file, ~/.ssh/config discovery, and writing a hosts file to edit."""

from __future__ import annotations

import json
import re
import tomllib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from engine.byte_sizes import parse_size
from engine.errors import IkctlError

DEFAULT_PORT_RANGE = (50052, 50151)
_DEVICE = re.compile(r"cpu|cuda\d+")
_HOST_ONLY_KEYS = ("name", "ssh")


class InventoryError(IkctlError):
    """A hosts file (or ssh config) that cannot be used: names the file, the host and the field."""


@dataclass(frozen=True)
class Host:
    """One machine to run workers on; `ssh` is `user@host:port`, `host`, or an alias from ~/.ssh/config."""

    name: str
    ssh: str
    identity: str | None = None
    python: str = "python3"
    venv: str | None = None
    devices: str | tuple[str, ...] = "all"
    port_range: tuple[int, int] = DEFAULT_PORT_RANGE
    threads: int | None = None
    cache_dir: str | None = None
    mem_bytes: int | None = None
    mem: str | None = None  # as written, so that save_hosts writes back what the user typed

    @property
    def destination(self) -> tuple[str | None, str, int | None]:
        """(user, host, port) of `ssh`; None where the ssh config (or the default) decides."""
        return parse_destination(self.ssh)

    @property
    def python_path(self) -> str:
        """The interpreter to run: the venv's python when a venv is set."""
        return f"{self.venv.rstrip('/')}/bin/python" if self.venv else self.python


def parse_destination(text: str) -> tuple[str | None, str, int | None]:
    """`[user@]host[:port]` (IPv6 as `[addr]:port`) → (user, host, port)."""
    user, _, rest = text.rpartition("@")
    port: str | None = None
    if rest.startswith("["):
        host, _, tail = rest[1:].partition("]")
        port = tail[1:] if tail.startswith(":") else None
    elif rest.count(":") == 1:
        host, port = rest.split(":")
    else:
        host = rest
    if not host or (port is not None and not (port.isdigit() and 0 < int(port) < 65536)):
        raise ValueError(f"'{text}' is not an ssh destination (user@host:port or an ~/.ssh/config alias)")
    return (user or None), host, (int(port) if port else None)


# --- validation of one field: each returns the value to store or raises ValueError with the reason ---

def _string(value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(f"expected a non-empty string, got {value!r}")
    return value


def _destination(value: Any) -> str:
    parse_destination(_string(value))
    return value


def _devices(value: Any) -> str | tuple[str, ...]:
    if value == "all":
        return "all"
    if not isinstance(value, list) or not value or not all(isinstance(d, str) for d in value):
        raise ValueError(f'expected "all" or a list like ["cpu", "cuda0"], got {value!r}')
    bad = [d for d in value if not _DEVICE.fullmatch(d)]
    if bad:
        raise ValueError(f"unknown device {bad[0]!r} (devices are cpu, cuda0, cuda1, ...)")
    return tuple(value)


def _port_range(value: Any) -> tuple[int, int]:
    if not (isinstance(value, list) and len(value) == 2 and all(type(p) is int for p in value)
            and 1024 <= value[0] <= value[1] <= 65535):
        raise ValueError(f"expected [lo, hi] with 1024 <= lo <= hi <= 65535, got {value!r}")
    return value[0], value[1]


def _threads(value: Any) -> int:
    if type(value) is not int or value < 1:
        raise ValueError(f"expected a positive integer, got {value!r}")
    return value


def _mem(value: Any) -> str:
    try:
        if parse_size(_string(value)) <= 0:
            raise ValueError
    except (IkctlError, ValueError):
        raise ValueError(f"expected a size like \"32GiB\", got {value!r}") from None
    return value


_FIELDS: dict[str, Callable[[Any], Any]] = {
    "name": _string, "ssh": _destination, "identity": _string, "python": _string, "venv": _string,
    "devices": _devices, "port_range": _port_range, "threads": _threads, "cache_dir": _string, "mem": _mem,
}


def _checked(table: Mapping[str, Any], where: str) -> dict[str, Any]:
    out = {}
    for key, value in table.items():
        check = _FIELDS.get(key)
        if check is None:
            raise InventoryError(f"{where}: unknown field '{key}' (known: {', '.join(_FIELDS)})")
        try:
            out[key] = check(value)
        except ValueError as e:
            raise InventoryError(f"{where}: field '{key}': {e}") from None
    return out


def _host_from(values: Mapping[str, Any]) -> Host:
    kw = dict(values)
    kw.setdefault("ssh", kw.get("name"))
    kw.setdefault("name", parse_destination(kw["ssh"])[1])
    if "mem" in kw:
        kw["mem_bytes"] = parse_size(kw["mem"])
    return Host(**kw)


def parse_hosts(text: str, path: str = "<hosts>") -> tuple[Host, ...]:
    """The hosts of a hosts file's text: `[defaults]` then each `[[host]]` on top of them."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise InventoryError(f"{path}: not valid TOML: {e}") from None
    extra = sorted(set(doc) - {"defaults", "host"})
    if extra:
        raise InventoryError(f"{path}: unknown table '{extra[0]}' (a hosts file has [defaults] and [[host]])")
    defaults_table, host_tables = doc.get("defaults", {}), doc.get("host", [])
    if not isinstance(defaults_table, dict) or not isinstance(host_tables, list):
        raise InventoryError(f"{path}: write [defaults] once and each host as [[host]]")
    defaults = _checked(defaults_table, f"{path}: [defaults]")
    for key in _HOST_ONLY_KEYS:
        if key in defaults:
            raise InventoryError(f"{path}: [defaults]: field '{key}' belongs in a [[host]] entry")
    if not host_tables:
        raise InventoryError(f"{path}: no [[host]] entries")
    hosts: list[Host] = []
    for i, table in enumerate(host_tables, 1):
        if not isinstance(table, dict):
            raise InventoryError(f"{path}: host #{i}: write each host as a [[host]] table")
        label = table.get("name") or table.get("ssh") or f"#{i}"
        values = {**defaults, **_checked(table, f"{path}: host '{label}'")}
        if "name" not in values and "ssh" not in values:
            raise InventoryError(f"{path}: host #{i}: field 'ssh' is missing (user@host:port or an ssh alias)")
        hosts.append(_host_from(values))
    _check_unique(hosts, path)
    return tuple(hosts)


def _check_unique(hosts: Iterable[Host], path: str) -> None:
    seen: set[str] = set()
    for h in hosts:
        if h.name in seen:
            raise InventoryError(f"{path}: host '{h.name}': field 'name': the name is used twice")
        seen.add(h.name)


def load_hosts(path: str | Path) -> tuple[Host, ...]:
    """Read and validate a hosts file once; every error is one line naming the file, host and field."""
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise InventoryError(f"cannot read hosts file {path}: {e.strerror}") from None
    return parse_hosts(text, str(path))


def ssh_config_hosts(config: str | Path | None = None) -> tuple[Host, ...]:
    """The concrete `Host` names of an ssh config (default ~/.ssh/config): no patterns, no negations."""
    path = Path(config) if config is not None else Path.home() / ".ssh" / "config"
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        return ()
    except OSError as e:
        raise InventoryError(f"cannot read ssh config {path}: {e.strerror}") from None
    names: list[str] = []
    for line in lines:
        words = line.strip().replace("=", " ", 1).split()
        if len(words) < 2 or words[0].lower() != "host":
            continue
        names += [w for w in words[1:] if not any(c in w for c in "*?!") and w not in names]
    return tuple(Host(name=n, ssh=n) for n in names)


def scan_hosts(destinations: Iterable[str]) -> tuple[Host, ...]:
    """Hosts from `--scan` destinations, named by their host part (with the port when it clashes)."""
    hosts: list[Host] = []
    for dest in dict.fromkeys(destinations):
        try:
            _user, name, port = parse_destination(dest)
        except ValueError as e:
            raise InventoryError(f"--scan: {e}") from None
        if any(h.name == name for h in hosts):
            name = f"{name}:{port}" if port else dest
        hosts.append(Host(name=name, ssh=dest))
    return tuple(hosts)


def _toml_value(value: Any) -> str:
    if isinstance(value, (tuple, list)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    # a JSON string or integer is also a valid TOML basic string or integer
    return json.dumps(value)


def format_hosts(hosts: Iterable[Host], notes: Mapping[str, str] | None = None) -> str:
    """A hosts file for `hosts`, writing only the fields that differ from the defaults."""
    out = ["# ikctl hosts file: `ikctl hosts --hosts FILE` probes these; see examples/hosts.toml for every field.", ""]
    default = Host(name="", ssh="")
    for h in hosts:
        if notes and h.name in notes:
            out.append(f"# {notes[h.name]}")
        out.append("[[host]]")
        for f in fields(Host):
            value = getattr(h, f.name)
            if f.name == "mem_bytes" or (f.name not in _HOST_ONLY_KEYS and value == getattr(default, f.name)):
                continue
            out.append(f"{f.name} = {_toml_value(value)}")
        out.append("")
    return "\n".join(out)


def save_hosts(path: str | Path, hosts: Iterable[Host], notes: Mapping[str, str] | None = None) -> None:
    """Write an editable hosts file; `notes` become a comment line above each named host."""
    try:
        Path(path).write_text(format_hosts(hosts, notes))
    except OSError as e:
        raise InventoryError(f"cannot write hosts file {path}: {e.strerror}") from None


def with_identity(host: Host, identity: str | None) -> Host:
    """`host` with `identity` as its key unless it names one already."""
    return host if identity is None or host.identity else replace(host, identity=identity)
