"""The placement map's model: tensors grouped by layer and kind, each group's device (pure, no widgets)."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from engine.placement import Placement, tensor_layer
from engine.placement_rules import device_kind

KINDS = ("attn", "router", "experts", "shexp", "dense")
KIND_TITLES = {"attn": "attention", "router": "router", "experts": "experts", "shexp": "shared experts",
               "dense": "dense FFN"}
MIXED = "*mixed*"  # a group whose tensors sit on more than one device
_EMBD_STEMS = ("token_embd", "pos_embd", "token_types")


def tensor_kind(name: str, moe_layer: bool) -> str | None:
    """attn, router, experts, shexp or dense for a layer tensor; None outside layers.

    ffn_norm feeds the router in an MoE layer and the dense FFN otherwise, so it follows the layer type."""
    if tensor_layer(name) is None:
        return None
    rest = name.split(".", 2)[2]
    if rest.startswith("attn_"):
        return "attn"
    if rest.startswith(("ffn_gate_inp", "exp_probs_b")):
        return "router"
    if re.match(r"ffn_\w+_exps\.", rest):
        return "experts"
    if re.match(r"ffn_\w+_shexp\.", rest):
        return "shexp"
    if rest.startswith("ffn_norm"):
        return "router" if moe_layer else "dense"
    return "dense" if rest.startswith("ffn_") else "attn"  # other per-layer norms travel with attention


# A cell: a device name, the devices a layer's experts are split over (in range order), MIXED, or None.
Cell = str | tuple[str, ...] | None


@dataclass(frozen=True)
class MapRow:
    """One row of the map: a label and, per column, a Cell."""

    label: str
    cells: tuple[Cell, ...]


def _group_device(devices: set[str | tuple[str, ...]]) -> Cell:
    if not devices:
        return None
    return devices.pop() if len(devices) == 1 else MIXED


def build_rows(device_of: Mapping[str, str], n_layers: int,
               split_over: Mapping[str, tuple[str, ...]] | None = None) -> list[MapRow]:
    """embd row, one row per layer (columns KINDS), output row; the embd/output cell is the first column.
    split_over: the devices of each expert tensor split over several."""
    moe = {tensor_layer(n) for n in device_of if ".ffn_gate_inp" in n}
    groups: dict[tuple[int, str], set[str | tuple[str, ...]]] = {}
    embd: set[str | tuple[str, ...]] = set()
    out: set[str | tuple[str, ...]] = set()
    for name, one in device_of.items():
        dev = (split_over or {}).get(name, one)
        layer = tensor_layer(name)
        if layer is None:
            (embd if name.startswith(_EMBD_STEMS) else out).add(dev)
            continue
        kind = tensor_kind(name, layer in moe)
        if kind is not None:
            groups.setdefault((layer, kind), set()).add(dev)
    rows = [MapRow("embd", (_group_device(embd),) + (None,) * (len(KINDS) - 1))]
    for i in range(n_layers):
        rows.append(MapRow(str(i), tuple(_group_device(set(groups.get((i, k), set()))) for k in KINDS)))
    rows.append(MapRow("output", (_group_device(out),) + (None,) * (len(KINDS) - 1)))
    return rows


def device_tags(devices: Sequence[str]) -> dict[str, str]:
    """Short cell labels: CPU, R1, R2... for RPC workers in --rpc order, G0, G1 for CUDA devices."""
    tags, n_rpc = {}, 0
    for name in devices:
        if device_kind(name) == "rpc":
            n_rpc += 1
            tags[name] = f"R{n_rpc}"
        elif device_kind(name) == "cuda":
            tags[name] = f"G{name[4:]}"
        else:
            tags[name] = name
    return tags


def placement_rows(placement: Placement) -> list[MapRow]:
    return build_rows(placement.device_of, placement.n_layers,
                      {n: placement.devices_of(n) for n in placement.experts_of})


def kinds_present(rows: Iterable[MapRow]) -> list[bool]:
    """Per column, whether any layer row has a cell there (a dense-only model has no router column)."""
    present = [False] * len(KINDS)
    for row in rows:
        if row.label in ("embd", "output"):
            continue
        for k, cell in enumerate(row.cells):
            present[k] = present[k] or cell is not None
    return present
