"""Sent over SSH to a host's python (stdin) by tui.launch: starts rpcnode workers detached, prints one JSON line.

Standard library only; f-strings are fine, since the python that runs a worker runs ikctl. tui.launch appends
a call of `main` with the parameters, the workers' tokens among them, to this text: a token travels inside the
SSH channel and never appears in a command line.
"""

import fcntl
import json
import os
import socket
import subprocess
import sys
import time

LISTENING = "listening on "
TAIL_LINES = 10


def bind_address(wanted):
    """The address to listen on: the one given, else the one this SSH session reached us at, else loopback."""
    if wanted:
        return wanted
    conn = os.environ.get("SSH_CONNECTION", "").split()  # client_ip client_port server_ip server_port
    return conn[2] if len(conn) == 4 else "127.0.0.1"


def port_free(addr, port):
    family = socket.AF_INET6 if ":" in addr else socket.AF_INET
    s = socket.socket(family, socket.SOCK_STREAM)
    try:
        # the worker's asyncio server sets SO_REUSEADDR too, so a port in TIME_WAIT counts as free
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((addr, port))
        return True
    except OSError:
        return False
    finally:
        s.close()


def read_text(path, offset):
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            return f.read().decode("utf-8", "replace")
    except OSError:
        return ""


def tail(path, offset):
    return [ln for ln in read_text(path, offset).splitlines() if ln.strip()][-TAIL_LINES:]


def write_secret(path, text):
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)  # an older file of that name may have had another mode
    with os.fdopen(fd, "w") as f:
        f.write(text + "\n")


def start(w, python, addr, port, files):
    # named by address and port: two workers of one machine may share a port on different addresses
    stem = os.path.join(files, f"{addr.replace(':', '_')}-{port}")
    token_file, log = stem + ".token", stem + ".log"
    write_secret(token_file, w["token"])
    cmd = [python, "-m", "rpcnode", "--host", addr, "--port", str(port), "--token-file", token_file,
           "-t", str(w["threads"])]
    if w["device"] != "cpu":
        cmd += ["--device", w["device_flag"]]
    if w["cache_dir"]:
        cmd += ["-c", os.path.expanduser(w["cache_dir"])]
    if w["mem_bytes"]:
        cmd += ["-m", str(w["mem_bytes"])]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    # appended to, so that an earlier worker's log on this address and port stays readable; this start's lines
    # are those after `offset`
    with open(log, "ab") as out:
        offset = out.tell()
        # a new session: the worker outlives this SSH session and gets no signal when it closes
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True, env=env)
    return {"device": w["device"], "port": port, "pid": proc.pid, "log": log, "token_file": token_file,
            "error": None, "log_tail": [], "proc": proc, "offset": offset}


def wait_started(started, timeout):
    """Until each worker logs that it listens, exits, or the time is up."""
    deadline = time.monotonic() + timeout
    pending = [s for s in started if "proc" in s]
    while pending:
        for s in list(pending):
            proc = s["proc"]
            if LISTENING in read_text(s["log"], s["offset"]):
                pending.remove(s)
            elif proc.poll() is not None:
                s["error"] = f"worker exited at start (status {proc.returncode})"
                pending.remove(s)
            elif time.monotonic() > deadline:
                proc.kill()
                proc.wait()
                s["error"] = f"worker did not listen within {timeout:g} s (killed)"
                pending.remove(s)
        if pending:
            time.sleep(0.05)
    for s in started:
        s.pop("proc", None)
        if s["error"] and "log" in s:
            s["log_tail"] = tail(s["log"], s["offset"])


def start_all(params, addr, files):
    lo, hi = params["port_range"]
    taken = set()
    started = []
    for w in params["workers"]:
        port = next((p for p in range(lo, hi + 1) if p not in taken and port_free(addr, p)), None)
        if port is None:
            error = f"port in use: no free port in {lo}-{hi} on {addr}"
            started.append({"device": w["device"], "error": error, "log_tail": []})
            continue
        taken.add(port)
        try:
            started.append(start(w, params["python"], addr, port, files))
        except OSError as e:
            started.append({"device": w["device"], "error": f"cannot start the worker: {e}", "log_tail": []})
    wait_started(started, params["start_timeout"])
    return started


def main(params):
    addr = bind_address(params["bind"])
    files = os.path.expanduser(params["files_dir"])
    os.makedirs(files, mode=0o700, exist_ok=True)
    # launches on one machine (two hosts-file entries for it, the TUI's local workers) take turns from choosing
    # ports until their workers listen, so that two never choose the same free port
    with open(os.path.join(files, ".launch.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        started = start_all(params, addr, files)
    sys.stdout.write(json.dumps({"addr": addr, "workers": started}) + "\n")
