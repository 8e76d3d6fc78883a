"""Full-model forward+backward throughput (samples/s per core) at the paper's size; prints JSON.

One process, plain (unsharded) embeddings, full 50-item histories, an AdamW step included, so
the number is what one CPU rank can train at before any communication. CPU seconds are reported
too: a busy shared machine inflates them less than wall seconds (with one thread). Compare models
or backends within one run:

    python tools/bench_model.py --models mdaf,static_only --threads 1
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from mdaf_dist.config import ModelConfig, load_config
from mdaf_dist.data.batch import FEATURES
from mdaf_dist.heap import reused_heap
from mdaf_dist.models.loss import smoothed_bce
from mdaf_dist.models.registry import build_model
from machine import gemm_gflops

# model name -> overrides of configs/paper.yaml's model section
VARIANTS = {
    "mdaf": {},
    "mdaf_cpu_scan": {"scan_backend": "cpu"},  # MDAF with the eager-op CPU scan, the fused kernel's fallback
    "static_only": {"sequence_branch": "none"},
    "mamba4rec": {"name": "mamba4rec"},
    "bst": {"name": "bst"},
}


def random_batch(batch: int, length: int, vocab: dict, generator: torch.Generator):
    ids = {key: torch.randint(1, vocab[key], (batch,), generator=generator) for key in ("user", "item", "category")}
    history = torch.randint(1, vocab["item"], (batch * length,), generator=generator)
    values = torch.cat([ids["user"], ids["item"], ids["category"], history])
    lengths = torch.cat([torch.ones(3 * batch, dtype=torch.int32), torch.full((batch,), length, dtype=torch.int32)])
    features = KeyedJaggedTensor(keys=list(FEATURES), values=values, lengths=lengths)
    return features, torch.randint(0, 2, (batch,), generator=generator).float()


def measure(cfg: ModelConfig, batch: int, iters: int, vocab: dict) -> dict:
    torch.manual_seed(0)
    model = build_model(cfg, vocab, embedding_backend="plain")
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-4, weight_decay=1e-5)
    features, labels = random_batch(batch, cfg.history_length, vocab, torch.Generator().manual_seed(0))

    def step():
        optimizer.zero_grad(set_to_none=True)
        smoothed_bce(model(features).logits, labels, cfg.label_smoothing).backward()
        optimizer.step()

    with reused_heap():  # the allocator as `Trainer.fit` runs it
        step()  # warm-up (and the first build of the fused CPU scan, if any)
        start, cpu_start = time.perf_counter(), time.process_time()
        for _ in range(iters):
            step()
    seconds = (time.perf_counter() - start) / iters
    cpu_seconds = (time.process_time() - cpu_start) / iters
    return {"seconds_per_step": round(seconds, 4), "samples_per_s": round(batch / seconds, 1),
            "cpu_seconds_per_step": round(cpu_seconds, 4), "samples_per_cpu_s": round(batch / cpu_seconds, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/paper.yaml")
    parser.add_argument("--models", default="mdaf,static_only", help=f"comma-separated, from {sorted(VARIANTS)}")
    parser.add_argument("--batch", type=int, default=2048)
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (cores used)")
    parser.add_argument("--vocab", default="user=100000,item=400000,category=10000",
                        help="table sizes; they change the optimizer's cost, not the model's")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    vocab = {k: int(v) for k, v in (pair.split("=") for pair in args.vocab.split(","))}
    results = {}
    for name in args.models.split(","):
        overrides = [f"model.{k}={v}" for k, v in VARIANTS[name].items()]
        cfg = load_config(args.config, overrides).model
        result = measure(cfg, args.batch, args.iters, vocab)
        result["samples_per_s_per_core"] = round(result["samples_per_s"] / args.threads, 1)
        results[name] = result
    print(json.dumps({"batch": args.batch, "threads": args.threads, "vocab": vocab, "models": results, "gemm_gflops_one_core": gemm_gflops()}, indent=2))


if __name__ == "__main__":
    main()
