"""Data-parallel training with ``torchrun``: process group, sharding, reductions, precision.

``torchrun --nproc_per_node=K -m kdistill distill ...`` starts ``K`` processes; each one calls
:func:`distributed_session` (the command line does), which joins the process group (gloo on CPU,
NCCL on CUDA) from the ``RANK`` / ``WORLD_SIZE`` / ``MASTER_ADDR`` variables torchrun sets.
:func:`kdistill.trainer.fit` then asks :func:`context` who it is and:

- cuts every global batch of the single-process run into ``K`` contiguous parts
  (:func:`shard`), so ``K`` processes see exactly the examples one process would, in the same
  order, with the same input jitter;
- wraps the student in ``DistributedDataParallel`` (:func:`wrap_model`);
- passes ``normalizer = global_count / K`` to the loss (:func:`local_normalizer`): each process
  then returns ``K * sum_local / global_count``, and DDP's average of the gradients over the
  ``K`` processes is the gradient of ``sum_global / global_count``, the single-process loss,
  however unevenly the examples are split;
- reduces the training loss and the test errors over the processes, and writes checkpoints,
  metrics and weights from rank 0 only.

Without ``torchrun`` (``WORLD_SIZE`` unset or 1) everything here is a no-op for one process.

Example:
    >>> from kdistill import distributed
    >>> ctx = distributed.context()
    >>> (ctx.rank, ctx.world_size, ctx.is_main)
    (0, 1, True)
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

logger = logging.getLogger(__name__)

__all__ = [
    "PRECISIONS",
    "DistributedContext",
    "autocast",
    "barrier",
    "context",
    "distributed_session",
    "evaluate_sharded",
    "init_distributed",
    "local_normalizer",
    "reduce_step",
    "shard",
    "wrap_model",
]

PRECISIONS = ("fp32", "bf16")
DEFAULT_TIMEOUT_S = 600.0


@dataclass(frozen=True)
class DistributedContext:
    """Where this process stands in a data-parallel run.

    Attributes:
        rank: global index of this process, 0 .. world_size - 1.
        world_size: number of processes.
        local_rank: index of this process on its machine (its GPU with NCCL).
        device: where this process trains: ``cuda:local_rank`` with NCCL, else the CPU.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        """True on rank 0, the process that writes files and prints."""
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        """True when more than one process takes part."""
        return self.world_size > 1


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name} must be an integer, got {value!r}") from None


def context() -> DistributedContext:
    """The :class:`DistributedContext` of this process (a single process when none is set up)."""
    if not (dist.is_available() and dist.is_initialized()):
        return DistributedContext()
    local_rank = _env_int("LOCAL_RANK", 0)
    device = torch.device("cpu")
    if dist.get_backend() == "nccl":
        device = torch.device("cuda", local_rank)
    return DistributedContext(dist.get_rank(), dist.get_world_size(), local_rank, device)


def init_distributed(
    backend: str | None = None, timeout_s: float = DEFAULT_TIMEOUT_S
) -> DistributedContext:
    """Join the process group described by torchrun's environment variables.

    Does nothing when ``WORLD_SIZE`` is unset or 1, or when the group already exists.

    Args:
        backend: ``"gloo"`` or ``"nccl"``; ``None`` picks NCCL when CUDA is available, else gloo.
        timeout_s: how long a collective may wait for the other processes before failing, so
            a crashed process cannot hang the others forever.

    Returns:
        This process's :class:`DistributedContext`.

    Raises:
        RuntimeError: ``WORLD_SIZE > 1`` but torch was built without distributed support.
        ValueError: a torchrun variable is not an integer, or the backend is unknown.
    """
    world_size = _env_int("WORLD_SIZE", 1)
    if world_size <= 1 or (dist.is_available() and dist.is_initialized()):
        return context()
    if not dist.is_available():
        raise RuntimeError(f"WORLD_SIZE is {world_size} but torch.distributed is not available")
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend not in ("gloo", "nccl"):
        raise ValueError(f"backend must be 'gloo' or 'nccl', got {backend!r}")
    local_rank = _env_int("LOCAL_RANK", 0)
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
    dist.init_process_group(
        backend=backend,
        rank=_env_int("RANK", 0),
        world_size=world_size,
        timeout=datetime.timedelta(seconds=timeout_s),
    )
    ctx = context()
    logger.info("rank %d of %d joined (%s, %s)", ctx.rank, ctx.world_size, backend, ctx.device)
    return ctx


@contextlib.contextmanager
def distributed_session(backend: str | None = None) -> Iterator[DistributedContext]:
    """Join the process group for the duration of a command and leave it afterwards.

    Only rank 0 keeps its standard output and INFO logging; the other ranks print nothing on
    standard output and log warnings and errors only, so a ``torchrun`` run reads like a single
    one. A single process (no ``WORLD_SIZE``) passes through untouched.

    Yields:
        This process's :class:`DistributedContext`.
    """
    already = dist.is_available() and dist.is_initialized()
    ctx = init_distributed(backend)
    if not ctx.enabled:
        yield ctx
        return
    quiet = contextlib.ExitStack()
    if not ctx.is_main:
        package_logger = logging.getLogger("kdistill")
        previous_level = package_logger.level
        package_logger.setLevel(logging.WARNING)
        quiet.callback(package_logger.setLevel, previous_level)
        devnull = quiet.enter_context(open(os.devnull, "w"))  # noqa: SIM115
        quiet.enter_context(contextlib.redirect_stdout(devnull))
    try:
        with quiet:
            yield ctx
    finally:
        sys.stdout.flush()
        if not already and dist.is_initialized():
            dist.destroy_process_group()


def shard(count: int, ctx: DistributedContext | None = None) -> slice:
    """This process's contiguous part of a global batch of ``count`` examples.

    The first ``count % world_size`` processes get one example more, as
    ``torch.tensor_split`` cuts. Every process gets the same global batch and keeps its slice.

    Args:
        count: size of the global batch.
        ctx: the context (default: :func:`context`).

    Returns:
        A ``slice`` into the global batch (possibly empty).

    Example:
        >>> [shard(5, DistributedContext(rank=r, world_size=2)) for r in range(2)]
        [slice(0, 3, None), slice(3, 5, None)]
    """
    ctx = ctx or context()
    base, extra = divmod(count, ctx.world_size)
    start = ctx.rank * base + min(ctx.rank, extra)
    stop = start + base + (1 if ctx.rank < extra else 0)
    return slice(start, stop)


def local_normalizer(global_count: int | float, ctx: DistributedContext | None = None) -> float:
    """The normalizer each process passes to the loss so DDP's mean gives the global mean.

    With ``K`` processes DDP averages gradients, so each process divides its summed loss by
    ``global_count / K``: the average of the ``K`` gradients is then the gradient of
    ``sum_all_processes / global_count``.

    Args:
        global_count: valid positions in the whole step over all processes (at least 1 is used).
        ctx: the context (default: :func:`context`).

    Returns:
        ``max(global_count, 1) / world_size``.
    """
    ctx = ctx or context()
    return max(float(global_count), 1.0) / ctx.world_size


def wrap_model(model: nn.Module, ctx: DistributedContext | None = None) -> nn.Module:
    """``DistributedDataParallel(model)`` when several processes take part, else ``model``.

    The model must already be on ``ctx.device``. Rank 0's parameters and buffers are broadcast
    to the others, so all processes start from the same weights.
    """
    ctx = ctx or context()
    if not ctx.enabled:
        return model
    device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)


def barrier(ctx: DistributedContext | None = None) -> None:
    """Wait for every process (no-op for one process)."""
    ctx = ctx or context()
    if ctx.enabled:
        dist.barrier()


def reduce_step(
    loss: Tensor, signum: int | None, ctx: DistributedContext | None = None
) -> tuple[float, int | None]:
    """The global loss of a step and whether any process was asked to stop, in one collective.

    Args:
        loss: this process's loss as returned with :func:`local_normalizer` (the processes'
            mean is the global loss).
        signum: the signal this process received, if any.
        ctx: the context (default: :func:`context`).

    Returns:
        ``(global_loss, signum)``; ``signum`` is set on every process when any one received a
        signal, so all of them stop after the same step.
    """
    ctx = ctx or context()
    if not ctx.enabled:
        return float(loss), signum
    values = torch.tensor(
        [float(loss), float(signum or 0), 1.0 if signum else 0.0],
        dtype=torch.float64,
        device=ctx.device,
    )
    dist.all_reduce(values)
    total, signal_sum, stopped = values.tolist()
    any_signum = round(signal_sum / stopped) if stopped else None
    return total / ctx.world_size, any_signum


def evaluate_sharded(
    evaluate: Callable[[nn.Module, Any, int], dict[str, float]],
    model: nn.Module,
    dataset: Any,
    batch_size: int,
    ctx: DistributedContext | None = None,
) -> dict[str, float]:
    """Run ``evaluate`` on this process's part of ``dataset`` and combine the parts.

    Args:
        evaluate: a function like :func:`kdistill.trainer.evaluate` returning
            ``{"errors", "accuracy", "loss", "count"}`` with ``loss`` a mean per example.
        model: the unwrapped model.
        dataset: a ``TensorDataset`` of inputs and labels.
        batch_size: evaluation batch size.
        ctx: the context (default: :func:`context`).

    Returns:
        The same keys for the whole dataset.
    """
    ctx = ctx or context()
    if not ctx.enabled:
        return evaluate(model, dataset, batch_size)
    from torch.utils.data import TensorDataset

    from kdistill.trainer import dataset_tensors

    x, y = dataset_tensors(dataset)
    part = shard(len(y), ctx)
    scores = evaluate(model, TensorDataset(x[part], y[part]), batch_size)
    count = len(y[part])
    totals = torch.tensor(
        [scores["errors"], scores["loss"] * count, count], dtype=torch.float64, device=ctx.device
    )
    dist.all_reduce(totals)
    errors, loss_sum, total = totals.tolist()
    total_count = max(1, round(total))
    return {
        "errors": round(errors),
        "accuracy": 1.0 - errors / total_count,
        "loss": loss_sum / total_count,
        "count": round(total),
    }


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """Autocast for the teacher and student forward passes.

    Args:
        precision: ``"fp32"`` (no autocast) or ``"bf16"`` (bfloat16 autocast on CPU or CUDA).
        device: the device the forward passes run on.

    Returns:
        A context manager; compute the loss outside it, on ``logits.float()``.

    Raises:
        ValueError: unknown precision.
    """
    if precision == "fp32":
        return contextlib.nullcontext()
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
