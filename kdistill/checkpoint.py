"""Atomic, code-free checkpoints.

A checkpoint is one ``.safetensors`` file. Its tensors are the model weights (``model.*``), the
optimizer state (``optim.*``) and the random generators' states (``rng.*``); everything else
(epoch, step, hyperparameters, Python's random state) is JSON in the file's metadata. Reading it
never unpickles anything, so a crafted file cannot run code. A SHA-256 over the tensors and that
JSON, also in the metadata, is checked on every load, so a damaged file is refused instead of
trained on.

Files are written atomically: to a temporary file in the same folder, flushed and fsynced,
renamed over the target with :func:`os.replace`, and the folder fsynced. A crash leaves either
the old file or the new one, never a torn one.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import random
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from kdistill.safeio import DIGEST_KEY, tensors_digest, verify_tensors_digest

logger = logging.getLogger(__name__)

FORMAT = "kdistill-checkpoint-1"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, damaged, or does not fit what it is loaded into."""


def atomic_write(path: str | Path, write: Callable[[Any], None]) -> None:
    """Write a file so that a crash leaves either the old content or the new, never a mix.

    A temporary file left by an earlier process that was killed mid-write is removed first.

    Args:
        path: the destination file.
        write: called with a binary file object open on a temporary file in the same folder.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        stale.unlink(missing_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        _pause_for_tests(path, "before-rename")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    _pause_for_tests(path, "after-rename")


_writes_seen: dict[str, int] = {}


def _pause_for_tests(path: Path, stage: str) -> None:
    """Hold one write in place so a test can kill or signal the process at a known point.

    Active only when ``KDISTILL_TEST_PAUSE`` is ``NAME:COUNT:STAGE:MARKER``: at the COUNT-th
    write of a file named NAME in this process, at STAGE (``before-rename``: the temporary file
    is complete and fsynced but not yet renamed; ``after-rename``: the new file is in place),
    the MARKER file is created and the process waits until the test deletes it.
    """
    spec = os.environ.get("KDISTILL_TEST_PAUSE")
    if not spec:
        return
    name, count, when, marker = spec.split(":", 3)
    if path.name != name:
        return
    if stage == "before-rename":
        _writes_seen[name] = _writes_seen.get(name, 0) + 1
    if stage != when or _writes_seen.get(name) != int(count):
        return
    Path(marker).write_text(stage)
    while Path(marker).exists():
        time.sleep(0.01)


def atomic_write_text(path: str | Path, text: str) -> None:
    """:func:`atomic_write` for a UTF-8 text file."""
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def _flatten(obj: Any, prefix: str, tensors: dict[str, Tensor]) -> Any:
    """Move every tensor of a nested dict/list into ``tensors``; return the JSON skeleton."""
    if isinstance(obj, Tensor):
        tensors[prefix] = obj.detach().cpu().clone().contiguous()
        return {"__tensor__": prefix}
    if isinstance(obj, dict):
        return {
            "__dict__": [[_key(k), _flatten(v, _join(prefix, k), tensors)] for k, v in obj.items()]
        }
    if isinstance(obj, (list, tuple)):
        return {"__list__": [_flatten(v, _join(prefix, i), tensors) for i, v in enumerate(obj)]}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot store {type(obj).__name__} at {prefix} in a checkpoint")


def _join(prefix: str, key: Any) -> str:
    return f"{prefix}.{key}" if prefix else str(key)


def _key(k: Any) -> Any:
    if isinstance(k, (bool, int, str)):
        return k
    raise TypeError(f"cannot store a dict key of type {type(k).__name__} in a checkpoint")


def _unflatten(skeleton: Any, tensors: dict[str, Tensor]) -> Any:
    if isinstance(skeleton, dict):
        if "__tensor__" in skeleton:
            return tensors[skeleton["__tensor__"]]
        if "__dict__" in skeleton:
            return {k: _unflatten(v, tensors) for k, v in skeleton["__dict__"]}
        if "__list__" in skeleton:
            return [_unflatten(v, tensors) for v in skeleton["__list__"]]
    if isinstance(skeleton, (dict, list)):
        raise ValueError(f"unexpected structure {str(skeleton)[:80]}")
    return skeleton


def rng_state(data_generator: torch.Generator | None = None) -> dict[str, Any]:
    """Snapshot torch's, numpy's and Python's global random states (and an extra generator)."""
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "name": np_state[0],
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "python": json.loads(json.dumps(random.getstate())),
    }
    if data_generator is not None:
        state["data"] = data_generator.get_state()
    return state


def set_rng_state(state: dict[str, Any], data_generator: torch.Generator | None = None) -> None:
    """Restore what :func:`rng_state` captured."""
    torch.set_rng_state(state["torch"])
    npst = state["numpy"]
    np.random.set_state(
        (
            npst["name"],
            npst["keys"].numpy().astype(np.uint32),
            npst["pos"],
            npst["has_gauss"],
            npst["cached_gaussian"],
        )
    )
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if data_generator is not None and "data" in state:
        data_generator.set_state(state["data"])


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    """Atomically write ``state`` (nested dicts/lists of tensors and JSON values) to ``path``.

    Args:
        path: destination, conventionally ``*.safetensors``.
        state: e.g. ``{"model": model.state_dict(), "optim": opt.state_dict(), "rng": ...,
            "progress": {"epoch": 3, "step": 0}}``.

    Raises:
        TypeError: ``state`` holds something that is neither a tensor nor JSON-serialisable.
    """
    from safetensors.torch import save

    tensors: dict[str, Tensor] = {}
    skeleton = _flatten(state, "", tensors)
    state_json = json.dumps(skeleton)
    metadata = {
        "format": FORMAT,
        "state": state_json,
        DIGEST_KEY: tensors_digest(tensors, state_json),
    }
    payload = save(tensors, metadata=metadata)
    atomic_write(path, lambda f: f.write(payload))
    logger.debug("wrote checkpoint %s (%d tensors)", path, len(tensors))


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a file written by :func:`save_checkpoint`, without unpickling anything.

    Raises:
        CheckpointError: the file is missing, truncated, corrupted or not a kdistill checkpoint;
            the message names the file.
    """
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            if metadata.get("format") != FORMAT:
                raise CheckpointError(
                    f"{path} is not a kdistill checkpoint (format {metadata.get('format')!r})"
                )
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        verify_tensors_digest(tensors, metadata, metadata["state"])
        return _unflatten(json.loads(metadata["state"]), tensors)
    except CheckpointError:
        raise
    except Exception as err:  # safetensors/json raise assorted types on damaged files
        raise CheckpointError(f"checkpoint {path} is damaged or unreadable: {err}") from err
