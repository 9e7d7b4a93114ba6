"""Predicted decode speed of DeepSeek-V3 Q4_K_M on 4 machines of 128 GB over 10 GbE, three placements, from one
machine's measured decode speed and a link's figures (engine.speed_model); and the same model checked against
benchmarks/expert_parallel_bench.py's measurements (issue 16).

    python benchmarks/predict_speed.py [--gbps G] [--rtt-ms R] [--gbit B] [--check EP_BENCH.json]

--gbps: one machine's decode speed, GB of weights read per second (default: ikctl's measured on this 2-core VM,
the bench model -t 1 all local, from --check's file when given; its one-worker run also gives a round trip's
software cost). --rtt-ms/--gbit: the link (default 0.4 ms, as
measured through lan_bench's namespace, and 10 Gbit/s). The model's tensors are sized from DeepSeek-V3's
hyper-parameters at Q4_K_M's mean 4.82 bits per weight (671B parameters in 404 GB); no file is read.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from engine.config import DeepSeek2Config, RopeConfig  # noqa: E402
from engine.gguf_file import GGUFFile  # noqa: E402
from engine.placement import (  # noqa: E402
    CPU,
    PlacementRules,
    devices_for,
    layer_ops,
    plan,
)
from engine.speed_model import Link, Prediction, model_shape, predict  # noqa: E402

Q4_K_M_BITS = 4.82
MACHINE_BYTES = 128 * 10**9
WORKERS = ("10.0.0.2:50052", "10.0.0.3:50052", "10.0.0.4:50052")

V3 = DeepSeek2Config(n_vocab=129280, hidden_size=7168, n_layers=61, n_heads=128, q_lora_rank=1536,
                     kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
                     intermediate_size=18432, moe_intermediate_size=2048, n_routed_experts=256, n_experts_per_tok=8,
                     n_shared_experts=1, first_k_dense_replace=3, routed_scaling_factor=2.5, norm_topk_prob=True,
                     gating_func=2, n_group=8, topk_group=4, rms_norm_eps=1e-6, context_length=163840,
                     rope=RopeConfig(n_rot=64))


def v3_tensor_bytes() -> dict[str, int]:
    """Every tensor of DeepSeek-V3 (split MLA form) at Q4_K_M's mean bits per weight."""
    shapes = V3.tensor_shapes()

    def size(shape: tuple[int, ...]) -> int:
        n = 1
        for d in shape:
            n *= d
        return int(n * Q4_K_M_BITS / 8)

    out = {"token_embd.weight": size((V3.n_vocab, V3.hidden_size)), "output.weight": size((V3.n_vocab,
                                                                                          V3.hidden_size))}
    layer = ["attn_norm.weight", "attn_q_a.weight", "attn_q_a_norm.weight", "attn_q_b.weight",
             "attn_kv_a_mqa.weight", "attn_kv_a_norm.weight", "attn_k_b.weight", "attn_v_b.weight",
             "attn_output.weight", "ffn_norm.weight"]
    dense = ["ffn_gate.weight", "ffn_up.weight", "ffn_down.weight"]
    moe = ["ffn_gate_inp.weight", "exp_probs_b.bias", "ffn_gate_exps.weight", "ffn_up_exps.weight",
           "ffn_down_exps.weight", "ffn_gate_shexp.weight", "ffn_up_shexp.weight", "ffn_down_shexp.weight"]
    for i in range(V3.n_layers):
        for name in layer + (dense if i < V3.first_k_dense_replace else moe):
            out[f"blk.{i}.{name}"] = size(shapes[name][0])
    return out


def v3_placements() -> dict[str, list[str]]:
    """-ot rules of the three placements on a coordinator and three workers (each within 128 GB)."""
    a, b, c = (f"RPC[{w}]" for w in WORKERS)
    moe = list(range(V3.first_k_dense_replace, V3.n_layers))

    def layers(ids: list[int]) -> str:
        return "blk\\.(" + "|".join(map(str, ids)) + ")\\."

    # experts by layer ranges: the coordinator (with attention) 10 layers' experts, each worker 16
    ranges = [moe[:10], moe[10:26], moe[26:42], moe[42:]]
    return {
        "layer split (-ngl 46 -ts 1,1,1)": [],
        "experts-remote, by layer ranges": [f"{layers(r)}ffn_.*_exps={d}" for r, d in zip(ranges[1:], (a, b, c),
                                                                                        strict=True)],
        "expert parallel (exps=CPU,RPC,RPC,RPC)": [f"exps=CPU,{a},{b},{c}"],
    }


def predict_v3(gbps: float, link: Link) -> list[tuple[str, Prediction, dict[str, int]]]:
    sizes = v3_tensor_bytes()
    shape = model_shape(sizes, V3.n_layers, V3.n_routed_experts, V3.n_experts_per_tok, V3.hidden_size, V3.n_vocab)
    out = []
    for name, ot in v3_placements().items():
        split = ot == []
        rules = PlacementRules.from_flags(ot, n_gpu_layers=46 if split else 0,
                                          tensor_split="1,1,1" if split else None, rpc=",".join(WORKERS))
        devices = devices_for(rules.rpc, {d: MACHINE_BYTES for d in [CPU, *(f"RPC[{w}]" for w in WORKERS)]})
        placement = plan(sizes.items(), V3.n_layers, devices, rules, n_experts=V3.n_routed_experts)
        segments = placement.segments(layer_ops(sizes, V3.n_layers))
        speeds = {d.name: gbps for d in devices}
        links = {d.name: link for d in devices if d.name != CPU}
        out.append((name, predict(segments, shape, speeds, links), placement.bytes_per_device))
    return out


def check(res: dict, gbit: float) -> tuple[float, float, dict[str, tuple[float, float]]]:
    """This machine's GB/s from the bench's all-local TG; a round trip's software cost (framing, both sides'
    Python) fitted so that the one-worker placement's prediction meets its measurement; then the prediction for
    the split placement, which that fit did not see, against its measurement."""
    f = GGUFFile(res["model_path"])
    cfg = DeepSeek2Config.from_gguf(f)
    sizes = {n: t.n_bytes for n, t in f.tensors.items()}
    shape = model_shape(sizes, cfg.n_layers, cfg.n_routed_experts, cfg.n_experts_per_tok, cfg.hidden_size,
                        cfg.n_vocab)
    active = sum(shape.op_bytes.values()) + sum(shape.shared_bytes.values())
    gbps = active * res["local_tg_median"] / 1e9
    w1, w2 = "RPC[10.0.0.2:50052]", "RPC[10.0.0.3:50052]"
    speeds = {CPU: gbps, w1: gbps, w2: gbps}

    def predicted(ot: str, overhead: float) -> Prediction:
        rules = PlacementRules.from_flags([ot], rpc="10.0.0.2:50052,10.0.0.3:50052")
        placement = plan(sizes.items(), cfg.n_layers, devices_for(rules.rpc), rules, n_experts=cfg.n_routed_experts)
        link = Link(res["rtt"]["median_ms"] / 1e3, gbit * 1e9 / 8, overhead)
        return predict(placement.segments(layer_ops(sizes, cfg.n_layers)), shape, speeds, {w1: link, w2: link})

    placements = {"one worker": f"exps={w1}", "two workers": f"exps={w1},{w2}"}
    bare = predicted(placements["one worker"], 0.0)
    measured_s = 1 / res["rows"]["one worker"]["tg_median"]
    overhead = max(0.0, (measured_s - bare.seconds) / bare.round_trips)
    out = {name: (predicted(ot, overhead).tokens_per_s, res["rows"][name]["tg_median"])
           for name, ot in placements.items()}
    return gbps, overhead, out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gbps", type=float, default=None, help="one machine's decode speed, GB/s of weights read")
    p.add_argument("--rtt-ms", type=float, default=0.4)
    p.add_argument("--gbit", type=float, default=10.0, help="link bandwidth for the V3 prediction, Gbit/s")
    p.add_argument("--check", type=Path, default=None, help="expert_parallel_bench.py --json output")
    args = p.parse_args()
    gbps, overhead = args.gbps, 0.0
    if args.check is not None:
        res = json.loads(args.check.read_text())
        measured_gbps, overhead, rows = check(res, 1.0)
        gbps = gbps or measured_gbps
        print(f"check against {args.check.name} ({res['model']}, 1 Gbit/s, RTT {res['rtt']['median_ms']:.3f} ms, "
              f"this machine {measured_gbps:.2f} GB/s from the all-local TG {res['local_tg_median']:.2f} t/s, "
              f"{overhead * 1e3:.2f} ms per round trip beyond RTT and wire, fitted on the one-worker run):")
        for name, (predicted, measured) in rows.items():
            print(f"  {name}: predicted {predicted:.2f} t/s, measured {measured:.2f} t/s "
                  f"({predicted / measured - 1:+.0%})")
        print()
    if gbps is None:
        print("predict_speed: give --gbps or --check (a measured speed to predict from)", file=sys.stderr)
        return 2
    link = Link(args.rtt_ms / 1e3, args.gbit * 1e9 / 8, overhead)
    print(f"DeepSeek-V3 Q4_K_M (~{sum(v3_tensor_bytes().values()) / 1e9:.0f} GB), a coordinator and 3 workers of "
          f"128 GB, each decoding at {gbps:.2f} GB/s, links {args.gbit:g} Gbit/s at {args.rtt_ms:g} ms RTT "
          f"(+{overhead * 1e3:.2f} ms per round trip):")
    print()
    print("| placement | predicted t/s | round trips/token | wire/token | GB per machine |")
    print("|---|---|---|---|---|")
    for name, pred, per_device in predict_v3(gbps, link):
        held = ", ".join(f"{v / 1e9:.0f}" for v in per_device.values())
        print(f"| {name} | {pred.tokens_per_s:.2f} | {pred.round_trips:.1f} | {pred.wire_bytes / 1e3:.0f} kB | "
              f"{held} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
