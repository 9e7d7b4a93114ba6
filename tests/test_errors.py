"""One error hierarchy: every exception engine, rpcnode and tui raise on purpose derives from IkctlError, so a
caller (the CLI, the app, a worker answering a peer) catches one type and prints one line."""

from __future__ import annotations

import importlib
import inspect

from engine.errors import IkctlError
from tests.test_imports import MODULES

# control flow inside one module, never seen outside it
PRIVATE = {"engine.gguf_file._Truncated", "rpcnode.worker._TimedOut"}


def _defined_exceptions() -> list[type[BaseException]]:
    found = []
    for name in MODULES:
        if name.startswith("tui.screens") or name == "tui.app":  # the Textual app defines no errors
            continue
        module = importlib.import_module(name)
        for _, obj in inspect.getmembers(module, inspect.isclass):
            if issubclass(obj, BaseException) and obj.__module__ == name:
                found.append(obj)
    return found


def test_every_error_of_ours_is_an_ikctl_error() -> None:
    errors = _defined_exceptions()
    assert {e.__name__ for e in errors} >= {"ProtocolError", "RPCError", "CacheError", "TokenFileError",
                                             "StartError", "ProgramError", "PlacementError", "ModelFileError"}
    strays = [f"{e.__module__}.{e.__qualname__}" for e in errors
              if not issubclass(e, IkctlError) and f"{e.__module__}.{e.__qualname__}" not in PRIVATE]
    assert strays == []

