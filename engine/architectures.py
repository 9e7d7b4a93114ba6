"""The architectures ikctl runs, by GGUF `general.architecture`: adding one is a module plus a line here.

An architecture module provides a config class (hyper-parameters from the GGUF header or a peer's flat scalars;
`layer_parts`, `cache_widths`, `kept_attn_bytes`) and a network class (`load`, `from_parts`, `ops`, `run_op`,
`new_cache`, `attention_scratch`, OP_PARTS). Segments, workers, the planner and the CLI reach them only here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from engine.config import DeepSeek2Config, LlamaConfig
from engine.deepseek2 import DeepSeek2
from engine.errors import ModelFileError
from engine.gguf_file import GGUFFile
from engine.llama import Llama

ModelConfig = DeepSeek2Config | LlamaConfig


@dataclass(frozen=True)
class Architecture:
    name: str  # general.architecture
    config: type[DeepSeek2Config] | type[LlamaConfig]
    network: type[DeepSeek2] | type[Llama]
    on_gpu: bool  # whether engine.cuda runs its ops

    @property
    def parts(self) -> tuple[str, ...]:
        return self.network.OP_PARTS


REGISTRY: dict[str, Architecture] = {a.name: a for a in (
    Architecture("deepseek2", DeepSeek2Config, DeepSeek2, on_gpu=True),
    Architecture("llama", LlamaConfig, Llama, on_gpu=False),
)}


def architecture(name: object, where: str = "") -> Architecture:
    """The registered architecture `name` (a file's or a peer's value), or a ModelFileError naming the ones known."""
    arch = REGISTRY.get(name) if isinstance(name, str) else None
    if arch is None:
        raise ModelFileError(f"{where}architecture '{name or '?'}' is not supported ({', '.join(REGISTRY)})")
    return arch


def of_config(cfg: ModelConfig) -> Architecture:
    return next(a for a in REGISTRY.values() if isinstance(cfg, a.config))


def model_config(f: GGUFFile) -> ModelConfig:
    """The hyper-parameters of a file of a supported architecture, from its header alone."""
    return architecture(f.architecture, f"{f.path}: ").config.from_gguf(f)


def load_network(f: GGUFFile, mla: int, amb_bytes: int) -> Any:
    """A file's whole network, weights memory-mapped in place."""
    return architecture(f.architecture, f"{f.path}: ").network.load(f, mla, amb_bytes)
