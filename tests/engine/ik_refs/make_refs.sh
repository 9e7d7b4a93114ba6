#!/usr/bin/env bash
# Rebuilds the reference files in this directory from ik_llama.cpp's own quantizer/dequantizer (see README.md).
# Usage: tests/engine/ik_refs/make_refs.sh [IK_LLAMA_DIR]   (default /work/peers/ik_llama.cpp)
# Clones ik_llama.cpp there if missing, builds its ggml library (Release, GGML_NATIVE) and runs make_refs.c.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
ik="${1:-/work/peers/ik_llama.cpp}"
mirror="${IK_LLAMA_MIRROR:-https://github.com/ikawrakow/ik_llama.cpp}"
if [ ! -d "$ik/ggml" ]; then
    git clone --no-checkout "$mirror" "$ik"
    # the repository holds a few large files that are not needed (and may be missing from a mirror)
    git -C "$ik" sparse-checkout set --no-cone '/*' '!/models/*.gguf' '!/examples/server/public_llamacpp' \
        '!/examples/server/webui/dist'
    git -C "$ik" checkout
fi
cmake -S "$ik" -B "$ik/build" -DGGML_NATIVE=ON -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF \
    -DBUILD_SHARED_LIBS=ON -DGGML_OPENMP=OFF > /dev/null
nice -n 15 cmake --build "$ik/build" --target ggml -j2
lib="$(dirname "$(find "$ik/build" -name 'libggml.so' | head -1)")"
tool="$ik/build/make_refs"
cc -O2 -o "$tool" "$here/make_refs.c" -I "$ik/ggml/include" -L "$lib" -lggml -lm -Wl,-rpath,"$lib"
rm -f "$here"/*.q "$here"/*.f32 "$here"/*.f32.gz
"$tool" "$here" | tee "$here/manifest.txt"
gzip -9n "$here"/*.f32  # decoded values compress well; the tests read them with gzip
echo "ik_llama.cpp commit: $(git -C "$ik" rev-parse HEAD)" >> "$here/manifest.txt"
