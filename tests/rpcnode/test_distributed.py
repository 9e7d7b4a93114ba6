"""Inference across real worker processes on loopback: same logits as local, one round trip per remote segment."""

from __future__ import annotations

import dataclasses
import json
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import psutil
import pytest

from engine import IkctlError, load_model
from engine.config import DeepSeek2Config
from engine.digests import model_digests
from engine.distributed import (
    DistributedNet,
    kv_bytes_per_layer,
    program_bytes_per_layer,
)
from engine.gguf_file import GGUFFile
from engine.model import Options
from engine.placement import PlacementError, devices_for, layer_ops, plan
from engine.placement_spec import placement_spec
from engine.segments import parse_program, program_host_bytes, segment_records
from engine.synth import SynthSpec, write_model
from rpcnode import protocol as P
from rpcnode.client import Client, RPCError
from tests.refs import V3
from tests.rpcnode.conftest import WorkerProc

REF_MODEL = V3
PROMPT = [1, 5, 9, 20, 33, 7, 100, 3, 42, 11]
DECODE = [4, 77, 12, 250, 8]


@pytest.fixture(scope="module")
def synth_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """4 layers (1 dense), Q8_0 weights: quantized bytes travel and are rebuilt on the worker."""
    path = tmp_path_factory.mktemp("synth") / "synth-q8.gguf"
    return write_model(path, SynthSpec(layers=4, dense_layers=1, dtype="Q8_0", seed=7))


def run_sequence(model: object, steps: list[int] = DECODE) -> list[np.ndarray]:
    """All-position logits of the prompt, then one decode at a time, then a truncate and a re-decode."""
    cache = model.new_cache(64)  # type: ignore[attr-defined]
    out = [model.eval(PROMPT, cache, all_logits=True)]  # type: ignore[attr-defined]
    out += [model.eval([t], cache) for t in steps]  # type: ignore[attr-defined]
    cache.truncate(len(PROMPT) + 1)
    out.append(model.eval([steps[-1]], cache))  # type: ignore[attr-defined]
    return out


def assert_same(got: list[np.ndarray], want: list[np.ndarray]) -> None:
    for g, w in zip(got, want, strict=True):
        assert g.shape == w.shape
        assert np.max(np.abs(g - w)) <= 1e-6 * np.max(np.abs(w)), np.max(np.abs(g - w))


def runs(model: object) -> dict[str, int]:
    net = model.net  # type: ignore[attr-defined]
    assert isinstance(net, DistributedNet)
    return {d: c.counters.runs for d, c in net.clients.items()}


# ---- logits equal local logits ----------------------------------------------------------------------------------


def test_all_layers_on_one_worker(workers: Callable[..., WorkerProc]) -> None:
    w = workers()
    want = run_sequence(load_model(REF_MODEL))
    model = load_model(REF_MODEL, rpc=[w.endpoint], n_gpu_layers=99)
    assert [s.device for _, s in model.net.remote] == [w.device]
    assert_same(run_sequence(model), want)
    # one segment holds every layer and the output: one round trip per forward call
    assert len(model.net.remote) == 1
    assert runs(model) == {w.device: 1 + len(DECODE) + 1}


def test_experts_on_a_worker(workers: Callable[..., WorkerProc]) -> None:
    w = workers()
    want = run_sequence(load_model(REF_MODEL))
    model = load_model(REF_MODEL, rpc=w.endpoint, override_tensor=[f"exps={w.device}"])
    n_remote = len(model.net.remote)
    assert n_remote == 2 and all(s.ops[0][1] == "moe_experts" and len(s.ops) == 1 for _, s in model.net.remote)
    assert_same(run_sequence(model), want)
    before = runs(model)[w.device]
    cache = model.new_cache(64)
    model.eval(PROMPT, cache)
    for t in DECODE:
        model.eval([t], cache)
    # round trips per generated token == the number of remote segments, not a multiple
    assert runs(model)[w.device] - before == n_remote * (1 + len(DECODE))


def test_float_activations_reach_the_workers(workers: Callable[..., WorkerProc], synth_model: Path) -> None:
    """--float-activations travels in the segment program: the worker's experts multiply float32 activations
    as the coordinator's attention does, so remote equals local float32 (and not the default integer path)."""
    w = workers()
    exact = run_sequence(load_model(synth_model, float_activations=True))
    fast = run_sequence(load_model(synth_model))
    assert max(np.max(np.abs(a - b)) / np.max(np.abs(b)) for a, b in zip(exact, fast, strict=True)) > 1e-5
    for flag, want in ((True, exact), (False, fast)):
        model = load_model(synth_model, rpc=w.endpoint, override_tensor=[f"exps={w.device}"],
                           float_activations=flag)
        assert model.net.remote
        assert_same(run_sequence(model), want)


def test_alternating_layers_on_two_workers(workers: Callable[..., WorkerProc], synth_model: Path) -> None:
    a, b = workers(), workers()
    want = run_sequence(load_model(synth_model))
    model = load_model(synth_model, rpc=[a.endpoint, b.endpoint],
                       override_tensor=[rf"blk\.[02]\.={a.device}", rf"blk\.[13]\.={b.device}"])
    assert [s.device for _, s in model.net.remote] == [a.device, b.device, a.device, b.device]
    assert_same(run_sequence(model), want)
    assert runs(model) == {a.device: 2 * (len(DECODE) + 2), b.device: 2 * (len(DECODE) + 2)}


@pytest.mark.parametrize("mla", [0, 3])
def test_attention_on_a_worker_with_q8_0_cache(workers: Callable[..., WorkerProc], synth_model: Path,
                                               mla: int) -> None:
    w = workers()
    want = run_sequence(load_model(synth_model, cache_type_k="q8_0", mla=mla))
    model = load_model(synth_model, rpc=w.endpoint, override_tensor=[f"attn={w.device}"], cache_type_k="q8_0",
                       mla=mla)
    assert all(p == "attn" for _, s in model.net.remote for _, p in s.ops)
    assert_same(run_sequence(model), want)
    # the attention layers' KV rows live on the worker, not here
    assert all(not layer for layer in model.new_cache(64).layers)


def test_experts_and_output_remote_across_two_workers(workers: Callable[..., WorkerProc], synth_model: Path) -> None:
    a, b = workers(), workers()
    want = run_sequence(load_model(synth_model))
    model = load_model(synth_model, rpc=f"{a.endpoint},{b.endpoint}", override_tensor=[f"exps={a.device}"],
                       n_gpu_layers=2, tensor_split=[0, 1])
    assert_same(run_sequence(model), want)


def test_cli_run_and_bench_use_workers(workers: Callable[..., WorkerProc], synth_model: Path) -> None:
    w = workers()
    base = [sys.executable, "-m", "tui.cli"]
    common = ["-m", str(synth_model), "-s", "1"]
    local = subprocess.run([*base, "run", *common, "-p", "hi", "-n", "6", "--temp", "0", "-no-cnv"],
                           capture_output=True, text=True, timeout=120)
    remote = subprocess.run([*base, "run", *common, "-p", "hi", "-n", "6", "--temp", "0", "-no-cnv", "--rpc",
                             w.endpoint, "-ngl", "99"], capture_output=True, text=True, timeout=120)
    assert remote.returncode == 0, remote.stderr
    assert remote.stdout == local.stdout
    out = synth_model.parent / "bench.json"
    bench = subprocess.run([*base, "bench", *common, "-c", "128", "-ub", "32", "-n", "4", "--rpc", w.endpoint,
                            "-ot", f"exps={w.device}", "--json", str(out)], capture_output=True, text=True,
                           timeout=120)
    assert bench.returncode == 0, bench.stderr
    assert "|    32 |" in bench.stdout
    # what the workers cost: 3 MoE layers' experts there, one round trip each per forward pass (two warm-up passes,
    # then per step 4 decodes and a prompt batch)
    report = json.loads(out.read_text())
    passes = 2 + len(report["rows"]) * (4 + 1)  # the warm-up's prompt and decode step, then each row's
    (traffic,) = report["workers"]
    assert traffic["device"] == w.device and traffic["round_trips"] == 3 * passes
    assert 0 < traffic["worker_seconds"] < traffic["run_seconds"] and traffic["bytes_sent"] > 0
    assert re.search(rf"^RPC\[{w.endpoint}\]: {traffic['round_trips']} round trips, [0-9.]+ ms each beyond the "
                     r"worker's compute", bench.stdout, re.M)
    gguf = GGUFFile(synth_model)
    experts = sum(t.n_bytes for n, t in gguf.tensors.items() if "exps" in n)
    weights = sum(t.n_bytes for t in gguf.tensors.values())
    assert report["placement"] == {"CPU": weights - experts, w.device: experts}
    gone = subprocess.run([*base, "run", *common, "-n", "2", "--rpc", "127.0.0.1:1", "-ngl", "99"],
                          capture_output=True, text=True, timeout=60)
    assert gone.returncode == 1 and "RPC[127.0.0.1:1]" in gone.stderr and "Traceback" not in gone.stderr


def test_two_models_share_a_worker(workers: Callable[..., WorkerProc], synth_model: Path) -> None:
    w = workers()
    want = run_sequence(load_model(synth_model))
    every = load_model(synth_model, rpc=w.endpoint, n_gpu_layers=99)
    experts = load_model(synth_model, rpc=w.endpoint, override_tensor=[f"exps={w.device}"])
    assert_same(run_sequence(every), want)  # its segments were not replaced by the second model's
    assert_same(run_sequence(experts), want)
    experts.net.close()
    assert_same(run_sequence(every), want)


def test_two_models_generate_at_once_on_one_worker(workers: Callable[..., WorkerProc], synth_model: Path) -> None:
    """Two coordinators' connections run segments on their own worker threads at the same time: the compute lock
    keeps them one at a time, and each gets its own logits."""
    w = workers()
    want = run_sequence(load_model(synth_model))
    models = [load_model(synth_model, rpc=w.endpoint, n_gpu_layers=99),
              load_model(synth_model, rpc=w.endpoint, override_tensor=[f"exps={w.device}"])]
    got: dict[int, list[list[np.ndarray]]] = {0: [], 1: []}
    errors: list[BaseException] = []

    def generate(k: int) -> None:
        try:
            for _ in range(3):
                got[k].append(run_sequence(models[k]))
        except BaseException as e:  # reported by the main thread
            errors.append(e)

    threads = [threading.Thread(target=generate, args=(k,)) for k in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for k in (0, 1):
        for seq in got[k]:
            assert_same(seq, want)
    assert all(runs(m)[w.device] > 0 for m in models)


def test_loopback_peers_never_poll(workers: Callable[..., WorkerProc], synth_model: Path) -> None:
    """A worker on this machine shares its cores with the coordinator: neither side spins for the other."""
    w = workers("--poll", "50")
    model = load_model(synth_model, rpc=w.endpoint, n_gpu_layers=99, rpc_poll=50)
    assert [c.poll_s for c in model.net.clients.values()] == [0.0]
    model.eval(PROMPT, model.new_cache(32))
    assert "connection from 127.0.0.1" in w.log_text() and "polls" not in w.log_text()


def test_llama_model_across_workers(workers: Callable[..., WorkerProc], smollm2_path: Path) -> None:
    """A real llama model (SmolLM2, Q4_1, tied embeddings): every layer on one worker, layers split across two,
    only the FFNs remote: the same logits as local, through prefill, decodes and a truncate; and `ikctl run`
    with its layers on the workers writes the same text."""
    a, b = workers(), workers()
    want = run_sequence(load_model(smollm2_path, ctx_size=64))
    every = load_model(smollm2_path, ctx_size=64, rpc=a.endpoint, n_gpu_layers=99)
    split = load_model(smollm2_path, ctx_size=64, rpc=f"{a.endpoint},{b.endpoint}", n_gpu_layers=99,
                       tensor_split="1,1")
    ffn = load_model(smollm2_path, ctx_size=64, rpc=b.endpoint, override_tensor=[f"ffn_={b.device}"])
    for model in (every, split, ffn):
        assert_same(run_sequence(model), want)
    assert runs(every) == {a.device: 1 + len(DECODE) + 1}  # a round trip per forward pass
    assert len(ffn.net.remote) == ffn.net.cfg.n_layers  # each FFN a segment of its own: a round trip per layer
    assert [s.device for s in split.net.segments] == ["CPU", a.device, b.device]
    base = [sys.executable, "-m", "tui.cli", "run", "-m", str(smollm2_path), "-c", "256", "-p",
            "What is the capital of France?", "-n", "12", "--temp", "0"]
    local = subprocess.run(base, capture_output=True, text=True, timeout=180)
    remote = subprocess.run([*base, "--rpc", f"{a.endpoint},{b.endpoint}", "-ngl", "99"], capture_output=True,
                            text=True, timeout=180)
    assert remote.returncode == 0, remote.stderr
    assert remote.stdout == local.stdout and "Paris" in remote.stdout


# ---- the cache: a second load sends almost nothing; a corrupt entry is replaced ----------------------------------


def test_second_load_sends_under_one_percent(workers: Callable[..., WorkerProc], synth_model: Path) -> None:
    w = workers()
    first = load_model(synth_model, rpc=w.endpoint, n_gpu_layers=99)
    sent = first.net.load_stats.bytes_uploaded
    assert sent > 0
    first.net.close()
    again = load_model(synth_model, rpc=w.endpoint, n_gpu_layers=99)  # the worker still holds them
    assert again.net.load_stats.bytes_uploaded < 0.01 * sent
    w.kill()
    restarted = workers(cache=w.cache)  # a new process: the tensors come from its disk cache
    third = load_model(synth_model, rpc=restarted.endpoint, n_gpu_layers=99)
    assert third.net.load_stats.bytes_uploaded < 0.01 * sent
    with Client.connect(restarted.endpoint) as c:
        t = c.telemetry()
        assert t.cache_misses == 0 and t.cache_hits == third.net.load_stats.tensors_offered
    assert_same(run_sequence(third), run_sequence(load_model(synth_model)))


def test_corrupt_cache_entry_is_replaced(workers: Callable[..., WorkerProc], synth_model: Path) -> None:
    w = workers()
    load_model(synth_model, rpc=w.endpoint, n_gpu_layers=99).net.close()
    w.kill()
    entries = sorted(p for p in w.cache.rglob("*") if p.is_file() and len(p.name) == 64)
    victim = max(entries, key=lambda p: p.stat().st_size)
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    restarted = workers(cache=w.cache)
    model = load_model(synth_model, rpc=restarted.endpoint, n_gpu_layers=99)
    assert model.net.load_stats.tensors_uploaded == 1
    assert model.net.load_stats.bytes_uploaded == len(data)
    assert_same(run_sequence(model), run_sequence(load_model(synth_model)))


# ---- security --------------------------------------------------------------------------------------------------


def test_token_auth(workers: Callable[..., WorkerProc], tmp_path: Path, synth_model: Path,
                    monkeypatch: pytest.MonkeyPatch) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("s3cret-token-of-some-length\n")
    token_file.chmod(0o600)
    w = workers("--token-file", str(token_file))
    with Client.connect(w.endpoint, "s3cret-token-of-some-length") as c:
        assert c.device_info().device == "cpu"
    with pytest.raises(RPCError, match=r"RPC\[127\.0\.0\.1:\d+\].*AUTH_FAILED"):
        Client.connect(w.endpoint, "wrong")
    with pytest.raises(RPCError, match="requires a token"):
        Client.connect(w.endpoint)
    with pytest.raises(IkctlError, match="requires a token"):
        load_model(synth_model, rpc=w.endpoint, n_gpu_layers=99)
    monkeypatch.setenv("IKCTL_RPC_TOKEN_FILE", str(token_file))
    model = load_model(synth_model, rpc=w.endpoint, n_gpu_layers=99)
    token_file.chmod(0o644)  # the coordinator refuses a token file others can read, as the worker does
    with pytest.raises(IkctlError, match=r"\$IKCTL_RPC_TOKEN_FILE: .* is readable by others \(mode 0644\)"):
        load_model(synth_model, rpc=w.endpoint, n_gpu_layers=99)
    assert_same(run_sequence(model), run_sequence(load_model(synth_model)))


def raw_exchange(endpoint: str, frames: list[bytes]) -> list[P.Frame]:
    """Send raw frames, read replies until the worker closes (or 5 s pass)."""
    host, _, port = endpoint.rpartition(":")
    out = []
    with socket.create_connection((host, int(port)), timeout=5) as s:
        for f in frames:
            s.sendall(f)
        try:
            while True:
                out.append(P.recv_frame(s))
        except (EOFError, OSError):
            pass
    return out


def test_a_token_count_that_does_not_fit_the_arrays_is_refused(workers: Callable[..., WorkerProc],
                                                               synth_model: Path) -> None:
    """RunSegment's n_tokens comes from the peer: an experts-only segment (no KV cache to bound it) given 2**31
    tokens and one row answers BAD_ARRAY before anything is sized by it, and the worker keeps serving."""
    w = workers("-m", "256MiB")
    model = load_model(synth_model, rpc=w.endpoint, override_tensor=[f"exps={w.device}"])
    client = model.net.clients[w.device]
    segment_id, _ = model.net.remote[0]
    h = np.zeros((1, model.config.hidden_size), np.float32)
    arrays = [("h", h), ("idx", np.array([[0, 1]], np.int64)), ("w", np.ones((1, 2), np.float32))]  # 2 experts
    for n_tokens in ((1 << 31) - 1, 2, 0):
        with pytest.raises(RPCError, match=r"BAD_ARRAY.*do not fit the arrays"):
            client.run_segment(segment_id, 0, n_tokens, arrays)
    assert set(client.run_segment(segment_id, 0, 1, arrays)) == {"y"}
    assert psutil.Process(w.proc.pid).memory_info().rss < 1 << 30
    assert_same(run_sequence(model), run_sequence(load_model(synth_model)))


def test_a_program_with_absurd_hyper_parameters_is_refused(workers: Callable[..., WorkerProc],
                                                           synth_model: Path) -> None:
    """One small DefineSegment used to make the worker build a billion-entry layer list: the config values are
    bounded before anything is built, the answer is BAD_PROGRAM, and the worker keeps serving."""
    w = workers("-m", "256MiB")
    cfg = DeepSeek2Config.from_gguf(GGUFFile(synth_model))
    (head,) = segment_records(cfg, [], {}, mla=3, amb_bytes=1 << 20, cache_type="f16", n_ctx=64)
    with Client.connect(w.endpoint) as c:
        for key, value in (("cfg.n_layers", 10**9), ("cfg.n_routed_experts", 1 << 30), ("cfg.hidden_size", "x")):
            with pytest.raises(RPCError, match=rf"BAD_PROGRAM.*{re.escape(key)}"):
                c.define_segment(1, [("config", {**head[1], key: value})])
        assert c.define_segment(1, [head]) == 0  # the same program with sane values is taken
    assert psutil.Process(w.proc.pid).memory_info().rss < 1 << 30
    assert_same(run_sequence(load_model(synth_model, rpc=w.endpoint, n_gpu_layers=99)),
                run_sequence(load_model(synth_model)))


def test_a_program_whose_config_does_not_fit_its_tensors_is_refused(workers: Callable[..., WorkerProc],
                                                                     synth_model: Path) -> None:
    """The fuzz campaign's growth without bound: a program over held tensors whose rope dims were 4,000,000 (in
    bounds for an int) made the worker's first attention run build a 4 GB rope table (the cgroup killed it). The
    hyper-parameters that size tables and scratch must be those of the tensors named: refused as BAD_PROGRAM,
    before anything is built, and the worker's memory and its answers stay as they were."""
    w = workers("-m", "256MiB")
    model = load_model(synth_model, rpc=w.endpoint, n_gpu_layers=99)  # holds every tensor
    f = model.gguf
    cfg = DeepSeek2Config.from_gguf(f)
    digests = model_digests(f)
    refs = {n: (digests[n], t.qtype, t.shape) for n, t in f.tensors.items()}
    ops = layer_ops(f.tensors, cfg.n_layers)[1:]  # the embedding stays with the coordinator
    records = segment_records(cfg, ops, refs, mla=3, amb_bytes=1 << 20, cache_type="f16", n_ctx=64)
    head = records[0][1]
    with Client.connect(w.endpoint) as c:
        for key, value, why in (("cfg.rope.n_rot", 4_000_000, "rope dims 4000000 differ"),
                                ("cfg.hidden_size", cfg.hidden_size * 64, "tensor 'blk.0.attn_norm.weight' has shape"),
                                ("cfg.n_heads", cfg.n_heads * 4, "has shape"),
                                ("cfg.moe_intermediate_size", 1 << 20, "has shape")):
            with pytest.raises(RPCError, match=rf"BAD_PROGRAM.*does not fit its tensors: .*{why}"):
                c.define_segment(7, [("config", {**head, key: value}), *records[1:]])
        assert c.define_segment(7, records) == len(records) - 1  # the same program as it is, taken
        x = np.ones((1, cfg.hidden_size), np.float32)
        assert set(c.run_segment(7, 0, 1, [("x", x), ("n_out", np.asarray(1))])) == {"logits"}
    assert psutil.Process(w.proc.pid).memory_info().rss < 1 << 30
    assert_same(run_sequence(model), run_sequence(load_model(synth_model)))
    assert "Traceback" not in w.log_text()


def test_a_programs_own_memory_is_charged(workers: Callable[..., WorkerProc], synth_model: Path) -> None:
    """A runner keeps objects of its own besides the tensors it reads: a float32 copy of each layer's norms, the
    decoded Wk/Wv of each attention layer, an object per op. A peer naming the same held tensors under thousands
    of layers made the worker keep all of that outside -m; now a program is charged before its runner is built,
    refused OUT_OF_MEMORY when it does not fit, and given back when it is freed."""
    w = workers("-m", "24MiB")
    model = load_model(synth_model, rpc=w.endpoint, n_gpu_layers=99)  # holds every tensor
    f = model.gguf
    digests = model_digests(f)

    def program(n_layers: int) -> list[tuple[str, dict[str, object]]]:
        """Layer 0's attention, n_layers times over: every name maps to layer 0's tensors."""
        cfg = dataclasses.replace(DeepSeek2Config.from_gguf(f), n_layers=n_layers)
        refs = {n.replace("blk.0.", f"blk.{i}."): (digests[n], t.qtype, t.shape)
                for n, t in f.tensors.items() if n.startswith("blk.0.attn") for i in range(n_layers)}
        return segment_records(cfg, [(i, "attn") for i in range(n_layers)], refs, mla=3, amb_bytes=1 << 20,
                               cache_type="f16", n_ctx=1)

    with Client.connect(w.endpoint) as c:
        free = c.telemetry().mem_free_bytes
        with pytest.raises(RPCError, match=r"OUT_OF_MEMORY: segment 9: .* and its program \(\d+ bytes\)"):
            c.define_segment(9, program(1024))
        assert c.telemetry().mem_free_bytes == free  # nothing kept from the refusal
        small = program(64)
        c.define_segment(9, small)
        charged = free - c.telemetry().mem_free_bytes
        assert charged >= program_host_bytes(parse_program(small)) > 64 * 8192
        c.free(segment_id=9)
        assert c.telemetry().mem_free_bytes == free
    assert_same(run_sequence(model), run_sequence(load_model(synth_model)))
    assert "Traceback" not in w.log_text()


def test_strings_from_peers_cannot_forge_log_lines(workers: Callable[..., WorkerProc], synth_model: Path,
                                                   tmp_path: Path) -> None:
    """The model name a coordinator sends is logged escaped: a newline in it stays inside the load line."""
    evil = tmp_path / "evil\nrpcnode: forged line\x1b[31m.gguf"
    evil.write_bytes(synth_model.read_bytes())
    w = workers()
    model = load_model(evil, rpc=w.endpoint, n_gpu_layers=99)
    model.logits([1, 2, 3])
    deadline = time.monotonic() + 10
    while "model load:" not in w.log_text() and time.monotonic() < deadline:
        time.sleep(0.05)
    lines = w.log_text().splitlines()
    (load,) = [ln for ln in lines if "model load:" in ln]
    assert "evil\\nrpcnode: forged line\\x1b[31m.gguf" in load
    assert not any(ln.startswith("rpcnode: forged") for ln in lines) and "\x1b" not in w.log_text()


def test_nothing_before_auth(workers: Callable[..., WorkerProc], tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("tok-of-sixteen-chars")
    token_file.chmod(0o600)
    w = workers("--token-file", str(token_file))
    # a telemetry request (and a huge payload declaration) before Hello: refused from the header, then closed
    for frame in (P.encode_frame(P.TelemetryRequest(), 1),
                  P.HEADER.pack(P.MAGIC, 1, 0, int(P.Kind.UPLOAD_TENSOR), 0, 1, 10, 1 << 40)):
        replies = raw_exchange(w.endpoint, [frame])
        assert len(replies) == 1 and isinstance(replies[0].message, P.ErrorReply)
        assert replies[0].message.code == P.ErrorCode.AUTH_REQUIRED and replies[0].message.fatal
    # after Hello, still nothing but Auth
    replies = raw_exchange(w.endpoint, [P.encode_frame(P.Hello(), 1), P.encode_frame(P.TelemetryRequest(), 2)])
    assert isinstance(replies[0].message, P.HelloReply) and replies[0].message.auth_required
    assert replies[1].message.code == P.ErrorCode.AUTH_REQUIRED
    with Client.connect(w.endpoint, "tok-of-sixteen-chars") as c:  # and the worker keeps serving
        assert c.telemetry().tensors_held == 0


# ---- failures ----------------------------------------------------------------------------------------------------


def test_sigkill_during_generation_names_the_worker(workers: Callable[..., WorkerProc], synth_model: Path) -> None:
    w = workers()
    model = load_model(synth_model, rpc=w.endpoint, override_tensor=[f"exps={w.device}"], failover=False)
    cache = model.new_cache(512)
    model.eval(PROMPT, cache)
    killer = threading.Timer(0.5, w.kill)
    killer.start()
    t0 = time.monotonic()
    with pytest.raises(RPCError, match=rf"RPC\[{w.endpoint}\]"):
        for k in range(400):
            model.eval([k % 200], cache)
            if time.monotonic() - t0 > 30:
                break
    assert time.monotonic() - t0 < 10
    killer.join()


def _worker_need(model_path: Path, ctx_size: int, **flags: object) -> tuple[int, int, int]:
    """(weight bytes, KV bytes, program bytes) the planner puts on the one worker for these flags."""
    f = GGUFFile(model_path)
    opts = Options(ctx_size=ctx_size, **flags)  # type: ignore[arg-type]
    rules = placement_spec(opts).rules
    cfg = DeepSeek2Config.from_gguf(f)
    p = plan(f.tensors.values(), cfg.n_layers, devices_for(rules.rpc), rules,
             kv_bytes_per_layer=kv_bytes_per_layer(cfg, opts),
             program_bytes_per_layer=program_bytes_per_layer(cfg, opts, f.tensors.values()))
    dev = f"RPC[{rules.rpc[0]}]"
    return p.bytes_per_device[dev], p.kv_bytes_per_device[dev], p.program_bytes_per_device[dev]


def test_kv_cache_counts_against_worker_memory(workers: Callable[..., WorkerProc], synth_model: Path) -> None:
    port = "127.0.0.1:1"  # any endpoint: only the plan is computed
    weights, kv_256, programs = _worker_need(synth_model, 256, rpc=port, n_gpu_layers=99, cache_type_k="f32")
    _, kv_4096, _ = _worker_need(synth_model, 4096, rpc=port, n_gpu_layers=99, cache_type_k="f32")
    assert kv_256 > 0 and kv_4096 == 16 * kv_256
    w = workers("-m", str(weights + kv_256 + programs))  # what the plan counts is enough
    flags = {"rpc": w.endpoint, "n_gpu_layers": 99, "cache_type_k": "f32"}
    model = load_model(synth_model, ctx_size=256, **flags)
    assert_same(run_sequence(model), run_sequence(load_model(synth_model, ctx_size=256, cache_type_k="f32")))
    with Client.connect(w.endpoint) as c:
        assert c.telemetry().kv_bytes == kv_256
    model.net.close()
    # the planner counts the KV cache of the whole context...
    with pytest.raises(PlacementError, match=r"weights \+ .* KV cache for -c"):
        load_model(synth_model, ctx_size=4096, **flags)
    # ...and so does the worker, when told it has more memory than it does
    with pytest.raises(RPCError, match=rf"OUT_OF_MEMORY.*KV cache for 4096 positions \(f32, {kv_4096} bytes\)"):
        load_model(synth_model, ctx_size=4096, device_mem=[f"{w.device}=1GiB"], **flags)


def test_worker_capacity_splits_layers(workers: Callable[..., WorkerProc], synth_model: Path) -> None:
    # without -ts, layers split by each worker's reported memory, as llama.cpp splits by free memory
    small, big = workers("-m", "1GiB"), workers("-m", "3GiB")
    model = load_model(synth_model, rpc=[small.endpoint, big.endpoint], n_gpu_layers=4)
    layers = {d: model.net.placement.layers_of(d) for d in (small.device, big.device)}
    assert layers == {small.device: [0], big.device: [1, 2, 3]}
    assert_same(run_sequence(model), run_sequence(load_model(synth_model)))


def test_a_token_per_worker(workers: Callable[..., WorkerProc], tmp_path: Path, synth_model: Path) -> None:
    files = [tmp_path / "a", tmp_path / "b"]
    for f, tok in zip(files, ("token-a-0123456789", "token-b-0123456789"), strict=True):
        f.write_text(tok)
        f.chmod(0o600)
    a, b = (workers("--token-file", str(f)) for f in files)
    tokens = {a.endpoint: "token-a-0123456789", b.endpoint: "token-b-0123456789"}
    model = load_model(synth_model, rpc=[a.endpoint, b.endpoint], n_gpu_layers=99, rpc_token=tokens)
    assert_same(run_sequence(model), run_sequence(load_model(synth_model)))
    with pytest.raises(IkctlError, match=rf"{re.escape(b.device)}.*AUTH_FAILED"):
        load_model(synth_model, rpc=[a.endpoint, b.endpoint], n_gpu_layers=99, rpc_token="token-a-0123456789")


def test_telemetry_answers_while_a_segment_runs(workers: Callable[..., WorkerProc], synth_model: Path) -> None:
    w = workers()
    model = load_model(synth_model, rpc=w.endpoint, n_gpu_layers=99, ubatch_size=256)
    stop = threading.Event()

    def busy() -> None:
        while not stop.is_set():
            model.eval(list(range(256)), model.new_cache(512))

    t = threading.Thread(target=busy)
    t.start()
    try:
        time.sleep(0.3)
        with Client.connect(w.endpoint) as c:
            t0 = time.monotonic()
            tel = c.telemetry()
            assert time.monotonic() - t0 < 2.0
            assert tel.tensors_held > 0 and tel.bytes_in > 0
    finally:
        stop.set()
        t.join()


def test_with_options_keeps_the_workers(workers: Callable[..., WorkerProc], synth_model: Path) -> None:
    w = workers()
    model = load_model(synth_model, rpc=w.endpoint, n_gpu_layers=99, ctx_size=64)
    small = model.with_options(ubatch_size=3, ctx_size=32)
    assert small.net is model.net and small.options.ubatch_size == 3 and small.n_ctx == 32
    assert_same(run_sequence(small), run_sequence(load_model(synth_model, ctx_size=32, ubatch_size=3)))
    with pytest.raises(IkctlError, match=r"-c 128 is more than the context the workers were loaded with \(64\)"):
        model.with_options(ctx_size=128)
    with pytest.raises(IkctlError, match="n_gpu_layers cannot change without loading the model again"):
        model.with_options(n_gpu_layers=1)

