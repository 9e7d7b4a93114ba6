"""The CUDA backend on CuPy: whether it can run here, and why not in one line when it cannot.

CuPy is optional (`pip install 'ikctl[cuda13]'` or `ikctl[cuda12]`): nothing outside this package imports it,
and everything else imports and runs without it.
"""

from __future__ import annotations

from typing import Any

from engine.errors import IkctlError

INSTALL_HINT = "pip install 'ikctl[cuda13]', or 'ikctl[cuda12]' for a CUDA 12 driver"


class CudaUnavailable(IkctlError):
    """CuPy or a CUDA device is missing; the message says which and what to do."""


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}".rstrip(": ")


def device_count() -> tuple[int, str | None]:
    """(number of CUDA devices, None) or (0, the reason there are none)."""
    try:
        # cupy: optional, loaded only where a GPU is used
        import cupy
    except ImportError:
        return 0, f"CuPy is not installed ({INSTALL_HINT})"
    except Exception as e:  # a broken CuPy install raises whatever its extension modules raise
        return 0, f"CuPy cannot be imported ({_first_line(e)})"
    try:
        n = int(cupy.cuda.runtime.getDeviceCount())
    except Exception as e:  # CUDARuntimeError without a driver, or RuntimeError from a missing libcudart
        return 0, f"no CUDA device: {_first_line(e)} (is the NVIDIA driver installed and a GPU visible?)"
    return (n, None) if n else (0, "no CUDA device: the driver reports none")


def available(device: int = 0) -> str | None:
    """None if CUDA device `device` can be used, else the one-line reason."""
    n, why = device_count()
    if why is not None:
        return why
    if not 0 <= device < n:
        return f"no CUDA device {device}: this machine has {n} (cuda:0{f'..cuda:{n - 1}' if n > 1 else ''})"
    return None


def require(device: int = 0) -> Any:
    """The cupy module, after checking that `device` exists; CudaUnavailable otherwise."""
    why = available(device)
    if why is not None:
        raise CudaUnavailable(why)
    # cupy: optional, loaded only where a GPU is used
    import cupy

    return cupy
