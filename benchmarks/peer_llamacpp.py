"""llama.cpp peer benchmark: ik_llama.cpp's llama-sweep-bench over llama-cpp-python's low-level API."""

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
# Weight placements (`weights=`): which CPU buffer types llama.cpp may put the model's weights in.
#   safe:    its extra buffer types (AMX, CPU_REPACK) except for the MLA attn_k_b/attn_v_b weights, which go to
#            the plain CPU buffer: their matmuls take a permuted (non-contiguous) activation that the AMX kernel
#            refuses, and then no backend supports the op (GGML_ASSERT(*cur_backend_id != -1) at context creation).
#   plain:   no extra buffer type at all (use_extra_bufts = false): no AMX, no repacking.
#   default: llama.cpp's own choice (aborts on deepseek2 with an AMX build, see above).
WEIGHTS = ("safe", "plain", "default")
SAFE_OVERRIDE = rb"attn_k_b|attn_v_b"
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


class _BuftOverride(ctypes.Structure):
    _fields_ = (("pattern", ctypes.c_char_p), ("buft", ctypes.c_void_p))


def _cpu_buffer_type(llama: ModuleType) -> int:
    """The address of ggml's plain CPU buffer type (ggml_backend_cpu_buffer_type)."""
    fn = llama.llama_cpp._lib.ggml_backend_cpu_buffer_type
    fn.restype, fn.argtypes = ctypes.c_void_p, []
    return int(fn())


def _model_params(llama: ModuleType, weights: str, keep: list[Any]) -> Any:
    """llama_model_params for a CPU-only load with the given weight placement; `keep` holds ctypes buffers alive."""
    if weights not in WEIGHTS:
        raise ValueError(f"weights must be one of {WEIGHTS}, not {weights!r}")
    params = llama.llama_model_default_params()
    params.n_gpu_layers = 0
    params.use_extra_bufts = weights != "plain"
    if weights == "safe":
        overrides = (_BuftOverride * 2)(_BuftOverride(SAFE_OVERRIDE, _cpu_buffer_type(llama)), _BuftOverride())
        keep.append(overrides)
        params.tensor_buft_overrides = ctypes.cast(overrides, ctypes.c_void_p)
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
def _quiet_logs(llama: ModuleType, verbose: bool) -> Iterator[None]:
    """Route llama.cpp's log to stderr: everything when verbose, else errors only."""
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
        llama.llama_log_set(callback, ctypes.c_void_p(0))


@contextmanager
def _loaded(llama: ModuleType, model_path: str, weights: str, cparams: Any) -> Iterator[tuple[Any, Any]]:
    """Load the model and create its context; free both afterwards."""
    keep: list[Any] = []
    llama.llama_backend_init()
    model = llama.llama_model_load_from_file(model_path.encode(), _model_params(llama, weights, keep))
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
    """One sequence's batch, decode and KV-cache trimming, with wall-clock timing."""

    def __init__(self, llama: ModuleType, context: Any, n_vocab: int, capacity: int, seed: int) -> None:
        self.llama, self.context, self.n_vocab = llama, context, n_vocab
        self.batch = llama.llama_batch_init(capacity, 0, 1)
        self.memory = llama.llama_get_memory(context)
        self.rng = random.Random(seed)

    def close(self) -> None:
        self.llama.llama_batch_free(self.batch)

    def trim(self, n_kv: int) -> None:
        """Drop every cached position >= n_kv of sequence 0."""
        if not self.llama.llama_memory_seq_rm(self.memory, 0, n_kv, -1):
            raise RuntimeError(f"llama.cpp could not trim the KV cache to {n_kv} tokens")

    def decode(self, start: int, n_tokens: int, token: int | None = None) -> float:
        """Decode n_tokens random tokens (or `token`) at positions start...; return the seconds it took."""
        batch = self.batch
        for i in range(n_tokens):
            batch.token[i] = self.rng.randrange(self.n_vocab) if token is None else token
            batch.pos[i] = start + i
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = 0
            batch.logits[i] = i == n_tokens - 1
        batch.n_tokens = n_tokens
        t0 = time.perf_counter()
        rc = self.llama.llama_decode(self.context, batch)
        self.llama.llama_synchronize(self.context)
        elapsed = time.perf_counter() - t0
        if rc != 0:
            raise RuntimeError(f"llama_decode failed with {rc} at position {start}")
        return elapsed


def _row(n_kv: int, pp: int, tg: int, t_pp: float, t_tg: float) -> dict[str, Any]:
    return {"n_kv": n_kv, "pp": pp, "tg": tg, "t_pp": t_pp, "speed_pp": pp / t_pp, "t_tg": t_tg, "speed_tg": tg / t_tg}


def _sweep_rows(runner: _Runner, ctx: int, ubatch: int, n_gen: int) -> list[dict[str, Any]]:
    """sweep-bench's loop: at each depth n_kv, time n_gen single-token decodes, drop them, then time one PP batch."""
    rows = []
    for n_kv in range(0, ctx - ubatch + 1, ubatch):
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
    weights: str = "safe",
    flash_attn: bool = False,
    seed: int = 0,
    verbose: bool = False,
) -> list[dict[str, Any]]:
    """Measure llama.cpp like llama-sweep-bench; one row per KV depth 0, ubatch, 2*ubatch, ... < ctx.

    Each row has the sweep-bench JSONL keys (ROW_KEYS): the PP batch of `ubatch` random tokens at depth n_kv
    (t_pp seconds, speed_pp tokens/s) and `n_gen` single-token decodes at the same depth (t_tg, speed_tg).
    """
    if ubatch < 1 or n_gen < 0 or ctx < ubatch + n_gen:
        raise ValueError(f"need 1 <= ubatch and ubatch + n_gen <= ctx, got ctx={ctx} ubatch={ubatch} n_gen={n_gen}")
    llama = load_llama_cpp()
    cparams = _context_params(llama, threads, ctx, ubatch, flash_attn)
    with _quiet_logs(llama, verbose), _loaded(llama, model_path, weights, cparams) as (model, context):
        vocab = llama.llama_model_get_vocab(model)
        runner = _Runner(llama, context, llama.llama_vocab_n_tokens(vocab), ubatch, seed)
        try:
            runner.decode(0, 1, token=max(llama.llama_vocab_bos(vocab), 0))  # warm-up, as sweep-bench does
            runner.trim(0)
            return _sweep_rows(runner, ctx, ubatch, n_gen)
        finally:
            runner.close()


def format_table(rows: list[dict[str, Any]]) -> str:
    """sweep-bench's markdown table."""
    lines = ["|    PP |     TG |   N_KV |   T_PP s | S_PP t/s |   T_TG s | S_TG t/s |"]
    lines.append("|-------|--------|--------|----------|----------|----------|----------|")
    for r in rows:
        lines.append(
            f"|{r['pp']:6d} | {r['tg']:6d} | {r['n_kv']:6d} | {r['t_pp']:8.3f} | {r['speed_pp']:8.2f} | "
            f"{r['t_tg']:8.3f} | {r['speed_tg']:8.2f} |"
        )
    return "\n".join(lines)


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("-m", "--model", required=True, help="GGUF file")
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("-c", "--ctx", type=int, default=512, help="KV cache size (N_KV max)")
    ap.add_argument("-ub", "--ubatch", type=int, default=128, help="PP batch size and sweep step")
    ap.add_argument("-n", "--n-gen", type=int, default=32, help="TG tokens per step")
    ap.add_argument("--weights", choices=WEIGHTS, default="safe", help="weight buffer placement (see module)")
    ap.add_argument("-fa", "--flash-attn", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--jsonl", action="store_true", help="print JSONL rows instead of the table")
    ap.add_argument("-v", "--verbose", action="store_true", help="show llama.cpp's log")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    try:
        rows = sweep(
            args.model, args.threads, args.ctx, args.ubatch, args.n_gen,
            weights=args.weights, flash_attn=args.flash_attn, seed=args.seed, verbose=args.verbose,
        )
    except PeerUnavailableError as exc:
        print(exc, file=sys.stderr)
        return 2
    print("\n".join(json.dumps(r) for r in rows) if args.jsonl else format_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
