"""The training loop: train a model alone, or distil a frozen teacher into a student.

One function, :func:`fit`, does both. With a teacher, each batch goes through the teacher (eval
mode, no gradient) and the student is trained on :class:`kdistill.DistillationLoss`:
``alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * cross_entropy(student, labels)``.
Without a teacher it is ordinary cross-entropy training.

Everything random is seeded, and the run folder always holds a checkpoint from which
:func:`fit` with ``resume=True`` continues bit-identically on CPU:

- the order of the examples in epoch ``e`` is a function of ``(seed, e)`` only, so a run
  resumed in the middle of an epoch skips exactly the batches it had done;
- the checkpoint holds the model and optimizer state, the epoch and step, and the states of
  torch's, numpy's and Python's global generators and of the jitter generator;
- the learning rate is a pure function of the step (:func:`learning_rate`), so there is no
  scheduler state to lose.

Run folder contents: ``config.json`` (written by the caller), ``metrics.jsonl`` (one JSON
record per epoch), ``curve.png`` (learning curve), ``last.safetensors`` (full state for
resuming), ``best.safetensors`` (weights with the fewest test errors so far),
``model.safetensors`` (final weights) and ``result.json`` (final numbers).
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from kdistill import distributed
from kdistill.checkpoint import (
    CheckpointError,
    atomic_write,
    atomic_write_text,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from kdistill.config import TrainConfig
from kdistill.losses import DistillationLoss
from kdistill.models import random_shift
from kdistill.safeio import DIGEST_KEY, tensors_digest

logger = logging.getLogger(__name__)

ProgressCallback = Callable[[dict[str, Any]], None]


class TrainingInterrupted(Exception):
    """Training stopped early (a signal, or ``stop_after_steps``) after saving a checkpoint."""

    def __init__(self, run_dir: Path, signum: int | None) -> None:
        self.run_dir = run_dir
        self.signum = signum
        reason = f"signal {signal.Signals(signum).name}" if signum else "a step limit"
        super().__init__(f"training in {run_dir} stopped by {reason}; checkpoint saved")


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite; the last checkpoint predates it and is intact."""


@dataclass
class FitResult:
    """Outcome of :func:`fit`: the final test numbers, the best epoch and the history."""

    run_dir: Path
    errors: int
    accuracy: float
    best_errors: int
    best_epoch: int
    epochs: int
    wall_time: float
    history: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["run_dir"] = str(self.run_dir)
        return out


def seed_everything(seed: int) -> None:
    """Seed torch, numpy and Python's ``random`` (call before building a model)."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def learning_rate(step: int, total_steps: int, config: TrainConfig) -> float:
    """Learning rate at optimizer step ``step`` (0-based) out of ``total_steps``.

    ``onecycle``: linear warm-up from ``lr / 25`` to ``lr`` over the first ``warmup`` fraction
    of the steps, then cosine decay to ``lr / 25e4``. ``cosine``: cosine decay from ``lr`` to 0.
    ``constant``: ``lr``.
    """
    peak = config.lr
    progress = step / max(1, total_steps)
    if config.schedule == "constant":
        return peak
    if config.schedule == "cosine":
        return 0.5 * peak * (1.0 + math.cos(math.pi * progress))
    start, end = peak / 25.0, peak / 25e4
    if progress < config.warmup:
        return start + (peak - start) * progress / config.warmup
    decay = (progress - config.warmup) / (1.0 - config.warmup)
    return end + 0.5 * (peak - end) * (1.0 + math.cos(math.pi * decay))


def make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """SGD with Nesterov momentum, or AdamW, over the model's trainable parameters."""
    params = [p for p in model.parameters() if p.requires_grad]
    if config.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    return torch.optim.SGD(
        params,
        lr=config.lr,
        momentum=config.momentum,
        nesterov=config.momentum > 0,
        weight_decay=config.weight_decay,
    )


def epoch_order(num_examples: int, seed: int, epoch: int) -> Tensor:
    """The order of the training examples in ``epoch``: a function of ``(seed, epoch)`` only."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(num_examples, generator=generator)


def dataset_tensors(dataset: Any) -> tuple[Tensor, Tensor]:
    """The ``(inputs, labels)`` tensors of a ``TensorDataset`` (or any indexable dataset)."""
    if hasattr(dataset, "tensors"):
        x, y = dataset.tensors[:2]
        return x, y
    items = [dataset[i] for i in range(len(dataset))]
    return torch.stack([x for x, _ in items]), torch.as_tensor([int(y) for _, y in items])


@torch.no_grad()
def evaluate(model: nn.Module, dataset: Any, batch_size: int = 1000) -> dict[str, float]:
    """Test errors, accuracy and mean cross-entropy of ``model`` on ``dataset`` (eval mode).

    Returns:
        ``{"errors": int, "accuracy": float, "loss": float, "count": int}``.
    """
    x, y = dataset_tensors(dataset)
    device = next(model.parameters(), torch.empty(0)).device
    was_training = model.training
    model.eval()
    errors, loss_sum = 0, 0.0
    for start in range(0, len(y), batch_size):
        logits = model(x[start : start + batch_size].to(device))
        target = y[start : start + batch_size].to(device)
        errors += int((logits.argmax(1) != target).sum())
        loss_sum += float(nn.functional.cross_entropy(logits, target, reduction="sum"))
    model.train(was_training)
    count = max(1, len(y))
    return {
        "errors": errors,
        "accuracy": 1.0 - errors / count,
        "loss": loss_sum / count,
        "count": len(y),
    }


def plot_history(history: list[dict[str, Any]], path: str | Path, title: str = "") -> None:
    """Write a learning-curve PNG: test errors and training loss per epoch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [r["epoch"] for r in history]
    fig, (ax_err, ax_loss) = plt.subplots(1, 2, figsize=(10, 4))
    ax_err.plot(epochs, [r["test_errors"] for r in history], marker=".")
    ax_err.set(xlabel="epoch", ylabel="test errors", title=title or "test errors")
    ax_err.grid(alpha=0.3)
    ax_loss.plot(epochs, [r["train_loss"] for r in history], marker=".")
    ax_loss.set(xlabel="epoch", ylabel="training loss", yscale="log", title="training loss")
    ax_loss.grid(alpha=0.3)
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100))
    plt.close(fig)


class _StopFlag:
    """Turns SIGINT/SIGTERM into a flag checked between steps (main thread only)."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _StopFlag:
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        logger.warning("received %s: stopping after this step", signal.Signals(signum).name)
        self.signum = signum

    def __exit__(self, *exc: Any) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


def _save_weights(model: nn.Module, path: Path, metadata: dict[str, str]) -> None:
    if not distributed.context().is_main:
        return
    from safetensors.torch import save

    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    payload = save(state, metadata={**metadata, DIGEST_KEY: tensors_digest(state)})
    atomic_write(path, lambda f: f.write(payload))


def _read_history(path: Path, completed_epochs: int) -> list[dict[str, Any]]:
    """Metrics of the epochs a checkpoint covers (records written after it are dropped)."""
    if not path.is_file():
        return []
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    records = []
    for number, line in enumerate(lines, start=1):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as err:
            if number == len(lines):
                # Torn by a crash while it was appended; its epoch is after the checkpoint.
                break
            raise CheckpointError(f"{path} line {number} is not a JSON record: {err}") from err
    return [r for r in records if r["epoch"] <= completed_epochs]


def fit(
    student: nn.Module,
    train_set: Any,
    test_set: Any,
    config: TrainConfig,
    run_dir: str | Path,
    *,
    teacher: nn.Module | None = None,
    teacher_cache: Any = None,
    temperature: float = 1.0,
    alpha: float = 0.0,
    use_labels: bool = True,
    resume: bool = False,
    progress: ProgressCallback | None = None,
    stop_after_steps: int | None = None,
    name: str = "train",
) -> FitResult:
    """Train ``student`` alone, or distil ``teacher`` into it, checkpointing into ``run_dir``.

    Args:
        student: the model to train (its current weights are the starting point).
        train_set: training (or transfer) set; a ``TensorDataset`` of inputs and int labels.
        test_set: evaluated after every epoch.
        config: optimizer, schedule, epochs, batch size, jitter, seed, checkpointing.
        run_dir: folder for checkpoints, metrics and the plot.
        teacher: a trained model; frozen, in eval mode, run under ``no_grad`` on each batch.
        teacher_cache: a :class:`kdistill.teacher_cache.TeacherCache` of the teacher's logits on
            ``train_set`` (in its order), read instead of running ``teacher``; needs
            ``config.jitter == 0``.
        temperature: softening temperature of the soft targets.
        alpha: weight of the soft term (needs a teacher); ``1 - alpha`` weighs the labels.
        use_labels: False trains on the teacher's soft targets only (needs ``alpha == 1``);
            the labels of ``train_set`` are then never read.
        resume: continue from ``run_dir/last.safetensors``; it must exist.
        progress: called with event dicts (``start``, ``step``, ``epoch``) for progress bars.
        stop_after_steps: stop (with a checkpoint) once this many steps are done in total.
        name: label of this run in logs and metrics.

    Returns:
        A :class:`FitResult` with the final test errors and the per-epoch history.

    Raises:
        TrainingInterrupted: SIGINT/SIGTERM or ``stop_after_steps`` stopped training; a
            checkpoint was saved first, so ``resume=True`` continues exactly.
        CheckpointError: ``resume`` is set but the checkpoint is missing, damaged, or was
            written for a different model or configuration.
        ValueError: inconsistent arguments (``alpha > 0`` without a teacher, ...).

    Example:
        >>> result = fit(student, train, test, TrainConfig(epochs=2), "runs/demo",
        ...              teacher=teacher, temperature=4.0, alpha=0.9)  # doctest: +SKIP
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if teacher_cache is not None:
        teacher_cache.check_training(len(dataset_tensors(train_set)[0]), config.jitter)
    if alpha > 0 and teacher is None and teacher_cache is None:
        raise ValueError(f"alpha is {alpha} but no teacher was given")
    if not use_labels and alpha != 1.0:
        raise ValueError(f"training without labels needs alpha == 1, got alpha={alpha}")

    # Setup: data, teacher, loss, optimizer.
    train_x, train_y = dataset_tensors(train_set)
    num_batches = math.ceil(len(train_x) / config.batch_size)
    total_steps = num_batches * config.epochs
    if teacher is not None:
        teacher.eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
    criterion = DistillationLoss(temperature=temperature, alpha=alpha)
    dist_ctx = distributed.context()
    student.to(dist_ctx.device)
    if teacher is not None:
        teacher.to(dist_ctx.device)
    model = distributed.wrap_model(student, dist_ctx)
    if not dist_ctx.is_main:
        progress = None
    optimizer = make_optimizer(student, config)
    jitter_generator = torch.Generator().manual_seed(config.seed + 7919)
    metrics_path, last_path = run_dir / "metrics.jsonl", run_dir / "last.safetensors"
    signature = {
        "name": name,
        "train": asdict(config),
        "temperature": temperature,
        "alpha": alpha,
        "use_labels": use_labels,
        "num_train": len(train_x),
    }

    epoch, step, global_step = 0, 0, 0
    best_errors, best_epoch, loss_sum, seconds_before = -1, 0, 0.0, 0.0
    if resume:
        state = load_checkpoint(last_path)
        if state.get("signature") != signature:
            raise CheckpointError(
                f"{last_path} was written by a different run: "
                f"{state.get('signature')} != {signature}"
            )
        from kdistill.models import load_state

        load_state(student, state["model"], last_path)
        optimizer.load_state_dict(state["optim"])
        set_rng_state(state["rng"], jitter_generator)
        p = state["progress"]
        epoch, step, global_step = p["epoch"], p["step"], p["global_step"]
        best_errors, best_epoch, loss_sum = p["best_errors"], p["best_epoch"], p["loss_sum"]
        seconds_before = p["seconds"]
        logger.info("%s: resuming at epoch %d, step %d", name, epoch + 1, step)
    else:
        if dist_ctx.is_main:
            for path in (metrics_path, last_path, run_dir / "result.json"):
                path.unlink(missing_ok=True)
        torch.manual_seed(config.seed)
        np.random.seed(config.seed % 2**32)
        random.seed(config.seed)
    history = _read_history(metrics_path, epoch)
    distributed.barrier(dist_ctx)  # every process has read the files before rank 0 rewrites them
    if dist_ctx.is_main:
        atomic_write_text(metrics_path, "".join(json.dumps(r) + "\n" for r in history))

    def checkpoint() -> None:
        if not dist_ctx.is_main:
            distributed.barrier(dist_ctx)
            return
        save_checkpoint(
            last_path,
            {
                "model": student.state_dict(),
                "optim": optimizer.state_dict(),
                "rng": rng_state(jitter_generator),
                "progress": {
                    "epoch": epoch,
                    "step": step,
                    "global_step": global_step,
                    "best_errors": best_errors,
                    "best_epoch": best_epoch,
                    "loss_sum": loss_sum,
                    "seconds": seconds_before + time.perf_counter() - started,
                },
                "signature": signature,
            },
        )
        distributed.barrier(dist_ctx)

    # Train.
    if progress:
        progress({"event": "start", "name": name, "total": total_steps, "done": global_step})
    started = time.perf_counter()
    with _StopFlag() as stop:
        while epoch < config.epochs:
            order = epoch_order(len(train_x), config.seed, epoch)
            epoch_started = time.perf_counter()
            student.train()
            while step < num_batches:
                index = order[step * config.batch_size : (step + 1) * config.batch_size]
                x = random_shift(train_x[index], config.jitter, jitter_generator)
                labels = train_y[index] if use_labels else None
                # This process's part of the global batch (all of it for a single process).
                part = distributed.shard(len(index), dist_ctx)
                x = x[part].to(dist_ctx.device)
                labels = labels[part].to(dist_ctx.device) if labels is not None else None

                teacher_logits = None
                if teacher_cache is not None:
                    teacher_logits = teacher_cache.logits(index[part]).to(dist_ctx.device)
                elif teacher is not None:
                    with torch.no_grad(), distributed.autocast(config.precision, dist_ctx.device):
                        teacher_logits = teacher(x)
                lr = learning_rate(global_step, total_steps, config)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                with distributed.autocast(config.precision, dist_ctx.device):
                    student_logits = model(x)
                # The loss in float32, normalised by the global batch (see kdistill.distributed).
                loss = criterion(
                    student_logits.float(),
                    teacher_logits.float() if teacher_logits is not None else None,
                    labels,
                    normalizer=distributed.local_normalizer(len(index), dist_ctx),
                )
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                if hasattr(student, "apply_constraints"):
                    student.apply_constraints()

                step += 1
                global_step += 1
                step_loss, stop.signum = distributed.reduce_step(
                    loss.detach(), stop.signum, dist_ctx
                )
                if not math.isfinite(step_loss):
                    # Raised before any checkpoint of this step, so last.safetensors still holds
                    # the weights from before the loss went bad.
                    raise NonFiniteLossError(
                        f"the training loss is {step_loss} at epoch {epoch + 1}, step {step}; "
                        f"stopped without saving: {run_dir / 'last.safetensors'} holds the last "
                        "good state (check the learning rate and the inputs)"
                    )
                loss_sum += step_loss
                if progress:
                    progress({"event": "step", "loss": step_loss, "lr": lr})
                limit_hit = stop_after_steps is not None and global_step >= stop_after_steps
                periodic = config.checkpoint_every and global_step % config.checkpoint_every == 0
                if stop.signum is not None or limit_hit:
                    checkpoint()
                    raise TrainingInterrupted(run_dir, stop.signum)
                if periodic and step < num_batches:
                    checkpoint()

            # Evaluate, record, checkpoint.
            scores = distributed.evaluate_sharded(
                evaluate, student, test_set, config.eval_batch_size, dist_ctx
            )
            epoch += 1
            record = {
                "name": name,
                "epoch": epoch,
                "step": global_step,
                "lr": learning_rate(global_step - 1, total_steps, config),
                "train_loss": loss_sum / num_batches,
                "test_errors": scores["errors"],
                "test_accuracy": scores["accuracy"],
                "test_loss": scores["loss"],
                "epoch_seconds": time.perf_counter() - epoch_started,
            }
            history.append(record)
            if dist_ctx.is_main:
                with open(metrics_path, "a", encoding="utf-8") as f:
                    f.write(json.dumps(record) + "\n")
                    f.flush()
                    os.fsync(f.fileno())
            if best_errors < 0 or scores["errors"] < best_errors:
                best_errors, best_epoch = scores["errors"], epoch
                _save_weights(student, run_dir / "best.safetensors", {"epoch": str(epoch)})
            logger.info(
                "%s epoch %d/%d: train loss %.4f, test errors %d",
                name,
                epoch,
                config.epochs,
                record["train_loss"],
                scores["errors"],
            )
            if progress:
                progress({"event": "epoch", **record})
            step, loss_sum = 0, 0.0
            checkpoint()
            if stop.signum is not None:
                raise TrainingInterrupted(run_dir, stop.signum)

    # Finish: final weights, plot, result.
    _save_weights(student, run_dir / "model.safetensors", {"epochs": str(epoch)})
    if history and dist_ctx.is_main:
        plot_history(history, run_dir / "curve.png", title=f"{name}: test errors")
    final = (
        history[-1]
        if history
        else distributed.evaluate_sharded(
            evaluate, student, test_set, config.eval_batch_size, dist_ctx
        )
    )
    result = FitResult(
        run_dir=run_dir,
        errors=int(final["test_errors"]) if history else int(final["errors"]),
        accuracy=float(final["test_accuracy"]) if history else float(final["accuracy"]),
        best_errors=best_errors,
        best_epoch=best_epoch,
        epochs=epoch,
        wall_time=seconds_before + time.perf_counter() - started,
        history=history,
    )
    if dist_ctx.is_main:
        atomic_write_text(run_dir / "result.json", json.dumps(result.to_dict(), indent=2) + "\n")
    distributed.barrier(dist_ctx)
    return result
