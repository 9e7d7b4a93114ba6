"""The flags `run`, `bench`, `plan` and the app share (llama.cpp's names, aliases and defaults), and the load_model
keywords they become (engine.placement_spec builds the placement from those)."""

from __future__ import annotations

import argparse


def add_model_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model and context")
    g.add_argument("-m", "--model", help="GGUF model file (default: the embedded deepseek2 model, generated once)")
    g.add_argument("-c", "--ctx-size", type=int, default=4096, help="context size in tokens (0 = the model's)")
    g.add_argument("-ctk", "--cache-type-k", default="f16", choices=["f16", "f32", "q8_0"], help="KV cache type")
    g.add_argument("-mla", "--mla-use", dest="mla", type=int, default=3, choices=[0, 1, 2, 3],
                   help="MLA mode: 0 naive K/V cache, 1/2 absorbed, 3 naive prefill + absorbed decode")
    g.add_argument("-amb", "--attn-max-batch", dest="amb", type=int, default=256,
                   help="MiB cap on the attention score scratch (long contexts run in chunks)")
    g.add_argument("-t", "--threads", type=int, default=None, help="compute threads (default: all cores)")
    g.add_argument("-ub", "--ubatch-size", type=int, default=512, help="tokens per forward pass in prefill")
    g.add_argument("--float-activations", action="store_true",
                   help="multiply the weights with float32 activations instead of int8-quantized ones (as "
                   "llama.cpp does): exact up to float32 rounding, slower; workers follow the coordinator")


def add_sampling_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("-n", "--n-predict", type=int, default=128, help="tokens to generate (-1 = until EOS)")
    g.add_argument("--temp", type=float, default=0.8, help="temperature (0 = greedy)")
    g.add_argument("--top-k", type=int, default=40)
    g.add_argument("--top-p", type=float, default=0.95)
    g.add_argument("--min-p", type=float, default=0.05)
    g.add_argument("-s", "--seed", type=int, default=-1, help="RNG seed (-1 = random)")
    g.add_argument("--ignore-eos", action="store_true",
                   help="generate past end-of-generation tokens (as llama.cpp's --ignore-eos)")


def add_placement_flags(p: argparse.ArgumentParser, polling: bool = True) -> None:
    g = p.add_argument_group("placement (llama.cpp's flags, same meaning)")
    g.add_argument("--rpc", metavar="SERVERS",
                   help="comma-separated host:port of rpcnode workers (in -ts order, before local GPUs)")
    g.add_argument("-ot", "--override-tensor", dest="override_tensor", action="append", default=[],
                   metavar="REGEX=DEV", help="tensors whose name REGEX matches go to DEV (CPU, RPC[host:port], "
                   "CUDA0...); repeatable, the first matching rule wins")
    g.add_argument("-ngl", "--gpu-layers", "--n-gpu-layers", dest="n_gpu_layers", type=int, default=0, metavar="N",
                   help="offload the last N repeating layers (and the output layer when N > layers) to the "
                   "RPC/GPU devices (default: 0, all on CPU)")
    g.add_argument("-ts", "--tensor-split", metavar="SPLIT",
                   help="proportions of the offloaded layers per RPC/GPU device, e.g. 3,1 (default: by capacity)")
    g.add_argument("--device-mem", action="append", default=[], metavar="DEV=SIZE",
                   help="plan against this capacity, e.g. RPC[10.0.0.2:50052]=48GiB (repeatable)")
    g.add_argument("--cluster", metavar="FILE",
                   help="workers from a cluster file of `ikctl launch`: their endpoints stand for --rpc (unless "
                   "given), each with its own token, their memory as capacities")
    g.add_argument("--auto", action="store_true",
                   help="choose the placement predicted fastest that fits, from this machine's and the workers' "
                   "measured speed (cached) and links (measured at connect): give only the workers (--rpc or "
                   "--cluster); the choice is printed as the equivalent flags")
    g.add_argument("--recalibrate", action="store_true",
                   help="with --auto: measure the devices' decode speed again instead of using the cached figures")
    if not polling:  # `plan` runs nothing
        return
    g.add_argument("--rpc-poll", dest="rpc_poll", type=float, default=10.0, metavar="MS",
                   help="spin up to MS milliseconds for a worker's reply instead of sleeping (a sleeping core wakes "
                   "0.1-0.3 ms late, every round trip); never for workers on this machine (default 10; 0: never)")
    g.add_argument("--rpc-timeout", dest="rpc_timeout", type=float, default=10.0, metavar="S",
                   help="wait S seconds for a worker's reply (or 10x its fastest time for the tokens at hand, if "
                   "more) before probing it on a second connection; a busy worker answers and is waited for "
                   "(default 10)")
    g.add_argument("--rpc-probe-timeout", dest="rpc_probe_timeout", type=float, default=20.0, metavar="S",
                   help="a worker that answers neither its request nor a probe within S seconds is frozen (stopped, "
                   "or its host gone): the run ends with an error naming it (default 20)")
    g.add_argument("--no-pipeline", dest="pipeline", action="store_false",
                   help="run a prompt's micro-batches (-ub) through the devices one after another instead of "
                   "overlapping them (a device computes one while another computes the next)")
    g.add_argument("--no-failover", dest="failover", action="store_false",
                   help="a worker lost during generation (dead, or frozen past --rpc-timeout and "
                   "--rpc-probe-timeout) ends the run with an error; by default ikctl re-plans onto the devices "
                   "left, rebuilds the KV cache from the tokens so far and goes on")



def load_options(args: argparse.Namespace) -> dict[str, object]:
    """The model, context and placement flags as load_model keywords."""
    return {**model_options(args), **placement_options(args)}


def model_options(args: argparse.Namespace) -> dict[str, object]:
    """The model and context flags (add_model_flags) as load_model keywords."""
    return {"ctx_size": args.ctx_size, "cache_type_k": args.cache_type_k, "mla": args.mla, "amb": args.amb,
            "threads": args.threads, "ubatch_size": args.ubatch_size, "float_activations": args.float_activations}


def placement_options(args: argparse.Namespace) -> dict[str, object]:
    """The placement flags (add_placement_flags) as load_model keywords; none when no placement flag is given."""
    if not (args.rpc or args.override_tensor or args.n_gpu_layers or args.tensor_split or args.cluster
            or args.device_mem or args.auto or args.recalibrate):
        return {}
    return {"rpc": args.rpc or (), "override_tensor": args.override_tensor, "n_gpu_layers": args.n_gpu_layers,
            "tensor_split": args.tensor_split, "device_mem": args.device_mem, "cluster": args.cluster,
            # `plan` runs nothing: it has no polling flags
            "rpc_poll": getattr(args, "rpc_poll", 10.0), "rpc_timeout": getattr(args, "rpc_timeout", 10.0),
            "rpc_probe_timeout": getattr(args, "rpc_probe_timeout", 20.0), "pipeline": getattr(args, "pipeline", True),
            "failover": getattr(args, "failover", True), "auto": args.auto, "recalibrate": args.recalibrate}
