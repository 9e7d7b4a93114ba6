"""Endpoints are values: checked when made, with their host, port and device name, and still the text typed."""

from __future__ import annotations

import pytest

from engine.placement import PlacementRules
from engine.placement_rules import PlacementError
from rpcnode.endpoint import Endpoint, EndpointError


def test_an_endpoint_knows_its_parts() -> None:
    ep = Endpoint(" 10.0.0.2:50052 ")
    assert ep == "10.0.0.2:50052" and (ep.host, ep.port, ep.device) == ("10.0.0.2", 50052, "RPC[10.0.0.2:50052]")
    v6 = Endpoint("[fe80::1]:7")
    assert (v6.host, v6.port, v6.device) == ("fe80::1", 7, "RPC[[fe80::1]:7]")
    assert {ep: "token"}["10.0.0.2:50052"] == "token"  # keys token maps as the text a cluster file holds


@pytest.mark.parametrize("text", ["localhost", "host:0", "host:65536", "fe80::1:7", ":50052", "a b:1"])
def test_what_is_not_an_endpoint(text: str) -> None:
    with pytest.raises(EndpointError, match=r"host:port|not in 1\.\.65535"):
        Endpoint(text)
    with pytest.raises(PlacementError, match="--rpc"):
        PlacementRules.from_flags(rpc=text)


def test_placement_rules_hold_endpoints() -> None:
    rules = PlacementRules(rpc=["127.0.0.1:1", "[::1]:2"])
    assert all(isinstance(e, Endpoint) for e in rules.rpc) and [e.port for e in rules.rpc] == [1, 2]
