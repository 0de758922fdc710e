"""Experiment configuration: TOML files, validated, with command-line overrides.

An experiment has up to three training phases: the teacher trained alone, the student trained
alone (the baseline) and the student distilled from the teacher. Example::

    [data]
    name = "mnist"            # or "fashion-mnist"
    labeled = 0               # > 0: the students see only this many labeled training images

    [teacher]
    model = "hinton-teacher"  # a name from kdistill.models.MODELS or "package.module:factory"
    kwargs = {}
    train = { epochs = 100, lr = 0.1, jitter = 2 }

    [student]
    model = "hinton-student"
    train = { epochs = 60 }

    [distill]
    temperature = 20.0
    alpha = 0.9               # weight of the soft targets; 1 - alpha goes to the true labels
    train = { epochs = 100 }

Every key is checked; an unknown key or a value of the wrong type or range raises
:class:`ConfigError` naming it (``teacher.train.lr must be > 0, got -1``).
"""

from __future__ import annotations

import dataclasses
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


class ConfigError(ValueError):
    """A configuration key or value is invalid; the message names it."""


@dataclass
class TrainConfig:
    """How one phase is trained.

    Attributes:
        epochs: passes over the training set.
        batch_size: examples per optimizer step.
        optimizer: ``"sgd"`` (Nesterov momentum) or ``"adamw"``.
        lr: peak learning rate.
        momentum: SGD momentum (ignored by AdamW).
        weight_decay: decoupled for AdamW, L2 for SGD.
        schedule: ``"onecycle"`` (linear warm-up then cosine decay to ~0), ``"cosine"`` (cosine
            decay from the peak) or ``"constant"``.
        warmup: fraction of all steps spent warming up (``"onecycle"`` only).
        jitter: shift training inputs by up to this many pixels (0: off).
        seed: seeds initialisation, data order, dropout and jitter.
        checkpoint_every: also checkpoint every this many steps (0: only at epoch ends).
        eval_batch_size: batch size for evaluation.
        precision: ``"fp32"``, or ``"bf16"`` for bfloat16 autocast of the teacher and student
            forward passes (the loss is always computed in float32).
    """

    epochs: int = 10
    batch_size: int = 128
    optimizer: str = "sgd"
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 0.0
    schedule: str = "onecycle"
    warmup: float = 0.15
    jitter: int = 0
    seed: int = 0
    checkpoint_every: int = 0
    eval_batch_size: int = 1000
    precision: str = "fp32"


@dataclass
class DataConfig:
    """Attributes:
    name: ``"mnist"`` or ``"fashion-mnist"``.
    root: folder with the IDX files; empty: the default cache (``$KDISTILL_DATA_DIR``).
    labeled: if > 0, the student trained alone sees only this many labeled training images
        (a seeded random subset) and the distilled student learns from the teacher's soft
        targets on every training image with no labels (``distill.alpha`` must be 1).
    labeled_seed: seed that picks the labeled subset.
    """

    name: str = "mnist"
    root: str = ""
    labeled: int = 0
    labeled_seed: int = 0


@dataclass
class ModelConfig:
    """Attributes:
    model: a name in ``kdistill.models.MODELS`` or ``"package.module:factory"``.
    kwargs: keyword arguments for the factory.
    init: optional state-dict file (safetensors or torch) to start from.
    train: how this model is trained alone.
    """

    model: str = "mlp"
    kwargs: dict = field(default_factory=dict)
    init: str = ""
    train: TrainConfig = field(default_factory=TrainConfig)


@dataclass
class DistillConfig:
    """Attributes:
    temperature: softening temperature of the soft targets.
    alpha: weight of the soft term; ``1 - alpha`` weighs the hard-label cross-entropy.
    teacher: weights file of the trained teacher; empty: the teacher phase's ``last`` weights.
    teacher_cache: folder of an offline teacher cache: built there on first use, then read
        instead of running the teacher (needs ``train.jitter = 0``); empty: run the teacher.
    train: how the student is distilled.
    """

    temperature: float = 4.0
    alpha: float = 0.9
    teacher: str = ""
    teacher_cache: str = ""
    train: TrainConfig = field(default_factory=TrainConfig)


@dataclass
class ExperimentConfig:
    """A whole experiment: data, teacher, student and distillation settings."""

    data: DataConfig = field(default_factory=DataConfig)
    teacher: ModelConfig = field(default_factory=lambda: ModelConfig(model="hinton-teacher"))
    student: ModelConfig = field(default_factory=lambda: ModelConfig(model="hinton-student"))
    distill: DistillConfig = field(default_factory=DistillConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_CHOICES = {
    "optimizer": ("sgd", "adamw"),
    "schedule": ("onecycle", "cosine", "constant"),
    "precision": ("fp32", "bf16"),
    "name": ("mnist", "fashion-mnist"),
}
_POSITIVE = {"epochs", "batch_size", "lr", "eval_batch_size", "temperature"}
_NON_NEGATIVE = {"momentum", "weight_decay", "jitter", "checkpoint_every", "labeled", "seed"}


def _check_value(where: str, name: str, value: Any, default: Any) -> Any:
    """Check one leaf value against the type of its default and the known ranges."""
    expected = type(default)
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if isinstance(value, bool) != isinstance(default, bool) or not isinstance(value, expected):
        raise ConfigError(
            f"{where} must be {expected.__name__}, got {type(value).__name__} {value!r}"
        )
    if name in _CHOICES and value not in _CHOICES[name]:
        raise ConfigError(f"{where} must be one of {', '.join(_CHOICES[name])}, got {value!r}")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if value != value or value in (float("inf"), float("-inf")):
            raise ConfigError(f"{where} must be finite, got {value}")
        if name in _POSITIVE and not value > 0:
            raise ConfigError(f"{where} must be > 0, got {value}")
        if name in _NON_NEGATIVE and value < 0:
            raise ConfigError(f"{where} must be >= 0, got {value}")
        if name in ("seed", "labeled_seed") and value >= 2**32:
            raise ConfigError(f"{where} must be below 2**32, got {value}")
    if name == "alpha" and not 0.0 <= value <= 1.0:
        raise ConfigError(f"{where} must be in [0, 1], got {value}")
    if name == "warmup" and not 0.0 <= value < 1.0:
        raise ConfigError(f"{where} must be in [0, 1), got {value}")
    return value


def _build(defaults: Any, values: Any, where: str) -> Any:
    """Return a copy of dataclass instance ``defaults`` updated from a dict, checking each key."""
    if not isinstance(values, dict):
        raise ConfigError(f"{where or 'the config'} must be a table, got {type(values).__name__}")
    fields = {f.name for f in dataclasses.fields(defaults)}
    unknown = sorted(set(values) - fields)
    if unknown:
        name = f"{where}.{unknown[0]}" if where else unknown[0]
        raise ConfigError(f"unknown key {name} (known: {', '.join(sorted(fields))})")
    changes = {}
    for key, value in values.items():
        path = f"{where}.{key}" if where else key
        default = getattr(defaults, key)
        if dataclasses.is_dataclass(default):
            changes[key] = _build(default, value, path)
        elif isinstance(default, dict):
            if not isinstance(value, dict):
                raise ConfigError(f"{path} must be a table, got {type(value).__name__}")
            changes[key] = dict(value)
        else:
            changes[key] = _check_value(path, key, value, default)
    return dataclasses.replace(defaults, **changes)


def _merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict) and key != "kwargs":
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def parse_override(text: str) -> tuple[list[str], Any]:
    """Parse ``"a.b.c=VALUE"`` where VALUE is TOML (a bare word is taken as a string).

    Raises:
        ConfigError: the text has no ``=`` or an empty key.
    """
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r} must look like section.key=value")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return key.split("."), value


def load_config(
    path: str | Path | None = None,
    overrides: list[str] | None = None,
    base: dict | None = None,
) -> ExperimentConfig:
    """Build an :class:`ExperimentConfig` from defaults, a base dict, a TOML file and overrides.

    Later sources win: ``base`` (e.g. a preset), then the file, then each override in order.

    Args:
        path: a TOML file, or None.
        overrides: strings like ``"teacher.train.epochs=3"`` or ``'student.kwargs={hidden=[64]}'``.
        base: a nested dict applied before the file.

    Returns:
        The validated configuration.

    Raises:
        ConfigError: the file cannot be read or parsed, or a key or value is invalid.

    Example:
        >>> load_config(overrides=["distill.temperature=20"]).distill.temperature
        20.0
    """
    values: dict = dict(base or {})
    if path is not None:
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as err:
            raise ConfigError(f"cannot read config file {path}: {err.strerror}") from err
        except UnicodeDecodeError as err:
            raise ConfigError(f"config file {path} is not UTF-8 text: {err}") from err
        try:
            values = _merge(values, tomllib.loads(text))
        except tomllib.TOMLDecodeError as err:
            raise ConfigError(f"{path} is not valid TOML: {err}") from err
    for text in overrides or []:
        keys, value = parse_override(text)
        nested: Any = value
        for key in reversed(keys):
            nested = {key: nested}
        values = _merge(values, nested)
    try:
        return _build(ExperimentConfig(), values, "")
    except ConfigError as err:
        if path is not None:
            raise ConfigError(f"{path}: {err}") from err
        raise


def config_from_dict(values: dict) -> ExperimentConfig:
    """Rebuild a configuration saved with :meth:`ExperimentConfig.to_dict` (validated)."""
    return _build(ExperimentConfig(), json.loads(json.dumps(values)), "")
