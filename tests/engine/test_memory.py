"""Loading maps the weights instead of copying them: anonymous memory stays far below the file size."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

from engine.synth import SynthSpec, write_model

PROBE = r"""
import json, sys
def mem():
    d = {}
    for line in open('/proc/self/status'):
        k, v = line.split(':', 1)
        if k in ('VmHWM', 'RssAnon'):
            d[k] = int(v.split()[0]) * 1024
    return d
import engine, numpy, tokenizers, engine.kernels, engine.deepseek2  # libraries count as before
before = mem()
m = engine.load_model(sys.argv[1], cache_type_k='f32')
loaded = mem()
m.logits(list(range(3, 11)))
ran = mem()
print(json.dumps({'before': before, 'loaded': loaded, 'ran': ran}))
"""


def test_weights_are_memory_mapped_not_copied(tmp_path: Path) -> None:
    # ~200 MB of F32 weights: big enough that a copy could not hide in the noise of imports
    spec = replace(SynthSpec(), hidden=512, layers=4, heads=8, kv_lora_rank=128, qk_nope=64, qk_rope=32, v_head=64,
                   experts=32, top_k=2, expert_ffn=512, dense_ffn=1024, vocab=2048, dtype="F32")
    path = write_model(tmp_path / "big.gguf", spec)
    size = path.stat().st_size
    assert size > 150e6
    out = subprocess.run([sys.executable, "-c", PROBE, str(path)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    m = json.loads(out.stdout)
    load_peak = m["loaded"]["VmHWM"] - m["before"]["VmHWM"]
    mb = f"{size / 1e6:.0f} MB file"
    assert load_peak < 0.15 * size, f"loading raised peak RSS by {load_peak / 1e6:.0f} MB for a {mb}"
    anon = m["ran"]["RssAnon"] - m["before"]["RssAnon"]
    assert anon < 0.25 * size, f"a forward pass left {anon / 1e6:.0f} MB of private memory for a {mb}"
