"""Sent over SSH to a host's python (stdin) by tui.probe: prints the host's facts as one JSON line.

Standard library only and Python 3.6 syntax, since it runs on whatever python the host has.
"""

import importlib.util
import json
import os
import platform
import shutil
import subprocess
import sys

try:
    from importlib.metadata import PackageNotFoundError, version
except ImportError:  # Python < 3.8 cannot run ikctl anyway
    PackageNotFoundError = version = None


def os_name():
    try:
        with open("/etc/os-release") as f:
            for line in f:
                if line.startswith("PRETTY_NAME="):
                    return line.split("=", 1)[1].strip().strip('"')
    except OSError:
        pass
    return platform.system() + " " + platform.release()


def meminfo():
    kib = {}
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                key, _, rest = line.partition(":")
                kib[key] = int(rest.split()[0])
    except (OSError, ValueError, IndexError):
        return None, None
    # MemAvailable is what a new process can take without swapping; MemFree alone undercounts the page cache
    free = kib.get("MemAvailable", kib.get("MemFree"))
    return kib.get("MemTotal", 0) * 1024, (free or 0) * 1024


def gpus():
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return []
    try:
        out = subprocess.run([smi, "--query-gpu=name,memory.total,memory.free", "--format=csv,noheader,nounits"],
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    found = []
    for line in out.decode(errors="replace").splitlines():
        parts = [p.strip() for p in line.rsplit(",", 2)]
        if len(parts) == 3 and parts[1].isdigit() and parts[2].isdigit():
            found.append({"name": parts[0], "mem_total_bytes": int(parts[1]) << 20,
                          "mem_free_bytes": int(parts[2]) << 20})
    return found


def ikctl():
    if version is None:  # no importlib.metadata: Python < 3.8
        return None, False
    try:
        found = version("ikctl")
    except PackageNotFoundError:
        found = None
    return found, importlib.util.find_spec("rpcnode") is not None


def main():
    total, free = meminfo()
    ikctl_version, importable = ikctl()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    facts = {"os": os_name(), "arch": platform.machine(), "cores": cores, "mem_total_bytes": total,
             "mem_free_bytes": free, "gpus": gpus(), "python": sys.executable,
             "python_version": platform.python_version(), "ikctl_version": ikctl_version,
             "ikctl_importable": importable}
    sys.stdout.write(json.dumps(facts) + "\n")


if __name__ == "__main__":
    main()
