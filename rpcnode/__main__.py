"""`python -m rpcnode` / `ikctl rpcnode`: start a worker owning one device."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import socket
import sys
from collections.abc import Sequence
from pathlib import Path

from engine.byte_sizes import SizeError, parse_size
from engine.cuda import available
from engine.cuda.devices import parse_device
from engine.errors import IkctlError
from rpcnode.protocol import is_loopback
from rpcnode.server import serve
from rpcnode.token_file import TokenFileError, read_token_file
from rpcnode.worker import Config, StartError

DEFAULT_PORT = 50052


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"TCP port (default {DEFAULT_PORT}; 0 = any free)")
    p.add_argument("-t", "--threads", type=int, default=None, help="compute threads (default: all cores)")
    p.add_argument("-c", "--cache", metavar="DIR", default=None,
                   help="local tensor cache (default: <user cache dir>/ikctl/rpcnode-cache)")
    p.add_argument("--cache-limit", default="1TiB", metavar="SIZE", help="tensor cache size limit (default 1TiB)")
    p.add_argument("--device", default="cpu", metavar="DEV",
                   help="the device this worker owns: cpu (default) or cuda:N, a GPU of this machine (needs CuPy: "
                   "pip install 'ikctl[cuda13]')")
    p.add_argument("-m", "--mem", default=None, metavar="BYTES",
                   help="bytes of tensors it may hold, e.g. 48GiB (default: the machine's RAM)")
    p.add_argument("--token-file", metavar="FILE",
                   help="file holding the shared token (required unless --host is a loopback address)")
    p.add_argument("--models", action="append", default=[], metavar="DIR",
                   help="directory of local GGUF files (or one .gguf file) to read tensors from instead of the "
                   "network (repeatable); entries it cannot use are logged with the reason")
    p.add_argument("--poll", type=float, default=10.0, metavar="MS",
                   help="after a segment, spin up to MS milliseconds for the coordinator's next one instead of "
                   "sleeping (a sleeping core wakes 0.1-0.3 ms late, every round trip); not for coordinators on "
                   "this machine (default 10; 0: never)")
    p.add_argument("--max-connections", type=int, default=32, metavar="N",
                   help="authenticated peers served at once; one more is answered BUSY (default 32)")
    p.add_argument("--idle-timeout", type=float, default=600.0, metavar="S",
                   help="close a peer that sends no request for S seconds; the coordinator reconnects when it "
                   "next needs the worker (default 600)")
    p.add_argument("--stall-timeout", type=float, default=60.0, metavar="S",
                   help="drop a peer that stops mid-frame, or uploads that get no chunk, for S seconds, releasing "
                   "the memory they reserved (default 60)")


def read_token(path: str) -> str:
    try:
        return read_token_file(path)
    except TokenFileError as e:
        raise SystemExit(f"rpcnode: error: --token-file: {e}") from None


def config_from_args(args: argparse.Namespace) -> object:
    if args.token_file is None and not is_loopback(args.host):
        raise SystemExit(f"rpcnode: error: binding to {args.host} needs --token-file (anyone on the network could "
                         "otherwise use this worker); bind to 127.0.0.1 for a local worker")
    try:
        mem = parse_size(args.mem) if args.mem else None
        cache_limit = parse_size(args.cache_limit)
    except SizeError as e:
        raise SystemExit(f"rpcnode: error: {e}") from None
    if args.threads is not None and args.threads <= 0:
        raise SystemExit(f"rpcnode: error: -t {args.threads} must be positive")
    if not 0 <= args.poll <= 1000:
        raise SystemExit(f"rpcnode: error: --poll {args.poll:g} must be 0..1000 milliseconds")
    if args.max_connections < 1:
        raise SystemExit(f"rpcnode: error: --max-connections {args.max_connections} must be at least 1")
    for flag, value in (("--idle-timeout", args.idle_timeout), ("--stall-timeout", args.stall_timeout)):
        if not 0 < value <= 1e6:  # `not` also catches nan
            raise SystemExit(f"rpcnode: error: {flag} {value:g} must be 0..1000000 seconds (above 0)")
    return Config(host=args.host, port=args.port, threads=args.threads,
                  cache_dir=Path(args.cache) if args.cache else None, cache_limit=cache_limit, mem_bytes=mem,
                  token=read_token(args.token_file) if args.token_file else None,
                  models=[Path(d) for d in args.models], cuda_device=cuda_device(args.device),
                  poll_ms=args.poll, max_connections=args.max_connections, idle_timeout_s=args.idle_timeout,
                  stall_timeout_s=args.stall_timeout)


def cuda_device(text: str) -> int | None:
    """--device as a CUDA index (None: cpu), checked now: a missing CuPy or GPU is one line, before listening."""
    try:
        index = parse_device(text)
    except IkctlError as e:
        raise SystemExit(f"rpcnode: error: {e}") from None
    why = available(index) if index is not None else None
    if why is not None:
        raise SystemExit(f"rpcnode: error: --device {text}: {why}")
    return index


def run(args: argparse.Namespace) -> int:
    # OpenMP's threads spin after each parallel region (libgomp's default ~300k iterations, milliseconds). When the
    # coordinator shares this machine's cores, its spinning threads and ours take turns stealing each other's
    # cores: with experts here and attention there on 2 cores, TG fell to 0.19x local (0.56x with 1000). A worker
    # on cores of its own should spin (every layer here: 0.98x local with the default, 0.93x with 1000), so
    # `GOMP_SPINCOUNT=300000 ikctl rpcnode ...` there. Before libgomp loads; the user's value wins.
    os.environ.setdefault("GOMP_SPINCOUNT", "1000")

    cfg = config_from_args(args)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="rpcnode: %(message)s")
    try:
        asyncio.run(serve(cfg))  # type: ignore[arg-type]
    except KeyboardInterrupt:
        return 130
    except StartError as e:
        print(f"rpcnode: error: {e}", file=sys.stderr)
        return 1
    except (OSError, socket.gaierror) as e:
        print(f"rpcnode: error: cannot listen on {args.host}:{args.port}: {e.strerror or e}", file=sys.stderr)
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="rpcnode", description=__doc__)
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
