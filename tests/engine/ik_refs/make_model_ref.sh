#!/usr/bin/env bash
# Rebuilds model/ (see README.md): a tiny deepseek2 model quantized by ik_llama.cpp's llama-quantize with a mixed
# recipe of ik and mainline types, and ik_llama.cpp's logits for 256 positions of it.
# Usage: tests/engine/ik_refs/make_model_ref.sh [IK_LLAMA_DIR]   (default /work/peers/ik_llama.cpp, built as by
# make_refs.sh; this adds the llama-quantize target, which also builds libllama).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/../../.." && pwd)"
ik="${1:-/work/peers/ik_llama.cpp}"
out="$here/model"
# ffn_*_exps in IQ4_KS / IQ2_K_R4 / Q6_0, the shared expert in IQ4_K / Q4_0_R8 / IQ4_NL_R4, the dense layer in
# IQ5_KS / IQ3_K / Q6_0_R4, attention Q8_0, output Q6_K (first matching rule wins; norms and the router stay F32).
recipe='attn_.*=q8_0,ffn_gate_exps=iq4_ks,ffn_up_exps=iq2_k_r4,ffn_down_exps=q6_0,ffn_gate_shexp=iq4_k'
recipe+=',ffn_up_shexp=q4_0_r8,ffn_down_shexp=iq4_nl_r4,blk\.0\.ffn_gate=iq5_ks,blk\.0\.ffn_up=iq3_k'
recipe+=',blk\.0\.ffn_down=q6_0_r4,token_embd=q8_0,^output=q6_K'
nice -n 15 cmake --build "$ik/build" --target llama-quantize -j2
cc -O2 -o "$ik/build/ik_logits" "$here/ik_logits.c" -I "$ik/include" -I "$ik/ggml/include" -L "$ik/build/src" \
    -L "$ik/build/ggml/src" -lllama -lggml -lm -Wl,-rpath,"$ik/build/src:$ik/build/ggml/src"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
mkdir -p "$out"
PYTHONPATH="$repo" python "$here/make_model_f32.py" "$tmp/f32.gguf" "$out/ik-mixed.tokens.txt"
"$ik/build/bin/llama-quantize" --custom-q "$recipe" "$tmp/f32.gguf" "$out/ik-mixed.gguf" q8_0 2 > "$tmp/quantize.log"
"$ik/build/ik_logits" "$out/ik-mixed.gguf" "$out/ik-mixed.tokens.txt" "$out/ik-mixed.logits.f32" 2> "$tmp/logits.log"
gzip -9nf "$out/ik-mixed.logits.f32"
{
    echo "recipe: --custom-q $recipe (base type q8_0)"
    echo "logits: ik_logits (one batch, -mla 0, no flash attention, 2 threads)"
    echo "ik_llama.cpp commit: $(git -C "$ik" rev-parse HEAD)"
    grep -o "Using custom type [a-z0-9_]* for tensor [^ ]*" "$tmp/quantize.log" | sed 's/Using custom type //'
} > "$out/ik-mixed.manifest.txt"
