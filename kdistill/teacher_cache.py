"""Offline teacher cache: run the teacher once, keep its logits on disk, distil from them.

A distillation epoch normally runs the (larger) teacher forward on every batch. When the teacher's
inputs are the same every epoch, its outputs are too, so they can be computed once and read back.
:func:`build_teacher_cache` writes them as raw NumPy ``.npy`` files, memory-mapped, in float16 or
float32 (either the full logits, or the top-k values and indices), together with a JSON manifest:

``manifest.json``
    ``format``, the teacher checkpoint's SHA-256, the dataset's name and size, a SHA-256 of the
    input tensor (its bytes, shape and dtype), the transform description, the kind (``logits`` or
    ``topk``), ``k``, dtype, shape, and the SHA-256 of each data file.

:meth:`TeacherCache.open` checks every one of these against what the caller is about to train
with and raises :class:`StaleTeacherCacheError` when the teacher, dataset, inputs or transform
differ, or :class:`CorruptTeacherCacheError` when a file is missing, truncated or altered. A
cache is never used on trust.

The stored values are raw logits (temperature 1); the loss applies the temperature. A top-k cache
follows the mass policy of :mod:`kdistill.sparse` (renormalised over the top-k).

Only valid without random augmentation of the teacher's inputs: with jitter or any random
transform the teacher would see different inputs every epoch, and cached outputs would be for
inputs the student never sees. :meth:`TeacherCache.check_training` enforces this for the trainer.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

logger = logging.getLogger(__name__)

FORMAT = "kdistill-teacher-cache-1"
MANIFEST = "manifest.json"
_DTYPES = {"float16": np.float16, "float32": np.float32}


class TeacherCacheError(ValueError):
    """A teacher cache cannot be used; the subclass says whether it is stale or damaged."""


class StaleTeacherCacheError(TeacherCacheError):
    """The cache was built for another teacher, dataset, input set or transform."""


class CorruptTeacherCacheError(TeacherCacheError):
    """A cache file is missing, unreadable, truncated or does not match its recorded hash."""


def sha256_file(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fingerprint_inputs(inputs: Tensor) -> str:
    """Hex SHA-256 of an input tensor: its dtype, shape and bytes in row-major order.

    Args:
        inputs: the whole input set, ``(N, ...)``, in the order the cache is indexed.

    Returns:
        The 64-character hex digest.
    """
    array = inputs.detach().cpu().contiguous()
    digest = hashlib.sha256(f"{array.dtype}|{tuple(array.shape)}|".encode())
    flat = array.reshape(-1).view(torch.uint8) if array.numel() else array.reshape(-1)
    step = 1 << 24
    for start in range(0, flat.numel(), step):
        digest.update(flat[start : start + step].numpy().tobytes())
    return digest.hexdigest()


def dataset_inputs(dataset: Any) -> Tensor:
    """The input tensor of a ``TensorDataset``, a plain tensor, or any indexable ``(x, y)`` set."""
    if isinstance(dataset, Tensor):
        return dataset
    if hasattr(dataset, "tensors"):
        return dataset.tensors[0]
    return torch.stack([dataset[i][0] for i in range(len(dataset))])


def _checkpoint_sha256(teacher_checkpoint: str | Path) -> str:
    path = Path(teacher_checkpoint)
    if not path.is_file():
        raise FileNotFoundError(f"teacher checkpoint {path} does not exist")
    return sha256_file(path)


@dataclass(frozen=True)
class _Expectation:
    teacher_sha256: str
    dataset_name: str
    dataset_size: int
    inputs_sha256: str
    transform: str


def build_teacher_cache(
    teacher: nn.Module | Callable[[Tensor], Tensor],
    dataset: Any,
    path: str | Path,
    *,
    teacher_checkpoint: str | Path,
    dataset_name: str,
    transform: str = "none",
    dtype: str = "float16",
    top_k: int | None = None,
    batch_size: int = 1000,
    overwrite: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> TeacherCache:
    """Run ``teacher`` once over ``dataset`` and store its logits (or top-k) under ``path``.

    The teacher is run in eval mode under ``torch.no_grad`` on the inputs in dataset order; row
    ``i`` of the cache belongs to example ``i``. The folder is written to a temporary sibling and
    renamed into place, so a crash never leaves a half-written cache behind.

    Args:
        teacher: the trained teacher (a module, put in eval mode, or any callable).
        dataset: a ``TensorDataset`` (or tensor, or indexable ``(x, y)`` set) of the exact inputs
            the teacher sees; no random transform may stand between it and the teacher.
        path: the cache folder to create.
        teacher_checkpoint: the weights file the teacher was loaded from; its SHA-256 is recorded.
        dataset_name: a name for the dataset (for example ``"mnist-train"``).
        transform: a description of the deterministic transform applied to the inputs before
            the teacher (``"none"`` when ``dataset`` holds exactly what the teacher sees).
        dtype: ``"float16"`` (half the disk) or ``"float32"``.
        top_k: store only the ``k`` largest logits and their indices (int32) per example.
        batch_size: examples per teacher forward.
        overwrite: replace an existing cache at ``path``.
        progress: called as ``progress(done, total)`` after each batch.

    Returns:
        The cache, opened and verified.

    Raises:
        ValueError: an unknown dtype, a bad ``top_k`` or ``batch_size``, ``path`` exists and
            ``overwrite`` is False, or the teacher's output is not ``(batch, classes)``.
        FileNotFoundError: ``teacher_checkpoint`` does not exist.

    Example:
        >>> cache = build_teacher_cache(teacher, train, "runs/teacher-cache",
        ...                             teacher_checkpoint="runs/teacher/model.safetensors",
        ...                             dataset_name="mnist-train")  # doctest: +SKIP
    """
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be a positive int or None, got {top_k!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    path = Path(path)
    if path.exists() and not overwrite:
        raise ValueError(f"{path} already exists; pass overwrite=True to replace it")

    inputs = dataset_inputs(dataset)
    total = len(inputs)
    teacher_sha = _checkpoint_sha256(teacher_checkpoint)
    inputs_sha = fingerprint_inputs(inputs)
    if isinstance(teacher, nn.Module):
        teacher.eval()

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        files: dict[str, Any] = {}
        shape: tuple[int, ...] | None = None
        with torch.no_grad():
            for start in range(0, total, batch_size):
                logits = teacher(inputs[start : start + batch_size])
                if not isinstance(logits, Tensor) or logits.dim() != 2:
                    raise ValueError(
                        "the teacher must return (batch, classes) logits, got "
                        f"{getattr(logits, 'shape', type(logits).__name__)}"
                    )
                logits = logits.detach().float().cpu()
                if not files:
                    classes = logits.shape[1]
                    if top_k is not None and top_k > classes:
                        raise ValueError(f"top_k is {top_k} but the teacher has {classes} classes")
                    width = classes if top_k is None else top_k
                    shape = (total, width)
                    if top_k is None:
                        files["logits.npy"] = _open_new(tmp / "logits.npy", dtype, shape)
                    else:
                        files["values.npy"] = _open_new(tmp / "values.npy", dtype, shape)
                        files["indices.npy"] = _open_new(tmp / "indices.npy", "int32", shape)
                end = start + logits.shape[0]
                if top_k is None:
                    files["logits.npy"][start:end] = logits.numpy()
                else:
                    values, indices = torch.topk(logits, top_k, dim=1)
                    files["values.npy"][start:end] = values.numpy()
                    files["indices.npy"][start:end] = indices.to(torch.int32).numpy()
                if progress:
                    progress(end, total)
        if not files:
            raise ValueError("the dataset is empty; nothing to cache")
        for array in files.values():
            array.flush()
        del array
        names = list(files)
        files.clear()

        manifest = {
            "format": FORMAT,
            "teacher_sha256": teacher_sha,
            "teacher_checkpoint": Path(teacher_checkpoint).name,
            "dataset": {
                "name": dataset_name,
                "size": total,
                "inputs_sha256": inputs_sha,
                "inputs_shape": list(inputs.shape),
                "inputs_dtype": str(inputs.dtype),
            },
            "transform": transform,
            "kind": "logits" if top_k is None else "topk",
            "top_k": top_k,
            "dtype": dtype,
            "shape": list(shape),
            "values": "raw teacher logits at temperature 1",
            "files": {name: sha256_file(tmp / name) for name in names},
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("cached %d teacher outputs of shape %s in %s", total, shape, path)
    return TeacherCache.open(
        path,
        teacher_checkpoint=teacher_checkpoint,
        dataset=inputs,
        dataset_name=dataset_name,
        transform=transform,
    )


def _open_new(path: Path, dtype: str, shape: tuple[int, ...]) -> np.memmap:
    np_dtype = np.int32 if dtype == "int32" else _DTYPES[dtype]
    return np.lib.format.open_memmap(path, mode="w+", dtype=np_dtype, shape=shape)


class TeacherCache:
    """A verified, memory-mapped teacher cache; build one with :func:`build_teacher_cache`.

    Attributes:
        path: the cache folder.
        manifest: the parsed ``manifest.json``.
        kind: ``"logits"`` or ``"topk"``.
    """

    def __init__(self, path: Path, manifest: dict[str, Any], arrays: dict[str, np.ndarray]):
        self.path = path
        self.manifest = manifest
        self.kind = manifest["kind"]
        self._arrays = arrays

    def __len__(self) -> int:
        return int(self.manifest["shape"][0])

    @property
    def num_classes(self) -> int | None:
        """Classes of a full-logits cache (None for top-k, whose class count is not stored)."""
        return int(self.manifest["shape"][1]) if self.kind == "logits" else None

    @classmethod
    def open(
        cls,
        path: str | Path,
        *,
        teacher_checkpoint: str | Path,
        dataset: Any,
        dataset_name: str,
        transform: str = "none",
        verify_data: bool = True,
    ) -> TeacherCache:
        """Open a cache after checking it against the teacher and data about to be used.

        Args:
            path: the cache folder.
            teacher_checkpoint: the teacher weights file in use now; its SHA-256 must match.
            dataset: the inputs in use now (dataset or tensor); size and fingerprint must match.
            dataset_name: must match the recorded name.
            transform: must match the recorded transform description.
            verify_data: hash the data files against the manifest (one read of the files; only
                worth turning off for very large caches that were verified before).

        Returns:
            The opened cache.

        Raises:
            StaleTeacherCacheError: the teacher checkpoint, dataset name, size, inputs or
                transform differ from those the cache was built with.
            CorruptTeacherCacheError: the manifest or a data file is missing, unreadable, has
                the wrong dtype or shape, or does not match its recorded SHA-256.
        """
        path = Path(path)
        manifest = _read_manifest(path)
        inputs = dataset_inputs(dataset)
        now = _Expectation(
            teacher_sha256=_checkpoint_sha256(teacher_checkpoint),
            dataset_name=dataset_name,
            dataset_size=len(inputs),
            inputs_sha256=fingerprint_inputs(inputs),
            transform=transform,
        )
        recorded = manifest["dataset"]
        checks = [
            ("teacher checkpoint SHA-256", manifest["teacher_sha256"], now.teacher_sha256),
            ("dataset name", recorded["name"], now.dataset_name),
            ("dataset size", recorded["size"], now.dataset_size),
            ("input fingerprint (SHA-256)", recorded["inputs_sha256"], now.inputs_sha256),
            ("transform", manifest["transform"], now.transform),
        ]
        for what, cached, current in checks:
            if cached != current:
                raise StaleTeacherCacheError(
                    f"teacher cache {path} is stale: its {what} is {cached!r} but the current "
                    f"one is {current!r}. Rebuild it with build_teacher_cache(..., overwrite=True)."
                )

        arrays = {}
        for name, expected_sha in manifest["files"].items():
            file = path / name
            if not file.is_file():
                raise CorruptTeacherCacheError(f"teacher cache {path} is missing {name}")
            if verify_data:
                actual = sha256_file(file)
                if actual != expected_sha:
                    raise CorruptTeacherCacheError(
                        f"teacher cache file {file} is damaged: SHA-256 is {actual}, the manifest "
                        f"records {expected_sha}. Rebuild the cache."
                    )
            try:
                array = np.load(file, mmap_mode="r", allow_pickle=False)
            except (OSError, ValueError) as err:
                raise CorruptTeacherCacheError(f"cannot read {file}: {err}") from err
            want_dtype = "int32" if name == "indices.npy" else manifest["dtype"]
            if str(array.dtype) != want_dtype or list(array.shape) != manifest["shape"]:
                raise CorruptTeacherCacheError(
                    f"{file} holds {array.dtype} {list(array.shape)} but the manifest records "
                    f"{want_dtype} {manifest['shape']}"
                )
            arrays[name] = array
        return cls(path, manifest, arrays)

    def _rows(self, name: str, index: Tensor | np.ndarray | slice) -> np.ndarray:
        array = self._arrays[name]
        if isinstance(index, Tensor):
            index = index.detach().cpu().numpy()
        return np.asarray(array[index])

    def logits(self, index: Tensor | np.ndarray | slice) -> Tensor:
        """Teacher logits of the examples ``index`` as float32 ``(len(index), classes)``.

        For a top-k cache this needs :attr:`num_classes`, which a top-k cache does not know; use
        :meth:`topk` with :func:`kdistill.sparse_kd_loss` there.

        Raises:
            TypeError: called on a top-k cache.
        """
        if self.kind != "logits":
            raise TypeError("this is a top-k cache; read it with .topk(index)")
        return torch.from_numpy(self._rows("logits.npy", index).astype(np.float32))

    def topk(self, index: Tensor | np.ndarray | slice) -> tuple[Tensor, Tensor]:
        """``(values float32, indices int64)`` of a top-k cache for the examples ``index``.

        Raises:
            TypeError: called on a full-logits cache.
        """
        if self.kind != "topk":
            raise TypeError("this is a full-logits cache; read it with .logits(index)")
        values = torch.from_numpy(self._rows("values.npy", index).astype(np.float32))
        indices = torch.from_numpy(self._rows("indices.npy", index).astype(np.int64))
        return values, indices

    def check_training(self, num_examples: int, jitter: int = 0) -> None:
        """Refuse a training setup the cache cannot serve.

        Args:
            num_examples: size of the training set about to be iterated.
            jitter: the trainer's random input shift; anything but 0 is refused.

        Raises:
            ValueError: ``jitter`` is not 0 (random augmentation makes cached teacher outputs
                wrong), or the training set's size differs from the cache's.
        """
        if jitter:
            raise ValueError(
                f"a teacher cache needs deterministic teacher inputs, but jitter is {jitter}: "
                "with random augmentation the teacher must run on each augmented batch. Set "
                "jitter = 0 or run the teacher instead of the cache."
            )
        if num_examples != len(self):
            raise ValueError(
                f"the teacher cache holds {len(self)} examples but the training set has "
                f"{num_examples}"
            )


def _read_manifest(path: Path) -> dict[str, Any]:
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise CorruptTeacherCacheError(f"{path} is not a teacher cache: {MANIFEST} is missing")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CorruptTeacherCacheError(f"cannot read {manifest_path}: {err}") from err
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CorruptTeacherCacheError(
            f"{manifest_path} is not a {FORMAT} manifest (format "
            f"{manifest.get('format') if isinstance(manifest, dict) else None!r})"
        )
    required = ("teacher_sha256", "dataset", "transform", "kind", "dtype", "shape", "files")
    missing = [key for key in required if key not in manifest]
    dataset = manifest.get("dataset")
    if missing or not isinstance(dataset, dict) or {"name", "size", "inputs_sha256"} - set(dataset):
        raise CorruptTeacherCacheError(f"{manifest_path} lacks fields {missing or ['dataset.*']}")
    if manifest["kind"] not in ("logits", "topk") or manifest["dtype"] not in _DTYPES:
        raise CorruptTeacherCacheError(f"{manifest_path} has an unknown kind or dtype")
    shape = manifest["shape"]
    if not isinstance(shape, list) or len(shape) != 2:
        raise CorruptTeacherCacheError(f"{manifest_path} has a malformed shape")
    if not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise CorruptTeacherCacheError(
            f"{manifest_path} has shape {shape}; expected two non-negative integers"
        )
    # Only the data files of the recorded kind, each with a SHA-256: a manifest cannot point
    # the loader at other files.
    names = {"logits.npy"} if manifest["kind"] == "logits" else {"values.npy", "indices.npy"}
    files = manifest["files"]
    if (
        not isinstance(files, dict)
        or set(files) != names
        or not all(isinstance(h, str) and len(h) == 64 for h in files.values())
    ):
        raise CorruptTeacherCacheError(
            f"{manifest_path} lists files {files!r}; a {manifest['kind']} cache has exactly "
            f"{sorted(names)}, each with a SHA-256"
        )
    return manifest
