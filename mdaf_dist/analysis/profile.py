"""`mdaf profile --config FILE`: the paper's efficiency tables (5.7 Table 8, appendix C Table C1)
measured on whatever device runs it.

Table 8 compares the config's model with BST: parameters, peak memory of a training step,
training time per epoch and inference time per batch. Training time per epoch is *measured* on
`--steps` training steps (forward, backward, AdamW) of random batches and *extrapolated* to the
epoch's steps (the train split of the data directory, or the paper's 473,044 samples when it
holds no prepared training data), so it
leaves out data loading and evaluation. The model is the unsharded one (plain embedding tables,
AdamW on every parameter) on one device: what a single GPU of the paper ran. Peak memory is CUDA's
peak allocation on a GPU; on a CPU, the peak resident memory of a fresh process that profiles
the one model (each model runs in its own spawned process, so one does not inherit the other's
peak), libraries included.

Table C1 splits one forward pass by component (embedding lookup, static branch, sequential
branch, gate, head): FLOPs from `torch.utils.flop_counter.FlopCounterMode` (matmuls,
convolutions and attention, and the fused CPU scan and convolution by the formulas registered in
`models/cpu_kernels.py`; an embedding lookup is a gather and counts 0), and latency from
module hooks: a component runs from the first call of one of its modules to the first call of
the next component's, so the glue code in between (reshapes, the history's right alignment)
counts with the component it follows, what precedes the first component (splitting the batch's
features) counts with the first, and the components together cover the whole forward.
Latencies are those of the fastest of `--repeats` passes (the least disturbed by other processes).
CUDA timings synchronise the device at every boundary; they have not been run on a GPU yet.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import multiprocessing
import resource
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from mdaf_dist.analysis.report import Table, write_tables
from mdaf_dist.config import Config, ModelConfig, load_config
from mdaf_dist.data.batch import CATEGORY, HIST_ITEM, ITEM, USER
from mdaf_dist.data.layout import META_FILE, read_meta
from mdaf_dist.data.loader import num_samples
from mdaf_dist.distributed.env import resolve_device
from mdaf_dist.errors import UserError
from mdaf_dist.models.describe import PAPER_MDAF, count_parts, parse_vocab
from mdaf_dist.models.loss import smoothed_bce
from mdaf_dist.models.registry import build_model

# MDAF_paper.md 5.1.1: training samples after the filters, the epoch Table 8 times
PAPER_EPOCH_SAMPLES = 473_044
# Table 8 (NVIDIA A100): parameters, GPU memory (GB), training s/epoch, inference s/batch
PAPER_TABLE8 = {"bst": (130_000_000, 18.2, 185.0, 0.42), "mdaf": (46_000_000, 12.7, 122.0, 0.31)}
# Table C1: component label, the model's top-level modules in it, paper GFLOPs, ms, share
C1_COMPONENTS = (
    ("Embedding lookup", ("embeddings",), 0.15, 2.1, 8.3),
    ("DCNv3 (static branch)", ("static_dropout", "static_norm", "static"), 0.82, 8.7, 34.4),
    ("Mamba4Rec (sequential branch)", ("sequence",), 1.24, 11.3, 44.7),
    ("Adaptive gate", ("fusion",), 0.03, 0.4, 1.6),
    ("Prediction MLP", ("fusion_dropout", "head"), 0.21, 2.8, 11.0),
)
COMPARED_WITH = "bst"


def random_batch(vocab: Dict[str, int], history_length: int, batch_size: int, seed: int = 0) -> Tuple[KeyedJaggedTensor, torch.Tensor]:
    """Ids uniform over each table (padding row excluded), history lengths uniform in [1, L]."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, history_length + 1, (batch_size,), generator=g)
    values = [torch.randint(1, vocab[table], (batch_size,), generator=g) for table in (USER, ITEM, CATEGORY)]
    values.append(torch.randint(1, vocab[ITEM], (int(lengths.sum()),), generator=g))
    features = KeyedJaggedTensor(
        keys=[USER, ITEM, CATEGORY, HIST_ITEM], values=torch.cat(values),
        lengths=torch.cat([torch.ones(3 * batch_size, dtype=torch.int64), lengths]).int(),
    )  # fmt: skip
    labels = (torch.rand(batch_size, generator=g) < 0.4).float()
    return features, labels


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def flops_by_module(model: nn.Module, *inputs: Any) -> Dict[str, int]:
    """FLOPs of one forward: "total" and per top-level child (by attribute name)."""
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(*inputs)
    counts = counter.get_flop_counts()
    root = type(model).__name__
    flops = {name: int(sum(counts.get(f"{root}.{name}", {}).values())) for name, _ in model.named_children()}
    flops["total"] = int(counter.get_total_flops())
    return flops


def component_latencies(model: nn.Module, components: Dict[str, Sequence[str]], inputs: Tuple[Any, ...], repeats: int, device: torch.device) -> Tuple[Dict[str, float], float]:
    """Seconds per component of the fastest of `repeats` hooked forward passes, and the fastest
    of as many passes without hooks, alternating with the hooked ones so that both see the same
    load of the machine."""
    modules = dict(model.named_children())
    starts: Dict[str, float] = {}

    def pre_hook(component: str) -> Callable:
        def hook(module: nn.Module, args: Any) -> None:
            if component not in starts:
                _sync(device)
                starts[component] = time.perf_counter()

        return hook

    def timed_pass() -> float:
        _sync(device)
        start = time.perf_counter()
        model(*inputs)
        _sync(device)
        return time.perf_counter() - start

    def hooked_pass() -> Dict[str, float]:
        handles = [modules[name].register_forward_pre_hook(pre_hook(component)) for component, names in components.items() for name in names if name in modules]
        starts.clear()
        try:
            _sync(device)
            begin = time.perf_counter()
            model(*inputs)
            _sync(device)
            end = time.perf_counter()
        finally:
            for handle in handles:
                handle.remove()
        ordered = [name for name, _ in sorted(starts.items(), key=lambda item: item[1])]
        bounds = [begin] + [starts[name] for name in ordered[1:]] + [end]
        return {name: bounds[i + 1] - bounds[i] for i, name in enumerate(ordered)}

    best: Dict[str, float] = {}
    whole = math.inf
    with torch.no_grad():
        timed_pass()  # warm-up
        for _ in range(repeats):
            whole = min(whole, timed_pass())
            split = hooked_pass()
            if not best or sum(split.values()) < sum(best.values()):
                best = split
    return best, whole


def components_of(model: nn.Module) -> Dict[str, Sequence[str]]:
    """Table C1's components for MDAF; each top-level module for other models."""
    names = {name for name, _ in model.named_children()}
    if {"static", "sequence", "fusion", "head"} <= names:
        return {label: modules for label, modules, *_ in C1_COMPONENTS}
    return {name: (name,) for name, _ in model.named_children()}


def _peak_memory_bytes(device: torch.device) -> Optional[float]:
    if device.type == "cuda":
        return float(torch.cuda.max_memory_allocated(device))
    # ru_maxrss is in KiB on Linux, bytes on macOS
    return float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * (1 if sys.platform == "darwin" else 1024)


def profile_model(cfg: ModelConfig, vocab: Dict[str, int], device: torch.device, batch_size: int, eval_batch_size: int, steps: int, repeats: int, lr: float) -> Dict[str, Any]:
    """Parameters, peak memory, seconds per training step and per inference batch, FLOPs and
    latency per component of one model."""
    torch.manual_seed(0)
    model = build_model(cfg, vocab, embedding_backend="plain").to(device)
    parts = count_parts(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    features, labels = (t.to(device) for t in random_batch(vocab, cfg.history_length, batch_size))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    step_seconds = []
    model.train()
    for step in range(steps + 1):  # the first step warms up and is not timed
        _sync(device)
        start = time.perf_counter()
        loss = smoothed_bce(model(features).logits, labels, cfg.label_smoothing)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        _sync(device)
        if step:
            step_seconds.append(time.perf_counter() - start)
    peak = _peak_memory_bytes(device)
    model.eval()
    eval_features = random_batch(vocab, cfg.history_length, eval_batch_size, seed=1)[0].to(device)
    components = components_of(model)
    latencies, whole = component_latencies(model, components, (eval_features,), repeats, device)
    flops = flops_by_module(model, eval_features)
    return {
        "model": cfg.name,
        "parameters": parts[-1][1],
        "parameters_by_part": parts,
        "peak_memory_bytes": peak,
        "train_step_seconds": sorted(step_seconds)[len(step_seconds) // 2],
        "inference_batch_seconds": whole,
        "component_seconds": latencies,
        "component_flops": {label: sum(flops.get(name, 0) for name in names) for label, names in components.items()},
        "total_flops": flops["total"],
        "batch_size": batch_size,
        "eval_batch_size": eval_batch_size,
    }


# Table 8's last row: BST's value over MDAF's, in the paper's words per column
SPEEDUP_WORDS = ("fewer", "less", "faster", "faster")


def epoch_samples(data_dir: str) -> Tuple[int, str]:
    """The training samples of the epoch Table 8 times, and where they come from: the data
    directory's train split, or the paper's count when it holds none (not prepared, or empty)."""
    if data_dir and (Path(data_dir) / META_FILE).is_file():
        samples = num_samples(data_dir, "train")
        if samples:
            return samples, f"the train split of {data_dir}"
        return PAPER_EPOCH_SAMPLES, f"the paper's (5.1.1): {data_dir} has no training samples"
    if data_dir:
        return PAPER_EPOCH_SAMPLES, f"the paper's (5.1.1): {data_dir} holds no prepared data"
    return PAPER_EPOCH_SAMPLES, "the paper's (5.1.1)"


def table8(profiles: List[Dict[str, Any]], epoch_steps: int, epoch_samples: int, device: torch.device, samples_from: str = "") -> Table:
    rows = []
    for p in profiles:
        paper = PAPER_TABLE8.get(p["model"], (None,) * 4)
        rows.append([
            p["model"].upper(), p["parameters"], p["peak_memory_bytes"] / 2**30, p["train_step_seconds"] * epoch_steps,
            p["inference_batch_seconds"], *(None if v is None else v for v in paper),
        ])  # fmt: skip
    if len(profiles) == 2:
        ours, other = rows
        ratio = [f"{other[i] / ours[i]:.2f}x {word}" if ours[i] else None for i, word in zip(range(1, 5), SPEEDUP_WORDS)]
        paper_ratio = [f"{other[i] / ours[i]:.2f}x {word}" if ours[i] and other[i] else None for i, word in zip(range(5, 9), SPEEDUP_WORDS)]
        rows.append(["Speedup", *ratio, *paper_ratio])
    memory = "CUDA peak allocated" if device.type == "cuda" else "peak resident memory of the profiling process"
    note = (
        f"Device: {device}. Memory: {memory} (GB). Training time/epoch: measured seconds per training step x {epoch_steps:,} "
        f"steps ({epoch_samples:,} samples{f', {samples_from}' if samples_from else ''} / batch {profiles[0]['batch_size']:,}), "
        f"extrapolated, without data loading or evaluation. Inference: one forward of {profiles[0]['eval_batch_size']:,} samples (s)."
        + (f" Speedup: {profiles[1]['model'].upper()}'s value over {profiles[0]['model'].upper()}'s, as the paper's last row." if len(profiles) == 2 else "")
    )
    columns = ["Model", "Parameters", "Memory (GB)", "Training Time/Epoch (s)", "Inference Time/Batch (s)",
               "Paper Parameters", "Paper GPU Memory (GB)", "Paper Training Time/Epoch (s)", "Paper Inference Time/Batch (s)"]  # fmt: skip
    return Table("table8", "Table 8: efficiency comparison", columns, rows, note)


def parameters_table(profile: Dict[str, Any]) -> Table:
    paper = dict(PAPER_MDAF) if profile["model"] == "mdaf" else {}
    rows = [[part, n, paper.get(part)] for part, n in profile["parameters_by_part"]]
    return Table("parameters", f"Parameters per part ({profile['model'].upper()})", ["Part", "Parameters", "Paper (4.6)"], rows,
                 "See `mdaf describe` for why the parts cannot agree with the paper's.")  # fmt: skip


def tableC1(profile: Dict[str, Any]) -> Table:
    paper = {label: (gflops, ms, share) for label, _, gflops, ms, share in C1_COMPONENTS}
    seconds = profile["component_seconds"]
    total_seconds = sum(seconds.values())
    rows = []
    for label, flops in profile["component_flops"].items():
        s = seconds.get(label, 0.0)
        rows.append([label, flops / 1e9, 1e3 * s, 100 * s / total_seconds if total_seconds else None, *paper.get(label, (None,) * 3)])
    rows.append(["Total", profile["total_flops"] / 1e9, 1e3 * total_seconds, 100.0, 2.45, 25.3, 100.0])
    note = (
        f"One forward of {profile['eval_batch_size']:,} samples ({profile['model'].upper()}); whole forward without hooks "
        f"{1e3 * profile['inference_batch_seconds']:.1f} ms. GFLOPs by FlopCounterMode (an embedding gather counts 0)."
    )
    columns = ["Component", "GFLOPs", "Latency (ms)", "% of Total", "Paper GFLOPs", "Paper Latency (ms)", "Paper % of Total"]
    return Table("tableC1", "Table C1: per-component computational cost (forward pass)", columns, rows, note)


def _vocab(cfg: Config, text: Optional[str]) -> Dict[str, int]:
    if text:
        return parse_vocab(text)
    if not cfg.data_dir:
        raise UserError("no table sizes: pass --vocab user=N,item=N,category=N or data_dir=PATH (a prepared directory)")
    return {name: int(size) for name, size in read_meta(cfg.data_dir)["vocab"].items() if name in (USER, ITEM, CATEGORY)}


def run(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    if args.steps < 1 or args.repeats < 1:
        raise UserError("--steps and --repeats must be at least 1")
    vocab = _vocab(cfg, args.vocab)
    device = resolve_device(cfg.train.device, 0)
    names = [cfg.model.name] + ([COMPARED_WITH] if cfg.model.name != COMPARED_WITH else [])
    samples, samples_from = epoch_samples(cfg.data_dir)
    epoch_steps = math.ceil(samples / cfg.loader.batch_size)
    jobs = [
        dict(cfg=dataclasses.replace(cfg.model, name=name), vocab=vocab, device=device, batch_size=cfg.loader.batch_size,
             eval_batch_size=cfg.loader.eval_batch_size, steps=args.steps, repeats=args.repeats, lr=cfg.train.lr)
        for name in names
    ]  # fmt: skip
    profiles = []
    for job in jobs:
        with multiprocessing.get_context("spawn").Pool(1) as pool:
            profiles.append(pool.apply(profile_model, (), job))
    tables = [table8(profiles, epoch_steps, samples, device, samples_from), parameters_table(profiles[0]), tableC1(profiles[0])]
    heading = f"Profile of {', '.join(n.upper() for n in names)} on {device}"
    if args.out:
        print(write_tables(tables, Path(args.out), "profile", heading))
    else:
        print("\n\n".join([f"## {heading}"] + [t.markdown() for t in tables]))
    return 0
