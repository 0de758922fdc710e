r"""Distillation from a teacher's top-k logits (indices and values) instead of all of them.

Storing a language-model teacher's full logits costs ``V`` numbers per token; its top-k costs
``2k``. What the top-k cannot tell is how much probability the teacher put on the other ``V - k``
classes, so a policy is needed for that missing mass.

**Mass policy: renormalise over the top-k.** The teacher distribution used is
:math:`q_j = \exp(v_j / T) / \sum_{i \le k} \exp(v_i / T)` on the stored classes and exactly 0 on
all others; the student's distribution :math:`p = \mathrm{softmax}(z^s / T)` is over all ``V``
classes. This is precisely the dense loss with a teacher whose logits are ``-inf`` outside its
top-k, so the sparse loss is tested against that dense reference. The reasons to prefer it over
spreading the remainder uniformly: the remainder's size is unknown without the teacher's full
log-partition (which is not stored); any spread puts teacher mass on classes the teacher ranked
lowest, which is the noise distillation with top-k means to drop; and with a sharp teacher the
top-k at ``T = 1`` already holds nearly all of the mass. What it costs: at high temperature the
tail is cut off, the soft targets are sharper than the teacher's, and the student is pushed to
put no mass outside the top-k (forward KL still only asks it to match the ratios inside). With
``reverse_kl`` the loss is infinite whenever the student gives any probability outside the top-k,
so use ``forward_kl`` or ``jsd``.
"""

from __future__ import annotations

import logging
import math

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from kdistill import fused
from kdistill.losses import (
    DIVERGENCES,
    NORMALIZATIONS,
    _check_normalizer_override,
    canonical_axis,
    check_beta,
    check_choice,
    check_ignore_index,
    check_labels,
    check_temperature,
    compute_normalizer,
    outer_inner,
    valid_mask,
)

logger = logging.getLogger(__name__)

# Dense teacher logits built per chunk; about 4 MiB of float32.
_CHUNK_ELEMENTS = 1 << 20


def topk_teacher(teacher_logits: Tensor, k: int, axis: int = 1) -> tuple[Tensor, Tensor]:
    """The teacher's ``k`` largest logits along ``axis`` and their class indices.

    Args:
        teacher_logits: dense teacher logits.
        k: how many to keep, ``1 <= k <= classes``.
        axis: the class axis.

    Returns:
        ``(values, indices)``, both shaped like ``teacher_logits`` with ``k`` along ``axis``;
        indices are int64.

    Raises:
        ValueError: ``k`` is outside ``[1, classes]``.
    """
    axis = canonical_axis(axis, teacher_logits.dim())
    classes = teacher_logits.shape[axis]
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= classes:
        raise ValueError(f"k must be an int in [1, {classes}], got {k!r}")
    values, indices = torch.topk(teacher_logits.detach(), k, dim=axis)
    return values, indices


def dense_teacher_from_topk(values: Tensor, indices: Tensor, classes: int, axis: int = 1) -> Tensor:
    """Dense teacher logits that equal ``values`` at ``indices`` and ``-inf`` everywhere else.

    This is the dense tensor whose loss :func:`sparse_kd_loss` computes without building it.

    Args:
        values: top-k teacher logits, ``k`` along ``axis``.
        indices: their class indices, same shape.
        classes: the number of classes ``V``.
        axis: the class axis.

    Returns:
        A tensor shaped like ``values`` with ``classes`` along ``axis``.
    """
    axis = canonical_axis(axis, values.dim())
    shape = list(values.shape)
    shape[axis] = classes
    dense = torch.full(shape, -math.inf, dtype=values.dtype, device=values.device)
    return dense.scatter_(axis, indices.long(), values)


def _check_topk(student: Tensor, values: Tensor, indices: Tensor, axis: int) -> None:
    if not isinstance(values, Tensor) or not values.is_floating_point():
        raise TypeError("teacher_topk_values must be a floating-point tensor")
    if (
        not isinstance(indices, Tensor)
        or indices.is_floating_point()
        or indices.dtype == torch.bool
    ):
        raise TypeError(
            f"teacher_topk_indices must be an integer tensor, got "
            f"{getattr(indices, 'dtype', type(indices).__name__)}"
        )
    if values.shape != indices.shape:
        raise ValueError(
            f"teacher_topk_values has shape {tuple(values.shape)} but teacher_topk_indices has "
            f"shape {tuple(indices.shape)}; they must match"
        )
    expected = list(student.shape)
    expected[axis] = values.shape[axis] if values.dim() == student.dim() else -1
    if values.dim() != student.dim() or list(values.shape) != expected:
        raise ValueError(
            f"teacher top-k of shape {tuple(values.shape)} does not fit student_logits of shape "
            f"{tuple(student.shape)}: every dim but the class axis ({axis}) must match"
        )
    classes, k = student.shape[axis], values.shape[axis]
    if k < 1 or k > classes:
        raise ValueError(f"top-k size {k} along axis {axis} must be in [1, {classes}]")
    if values.device != student.device or indices.device != student.device:
        raise ValueError(
            f"student_logits is on {student.device}, the top-k values on {values.device} and "
            f"the indices on {indices.device}; they must share a device"
        )
    if indices.numel():
        low, high = int(indices.min()), int(indices.max())
        if low < 0 or high >= classes:
            raise ValueError(
                f"teacher_topk_indices must lie in [0, {classes}), got values in [{low}, {high}]"
            )
        ordered = indices.sort(dim=axis).values
        if k > 1 and bool((ordered.diff(dim=axis) == 0).any()):
            raise ValueError("teacher_topk_indices repeats a class within one position")


class _SparseDivergence(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx,
        student2d,
        values2d,
        indices2d,
        row_mask,
        temperature,
        divergence,
        beta,
        scale,
        grad_mode,
    ):
        rows, classes = student2d.shape
        student2d = student2d.detach().contiguous()
        need_grad = grad_mode and ctx.needs_input_grad[0]  # the flag is set under no_grad too
        grad = fused.empty_like_fast(student2d) if need_grad else None
        step = max(1, _CHUNK_ELEMENTS // max(classes, 1))
        dense = torch.empty(
            min(step, rows), classes, dtype=student2d.dtype, device=student2d.device
        )
        total = torch.zeros((), dtype=torch.float64, device=student2d.device)
        for r0 in range(0, rows, step):
            r1 = min(rows, r0 + step)
            teacher = dense[: r1 - r0].fill_(-math.inf)
            teacher.scatter_(1, indices2d[r0:r1], values2d[r0:r1].to(dense.dtype))
            row_loss, _ = fused.divergence_rows(
                student2d[r0:r1],
                teacher,
                None if row_mask is None else row_mask[r0:r1],
                temperature=temperature,
                divergence=divergence,
                beta=beta,
                grad_coef=scale / temperature,
                need_grad=need_grad,
                grad_out=None if grad is None else grad[r0:r1],
            )
            total += row_loss.sum()
        ctx.fused_grad = grad
        return (total * scale).to(fused.compute_dtype(student2d.dtype))

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        grad = getattr(ctx, "fused_grad", None)
        if grad is None:
            raise RuntimeError("sparse_kd_loss can be backpropagated once")
        ctx.fused_grad = None
        if not (grad_output.device.type == "cpu" and float(grad_output) == 1.0):
            grad.mul_(grad_output.to(grad.dtype))
        return grad, None, None, None, None, None, None, None, None


def sparse_kd_loss(
    student_logits: Tensor,
    teacher_topk_values: Tensor,
    teacher_topk_indices: Tensor,
    labels: Tensor | None = None,
    *,
    temperature: float = 1.0,
    axis: int = 1,
    ignore_index: int | None = None,
    normalization: str = "valid",
    t_squared: bool = True,
    normalizer: float | Tensor | None = None,
    divergence: str = "forward_kl",
    beta: float = 0.5,
) -> Tensor:
    r"""Distillation loss against a teacher known only by its top-k logits.

    The teacher distribution is renormalised over its top-k (zero elsewhere; see
    :mod:`kdistill.sparse` for why), so the result equals :func:`kdistill.divergence_loss` with
    the dense teacher :func:`dense_teacher_from_topk` builds, without building it:

    .. math::
        \ell = T^2 \frac{1}{\mathrm{normalizer}} \sum_{i \in V} \sum_{j \in \mathrm{top}_k(i)}
        q_{ij} (\log q_{ij} - \log p_{ij}),\qquad q_i = \mathrm{softmax}(v_i / T)

    with the student's :math:`\log p = \mathrm{log\_softmax}(z^s / T)` over all classes. The
    gradient is computed in the forward pass, chunk by chunk.

    Shape:
        - student_logits: ``(d_0, ..., V, ..., d_n)`` with ``V`` classes along ``axis``.
        - teacher_topk_values, teacher_topk_indices: the same with ``k`` along ``axis``.
        - labels: one integer per position (``outer * inner`` in any shape).

    Args:
        student_logits: the student's logits.
        teacher_topk_values: the teacher's top-k logits (any order; ``-inf`` marks an unused
            slot when fewer than ``k`` were kept).
        teacher_topk_indices: their class indices, distinct within each position.
        labels: optional labels, used only to leave out ``ignore_index``.
        temperature: softening temperature ``T`` > 0, applied to the stored values too.
        axis: the class axis.
        ignore_index: label value of positions to leave out.
        normalization: ``"valid"``, ``"full"``, ``"batch_size"`` or ``"none"``.
        t_squared: multiply by ``T**2``.
        normalizer: replaces the computed normalizer.
        divergence: ``"forward_kl"`` (default), ``"jsd"`` or ``"reverse_kl"`` (infinite unless the
            student puts no mass outside the top-k).
        beta: JSD interpolation in [0, 1].

    Returns:
        A 0-dim tensor: float32 for 16-bit student logits, else their dtype.

    Raises:
        TypeError: non-floating values or student logits, non-integer indices or labels.
        ValueError: shapes that do not fit, indices out of ``[0, V)`` or repeated within a
            position, or an option out of range.

    Example:
        >>> teacher = torch.randn(16, 1000)
        >>> values, indices = topk_teacher(teacher, k=20)
        >>> student = torch.randn(16, 1000, requires_grad=True)
        >>> sparse_kd_loss(student, values, indices, temperature=2.0).backward()
    """
    temperature = check_temperature(temperature)
    divergence = check_choice("divergence", divergence, DIVERGENCES)
    normalization = check_choice("normalization", normalization, NORMALIZATIONS)
    beta = check_beta(beta)
    ignore_index = check_ignore_index(ignore_index)
    if not isinstance(student_logits, Tensor) or not student_logits.is_floating_point():
        raise TypeError("student_logits must be a floating-point tensor")
    axis = canonical_axis(axis, student_logits.dim())
    _check_topk(student_logits, teacher_topk_values, teacher_topk_indices, axis)

    shape = student_logits.shape
    outer, inner = outer_inner(shape, axis)
    mask = None
    if labels is not None:
        mask = valid_mask(check_labels(labels, shape, axis, student_logits.device), ignore_index)
    if normalizer is None:
        norm = compute_normalizer(normalization, outer, inner, None if mask is None else mask.sum())
    else:
        norm = _check_normalizer_override(normalizer, student_logits.device)
    scale = (temperature**2 if t_squared else 1.0) / float(norm)

    classes, k = shape[axis], teacher_topk_values.shape[axis]
    student2d = student_logits.movedim(axis, -1).reshape(-1, classes)
    values2d = teacher_topk_values.detach().movedim(axis, -1).reshape(-1, k)
    indices2d = teacher_topk_indices.movedim(axis, -1).reshape(-1, k).long()
    row_mask = None if mask is None else mask.reshape(-1)
    return _SparseDivergence.apply(
        student2d,
        values2d,
        indices2d,
        row_mask,
        temperature,
        divergence,
        beta,
        scale,
        torch.is_grad_enabled(),
    )
