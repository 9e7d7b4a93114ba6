"""`ikctl launch --install`: this ikctl's wheel, built once from its source tree, installed into a venv on a host."""

from __future__ import annotations

import asyncio
import hashlib
import importlib.util
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import TYPE_CHECKING

from engine.errors import IkctlError
from engine.user_cache import cache_dir
from tui.inventory import Host
from tui.probe import HostFacts, shell_path
from tui.ssh import HostError, Session

if TYPE_CHECKING:
    from tui.launch import LaunchOptions

PACKAGES = ("engine", "rpcnode", "tui")
_PROJECT_FILES = ("pyproject.toml", "README.md")  # README.md: pyproject's `readme`
_BUILDING = threading.Lock()  # hosts install concurrently: the first builds, the others find its wheel


def source_tree() -> Path:
    """The directory this ikctl runs from, which must hold pyproject.toml (a checkout, installed editable)."""
    root = Path(__file__).resolve().parents[1]
    if not (root / "pyproject.toml").is_file():
        raise IkctlError(f"--install builds a wheel from ikctl's source tree, but {root} has no pyproject.toml "
                         "(install ikctl on the hosts yourself, or run ikctl from a checkout)")
    return root


def _files(root: Path) -> list[Path]:
    found = [root / f for f in _PROJECT_FILES]
    for pkg in PACKAGES:
        found += [p for p in (root / pkg).rglob("*") if p.is_file() and "__pycache__" not in p.parts]
    return sorted(found)


def source_digest(root: Path) -> str:
    """A digest of every file the wheel is built from: an edited checkout gets a new wheel, an unedited one reuses."""
    h = hashlib.sha256()
    for p in _files(root):
        h.update(str(p.relative_to(root)).encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def build_wheel(cache: Path | None = None) -> Path:
    """The wheel of the running ikctl, built once per source state under <cache>/wheels/<digest>/."""
    root = source_tree()
    out = (cache or cache_dir()) / "wheels" / source_digest(root)
    with _BUILDING:
        built = sorted(out.glob("ikctl-*.whl"))
        return built[0] if built else _build(root, out)


def _build(root: Path, out: Path) -> Path:
    with tempfile.TemporaryDirectory(prefix="ikctl-wheel-") as tmp:
        # build from a copy: a build in place would leave build/ and *.egg-info in the checkout
        src = Path(tmp) / "src"
        for p in _files(root):
            (src / p.relative_to(root)).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(p, src / p.relative_to(root))
        # with setuptools here, build without fetching it into an isolated environment (no network needed)
        isolation = [] if importlib.util.find_spec("setuptools") is None else ["--no-build-isolation"]
        cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--disable-pip-version-check", "-q", *isolation,
               "-w", str(Path(tmp) / "dist"), str(src)]
        r = subprocess.run(cmd, capture_output=True, text=True)
        wheels = sorted((Path(tmp) / "dist").glob("ikctl-*.whl"))
        if r.returncode != 0 or not wheels:
            last = (r.stderr.strip().splitlines() or ["no output"])[-1]
            raise IkctlError(f"--install: building the ikctl wheel failed: {last}")
        out.mkdir(parents=True, exist_ok=True)
        part = out / f".{wheels[0].name}.part"
        shutil.copyfile(wheels[0], part)
        return part.replace(out / wheels[0].name)


def install_command(base_python: str, venv: str, wheel: str) -> str:
    """Create the venv (reusing the host's own packages where they fit), install the wheel with its dependencies,
    then the wheel itself again: the same version visible from the host's site-packages must not stand in for it."""
    vpy = f"{shell_path(venv.rstrip('/'))}/bin/python"
    pip = f"{vpy} -m pip install -q --disable-pip-version-check"
    w = shlex.quote(wheel)
    return (f"{shlex.quote(base_python)} -m venv --system-site-packages {shell_path(venv)} && {pip} {w} && "
            f"{pip} --no-deps --force-reinstall {w} && {vpy} -c 'import rpcnode, sys; print(sys.executable)'")


async def install(session: Session, host: Host, facts: HostFacts, options: LaunchOptions) -> str:
    """Install this ikctl into the host's venv (its `venv`, else <remote_dir>/venv); the venv's python."""
    wheel = await asyncio.to_thread(build_wheel)
    remote_dir = options.remote_dir.rstrip("/")
    r = await session.run(f"mkdir -p {shell_path(remote_dir)}/wheels && cd {shell_path(remote_dir)} && pwd",
                          timeout=options.timeout)
    if r.exit_status != 0:
        raise HostError(f"--install: cannot create {remote_dir}: {(r.stderr.strip().splitlines() or ['?'])[-1]}")
    remote_wheel = f"{r.stdout.strip()}/wheels/{wheel.name}"  # absolute: sftp does not expand ~
    await session.put(wheel, remote_wheel)
    venv = host.venv or f"{remote_dir}/venv"
    r = await session.run(install_command(facts.python, venv, remote_wheel), timeout=options.install_timeout)
    if r.exit_status != 0:
        last = (r.stderr.strip().splitlines() or r.stdout.strip().splitlines() or ["no output"])[-1]
        raise HostError(f"--install into {venv} failed (exit {r.exit_status}): {last}")
    return r.stdout.strip().splitlines()[-1]
