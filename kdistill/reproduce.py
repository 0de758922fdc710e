"""Experiments of three phases (teacher alone, student alone, distilled student), and presets.

:func:`run_phase` trains one phase in its own folder of the run folder. A phase that finished
(``result.json`` there, same configuration) is reused; one that was stopped is resumed from its
checkpoint. So rerunning an interrupted experiment with the same run folder continues it.

Presets:

- ``hinton-mnist``: the setup of Hinton, Vinyals and Dean (2015), section 3, at a length that fits
  about an hour on two CPU cores (``configs/hinton-mnist-short.toml`` halves it).
- ``demo``: a few minutes. The student trained alone sees 1,000 labeled images; the distilled
  student sees the teacher's soft targets on all 60,000 training images and no labels. The
  teacher (trained on all labels) is kept in the data cache and reused by later runs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import TensorDataset

from kdistill import distributed
from kdistill.checkpoint import atomic_write_text
from kdistill.config import ConfigError, ExperimentConfig, ModelConfig, config_from_dict
from kdistill.models import build_model, load_state, load_weights_file
from kdistill.teacher_cache import TeacherCache, build_teacher_cache
from kdistill.trainer import FitResult, ProgressCallback, fit, seed_everything

logger = logging.getLogger(__name__)

PHASES = ("teacher", "student", "distill")

PAPER_ERRORS = {"teacher": 67, "student": 146, "distill": 74}

PRESETS: dict[str, dict[str, Any]] = {
    "hinton-mnist": {
        "data": {"name": "mnist"},
        "teacher": {
            "model": "hinton-teacher",
            "train": {"epochs": 60, "lr": 0.1, "jitter": 2, "seed": 1},
        },
        "student": {"model": "hinton-student", "train": {"epochs": 40, "lr": 0.05, "seed": 2}},
        "distill": {
            "temperature": 20.0,
            "alpha": 0.9,
            "train": {"epochs": 40, "lr": 0.05, "seed": 3},
        },
    },
    "demo": {
        "data": {"name": "mnist", "labeled": 1000},
        "teacher": {
            "model": "mlp",
            "kwargs": {"hidden": [1200, 1200], "dropout": 0.3},
            "train": {"epochs": 3, "lr": 0.1, "seed": 1},
        },
        "student": {
            "model": "hinton-student",
            "train": {"epochs": 50, "lr": 0.05, "batch_size": 100, "seed": 2},
        },
        "distill": {
            "temperature": 4.0,
            "alpha": 1.0,
            "train": {"epochs": 3, "lr": 0.05, "seed": 3},
        },
    },
}


def config_digest(values: dict[str, Any]) -> str:
    """A short hash of a configuration (used to name cached teachers)."""
    return hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()[:12]


def phase_datasets(
    config: ExperimentConfig, phase: str, train: TensorDataset
) -> tuple[TensorDataset, bool]:
    """The training set of ``phase`` and whether its labels may be used.

    With ``data.labeled > 0`` the student alone gets a seeded random subset of that many labeled
    images, and the distilled student gets every image without labels.
    """
    labeled = config.data.labeled
    if labeled <= 0 or phase == "teacher":
        return train, True
    if phase == "distill":
        return train, False
    x, y = train.tensors
    if labeled > len(y):
        raise ConfigError(f"data.labeled is {labeled} but the training set has {len(y)} images")
    generator = torch.Generator().manual_seed(config.data.labeled_seed)
    index = torch.randperm(len(y), generator=generator)[:labeled]
    return TensorDataset(x[index], y[index]), True


def make_model(spec: ModelConfig) -> nn.Module:
    """Build a model (seeded by its ``train.seed``) and load its ``init`` weights if given."""
    seed_everything(spec.train.seed)
    model = build_model(spec.model, spec.kwargs)
    if spec.init:
        load_state(model, load_weights_file(spec.init), spec.init)
    return model


def teacher_weights_path(config: ExperimentConfig, run_dir: Path) -> Path:
    return (
        Path(config.distill.teacher)
        if config.distill.teacher
        else run_dir / "teacher" / ("model.safetensors")
    )


def load_teacher(config: ExperimentConfig, run_dir: Path) -> nn.Module:
    """The teacher model of ``config`` with its trained weights."""
    path = teacher_weights_path(config, run_dir)
    teacher = build_model(config.teacher.model, config.teacher.kwargs)
    load_state(teacher, load_weights_file(path), path)
    return teacher


def open_teacher_cache(
    config: ExperimentConfig, run_dir: Path, teacher: nn.Module, train_set: Any
) -> TeacherCache:
    """The teacher cache of ``distill.teacher_cache``, verified, or built there if absent.

    Raises:
        ConfigError: the distillation jitters its inputs, which a cache cannot serve.
        TeacherCacheError: the cache is stale (another teacher or other data) or damaged.
    """
    if config.distill.train.jitter:
        raise ConfigError(
            f"distill.teacher_cache needs distill.train.jitter = 0, got "
            f"{config.distill.train.jitter}: cached teacher outputs are only valid for inputs "
            "that are not randomly augmented"
        )
    folder = Path(config.distill.teacher_cache)
    options = {
        "teacher_checkpoint": teacher_weights_path(config, run_dir),
        "dataset_name": f"{config.data.name}-train",
    }
    # Under torchrun rank 0 builds it once; every process then opens and verifies it.
    if not (folder / "manifest.json").exists() and distributed.context().is_main:
        logger.info("building the teacher cache in %s", folder)
        build_teacher_cache(teacher, train_set, folder, dtype="float32", **options)
    distributed.barrier()
    return TeacherCache.open(folder, dataset=train_set, **options)


def phase_signature(config: ExperimentConfig, phase: str) -> dict[str, Any]:
    """The parts of ``config`` that decide what ``phase`` computes.

    A finished or stopped phase is reused only when these match, so changing, say, the
    distillation settings does not retrain the teacher.
    """
    values = config.to_dict()
    data = {k: v for k, v in values["data"].items() if k != "root"}
    if phase == "teacher":
        return {"data": {"name": data["name"]}, "teacher": values["teacher"]}
    if phase == "student":
        return {"data": data, "student": values["student"]}
    models = {k: {"model": values[k]["model"], "kwargs": values[k]["kwargs"]} for k in PHASES[:2]}
    distill = dict(values["distill"])
    if distill["teacher"]:  # the same file named relatively or absolutely is the same teacher
        distill["teacher"] = str(Path(distill["teacher"]).resolve())
    return {"data": data, "models": models, "init": values["student"]["init"], **distill}


def run_phase(
    config: ExperimentConfig,
    phase: str,
    phase_dir: str | Path,
    train: TensorDataset,
    test: TensorDataset,
    *,
    teacher_dir: Path | None = None,
    resume: bool | None = None,
    progress: ProgressCallback | None = None,
) -> FitResult:
    """Train one phase of an experiment in ``phase_dir``.

    Args:
        config: the experiment.
        phase: ``"teacher"``, ``"student"`` (alone) or ``"distill"``.
        phase_dir: the phase's run folder.
        train, test: the data.
        teacher_dir: for ``"distill"``: the folder holding the teacher's ``model.safetensors``
            (default: the sibling ``teacher`` folder, or ``distill.teacher`` when set).
        resume: True: continue from the checkpoint (it must exist); False: start afresh;
            None: reuse a finished phase with the same configuration, else resume when a
            checkpoint exists, else start.
        progress: progress callback passed to :func:`kdistill.trainer.fit`.

    Returns:
        The phase's :class:`FitResult`.

    Raises:
        ConfigError: the configuration is inconsistent (e.g. unlabeled distillation with
            ``alpha < 1``).
    """
    if phase not in PHASES:
        raise ValueError(f"phase must be one of {PHASES}, got {phase!r}")
    phase_dir = Path(phase_dir)
    if phase == "distill" and teacher_dir is not None and not config.distill.teacher:
        weights = str(Path(teacher_dir) / "model.safetensors")
        config = dataclasses.replace(
            config, distill=dataclasses.replace(config.distill, teacher=weights)
        )
    record = {"phase": phase, "experiment": config.to_dict()}
    config_path = phase_dir / "config.json"
    same_config = False
    if config_path.is_file():
        saved_phase, saved = read_phase_config(phase_dir)
        same_config = saved_phase == phase and phase_signature(saved, phase) == phase_signature(
            config, phase
        )
    if resume is None:
        result_path = phase_dir / "result.json"
        if same_config and result_path.is_file():
            logger.info("%s: reusing the finished run in %s", phase, phase_dir)
            values = json.loads(result_path.read_text())
            return FitResult(**{**values, "run_dir": Path(values["run_dir"])})
        resume = same_config and (phase_dir / "last.safetensors").is_file()
    phase_dir.mkdir(parents=True, exist_ok=True)
    # Under torchrun every process decides the above before rank 0 rewrites config.json.
    distributed.barrier()
    if distributed.context().is_main:
        atomic_write_text(config_path, json.dumps(record, indent=2) + "\n")

    train_set, use_labels = phase_datasets(config, phase, train)
    if phase == "distill":
        if not use_labels and config.distill.alpha != 1.0:
            raise ConfigError(
                f"data.labeled is {config.data.labeled}, so the distilled student learns from "
                f"soft targets only and distill.alpha must be 1.0, got {config.distill.alpha}"
            )
        teacher = load_teacher(config, phase_dir.parent)
        cache = None
        if config.distill.teacher_cache:
            cache = open_teacher_cache(config, phase_dir.parent, teacher, train_set)
        spec = ModelConfig(
            model=config.student.model,
            kwargs=config.student.kwargs,
            init=config.student.init,
            train=config.distill.train,
        )
        student = make_model(spec)
        return fit(
            student,
            train_set,
            test,
            config.distill.train,
            phase_dir,
            teacher=teacher,
            teacher_cache=cache,
            temperature=config.distill.temperature,
            alpha=config.distill.alpha,
            use_labels=use_labels,
            resume=resume,
            progress=progress,
            name=phase,
        )
    spec = config.teacher if phase == "teacher" else config.student
    model = make_model(spec)
    return fit(
        model, train_set, test, spec.train, phase_dir, resume=resume, progress=progress, name=phase
    )


def read_phase_config(phase_dir: str | Path) -> tuple[str, ExperimentConfig]:
    """The phase name and configuration saved in a phase folder's ``config.json``.

    Raises:
        ConfigError: the folder has no readable ``config.json``.
    """
    path = Path(phase_dir) / "config.json"
    try:
        record = json.loads(path.read_text())
        return record["phase"], config_from_dict(record["experiment"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ConfigError(f"{path} is missing or not a kdistill run configuration: {err}") from err


def plot_comparison(results: dict[str, FitResult], path: Path, title: str) -> None:
    """One PNG with the test-error curves of all phases."""
    if not distributed.context().is_main:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    from kdistill.checkpoint import atomic_write

    labels = {"teacher": "teacher", "student": "student alone", "distill": "distilled student"}
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for phase, result in results.items():
        epochs = [r["epoch"] for r in result.history]
        ax.plot(epochs, [r["test_errors"] for r in result.history], label=labels[phase])
    ax.set(xlabel="epoch", ylabel="test errors (of 10,000)", yscale="log", title=title)
    ax.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.yaxis.set_minor_formatter(matplotlib.ticker.ScalarFormatter())
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100))
    plt.close(fig)


def summary(results: dict[str, FitResult]) -> dict[str, Any]:
    """JSON-ready summary: each phase's final and best test errors and wall time."""
    return {
        phase: {
            "errors": r.errors,
            "best_errors": r.best_errors,
            "epochs": r.epochs,
            "wall_time": round(r.wall_time, 1),
            "paper_errors": PAPER_ERRORS[phase],
        }
        for phase, r in results.items()
    }


__all__ = [
    "PAPER_ERRORS",
    "PHASES",
    "PRESETS",
    "config_digest",
    "load_teacher",
    "phase_datasets",
    "plot_comparison",
    "read_phase_config",
    "run_phase",
    "summary",
]
