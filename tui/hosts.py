"""`ikctl hosts`: probe the hosts of a hosts file, ~/.ssh/config or --scan, print a table, save the reachable."""

from __future__ import annotations

import argparse
import asyncio
import sys
from dataclasses import replace
from typing import TYPE_CHECKING

from engine.errors import IkctlError
from tui.inventory import Host, InventoryError, load_hosts, save_hosts, scan_hosts, ssh_config_hosts, with_identity
from tui.probe import probe_all
from tui.ssh import SSHOptions, SSHTransport

if TYPE_CHECKING:
    from tui.probe import HostFacts, HostProbe, ProbeResults

EPILOG = """\
Without --hosts or --scan, the candidates are the concrete Host entries of ~/.ssh/config.
Exit status: 0 when at least one host is reachable (the others are listed with the reason),
1 when none is, or the hosts file is invalid."""
HEADER = ("HOST", "STATUS", "OS", "CORES", "RAM GiB total/free", "GPUS (GiB total/free)", "IKCTL")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = "Probe hosts over SSH, concurrently, and print what each has."
    p.epilog = EPILOG
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.add_argument("--hosts", metavar="FILE", help="hosts file (TOML; see examples/hosts.toml)")
    p.add_argument("--scan", nargs="+", default=[], metavar="HOST", help="also probe these [user@]host[:port]")
    p.add_argument("--save", metavar="FILE", help="write the reachable hosts as a hosts file to edit")
    p.add_argument("--timeout", type=float, default=10.0, metavar="S",
                   help="seconds per host for connecting and probing (default: 10)")
    p.add_argument("--identity", metavar="KEY", help="private key for hosts that name none (default: agent, ~/.ssh)")
    p.add_argument("--known-hosts", metavar="FILE", help="known_hosts file (default: ~/.ssh/known_hosts)")
    p.add_argument("--accept-new-host-keys", action="store_true",
                   help="trust and record the key of a host missing from known_hosts (a changed key is still refused)")


def _merge(listed: tuple[Host, ...], scanned: tuple[Host, ...]) -> tuple[Host, ...]:
    """The listed hosts, then the scanned ones not listed; a clashing name becomes the destination."""
    names, dests = {h.name for h in listed}, {h.ssh for h in listed}
    extra = (h if h.name not in names else replace(h, name=h.ssh) for h in scanned if h.ssh not in dests)
    return listed + tuple(extra)


def candidate_hosts(args: argparse.Namespace) -> tuple[Host, ...]:
    hosts = _merge(load_hosts(args.hosts) if args.hosts else (), scan_hosts(args.scan))
    if not args.hosts and not args.scan:
        hosts = ssh_config_hosts()
        if not hosts:
            raise InventoryError("no hosts: give --hosts FILE or --scan HOST..., or add Host entries to ~/.ssh/config")
    return tuple(with_identity(h, args.identity) for h in hosts)


def _gib(n_bytes: int) -> str:
    return f"{n_bytes / 2**30:.1f}"


def _gpus(facts: HostFacts) -> str:
    return "; ".join(f"{g.name} {_gib(g.mem_total_bytes)}/{_gib(g.mem_free_bytes)}" for g in facts.gpus) or "-"


def _ikctl(facts: HostFacts) -> str:
    if facts.ikctl_version is None:
        return "not installed"
    return facts.ikctl_version if facts.ikctl_importable else f"{facts.ikctl_version} (not importable)"


def table_row(p: HostProbe) -> tuple[str, ...]:
    f = p.facts
    if f is None:
        return (p.host.name, p.error or "failed", "-", "-", "-", "-", "-")
    return (p.host.name, "ok", f"{f.os} {f.arch}", str(f.cores),
            f"{_gib(f.mem_total_bytes)}/{_gib(f.mem_free_bytes)}", _gpus(f), _ikctl(f))


def format_table(results: ProbeResults) -> str:
    rows = [HEADER, *(table_row(p) for p in results.probes)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(HEADER))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows)


def summary_note(f: HostFacts) -> str:
    gpus = f"{len(f.gpus)} GPU" + ("s" if len(f.gpus) != 1 else "")
    return f"probed: {f.os}, {f.cores} cores, {_gib(f.mem_total_bytes)} GiB RAM, {gpus}, python {f.python_version}"


def run(args: argparse.Namespace) -> int:
    if not args.timeout > 0:
        raise IkctlError(f"--timeout must be more than 0 seconds, got {args.timeout:g}")
    hosts = candidate_hosts(args)
    options = SSHOptions(connect_timeout=args.timeout, known_hosts=args.known_hosts,
                         accept_new_host_keys=args.accept_new_host_keys)
    results = asyncio.run(probe_all(SSHTransport(options), hosts, args.timeout))
    print(format_table(results))
    ok = results.succeeded
    print(f"\n{len(ok)} of {len(results.probes)} hosts reachable", file=sys.stderr)
    if args.save:
        if ok:
            save_hosts(args.save, [p.host for p in ok], {p.host.name: summary_note(p.facts) for p in ok if p.facts})
            print(f"wrote {len(ok)} hosts to {args.save}", file=sys.stderr)
        else:
            print(f"ikctl: not writing {args.save}: no host is reachable", file=sys.stderr)
    return 0 if ok else 1

