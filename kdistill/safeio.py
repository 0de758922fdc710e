"""Integrity checks for the tensor files kdistill writes.

safetensors never executes code while loading, but it does not notice a flipped bit in the
tensor data: the file parses and the damage goes into training unseen. kdistill therefore
records a SHA-256 of every tensor (name, dtype, shape and bytes) plus any JSON state in the
file's metadata under :data:`DIGEST_KEY`, and checks it when the file is read back.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

import torch
from torch import Tensor

__all__ = ["DIGEST_KEY", "IntegrityError", "tensors_digest", "verify_tensors_digest"]

DIGEST_KEY = "kdistill.sha256"


class IntegrityError(ValueError):
    """A file's content does not match the digest recorded in it."""


def tensors_digest(tensors: Mapping[str, Tensor], extra: str = "") -> str:
    """SHA-256 over ``extra`` and each tensor's name, dtype, shape and bytes, in name order.

    Args:
        tensors: the tensors as stored (on the CPU).
        extra: further text covered by the digest, e.g. a JSON state stored beside the tensors.

    Returns:
        The 64-character hex digest.

    Example:
        >>> tensors_digest({"w": torch.zeros(2)})[:8]
        'cf292f72'
    """
    digest = hashlib.sha256()
    digest.update(extra.encode("utf-8"))
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous()
        digest.update(f"\0{name}\0{tensor.dtype}\0{tuple(tensor.shape)}\0".encode())
        if tensor.numel():
            digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def verify_tensors_digest(
    tensors: Mapping[str, Tensor],
    metadata: Mapping[str, str] | None,
    extra: str = "",
    *,
    required: bool = True,
) -> None:
    """Check the digest recorded in ``metadata`` against the tensors read back.

    Args:
        tensors: the tensors as loaded.
        metadata: the file's metadata.
        extra: the same text that was passed to :func:`tensors_digest` when writing.
        required: whether a missing digest is an error (files kdistill wrote always have one).

    Raises:
        IntegrityError: the digest is missing (when required) or does not match.
    """
    recorded = (metadata or {}).get(DIGEST_KEY)
    if recorded is None:
        if required:
            raise IntegrityError(f"no {DIGEST_KEY} digest recorded, so its content is unverified")
        return
    actual = tensors_digest(tensors, extra)
    if actual != recorded:
        raise IntegrityError(
            f"content does not match its recorded SHA-256 (recorded {recorded}, "
            f"computed {actual}): the file is damaged"
        )
