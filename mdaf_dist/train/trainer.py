"""The training loop: optimizers, epochs, evaluation, early stopping, checkpoints. The model
comes from build.py (the same one scoring builds), every evaluation runs score.py's loop, every
training step runs through a TorchRec train pipeline (pipeline.py, `train.pipeline`).

Uneven data across ranks. The loader gives every rank a contiguous slice of the samples (ranks
differ by at most one sample), so one rank may have one batch more than another. Every step
starts with an all-reduce of a "has a batch" flag; the loop ends only when no rank has one.
A rank that has run out meanwhile runs the step on a one-sample padding batch (id 0, the padding
row of every table) with loss weight 0, so it joins the collectives (embedding all-to-alls, DDP
all-reduce) without contributing gradient: nothing hangs and no sample is dropped, the tail
batches included (the last partial batch of each rank is trained on, unless loader.drop_last).
On such a step the dense gradient is the mean over all ranks, the padding rank counting zero.
Evaluation does the same (score.py), and only real batches reach the Evaluator.

Train AUC per epoch (the paper's Table 7) is exact over the epoch's training samples and costs
no second pass: each step's logits, from the training forward (dropout on, weights as they were
before that step's update), go to an `Evaluator` whose rows only rank 0 gathers at the end of
the epoch (the other ranks need the value alone, which rank 0 broadcasts so that every rank
returns the same results; early stopping looks at validation AUC). Each rank's rows of the epoch
are part of its checkpoint file, so an epoch resumed mid-way at the same world size reports the
same train AUC as an uninterrupted run. `train.train_auc=false` keeps no rows (memory grows with
the epoch's samples) and records train_auc as None.
With a test split, the model is also evaluated on it after every epoch: the checkpoints (the best
one included) and results.json carry those test metrics; early stopping looks at validation only.
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
import torch.distributed as dist

from mdaf_dist.config import Config, to_yaml
from mdaf_dist.data.batch import Batch
from mdaf_dist.data.loader import check_settings as check_loader_settings
from mdaf_dist.data.loader import make_loader, num_samples
from mdaf_dist.distributed import checkpoint as ckpt
from mdaf_dist.distributed.env import DistEnv, all_reduce, all_reduce_max
from mdaf_dist.distributed.sharding import PLAN_JSON, PLAN_TEXT, describe_plan
from mdaf_dist.errors import UserError
from mdaf_dist.files import read_json, write_json
from mdaf_dist.heap import reused_heap
from mdaf_dist.models.optfusion import ARCHITECTURE_FILE, describe_architecture, searched_architecture
from mdaf_dist.train.build import build_distributed_model, data_vocab
from mdaf_dist.train.logging import RunLogger
from mdaf_dist.train.metrics import Evaluator
from mdaf_dist.train.optim import (
    build_optimizer,
    dense_parameters,
    linear_warmup,
    resolve_embedding_optimizer,
    warmup_steps,
)
from mdaf_dist.train.pipeline import StepOptimizer, TrainSteps
from mdaf_dist.train.score import Scorer

RESULTS_FILE = "results.json"
# the key of this rank's train-AUC rows of the current epoch in its checkpoint file
TRAIN_AUC_ROWS = "train_auc_rows"


@dataclass
class TrainState:
    """What the loop itself must remember across a resume (the rest is model/optimizer/loader)."""

    step: int = 0
    best_auc: float = -math.inf
    best_step: int = -1
    # epochs completed when the best evaluation was taken (1 = after the first epoch)
    best_epoch: int = -1
    epochs_without_improvement: int = 0
    samples_trained: int = 0
    # samples trained since the current epoch began (0 once it is complete): what a resume at
    # another world size, which restarts the epoch, trains on again
    epoch_samples: int = 0
    # one {"epoch", "step", "auc", "logloss", "train_auc"} per validation pass, for the training
    # curves; train_auc is None with train.train_auc off
    evaluations: List[Dict[str, float]] = field(default_factory=list)


class Trainer:
    """Builds everything from a Config and runs `fit`. All methods are collective: every rank
    calls them in the same order."""

    def __init__(self, cfg: Config, env: DistEnv, embedding_backend: str = "torchrec", save_plan: bool = True) -> None:
        """`save_plan`: rank 0 writes the sharding plan into output_dir (off for a run that only
        reads a checkpoint, such as `mdaf evaluate`)."""
        check_loader_settings(cfg.loader)
        self.cfg, self.env = cfg, env
        self.out_dir = Path(cfg.output_dir)
        ckpt.seed_everything(cfg.train.seed)
        self.vocab = data_vocab(cfg)
        self.embedding_optimizer = resolve_embedding_optimizer(cfg.train.embedding_optimizer, env.device)
        plan_dir = self.out_dir if save_plan else None
        self.model = build_distributed_model(cfg, self.vocab, env, embedding_backend, self.embedding_optimizer, plan_dir)
        # seed again: whatever building and sharding drew, the dropout masks then do not depend
        # on the plan or the backend
        ckpt.seed_everything(cfg.train.seed)
        self.sharded = embedding_backend == "torchrec"
        self.optimizer = build_optimizer(self.model, cfg.train, self.embedding_optimizer)
        self.dense_params = list(dense_parameters(self.model).values())
        self.train_loader = make_loader(cfg.data_dir, "train", cfg.loader, history_length=cfg.model.history_length, rank=env.rank, world_size=env.world_size, device=env.device)
        self.steps_per_epoch = all_reduce_max(len(self.train_loader))
        self.scheduler = linear_warmup(self.optimizer, warmup_steps(cfg.train, self.steps_per_epoch))
        self.evaluator = Evaluator()
        # None with train.train_auc off: nothing is accumulated
        self.train_evaluator: Optional[Evaluator] = Evaluator() if cfg.train.train_auc else None
        # True while the current epoch's rows before a resume are missing (a checkpoint saved
        # with train.train_auc off): that epoch's train AUC is then None, not a partial one
        self._train_rows_missing = False
        self.has_test = num_samples(cfg.data_dir, "test") > 0
        self.checkpointer = ckpt.Checkpointer(self.out_dir / "checkpoints", env.rank, cfg.checkpoint.keep_last)
        self.state = TrainState()
        # global mean training loss of every step this process ran
        self.step_losses: List[float] = []
        self.scorer = Scorer(self.model, cfg, env)
        step_optimizer = StepOptimizer(self.optimizer, self.scheduler, self.dense_params, cfg.train.grad_clip_norm)
        self.steps = TrainSteps(cfg.train.pipeline, self.model, step_optimizer, self.scorer, cfg.model.label_smoothing, env.device, self.sharded)
        self._warned_undefined_auc = False

    # -- one step ---------------------------------------------------------------------------
    def train_step(self, batch: Batch) -> torch.Tensor:
        """One step on `batch` outside the loop (pipeline.py has the step): forward, backward (the
        tables update inside it), dense clip + AdamW step, warmup. Returns the sum of this rank's
        per-sample losses in float64."""
        return self.steps.step(batch).loss_sum

    # -- evaluation -------------------------------------------------------------------------
    def evaluate(self, split: str = "valid") -> Dict[str, Any]:
        """Exact metrics over a whole split, every rank taking its slice."""
        return self.scorer.evaluate(self.evaluator, split)

    def train_auc(self) -> Optional[float]:
        """Exact AUC over the current epoch's training samples so far (collective); None with
        train.train_auc off or the epoch's rows incomplete. The rows are dropped once the epoch
        is complete, and kept after a max_steps stop, whose checkpoint continues the epoch."""
        if self.train_evaluator is None:
            return None
        auc = None if self._train_rows_missing else self.train_evaluator.auc()
        if self.state.epoch_samples == 0:
            self.train_evaluator.reset()
            self._train_rows_missing = False
        return auc

    # -- the loop ---------------------------------------------------------------------------
    def _reached_max_steps(self) -> bool:
        return 0 < self.cfg.train.max_steps <= self.state.step

    def _train_epoch(self, logger: RunLogger) -> None:
        log_every = max(1, self.cfg.logging.log_every)
        every = self.cfg.checkpoint.every_steps
        with contextlib.closing(self.steps.run(self.train_loader)) as steps:
            for result in steps:
                real, batch = result.drawn.real, result.drawn.batch
                if real and self.train_evaluator is not None:
                    self.train_evaluator.update(result.logits, batch.labels)
                n = batch.batch_size if real else 0
                loss_sum, count = all_reduce([float(result.loss_sum) if real else 0.0, n], dist.ReduceOp.SUM)
                self.state.step += 1
                self.state.samples_trained += int(count)
                self.state.epoch_samples += int(count)
                self.step_losses.append(loss_sum / count)
                if self.state.step % log_every == 0:
                    logger.step(self.state.step, {"loss": loss_sum / count, "lr": self.scheduler.get_last_lr()[0]})
                if every > 0 and self.state.step % every == 0:
                    # the loader's position after this step's batch, not after those read ahead
                    self.save_checkpoint(None, loader_state=result.drawn.loader_state)
                if self._reached_max_steps():
                    return
        self.state.epoch_samples = 0

    def _record(self, metrics: Dict[str, Any], train_auc: Optional[float], logger: RunLogger) -> bool:
        """Early stopping bookkeeping; True when patience has run out."""
        logger.scalars(self.state.step, {k: v for k, v in metrics.items() if isinstance(v, (int, float, dict))}, prefix="valid")
        if train_auc is not None:
            logger.scalars(self.state.step, {"auc": train_auc}, prefix="train")
        if self.evaluator.gates is not None:
            logger.histogram(self.state.step, "valid/gate", self.evaluator.gates)
        epoch = self.train_loader.epoch
        train_text = "n/a" if train_auc is None else f"{train_auc:.6f}"
        logger.info(f"epoch={epoch} step={self.state.step} auc={metrics['auc']:.6f} logloss={metrics['logloss']:.6f} train_auc={train_text}")
        self.state.evaluations.append(
            {"epoch": epoch, "step": self.state.step, "auc": float(metrics["auc"]), "logloss": float(metrics["logloss"]), "train_auc": train_auc}
        )
        if not math.isfinite(metrics["auc"]):
            if not self._warned_undefined_auc:
                self._warned_undefined_auc = True
                logger.info(
                    f"warning: AUC is undefined on the validation split ({metrics['num_samples']} samples, positive rate "
                    f"{metrics['positive_rate']:g}, one class or none): null in results.json, and early stopping ignores it"
                )
        elif metrics["auc"] > self.state.best_auc:
            self.state.best_auc, self.state.best_step, self.state.best_epoch = float(metrics["auc"]), self.state.step, epoch
            self.state.epochs_without_improvement = 0
        else:
            self.state.epochs_without_improvement += 1
        patience = self.cfg.train.patience
        return patience > 0 and self.state.epochs_without_improvement >= patience

    def fit(self) -> Dict[str, Any]:
        """Train until max_epochs, max_steps or early stopping; evaluate after every epoch (and
        after a max_steps stop) and checkpoint each time. Returns `results` of the final model,
        which rank 0 also writes to <output_dir>/results.json; a resumed run with nothing left to
        train returns the results.json it finds and leaves it as it is. Refuses a run with no
        training step."""
        if self.steps_per_epoch == 0:
            raise UserError(
                f"no training step: the train split of {self.cfg.data_dir} has {num_samples(self.cfg.data_dir, 'train')} samples, "
                f"too few for {self.env.world_size} rank(s) of loader.batch_size={self.cfg.loader.batch_size} with "
                f"loader.drop_last={self.cfg.loader.drop_last}; lower loader.batch_size, set loader.drop_last=false or use fewer ranks"
            )
        resume_from = self.checkpointer.resume_point(self.cfg.train.resume)
        if resume_from is not None:
            self.restore(resume_from)
        logger = RunLogger(
            (self.cfg.logging.tensorboard_dir or str(self.out_dir / "tensorboard")) if self.cfg.logging.tensorboard else None,
            self.env.rank,
            self._planned_steps(),
            self.cfg.loader.batch_size * self.env.world_size,
            enabled_progress=self.cfg.logging.progress_bar,
            start_step=self.state.step,
        )
        logger.info(
            f"world_size={self.env.world_size} device={self.env.device} backend={self.env.backend} "
            f"embedding_optimizer={self.embedding_optimizer} (fused={self.sharded}) dense_optimizer=AdamW "
            f"steps_per_epoch={self.steps_per_epoch} warmup_steps={warmup_steps(self.cfg.train, self.steps_per_epoch)}"
        )
        metrics: Dict[str, Any] = {}
        test: Optional[Dict[str, Any]] = None
        started, samples_before = time.perf_counter(), self.state.samples_trained
        try:
            with reused_heap():  # each step's freed tensors kept for the next ones (heap.py)
                while self.train_loader.epoch < self.cfg.train.max_epochs and not self._reached_max_steps():
                    self._train_epoch(logger)
                    train_auc = self.train_auc()
                    metrics = self.evaluate()
                    stop = self._record(metrics, train_auc, logger)
                    test = self.evaluate("test") if self.has_test else None
                    self.save_checkpoint(metrics, test)
                    if stop:
                        logger.info(f"early stopping: no better validation AUC for {self.cfg.train.patience} evaluations")
                        break
        finally:
            logger.close(self.state.step)
        wall_seconds = time.perf_counter() - started
        results_file = self.out_dir / RESULTS_FILE
        if not metrics:
            # nothing left to train (a resumed, finished run): its results.json stands as it is
            if results_file.is_file():
                if self.env.is_main:
                    print(f"nothing left to train: {results_file} is kept as it is", flush=True)
                return read_json(results_file, "the results of a finished run")
            metrics = self.evaluate()
            test = self.evaluate("test") if self.has_test else None
        results = self.results(metrics, self.state.samples_trained - samples_before, wall_seconds)
        if test is not None:
            results["test"] = test
        if self.env.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            write_json(results_file, results)
            self._save_searched_architecture()
        return results

    def _save_searched_architecture(self) -> None:
        """OptFusion's search stage: the final model's selection, printed and written to
        <output_dir>/optfusion_architecture.json (each checkpoint holds its own, too)."""
        selection = searched_architecture(self.model)
        if selection is not None:
            path = self.out_dir / ARCHITECTURE_FILE
            write_json(path, selection)
            print("OptFusion architecture:\n  " + "\n  ".join(describe_architecture(selection)) + f"\nwritten to {path}", flush=True)

    def _planned_steps(self) -> int:
        """The step count this run ends at unless it stops early: the steps taken, the rest of
        the current epoch (ranks in lockstep: the furthest rank's position), then whole epochs."""
        done_in_epoch = all_reduce_max(self.train_loader.position)
        epochs_left = max(0, self.cfg.train.max_epochs - self.train_loader.epoch)
        total = self.state.step + max(0, epochs_left * self.steps_per_epoch - done_in_epoch)
        return min(total, self.cfg.train.max_steps) if self.cfg.train.max_steps > 0 else total

    def results(self, metrics: Dict[str, Any], samples: int, seconds: float) -> Dict[str, Any]:
        """The run's summary: "valid" = metrics of the final model (auc, logloss, num_samples,
        positive_rate, calibration, gauc, gate statistics), the best evaluation, every evaluation
        (with the epoch's train AUC, None with train.train_auc off), "test" (set by `fit` with a
        test split), and the throughput of this process's part of the run: `samples` trained in
        `seconds` of wall time, evaluation and checkpoints included (a resumed run counts from its
        resume; None when this process trained no sample: no throughput was measured)."""
        return {
            "valid": metrics,
            "best_auc": self.state.best_auc,
            "best_step": self.state.best_step,
            "best_epoch": self.state.best_epoch,
            "epochs": self.train_loader.epoch,
            "steps": self.state.step,
            "samples_trained": self.state.samples_trained,
            "evaluations": self.state.evaluations,
            "wall_seconds": seconds,
            "samples_per_sec": samples / seconds if samples and seconds > 0 else None,
            "world_size": self.env.world_size,
            "embedding_optimizer": self.embedding_optimizer,
        }

    # -- checkpoints ------------------------------------------------------------------------
    def save_checkpoint(
        self, metrics: Optional[Dict[str, Any]], test: Optional[Dict[str, Any]] = None, loader_state: Optional[Dict[str, int]] = None
    ) -> Path:
        """`loader_state`: the train loader's position to resume from (default: where it is)."""
        trainer = {
            **asdict(self.state),
            "epoch": self.train_loader.epoch,
            "world_size": self.env.world_size,
            "vocab": self.vocab,
            "auc": None if metrics is None else float(metrics["auc"]),
            "metrics": metrics,
            "test_metrics": test,
        }
        files = {ckpt.CONFIG_FILE: to_yaml(self.cfg)}
        selection = searched_architecture(self.model)
        if selection is not None:
            files[ARCHITECTURE_FILE] = json.dumps(selection, indent=2)
        if self.sharded:
            files[PLAN_JSON] = json.dumps(describe_plan(self.model.plan), indent=2)
            files[PLAN_TEXT] = str(self.model.plan) + "\n"
        local = {"loader": self.train_loader.state_dict() if loader_state is None else loader_state, "rng": ckpt.rng_state()}
        if self.train_evaluator is not None:
            local[TRAIN_AUC_ROWS] = self.train_evaluator.state_dict()
        snapshot = ckpt.Snapshot(trainer=json.loads(json.dumps(trainer, default=float)), local=local, files=files)
        return self.checkpointer.save(self.state.step, self.model, self.optimizer, snapshot)

    def restore(self, path: Path) -> None:
        """Model, optimizer, loop state, and (same world size) loader position, RNG and the
        epoch's train-AUC rows. A checkpoint of another model or data is refused, naming what
        differs."""
        ckpt.check_compatible(path, self.cfg, self.vocab)
        # optimizer states must exist before DCP can load into them; the fused ones always do
        for name, optimizer in self.optimizer.optimizers:
            if not (self.sharded and name == "embeddings"):
                optimizer.init_state()
        ckpt.Checkpointer.load(path, self.model, self.optimizer)
        saved = ckpt.read_trainer_state(path)
        # fields a checkpoint predates keep their defaults, and so does best_auc before the first
        # evaluation (-inf, which strict JSON wrote as null)
        self.state = TrainState(**{k: saved[k] for k in asdict(TrainState()) if saved.get(k) is not None})
        local = ckpt.Checkpointer.load_local(path, self.env.rank, self.env.world_size)
        if local is not None:
            self.train_loader.load_state_dict(local["loader"])
            ckpt.set_rng_state(local["rng"])
            if self.train_evaluator is not None:
                # a checkpoint saved with train.train_auc off has no rows of its epoch
                self._train_rows_missing = TRAIN_AUC_ROWS not in local and self.state.epoch_samples > 0
                self.train_evaluator.load_state_dict(local.get(TRAIN_AUC_ROWS, {}))
                if self.env.is_main and self._train_rows_missing:
                    print(f"warning: {path} holds no train-AUC rows of epoch {saved['epoch']}: its train_auc is recorded as None", file=sys.stderr, flush=True)
        else:
            if self.env.is_main and self.state.epoch_samples:
                print(
                    f"warning: {path} was written by {saved['world_size']} ranks and this run has {self.env.world_size}: "
                    f"epoch {saved['epoch']} restarts from its beginning, and the {self.state.epoch_samples} samples "
                    "it trained on before the checkpoint are seen again",
                    file=sys.stderr,
                    flush=True,
                )
            self.state.epoch_samples = 0
            self.train_loader.set_epoch(int(saved["epoch"]))
            ckpt.seed_everything(self.cfg.train.seed + self.state.step * 1000 + self.env.rank)
        # the warmup schedule continues from the restored step; this scheduler step comes before
        # the optimizer's first on purpose, which torch warns of
        self.scheduler.last_epoch = self.state.step - 1
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)` before `optimizer.step\(\)`", category=UserWarning)
            self.scheduler.step()
        if self.env.is_main:
            print(f"resumed from {path} at step {self.state.step} (epoch {saved['epoch']})", flush=True)
