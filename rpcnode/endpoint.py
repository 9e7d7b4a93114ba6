"""A worker's address as a value: `host:port` (an IPv6 host in brackets), checked when made. It is the string
itself, so it keys token maps and joins into flags as the text a user typed."""

from __future__ import annotations

import re

from rpcnode.errors import IkctlError

_ENDPOINT = re.compile(r"(?P<host>\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?):(?P<port>\d{1,5})")


class EndpointError(IkctlError):
    """Text that is not host:port."""


class Endpoint(str):
    """`host:port`; `host` without IPv6 brackets, `port` a number in 1..65535, `device` its device name."""

    def __new__(cls, text: str) -> Endpoint:
        text = text.strip()
        m = _ENDPOINT.fullmatch(text)
        if m is None:
            raise EndpointError(f"'{text}' is not host:port (e.g. 192.168.1.20:50052)")
        if not 0 < int(m["port"]) < 65536:
            raise EndpointError(f"'{text}': port {m['port']} is not in 1..65535")
        return super().__new__(cls, text)

    @property
    def host(self) -> str:
        return self.rpartition(":")[0].strip("[]")

    @property
    def port(self) -> int:
        return int(self.rpartition(":")[2])

    @property
    def device(self) -> str:
        """The device name of the worker here, as llama.cpp's -ot and --device-mem write it."""
        return f"RPC[{self}]"
