"""The architecture registry: what each architecture provides, and an unknown one refused in one line."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.architectures import REGISTRY, architecture, load_network, model_config, of_config
from engine.errors import ModelFileError
from engine.gguf_file import GGUFFile
from tests.refs import REFS


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_an_architecture_runs_the_ops_its_config_lays_out(name: str) -> None:
    arch = REGISTRY[name]
    assert arch.parts[0] == "embd" and arch.parts[-1] == "output"
    for method in ("load", "from_parts", "ops", "run_op", "new_cache", "attention_scratch"):
        assert callable(getattr(arch.network, method))
    for method in ("from_gguf", "layer_parts", "cache_widths", "kept_attn_bytes", "rope_problem"):
        assert callable(getattr(arch.config, method))


def test_files_load_through_the_registry(smollm2_path: Path) -> None:
    for path in (REFS / "open-v3.gguf", smollm2_path):
        f = GGUFFile(path)
        cfg = model_config(f)
        arch = of_config(cfg)
        assert arch.name == f.architecture and isinstance(cfg, arch.config)
        net = load_network(f, mla=3, amb_bytes=1 << 20)
        assert isinstance(net, arch.network)
        ops = net.ops()
        assert ops[0] == (-1, "embd") and ops[-1] == (cfg.n_layers, "output")
        assert {part for _, part in ops} <= set(arch.parts)
        assert [p for i, p in ops if i == cfg.n_layers - 1] == list(cfg.layer_parts(cfg.n_layers - 1))


def test_an_unknown_architecture_is_one_line_naming_the_known_ones() -> None:
    with pytest.raises(ModelFileError) as e:
        architecture("mamba", "m.gguf: ")
    assert str(e.value) == f"m.gguf: architecture 'mamba' is not supported ({', '.join(REGISTRY)})"
    with pytest.raises(ModelFileError, match="architecture '\\?'"):
        architecture(None)
