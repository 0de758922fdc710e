"""A NumPy transcription of Caffe's KnowledgeDistillation layer, Forward_cpu and Backward_cpu.

Written loop for loop from the C++ so the tests can compare kdistill against the layer itself,
including its FLT_MIN clamp and its normalizer, rather than against kdistill's own formulas.
"""

from __future__ import annotations

import numpy as np

FLT_MIN = np.float32(np.finfo(np.float32).tiny)


def _softmax(x: np.ndarray, axis: int) -> np.ndarray:
    shifted = x - x.max(axis=axis, keepdims=True)
    e = np.exp(shifted)
    return e / e.sum(axis=axis, keepdims=True)


def _normalizer(mode: str, outer: int, inner: int, valid_count: int) -> float:
    if mode == "full":
        value = outer * inner
    elif mode == "valid":
        value = outer * inner if valid_count == -1 else valid_count
    elif mode == "batch_size":
        value = outer
    elif mode == "none":
        value = 1
    else:
        raise ValueError(mode)
    return max(1.0, float(value))


def caffe_forward_backward(
    student: np.ndarray,
    teacher: np.ndarray,
    labels: np.ndarray | None,
    *,
    temperature: float,
    axis: int,
    ignore_label: int | None,
    normalization: str,
    loss_weight: float = 1.0,
) -> tuple[float, np.ndarray]:
    """Return (top[0], bottom[0].diff) of the layer with ``top[0].diff = loss_weight``."""
    axis = axis % student.ndim
    dtype = student.dtype
    outer = int(np.prod(student.shape[:axis]))
    inner = int(np.prod(student.shape[axis + 1 :]))
    channels = student.shape[axis]
    dim = channels * inner
    s_prob = _softmax(student / dtype.type(temperature), axis).reshape(-1)
    t_prob = _softmax(teacher / dtype.type(temperature), axis).reshape(-1)
    flat_labels = None if labels is None else labels.reshape(-1)
    use_labels = flat_labels is not None and ignore_label is not None
    floor = dtype.type(FLT_MIN)

    # Forward_cpu
    loss = 0.0
    count = 0
    for i in range(outer):
        for j in range(inner):
            if use_labels and int(flat_labels[i * inner + j]) == ignore_label:
                continue
            for c in range(channels):
                pos = i * dim + c * inner + j
                loss -= t_prob[pos] * (
                    np.log(max(s_prob[pos], floor)) - np.log(max(t_prob[pos], floor))
                )
            count += 1
    if not use_labels:
        count = outer * inner
    top = loss / _normalizer(normalization, outer, inner, count)

    # Backward_cpu
    diff = temperature * s_prob - temperature * t_prob
    count = outer * inner
    if use_labels:
        count = 0
        for i in range(outer):
            for j in range(inner):
                if int(flat_labels[i * inner + j]) == ignore_label:
                    for c in range(channels):
                        diff[i * dim + c * inner + j] = 0
                else:
                    count += 1
    diff = diff * (loss_weight / _normalizer(normalization, outer, inner, count))
    return float(top), diff.reshape(student.shape).astype(dtype)
