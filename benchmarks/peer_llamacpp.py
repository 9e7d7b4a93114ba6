"""llama.cpp peer benchmark: ik_llama.cpp's llama-sweep-bench over llama-cpp-python's low-level API."""

# python benchmarks/peer_llamacpp.py -m MODEL.gguf -t 2 -c 512 -ub 128 -n 32 [-fa] [--no-extra-bufts] [--jsonl]
#
# At each KV depth N_KV = 0, ub, 2ub, ... (while a PP batch still fits in -c) it times -n single-token decodes
# (TG), removes them from the KV cache, then times one batch of -ub random tokens (PP), which stays in the cache
# and deepens it for the next row: the order and the arithmetic of llama-sweep-bench.
#
# llama-cpp-python is an optional peer dependency (never a CI one). Build it without GGML_NATIVE, so that it has
# no AMX buffer type (see below) but keeps AVX-512:
#   CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX512=ON -DGGML_AVX512_VBMI=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON" \
#   CMAKE_BUILD_PARALLEL_LEVEL=2 pip install --no-binary llama-cpp-python llama-cpp-python==0.3.36
#
# Weights are loaded with llama.cpp's CPU "extra buffer types" (use_extra_bufts = true): CPU_REPACK interleaves
# Q4_0/Q4_K/IQ4_NL rows for its AVX2/AVX-512 GEMM kernels, about 2x llama.cpp's Q4_K speed here.
# --no-extra-bufts loads them plain, which a GGML_NATIVE build on an AMX Xeon needs: there it compiles in the AMX
# buffer type, and llama.cpp then puts every weight whose matmul AMX accepts there. That breaks two ways here:
#   - deepseek2 (MLA): attn_k_b/attn_v_b land in AMX (the loader's probe uses a contiguous activation), but
#     the graph multiplies them by a permuted one (q_nope), which AMX's supports_op refuses and the CPU backend
#     cannot read from a non-host AMX buffer, so no backend takes the op and context creation aborts with
#     ggml-backend.cpp GGML_ASSERT(*cur_backend_id != -1);
#   - any model with AMX kernels (Q4_0/Q4_1/Q8_0/K-quants): SIGILL (tileloadd) at the first multi-token batch,
#     because GCC 12's _tile_loadconfig declares an 8-byte memory operand, so the compiler drops the tile
#     shapes before ldtilecfg and the tiles stay unconfigured.
# CPU_REPACK has no x86 kernels for Q8_0 or Q4_1, so for those the flag makes no difference.

from __future__ import annotations

import argparse
import ctypes
import importlib
import json
import random
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from types import ModuleType
from typing import Any

INSTALL_HINT = "llama-cpp-python is not installed: pip install llama-cpp-python==0.3.36 (the optional `peer` extra)"
ROW_KEYS = ("n_kv", "pp", "tg", "t_pp", "speed_pp", "t_tg", "speed_tg")
GGML_LOG_LEVEL_ERROR = 3
GGML_LOG_LEVEL_CONT = 5


class PeerUnavailableError(RuntimeError):
    """llama-cpp-python is not importable."""


def load_llama_cpp() -> ModuleType:
    """Import llama_cpp lazily; raise PeerUnavailableError with the install hint when it is missing."""
    try:
        return importlib.import_module("llama_cpp")
    except ImportError as exc:
        raise PeerUnavailableError(INSTALL_HINT) from exc


def depths(ctx: int, ubatch: int, n_gen: int) -> list[int]:
    """The sweep's N_KV values: every multiple of ubatch whose PP batch (and TG tokens) fit in ctx."""
    if ubatch < 1 or n_gen < 1:
        raise ValueError(f"ubatch and n_gen must be >= 1, got {ubatch} and {n_gen}")
    out = [n_kv for n_kv in range(0, ctx - ubatch + 1, ubatch) if n_kv + n_gen <= ctx]
    if not out:
        raise ValueError(f"ctx={ctx} holds no PP batch of {ubatch} tokens")
    return out


def _model_params(llama: ModuleType, extra_bufts: bool) -> Any:
    """llama_model_params for a CPU-only load, with or without the CPU extra buffer types (AMX, CPU_REPACK)."""
    params = llama.llama_model_default_params()
    params.n_gpu_layers = 0
    params.use_extra_bufts = extra_bufts
    return params


def _context_params(llama: ModuleType, threads: int, ctx: int, ubatch: int, flash_attn: bool) -> Any:
    """llama_context_params for one sequence of `ctx` tokens decoded in batches of `ubatch`."""
    params = llama.llama_context_default_params()
    params.n_ctx = ctx
    params.n_batch = ubatch
    params.n_ubatch = ubatch
    params.n_seq_max = 1
    params.n_threads = threads
    params.n_threads_batch = threads
    params.flash_attn_type = llama.LLAMA_FLASH_ATTN_TYPE_ENABLED if flash_attn else llama.LLAMA_FLASH_ATTN_TYPE_DISABLED
    params.no_perf = True
    return params


@contextmanager
def _log_filter(llama: ModuleType, verbose: bool) -> Iterator[None]:
    """Pass llama.cpp's log to stderr (all of it when verbose, else errors); restore llama_cpp's logger after."""
    state = {"last": 0}

    @llama.llama_log_callback
    def callback(level: int, text: bytes, _user: ctypes.c_void_p) -> None:
        level = state["last"] if level == GGML_LOG_LEVEL_CONT else level
        state["last"] = level
        if verbose or level == GGML_LOG_LEVEL_ERROR:
            sys.stderr.write(text.decode("utf-8", "replace"))

    llama.llama_log_set(callback, ctypes.c_void_p(0))
    try:
        yield
    finally:
        previous = getattr(getattr(llama, "_logger", None), "llama_log_callback", None)
        if previous is not None:
            llama.llama_log_set(previous, ctypes.c_void_p(0))


@contextmanager
def _loaded(llama: ModuleType, model_path: str, extra_bufts: bool, cparams: Any) -> Iterator[tuple[Any, Any]]:
    """Load the model and create its context; free both afterwards."""
    llama.llama_backend_init()
    model = llama.llama_model_load_from_file(model_path.encode(), _model_params(llama, extra_bufts))
    if not model:
        raise RuntimeError(f"llama.cpp could not load {model_path}")
    try:
        context = llama.llama_init_from_model(model, cparams)
        if not context:
            raise RuntimeError(f"llama.cpp could not create a context for {model_path}")
        try:
            yield model, context
        finally:
            llama.llama_free(context)
    finally:
        llama.llama_model_free(model)


class _Runner:
    """Sequence 0's batch, timed decodes and KV-cache trimming."""

    def __init__(self, llama: ModuleType, context: Any, n_vocab: int, capacity: int, seed: int) -> None:
        self.llama, self.context, self.n_vocab = llama, context, n_vocab
        self.batch = llama.llama_batch_init(capacity, 0, 1)
        self.memory = llama.llama_get_memory(context)
        self.rng = random.Random(seed)

    def close(self) -> None:
        self.llama.llama_batch_free(self.batch)

    def trim(self, n_kv: int) -> None:
        """Drop every cached position >= n_kv."""
        if not self.llama.llama_memory_seq_rm(self.memory, 0, n_kv, -1):
            raise RuntimeError(f"llama.cpp could not trim the KV cache to {n_kv} tokens")

    def _fill(self, start: int, n_tokens: int) -> None:
        """Random valid token ids at positions start.., logits for the last one only."""
        batch = self.batch
        for i in range(n_tokens):
            batch.token[i] = self.rng.randrange(self.n_vocab)
            batch.pos[i] = start + i
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = 0
            batch.logits[i] = i == n_tokens - 1
        batch.n_tokens = n_tokens

    def decode(self, start: int, n_tokens: int) -> float:
        """Decode n_tokens random tokens at positions start..; return the wall-clock seconds it took."""
        self._fill(start, n_tokens)
        t0 = time.perf_counter()
        rc = self.llama.llama_decode(self.context, self.batch)
        self.llama.llama_synchronize(self.context)
        elapsed = time.perf_counter() - t0
        if rc != 0:
            raise RuntimeError(f"llama_decode failed with {rc} at position {start}")
        return elapsed

    def warm_up(self, ubatch: int) -> None:
        """One token and one full batch (pages in every expert of an mmap'd MoE), then an empty cache."""
        self.decode(0, 1)
        self.decode(1, ubatch)
        self.trim(0)


def _row(n_kv: int, pp: int, tg: int, t_pp: float, t_tg: float) -> dict[str, Any]:
    return {"n_kv": n_kv, "pp": pp, "tg": tg, "t_pp": t_pp, "speed_pp": pp / t_pp, "t_tg": t_tg, "speed_tg": tg / t_tg}


def _sweep_rows(runner: _Runner, ctx: int, ubatch: int, n_gen: int) -> list[dict[str, Any]]:
    """sweep-bench's loop: at each depth, time n_gen single-token decodes, drop them, then time one PP batch."""
    rows = []
    for n_kv in depths(ctx, ubatch, n_gen):
        runner.trim(n_kv)
        t_tg = sum(runner.decode(n_kv + i, 1) for i in range(n_gen))
        runner.trim(n_kv)
        t_pp = runner.decode(n_kv, ubatch)
        rows.append(_row(n_kv, ubatch, n_gen, t_pp, t_tg))
    return rows


def sweep(
    model_path: str,
    threads: int,
    ctx: int,
    ubatch: int,
    n_gen: int,
    *,
    flash_attn: bool = False,
    extra_bufts: bool = True,
    seed: int = 0,
    verbose: bool = False,
) -> list[dict[str, Any]]:
    """Measure llama.cpp like llama-sweep-bench; one row per N_KV in depths(ctx, ubatch, n_gen).

    Each row holds the sweep-bench JSONL keys ROW_KEYS: a PP batch of `ubatch` random tokens at depth n_kv
    (t_pp seconds, speed_pp tokens/s) and `n_gen` single-token decodes at the same depth (t_tg, speed_tg).
    Raises PeerUnavailableError when llama-cpp-python is not installed.
    """
    depths(ctx, ubatch, n_gen)  # validate before loading anything
    llama = load_llama_cpp()
    cparams = _context_params(llama, threads, ctx, ubatch, flash_attn)
    with _log_filter(llama, verbose), _loaded(llama, model_path, extra_bufts, cparams) as (model, context):
        n_vocab = llama.llama_vocab_n_tokens(llama.llama_model_get_vocab(model))
        runner = _Runner(llama, context, n_vocab, ubatch, seed)
        try:
            runner.warm_up(min(ubatch, ctx - 1))
            return _sweep_rows(runner, ctx, ubatch, n_gen)
        finally:
            runner.close()


def quantize(source: str, dest: str, ftype: str, threads: int = 0, verbose: bool = False) -> None:
    """Quantize a GGUF with llama.cpp's own quantizer (its default params); ftype is a LLAMA_FTYPE_MOSTLY_ suffix
    such as Q4_K_M or Q8_0. Raises PeerUnavailableError when llama-cpp-python is not installed."""
    llama = load_llama_cpp()
    params = llama.llama_model_quantize_default_params()
    params.ftype = getattr(llama, f"LLAMA_FTYPE_MOSTLY_{ftype}")
    params.nthread = threads
    with _log_filter(llama, verbose):
        llama.llama_backend_init()
        rc = llama.llama_model_quantize(source.encode(), dest.encode(), ctypes.byref(params))
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize({source} -> {ftype}) failed with {rc}")


def format_table(rows: list[dict[str, Any]]) -> str:
    """sweep-bench's markdown table."""
    lines = [
        f"|{'PP':>6} | {'TG':>6} | {'N_KV':>6} | {'T_PP s':>8} | {'S_PP t/s':>8} | {'T_TG s':>8} | {'S_TG t/s':>8} |",
        f"|{'-' * 7}|{'-' * 8}|{'-' * 8}|{'-' * 10}|{'-' * 10}|{'-' * 10}|{'-' * 10}|",
    ]
    for r in rows:
        lines.append(
            f"|{r['pp']:6d} | {r['tg']:6d} | {r['n_kv']:6d} | {r['t_pp']:8.3f} | {r['speed_pp']:8.2f} | "
            f"{r['t_tg']:8.3f} | {r['speed_tg']:8.2f} |"
        )
    return "\n".join(lines)


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-m", "--model", required=True, help="GGUF file")
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("-c", "--ctx", type=int, default=512, help="KV cache size (largest N_KV + ubatch)")
    ap.add_argument("-ub", "--ubatch", type=int, default=128, help="PP batch and sweep step")
    ap.add_argument("-n", "--n-gen", type=int, default=32, help="TG tokens per row")
    ap.add_argument("-fa", "--flash-attn", action="store_true")
    ap.add_argument("--extra-bufts", action=argparse.BooleanOptionalAction, default=True,
                    help="let llama.cpp use its CPU_REPACK (and, in a native build, AMX) weight buffers (default: on)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the random token ids")
    ap.add_argument("--jsonl", action="store_true", help="sweep-bench JSONL lines instead of the table")
    ap.add_argument("-v", "--verbose", action="store_true", help="show llama.cpp's log")
    return ap.parse_args(argv)


def _jsonl(rows: list[dict[str, Any]], args: argparse.Namespace) -> str:
    head = {"n_kv_max": args.ctx, "n_batch": args.ubatch, "n_ubatch": args.ubatch, "flash_attn": int(args.flash_attn)}
    head |= {"n_gpu_layers": 0, "n_threads": args.threads, "n_threads_batch": args.threads}
    return "\n".join(json.dumps(head | r) for r in rows)


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    try:
        rows = sweep(
            args.model,
            args.threads,
            args.ctx,
            args.ubatch,
            args.n_gen,
            flash_attn=args.flash_attn,
            extra_bufts=args.extra_bufts,
            seed=args.seed,
            verbose=args.verbose,
        )
    except PeerUnavailableError as exc:
        print(exc, file=sys.stderr)
        return 2
    print(_jsonl(rows, args) if args.jsonl else format_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
