"""Forward+backward of the Mamba4Rec-size Mamba block with each selective-scan backend; prints JSON.

Each backend runs in its own subprocess so that its peak memory is its own: on CPU the growth of
the peak resident set (ru_maxrss) over the state after building the block and its input, on CUDA
torch.cuda.max_memory_allocated over the same baseline. Besides wall seconds it reports the
process' CPU seconds, which a busy shared machine inflates less (with one thread).

``mambapy`` in --backends is a peer rather than one of ours: the ``mambapy`` package's pure-PyTorch
``MambaBlock`` (parallel scan) at the same shape, skipped with one line when not installed.

    python tools/bench_mamba.py --batch 512 --threads 1
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import subprocess
import sys
import time

import torch
from mdaf_dist.heap import reused_heap
from machine import gemm_gflops


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=2048)
    parser.add_argument("--length", type=int, default=50, help="sequence length L")
    parser.add_argument("--d-model", type=int, default=64)
    parser.add_argument("--d-state", type=int, default=32)
    parser.add_argument("--expand", type=int, default=2)
    parser.add_argument("--d-conv", type=int, default=4)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=os.cpu_count(),
                        help="torch.set_num_threads (default: all cores)")
    parser.add_argument("--iters", type=int, default=3, help="timed iterations after one warm-up")
    parser.add_argument("--backends", default="cpu,fused_cpu,mambapy",
                        help="comma-separated selective-scan backends, or mambapy; the first is the baseline")
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # run one backend in this process
    return parser.parse_args(argv)


def peak_bytes(device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


PEER = "mambapy"


def build_block(args: argparse.Namespace, backend: str):
    """The block under test: ours with ``backend``, or mambapy's; a function x -> output."""
    from mdaf_dist.models.mamba import Mamba

    if backend == PEER:
        from mambapy.mamba import MambaBlock, MambaConfig

        config = MambaConfig(d_model=args.d_model, n_layers=1, d_state=args.d_state,
                             expand_factor=args.expand, d_conv=args.d_conv, pscan=True)
        return MambaBlock(config)
    block = Mamba(args.d_model, d_state=args.d_state, d_conv=args.d_conv, expand=args.expand, scan_backend=backend)
    mask = torch.ones(args.batch, args.length, dtype=torch.bool)
    return lambda x: block(x, mask=mask)


def measure(args: argparse.Namespace) -> dict:
    """Seconds per forward+backward iteration and peak-memory growth of one backend."""
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    with device:
        block = build_block(args, args.worker)
    x = torch.randn(args.batch, args.length, args.d_model, device=device, requires_grad=True)

    def step():
        block(x).square().mean().backward()
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    baseline = peak_bytes(device)
    with reused_heap():  # the allocator as `Trainer.fit` runs it
        step()  # warm-up (and compilation, for the compiled backends)
        start, cpu_start = time.perf_counter(), time.process_time()
        for _ in range(args.iters):
            step()
    return {"seconds_per_iter": round((time.perf_counter() - start) / args.iters, 4),
            "cpu_seconds_per_iter": round((time.process_time() - cpu_start) / args.iters, 4),
            "peak_memory_mb": round((peak_bytes(device) - baseline) / 2**20, 1)}


def run_worker(argv: list, backend: str) -> dict:
    """``measure`` for one backend in a fresh process; its JSON line back."""
    command = [sys.executable, __file__, *argv, "--worker", backend]
    done = subprocess.run(command, check=True, capture_output=True, text=True)
    return json.loads(done.stdout)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(measure(args)))
        return 0
    backends = args.backends.split(",")
    if PEER in backends and importlib.util.find_spec(PEER) is None:
        print(f"bench_mamba: {PEER} is not installed (pip install {PEER}); skipping it", file=sys.stderr)
        backends.remove(PEER)
    results = {name: run_worker(argv, name) for name in backends}
    base = results[backends[0]]
    for name in backends[1:]:
        for measure_name in ("seconds_per_iter", "cpu_seconds_per_iter"):
            ratio = base[measure_name] / results[name][measure_name]
            results[name][measure_name.replace("seconds_per_iter", "speedup_vs_") + backends[0]] = round(ratio, 2)
        fraction = results[name]["peak_memory_mb"] / base["peak_memory_mb"]
        results[name]["memory_fraction_of_" + backends[0]] = round(fraction, 3)
    shape = {k: getattr(args, k) for k in ("batch", "length", "d_model", "d_state", "expand", "d_conv")}
    print(json.dumps({"device": args.device, "threads": args.threads, "iters": args.iters,
                      "shape": shape, "backends": results, "gemm_gflops_one_core": gemm_gflops()}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
