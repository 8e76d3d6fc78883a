"""Forward+backward of the Mamba4Rec-size Mamba block with each selective-scan backend; prints JSON.

Each backend runs in its own subprocess so that its peak memory is its own: on CPU the growth of
the peak resident set (ru_maxrss) over the state after building the block and its input, on CUDA
torch.cuda.max_memory_allocated over the same baseline.

    python tools/bench_mamba.py --batch 2048 --device cpu --threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time


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
    parser.add_argument("--backends", default="reference,cpu", help="comma-separated; the first is the baseline")
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # run one backend in this process
    return parser.parse_args(argv)


def peak_bytes(device) -> int:
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def measure(args: argparse.Namespace) -> dict:
    """Seconds per forward+backward iteration and peak-memory growth of one backend."""
    import torch

    from mdaf_dist.models.mamba import Mamba

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    block = Mamba(args.d_model, d_state=args.d_state, d_conv=args.d_conv, expand=args.expand,
                  scan_backend=args.worker).to(device)
    x = torch.randn(args.batch, args.length, args.d_model, device=device, requires_grad=True)
    mask = torch.ones(args.batch, args.length, dtype=torch.bool, device=device)

    def step():
        block(x, mask=mask).square().mean().backward()
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    baseline = peak_bytes(device)
    step()  # warm-up (and compilation, for the compiled backend)
    start = time.perf_counter()
    for _ in range(args.iters):
        step()
    seconds = (time.perf_counter() - start) / args.iters
    return {"seconds_per_iter": seconds, "peak_memory_mb": (peak_bytes(device) - baseline) / 2**20}


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
    results = {name: run_worker(argv, name) for name in backends}
    base = results[backends[0]]
    for name in backends[1:]:
        results[name]["speedup_vs_" + backends[0]] = base["seconds_per_iter"] / results[name]["seconds_per_iter"]
        results[name]["memory_fraction_of_" + backends[0]] = results[name]["peak_memory_mb"] / base["peak_memory_mb"]
    shape = {k: getattr(args, k) for k in ("batch", "length", "d_model", "d_state", "expand", "d_conv")}
    print(json.dumps({"device": args.device, "threads": args.threads, "iters": args.iters,
                      "shape": shape, "backends": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
