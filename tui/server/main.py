"""`ikctl serve`: its own flags, the checks before binding, loading in the background, and uvicorn's loop."""

from __future__ import annotations

import argparse
import socket
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import uvicorn

from engine.batching import Scheduler
from engine.distributed import remote_segments
from engine.errors import IkctlError
from engine.model import Model
from engine.segments import MAX_SEQUENCES
from rpcnode.protocol import is_loopback
from rpcnode.token_file import TokenFileError, read_token_file
from tui.formatting import auto_chosen_line
from tui.server.app import ServerConfig, ServerState, make_app

DEFAULT_QUEUE = 16


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("server (llama-server's flags)")
    g.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1; another than "
                   "loopback needs --api-key-file)")
    g.add_argument("--port", type=int, default=8080, help="port (default: 8080; 0: any free port, logged)")
    g.add_argument("-np", "--parallel", type=int, default=1, metavar="N",
                   help="sequence slots: requests generated at once, in one batch, each with its own KV cache "
                   "(default: 1)")
    g.add_argument("--max-queue", type=int, default=DEFAULT_QUEUE, metavar="N",
                   help=f"requests that may wait for a slot; one more is answered 429 (default: {DEFAULT_QUEUE})")
    g.add_argument("--api-key-file", metavar="FILE", help="file holding the API key clients send as `Authorization: "
                   "Bearer KEY` (owner-only, at least 16 characters, as the worker's token file)")
    g.add_argument("--alias", metavar="NAME", help="the model's id in the API (default: the GGUF file's name)")
    g.add_argument("--metrics", action="store_true", help="answer GET /metrics (Prometheus text)")


@dataclass(frozen=True)
class ServeOptions:
    host: str
    port: int
    parallel: int
    max_queue: int
    api_key_file: str | None
    alias: str | None
    metrics: bool

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> ServeOptions:
        return cls(args.host, args.port, args.parallel, args.max_queue, args.api_key_file, args.alias, args.metrics)


def _api_key(opts: ServeOptions) -> str | None:
    if opts.api_key_file is None:
        if not is_loopback(opts.host):
            raise IkctlError(f"--host {opts.host} is reachable from other machines: give --api-key-file FILE (a key "
                             "of at least 16 characters, chmod 600), or listen on 127.0.0.1")
        return None
    try:
        return read_token_file(opts.api_key_file)
    except TokenFileError as e:
        raise IkctlError(f"--api-key-file: {e}") from None


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise IkctlError(f"cannot listen on {host}:{port}: {e.strerror or e}; give another --port (0: any free "
                         "one)") from None
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def _say(text: str) -> None:
    print(f"ikctl serve: {text}", file=sys.stderr, flush=True)


def _warm_up(model: Model) -> None:
    """A two-token prompt and a decode step before the first request: the first use of a kernel in a process loads
    or compiles it, and the first pass touches the mapped weights; the first user should not wait for that."""
    cache = model.new_cache(8)
    model.eval([0, 0], cache)
    model.eval([0], cache)
    cache.clear()


def run_server(opts: ServeOptions, model_path: str, load: Callable[[], Model]) -> int:
    """Listen at once (so /health answers 503 while loading), load the model, serve until interrupted."""
    if not 1 <= opts.parallel <= 64:
        raise IkctlError(f"-np {opts.parallel} must be 1..64 slots")
    if opts.max_queue < 0:
        raise IkctlError(f"--max-queue {opts.max_queue} must be 0 or more")
    key = _api_key(opts)
    name = Path(model_path).name
    ids = tuple(dict.fromkeys(x for x in (opts.alias, name, model_path) if x))
    state = ServerState(ServerConfig(ids, key, opts.metrics))
    sock = _bind(opts.host, opts.port)
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    config = uvicorn.Config(make_app(state, _say), log_level="warning", access_log=False, timeout_graceful_shutdown=3)
    server = uvicorn.Server(config)
    failure: list[str] = []

    def load_in_background() -> None:
        t0 = time.perf_counter()
        try:
            model = load()
            if remote_segments(model.net) and opts.parallel > MAX_SEQUENCES:
                raise IkctlError(f"-np {opts.parallel}: a worker keeps the KV caches of {MAX_SEQUENCES} sequences per "
                                 f"segment; give -np {MAX_SEQUENCES} or fewer with layers on workers")
            if model.auto is not None:
                _say(auto_chosen_line(model.auto))
            model.on_failover(lambda event: _say(event.line()))
            _warm_up(model)
            scheduler = Scheduler(model, opts.parallel, opts.max_queue, _say)
        except IkctlError as e:
            failure.append(str(e))
            server.should_exit = True
            return
        scheduler.start()
        state.ready(model, scheduler)
        _say(f"{ids[0]} ready in {time.perf_counter() - t0:.1f} s: {opts.parallel} slots of {model.n_ctx} tokens, "
             f"queue {opts.max_queue}")

    _say(f"listening on http://{shown}:{port} (loading {name}; GET /health answers 503 until it is ready)")
    loader = threading.Thread(target=load_in_background, name="ikctl-load", daemon=True)
    loader.start()
    try:
        server.run(sockets=[sock])
    finally:
        if state.scheduler is not None:
            state.scheduler.stop()
        if state.model is not None and hasattr(state.model.net, "close"):
            state.model.net.close()
    if failure:
        raise IkctlError(failure[0])
    _say("stopped")
    return 0
