"""Where a model is to go, as one value: the placement rules, the capacities given for devices and each worker's
token, built by one function from the load options (which the CLI's flags, a script's keywords and the app's
fields all become), a cluster file and the environment."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from engine.cluster import read_cluster
from engine.errors import IkctlError
from engine.placement_rules import PlacementRules, parse_device_mem
from rpcnode.protocol import rpc_device
from rpcnode.token_file import TokenFileError, read_token_file

if TYPE_CHECKING:
    from engine.model import Options

TOKEN_ENV, TOKEN_FILE_ENV = "IKCTL_RPC_TOKEN", "IKCTL_RPC_TOKEN_FILE"


def read_token() -> str | None:
    """The shared worker token from $IKCTL_RPC_TOKEN_FILE (a file) or $IKCTL_RPC_TOKEN; None if neither is set."""
    path = os.environ.get(TOKEN_FILE_ENV)
    if path:
        try:
            return read_token_file(path)
        except TokenFileError as e:
            raise IkctlError(f"${TOKEN_FILE_ENV}: {e}") from None
    return os.environ.get(TOKEN_ENV) or None


@dataclass(frozen=True)
class PlacementSpec:
    """The rules (-ot, -ngl, -ts, --rpc), the capacities given for devices (a cluster file's for the workers
    planned on, then --device-mem) and the workers' tokens (per endpoint; `token` for any other, else the
    environment's)."""

    rules: PlacementRules = field(default_factory=PlacementRules)
    given_capacities: Mapping[str, int] = field(default_factory=dict)
    tokens: Mapping[str, str] = field(default_factory=dict)
    token: str | None = None

    @property
    def endpoints(self) -> Sequence[str]:
        return self.rules.rpc

    def token_for(self, endpoint: str) -> str | None:
        """The endpoint's own token, else the shared one, else $IKCTL_RPC_TOKEN_FILE / $IKCTL_RPC_TOKEN."""
        return self.tokens.get(endpoint) or self.token or read_token()

    def capacities(self, reported: Mapping[str, int]) -> dict[str, int]:
        """What to plan against: what the workers report, overridden by what was given."""
        return {**reported, **self.given_capacities}

    def without(self, device: str) -> PlacementSpec:
        """This spec with one device gone (engine.placement_rules.PlacementRules.without)."""
        return replace(self, rules=self.rules.without(device),
                       given_capacities={d: c for d, c in self.given_capacities.items() if d != device})


def _texts(value: str | Sequence[str]) -> list[str]:
    return [value] if isinstance(value, str) else list(value)


def placement_spec(opts: Options) -> PlacementSpec:
    """The spec of load options (the flags as strings or lists, as the CLI, a script or the app passes them): a
    cluster file's endpoints stand for --rpc when --rpc is not given. A bad flag is one PlacementError line."""
    cluster = read_cluster(opts.cluster) if opts.cluster else None
    rpc = opts.rpc if isinstance(opts.rpc, str) else ",".join(opts.rpc)
    if not rpc and cluster is not None:
        rpc = ",".join(cluster.endpoints())
    ts = opts.tensor_split
    ts_text = ts if isinstance(ts, str) or ts is None else ",".join(str(v) for v in ts)
    rules = PlacementRules.from_flags(_texts(opts.override_tensor), opts.n_gpu_layers, ts_text or None, rpc or None)
    planned = {rpc_device(ep) for ep in rules.rpc}
    given = {d: c for d, c in cluster.capacities().items() if d in planned} if cluster is not None else {}
    given.update(parse_device_mem(t) for t in _texts(opts.device_mem))
    tokens = dict(cluster.tokens()) if cluster is not None else {}
    shared = None
    if isinstance(opts.rpc_token, Mapping):
        tokens.update(opts.rpc_token)
    else:
        shared = opts.rpc_token or None
    return PlacementSpec(rules, given, tokens, shared)
