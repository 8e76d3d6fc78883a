"""The training loop's steps through a TorchRec train pipeline (`train.pipeline`).

A pipeline reads ahead of the step it trains: `TrainPipelineSparseDist` (auto on CUDA) starts the
input all-to-all of batch i+1 on its own stream while batch i computes (on CPU it runs too, with
nothing to overlap); `TrainPipelineBase` (auto on CPU) reads one batch ahead; "none" draws each
batch right before its step. The step is the same whichever runs it (the losses are equal),
because the pieces a pipeline calls itself carry the loop's semantics:

- `model(batch) -> (loss, output)`: `StepLoss`, a thin module around the model whose forward
  computes the label-smoothed BCE mean times the step's weight (0 on a padding step).
- `optimizer.zero_grad()` / `optimizer.step()`: `StepOptimizer`, which also clips the dense
  gradients and advances the warmup between the backward and the update.
- the batch: a pipeline gets the features alone (a KeyedJaggedTensor), since
  TrainPipelineSparseDist finds the tables to pipeline by tracing the sharded model, whose forward
  takes the features. The rest of a drawn batch (labels, whether it is real, the loader's
  position after it) waits in a queue that StepLoss pops: pipelines run forwards in draw order.
- uneven data: batches are drawn by `Scorer.next_or_padding` (the has-a-batch all-reduce and the
  padding batch), ahead of their step but in the same order on every rank, so collectives match.
  It also copies the batch to the device (non-blocking, from pinned memory, on the current
  stream), so the pipelines' own host-to-device copy has nothing left to do.
- checkpoints: each step's result carries the loader's position right after its batch was drawn,
  which is what a loop without read-ahead saves; when the loop leaves an epoch early (max_steps),
  the loader goes back to the position after the last trained batch, so that the batches read
  ahead are read again by whatever comes next (a resume, or the next fit).
- evaluation: each epoch gets its own pipeline, and TrainPipelineSparseDist, which swaps the sharded
  tables' forwards for pipelined ones, gives them back at the epoch's end.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Deque, Dict, Iterator, List, Tuple

import torch
from torch import nn
from torch.optim.lr_scheduler import LRScheduler
from torchrec.distributed.train_pipeline import TrainPipelineBase, TrainPipelineSparseDist
from torchrec.optim.keyed import KeyedOptimizer
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from mdaf_dist.data.batch import Batch
from mdaf_dist.data.loader import StreamingLoader
from mdaf_dist.errors import UserError
from mdaf_dist.models.loss import smoothed_bce
from mdaf_dist.train.score import Scorer


def resolve_pipeline(name: str, device: torch.device, sharded: bool) -> str:
    """`train.pipeline` with "auto" resolved: sparse_dist on CUDA with sharded tables (whose input
    all-to-all it pipelines; it traces the model, which only the sharded one allows), else base."""
    if name == "auto":
        return "sparse_dist" if device.type == "cuda" and sharded else "base"
    if name == "sparse_dist" and not sharded:
        raise UserError("train.pipeline=sparse_dist pipelines the sharded tables, and the plain embedding backend has none: use train.pipeline=base or none")
    return name


@dataclass
class Drawn:
    """A batch as drawn for a step: `real` is False for the padding batch (loss weight 0);
    `loader_state` is the loader's state right after the draw."""

    batch: Batch
    real: bool
    loader_state: Dict[str, int]


@dataclass
class StepResult:
    """One trained step: the sum of this rank's per-sample losses (float64, see `StepLoss`), the
    logits of the training forward (detached) and the drawn batch."""

    loss_sum: torch.Tensor
    logits: torch.Tensor
    drawn: Drawn


class StepLoss(nn.Module):
    """What a pipeline calls as its model: features -> (weighted mean loss, StepResult), the labels
    and weight taken from the head of `queue`. The loss sum is in float64, where summing float32
    values is exact: the global mean the loop logs is then the same however the global batch is
    split over ranks."""

    def __init__(self, model: nn.Module, label_smoothing: float) -> None:
        super().__init__()
        self.model, self.label_smoothing = model, label_smoothing
        self.queue: Deque[Drawn] = deque()

    def forward(self, features: KeyedJaggedTensor) -> Tuple[torch.Tensor, StepResult]:
        drawn = self.queue.popleft()
        logits = self.model(features).logits
        losses = smoothed_bce(logits, drawn.batch.labels, self.label_smoothing, reduction="none")
        weight = 1.0 if drawn.real else 0.0
        return losses.mean() * weight, StepResult(losses.detach().double().sum(), logits.detach(), drawn)


class StepOptimizer:
    """What a pipeline calls as its optimizer. zero_grad also hands the scheduled lr to the fused
    tables' kernels before their in-backward update (torchrec does it there); step clips the
    dense gradients, steps every optimizer and advances the warmup."""

    def __init__(self, optimizer: KeyedOptimizer, scheduler: LRScheduler, dense_params: List[nn.Parameter], clip_norm: float) -> None:
        self.optimizer, self.scheduler, self.dense_params, self.clip_norm = optimizer, scheduler, dense_params, clip_norm

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def step(self) -> None:
        if self.clip_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.dense_params, self.clip_norm)
        self.optimizer.step()
        self.scheduler.step()


class Unpipelined:
    """`train.pipeline=none`: a pipeline's step without reading ahead."""

    def __init__(self, model: StepLoss, optimizer: StepOptimizer) -> None:
        self.model, self.optimizer = model, optimizer

    def progress(self, features: Iterator[KeyedJaggedTensor]) -> StepResult:
        batch = next(features)
        self.optimizer.zero_grad()
        loss, result = self.model(batch)
        loss.backward()
        self.optimizer.step()
        return result


def draw(scorer: Scorer, loader: StreamingLoader, queue: Deque[Drawn]) -> Iterator[KeyedJaggedTensor]:
    """This rank's batches (the padding one while only other ranks have data) until every rank is
    out: each one's features, the rest queued."""
    batches = iter(loader)
    while (batch := scorer.next_or_padding(batches)) is not None:
        queue.append(Drawn(batch, batch is not scorer.padding, loader.state_dict()))
        yield batch.features


class TrainSteps:
    """Runs an epoch's steps through the pipeline `name` (see the module docstring)."""

    def __init__(
        self, name: str, model: nn.Module, optimizer: StepOptimizer, scorer: Scorer, label_smoothing: float, device: torch.device, sharded: bool
    ) -> None:
        self.name = resolve_pipeline(name, device, sharded)
        self.model, self.optimizer, self.scorer, self.device = model, optimizer, scorer, device
        self.loss = StepLoss(model, label_smoothing)

    def _pipeline(self) -> Unpipelined | TrainPipelineBase | TrainPipelineSparseDist:
        if self.name == "none":
            return Unpipelined(self.loss, self.optimizer)
        if self.name == "base":
            return TrainPipelineBase(self.loss, self.optimizer, self.device)
        # the pipeline traces `model` for its sharded tables and calls the loss as its forward
        return TrainPipelineSparseDist(self.model, self.optimizer, self.device, custom_model_fwd=self.loss)

    def step(self, batch: Batch) -> StepResult:
        """One step on a real `batch`, drawn by the caller and not read ahead."""
        self.loss.queue.append(Drawn(batch, True, {}))
        self.loss.train()
        return Unpipelined(self.loss, self.optimizer).progress(iter([batch.features]))

    def run(self, loader: StreamingLoader) -> Iterator[StepResult]:
        """The rest of the loader's epoch, one result per step (a collective: every rank takes the
        same number of results, or closes the iterator at the same step)."""
        pipeline = self._pipeline()
        features = draw(self.scorer, loader, self.loss.queue)
        trained, finished = loader.state_dict(), False
        try:
            while True:
                self.loss.train()
                try:
                    result = pipeline.progress(features)
                except StopIteration:
                    finished = True
                    return
                trained = result.drawn.loader_state
                yield result
        finally:
            features.close()
            self.loss.queue.clear()
            if not finished:  # left early: the batches read ahead are read again next time
                loader.load_state_dict(trained)
            if isinstance(pipeline, TrainPipelineSparseDist):
                # the tables' own forwards back, for evaluation and scoring
                pipeline.detach()
