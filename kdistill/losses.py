"""Knowledge-distillation losses: forward KL, reverse KL and generalised Jensen-Shannon.

Every loss here compares the student's and the teacher's softened distributions over one axis of
the logits (classes, per-pixel classes or vocabulary tokens), optionally masks positions whose
label equals ``ignore_index``, sums over the remaining positions and divides by a normalizer chosen
the way Caffe's loss layers choose it. The reference path below is plain autograd over
log-softmaxes; a fused, chunked path (``kdistill.fused``) computes the same values with far less
memory when it applies.
"""

from __future__ import annotations

import logging
import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

logger = logging.getLogger(__name__)

Normalization = Literal["valid", "full", "batch_size", "none"]
Divergence = Literal["forward_kl", "reverse_kl", "jsd"]
Implementation = Literal["auto", "reference", "fused"]

NORMALIZATIONS = ("valid", "full", "batch_size", "none")
DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")
IMPLEMENTATIONS = ("auto", "reference", "fused")

_LOW_PRECISION = (torch.float16, torch.bfloat16)

MIN_TEMPERATURE = 1e-4
MAX_TEMPERATURE = 1e4
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1


# --------------------------------------------------------------------------------------------
# Argument checks shared by every loss
# --------------------------------------------------------------------------------------------


def _as_float(name: str, value: object, expected: str) -> float:
    """``value`` as a float; TypeError for a non-number, ValueError for an int too large."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be {expected}, got {type(value).__name__}")
    try:
        return float(value)
    except OverflowError:
        raise ValueError(
            f"{name} must be {expected}, got an int of {len(str(value))} digits"
        ) from None


def check_temperature(temperature: float) -> float:
    """Return ``temperature`` as a float, or raise if it is not a finite number above zero."""
    temperature = _as_float("temperature", temperature, "a number")
    if not math.isfinite(temperature) or temperature <= 0.0:
        raise ValueError(f"temperature must be finite and > 0, got {temperature}")
    if not MIN_TEMPERATURE <= temperature <= MAX_TEMPERATURE:
        # Outside this range T^2 or logits / T overflow float32 for ordinary logits.
        raise ValueError(
            f"temperature must be finite and > 0 and within [{MIN_TEMPERATURE:g}, "
            f"{MAX_TEMPERATURE:g}], got {temperature:g}"
        )
    return temperature


def check_choice(name: str, value: str, choices: tuple[str, ...]) -> str:
    """Return ``value`` lower-cased if it is one of ``choices``, else raise ValueError."""
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a string, one of {choices}; got {type(value).__name__}")
    lowered = value.lower()
    if lowered not in choices:
        raise ValueError(f"unknown {name} {value!r}; expected one of {choices}")
    return lowered


def check_beta(beta: float) -> float:
    """Return ``beta`` as a float in [0, 1], or raise."""
    beta = _as_float("beta", beta, "a number in [0, 1]")
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    return beta


def check_loss_weight(loss_weight: float) -> float:
    """Return ``loss_weight`` as a finite float, or raise."""
    if isinstance(loss_weight, bool) or not isinstance(loss_weight, (int, float)):
        raise TypeError(f"loss_weight must be a number, got {type(loss_weight).__name__}")
    try:
        value = float(loss_weight)
    except OverflowError:
        value = math.inf
    if not math.isfinite(value):
        raise ValueError(f"loss_weight must be finite, got {value}")
    return value


def _shape(t: Tensor) -> tuple[int, ...]:
    return tuple(t.shape)


def canonical_axis(axis: int, ndim: int) -> int:
    """Turn a possibly negative ``axis`` into an index in ``[0, ndim)``, or raise ValueError."""
    if isinstance(axis, bool) or not isinstance(axis, int):
        raise TypeError(f"axis must be an int, got {type(axis).__name__}")
    if not -ndim <= axis < ndim:
        raise ValueError(f"axis {axis} is out of range for logits with {ndim} dimensions")
    return axis % ndim


def check_logits(student_logits: Tensor, teacher_logits: Tensor, axis: int) -> int:
    """Validate a student/teacher pair and return the canonical softmax axis.

    Raises:
        TypeError: either input is not a floating-point tensor.
        ValueError: the shapes differ in any dimension, the axis is out of range, or the inputs
            live on different devices.
    """
    for name, t in (("student_logits", student_logits), ("teacher_logits", teacher_logits)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
        if t.dim() == 0:
            raise ValueError(f"{name} must have at least one dimension, got a scalar")
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"teacher_logits has shape {_shape(teacher_logits)} but student_logits has shape "
            f"{_shape(student_logits)}; they must match in every dimension"
        )
    if student_logits.device != teacher_logits.device:
        raise ValueError(
            f"student_logits is on {student_logits.device} but teacher_logits is on "
            f"{teacher_logits.device}"
        )
    return canonical_axis(axis, student_logits.dim())


def outer_inner(shape: torch.Size | tuple[int, ...], axis: int) -> tuple[int, int]:
    """Number of positions before (outer) and after (inner) the softmax axis."""
    return math.prod(shape[:axis]), math.prod(shape[axis + 1 :])


def check_labels(labels: Tensor, shape: torch.Size, axis: int, device: torch.device) -> Tensor:
    """Return ``labels`` reshaped to ``(outer, inner)``, or raise if they do not fit the logits.

    Labels may have any shape whose element count is ``outer * inner`` (Caffe accepts
    ``(N, 1, H, W)`` as well as ``(N, H, W)``).
    """
    if not isinstance(labels, Tensor):
        raise TypeError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise TypeError(
            f"labels must be an integer tensor, got dtype {labels.dtype}; "
            "convert them with labels.long()"
        )
    outer, inner = outer_inner(shape, axis)
    if labels.numel() != outer * inner:
        raise ValueError(
            f"labels has shape {_shape(labels)} ({labels.numel()} values) but logits of shape "
            f"{tuple(shape)} with axis {axis} need one label per position: {outer} x {inner} = "
            f"{outer * inner}"
        )
    if labels.device != device:
        raise ValueError(f"labels are on {labels.device} but the logits are on {device}")
    return labels.reshape(outer, inner)


def check_ignore_index(ignore_index: int | None) -> int | None:
    """Return ``ignore_index`` unchanged if it is None or an int, else raise TypeError."""
    if ignore_index is None:
        return None
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int or None, got {type(ignore_index).__name__}")
    if not _INT64_MIN <= ignore_index <= _INT64_MAX:
        raise ValueError(f"ignore_index must fit in int64, got {ignore_index}")
    return ignore_index


def valid_mask(labels: Tensor | None, ignore_index: int | None) -> Tensor | None:
    """Boolean mask of the positions that count, or None when every position counts."""
    if labels is None or ignore_index is None:
        return None
    return labels != ignore_index


def count_valid(labels: Tensor, ignore_index: int | None) -> Tensor:
    """Number of positions whose label is not ``ignore_index`` (all of them when it is None)."""
    if ignore_index is None:
        return torch.tensor(labels.numel(), device=labels.device)
    return (labels != ignore_index).sum()


def compute_normalizer(
    normalization: str, outer: int, inner: int, valid_count: Tensor | int | None
) -> Tensor | float:
    """The divisor of the summed loss, exactly as Caffe's ``get_normalizer`` picks it.

    Args:
        normalization: ``"valid"`` (non-ignored positions), ``"full"`` (``outer * inner``),
            ``"batch_size"`` (``outer``) or ``"none"`` (1).
        outer: product of the dimensions before the softmax axis.
        inner: product of the dimensions after it.
        valid_count: number of non-ignored positions, or None when nothing is ignored.

    Returns:
        The normalizer, never below 1 (so an all-ignored batch gives a zero loss, not NaN).
    """
    normalization = check_choice("normalization", normalization, NORMALIZATIONS)
    if normalization == "valid" and valid_count is not None:
        if isinstance(valid_count, Tensor):
            return valid_count.clamp(min=1)
        return float(max(1, valid_count))
    size = {"valid": outer * inner, "full": outer * inner, "batch_size": outer, "none": 1}
    return float(max(1, size[normalization]))


def _check_normalizer_override(normalizer: float | Tensor, device: torch.device) -> float | Tensor:
    if isinstance(normalizer, Tensor):
        if normalizer.device != device:
            raise ValueError(f"normalizer is on {normalizer.device} but the logits are on {device}")
        if normalizer.numel() != 1:
            raise ValueError(f"normalizer must be a scalar, got shape {_shape(normalizer)}")
        if normalizer.dtype == torch.bool or normalizer.is_complex():
            raise TypeError(f"normalizer must be a real number, got dtype {normalizer.dtype}")
        # The value check reads the tensor, which would stall an accelerator's queue; there the
        # caller vouches for it.
        if normalizer.device.type == "cpu":
            value = float(normalizer)
            if not math.isfinite(value) or value <= 0:
                raise ValueError(f"normalizer must be finite and > 0, got {value}")
        return normalizer.reshape(())
    if isinstance(normalizer, bool) or not isinstance(normalizer, (int, float)):
        raise TypeError(f"normalizer must be a number or a tensor, got {type(normalizer).__name__}")
    try:
        value = float(normalizer)
    except OverflowError:
        raise ValueError(
            f"normalizer must be finite and > 0, got an int of {len(str(normalizer))} digits"
        ) from None
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"normalizer must be finite and > 0, got {normalizer}")
    return value


# --------------------------------------------------------------------------------------------
# The divergences, row-wise over ``dim``, from log-probabilities
# --------------------------------------------------------------------------------------------


def _kl_from_log_probs(log_p: Tensor, log_q: Tensor, dim: int) -> Tensor:
    """KL(p || q) summed over ``dim``; terms with p == 0 contribute 0 even where q == 0.

    ``p != 0`` rather than ``p > 0`` so that a NaN in p propagates instead of being dropped.
    """
    p = log_p.exp()
    terms = torch.where(p != 0, p * (log_p - log_q), torch.zeros_like(p))
    return terms.sum(dim)


def divergence_from_log_probs(
    log_p_student: Tensor, log_p_teacher: Tensor, dim: int, divergence: str, beta: float
) -> Tensor:
    """The chosen divergence per position, summed over ``dim``.

    ``forward_kl`` is KL(teacher || student), ``reverse_kl`` is KL(student || teacher) and ``jsd``
    is ``(1 - beta) KL(teacher || M) + beta KL(student || M)`` with the mixture
    ``M = beta teacher + (1 - beta) student`` formed in log space, so that ``beta = 0`` is forward
    KL, ``beta = 1`` is reverse KL and ``beta = 0.5`` the symmetric Jensen-Shannon divergence.
    """
    if divergence == "forward_kl":
        return _kl_from_log_probs(log_p_teacher, log_p_student, dim)
    if divergence == "reverse_kl":
        return _kl_from_log_probs(log_p_student, log_p_teacher, dim)
    if beta == 0.0:
        return _kl_from_log_probs(log_p_teacher, log_p_student, dim)
    if beta == 1.0:
        return _kl_from_log_probs(log_p_student, log_p_teacher, dim)
    log_mixture = torch.logaddexp(log_p_teacher + math.log(beta), log_p_student + math.log1p(-beta))
    return (1.0 - beta) * _kl_from_log_probs(log_p_teacher, log_mixture, dim) + beta * (
        _kl_from_log_probs(log_p_student, log_mixture, dim)
    )


def _fused_applies(student_logits: Tensor, axis: int, divergence: str) -> bool:
    """Whether ``implementation="auto"`` should take the fused path for these inputs."""
    try:
        from kdistill import fused
    except ImportError:
        return False
    applies = getattr(fused, "applies", None)
    return bool(applies is not None and applies(student_logits, axis, divergence))


# --------------------------------------------------------------------------------------------
# Public functional losses
# --------------------------------------------------------------------------------------------


def divergence_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    labels: Tensor | None = None,
    *,
    divergence: Divergence = "forward_kl",
    beta: float = 0.5,
    temperature: float = 1.0,
    axis: int = 1,
    ignore_index: int | None = None,
    normalization: Normalization = "valid",
    t_squared: bool = True,
    normalizer: float | Tensor | None = None,
    loss_weight: float = 1.0,
    implementation: Implementation = "auto",
) -> Tensor:
    r"""Distillation divergence between softened student and teacher distributions.

    With :math:`p^s = \mathrm{softmax}(z^s / T)` and :math:`p^t = \mathrm{softmax}(z^t / T)` over
    ``axis``, and :math:`V` the set of positions whose label is not ``ignore_index``:

    .. math::
        \ell = w \cdot T^2 \cdot \frac{1}{\mathrm{normalizer}} \sum_{i \in V} D(p^t_i, p^s_i)

    where :math:`D` is the chosen divergence, :math:`w` is ``loss_weight`` and the :math:`T^2` is
    dropped when ``t_squared`` is False. The gradient with respect to the student's logits is then
    :math:`w T (p^s - p^t) / \mathrm{normalizer}` for forward KL, exactly the Caffe layer's.

    Shape:
        - student_logits, teacher_logits: any shape ``(d_0, ..., d_axis, ..., d_k)``, equal.
        - labels: ``outer * inner`` integers in any shape, where ``outer`` is the product of the
          dimensions before ``axis`` and ``inner`` the product of those after it.
        - output: a scalar.

    Args:
        student_logits: the student's unnormalised scores.
        teacher_logits: the teacher's scores; detached, it gets no gradient. ``-inf`` entries
            (masked classes) are allowed.
        labels: optional integer labels, one per position; only used to mask ``ignore_index``.
        divergence: ``"forward_kl"`` (KL(teacher || student), Hinton's), ``"reverse_kl"``
            (KL(student || teacher)) or ``"jsd"`` (generalised Jensen-Shannon, see ``beta``).
        beta: JSD interpolation in [0, 1]: 0 is forward KL, 1 reverse KL, 0.5 symmetric JSD.
        temperature: softening temperature ``T`` > 0.
        axis: the class axis the softmax runs over.
        ignore_index: label value of positions to leave out; needs ``labels``.
        normalization: ``"valid"``, ``"full"``, ``"batch_size"`` or ``"none"`` (see the README).
        t_squared: multiply by ``T**2`` so gradient magnitudes do not shrink as ``T`` grows.
        normalizer: replaces the computed normalizer, e.g. a token count across devices.
        loss_weight: a constant factor, Caffe's ``loss_weight``.
        implementation: ``"reference"`` (autograd over log-softmax), ``"fused"`` (chunked, the
            gradient computed in the forward pass) or ``"auto"`` (fused where it applies).

    Returns:
        A 0-dim tensor: float32 for float16/bfloat16 inputs, else the input dtype.

    Raises:
        TypeError: non-tensor or non-floating logits, non-integer labels, wrong option types.
        ValueError: shapes that differ, an axis out of range, a label count that does not fit,
            a temperature that is not finite and positive, or an unknown option value.

    Example:
        >>> student = torch.randn(8, 10, requires_grad=True)
        >>> teacher = torch.randn(8, 10)
        >>> loss = divergence_loss(student, teacher, temperature=4.0)
        >>> loss.backward()
    """
    temperature = check_temperature(temperature)
    divergence = check_choice("divergence", divergence, DIVERGENCES)
    normalization = check_choice("normalization", normalization, NORMALIZATIONS)
    implementation = check_choice("implementation", implementation, IMPLEMENTATIONS)
    beta = check_beta(beta)
    ignore_index = check_ignore_index(ignore_index)
    loss_weight = check_loss_weight(loss_weight)
    axis = check_logits(student_logits, teacher_logits, axis)
    shape = student_logits.shape
    outer, inner = outer_inner(shape, axis)
    labels2d = None
    if labels is not None:
        labels2d = check_labels(labels, shape, axis, student_logits.device)
    mask = valid_mask(labels2d, ignore_index)

    if normalizer is None:
        valid_count = None if mask is None else mask.sum()
        norm = compute_normalizer(normalization, outer, inner, valid_count)
    else:
        norm = _check_normalizer_override(normalizer, student_logits.device)
    scale_factor = float(loss_weight) * (temperature**2 if t_squared else 1.0)

    # An empty input has nothing to fuse; the reference path returns its zero loss.
    use_fused = student_logits.numel() > 0 and (
        implementation == "fused"
        or (implementation == "auto" and _fused_applies(student_logits, axis, divergence))
    )
    if use_fused:
        from kdistill.fused import fused_divergence_2d

        classes = shape[axis]
        student2d = student_logits.movedim(axis, -1).reshape(-1, classes)
        teacher2d = teacher_logits.detach().movedim(axis, -1).reshape(-1, classes)
        row_mask = None if mask is None else mask.reshape(-1)
        summed = fused_divergence_2d(
            student2d,
            teacher2d,
            row_mask,
            temperature=temperature,
            divergence=divergence,
            beta=beta,
            # The normalizer goes into the scale so that backward hands over the stored
            # gradient without another full-size multiply.
            scale=scale_factor / (norm.double() if isinstance(norm, Tensor) else norm),
        )
        return summed

    compute_dtype = torch.float32 if student_logits.dtype in _LOW_PRECISION else None
    student = student_logits if compute_dtype is None else student_logits.to(compute_dtype)
    teacher = teacher_logits.detach()
    teacher = teacher if compute_dtype is None else teacher.to(compute_dtype)
    teacher = teacher.to(student.dtype)

    log_p_student = F.log_softmax(student / temperature, dim=axis)
    log_p_teacher = F.log_softmax(teacher / temperature, dim=axis)
    per_position = divergence_from_log_probs(log_p_student, log_p_teacher, axis, divergence, beta)
    per_position = per_position.reshape(outer, inner)
    if mask is not None:
        # where (not multiply) so that a NaN or inf at an ignored position cannot leak in.
        per_position = torch.where(mask, per_position, torch.zeros_like(per_position))
    return per_position.sum() * scale_factor / norm


def kd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    labels: Tensor | None = None,
    *,
    temperature: float = 1.0,
    axis: int = 1,
    ignore_index: int | None = None,
    normalization: Normalization = "valid",
    t_squared: bool = True,
    normalizer: float | Tensor | None = None,
    implementation: Implementation = "auto",
) -> Tensor:
    r"""Hinton's distillation loss: :math:`T^2 \cdot \mathrm{KL}(p^t \,\|\, p^s)` per position.

    The drop-in replacement for Caffe's ``KnowledgeDistillation`` layer: same inputs, same
    normalizer modes, same gradient (``T (p^s - p^t) / normalizer``), but computed with
    log-softmax, so its value stays exact for logits in the thousands where the layer's clamped
    logarithm goes wrong. See :func:`divergence_loss` for the arguments, shapes and errors.

    Example:
        >>> student = torch.randn(4, 10, 32, 32, requires_grad=True)  # per-pixel classes
        >>> teacher = torch.randn(4, 10, 32, 32)
        >>> labels = torch.randint(0, 10, (4, 32, 32))
        >>> loss = kd_loss(student, teacher, labels, temperature=4.0, ignore_index=255)
    """
    return divergence_loss(
        student_logits,
        teacher_logits,
        labels,
        divergence="forward_kl",
        temperature=temperature,
        axis=axis,
        ignore_index=ignore_index,
        normalization=normalization,
        t_squared=t_squared,
        normalizer=normalizer,
        implementation=implementation,
    )


def reverse_kd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    labels: Tensor | None = None,
    *,
    temperature: float = 1.0,
    axis: int = 1,
    ignore_index: int | None = None,
    normalization: Normalization = "valid",
    t_squared: bool = True,
    normalizer: float | Tensor | None = None,
    implementation: Implementation = "auto",
) -> Tensor:
    r"""Reverse KL, :math:`T^2 \cdot \mathrm{KL}(p^s \,\|\, p^t)`: mode-seeking distillation.

    Same arguments and semantics as :func:`kd_loss`; see :func:`divergence_loss`.

    Example:
        >>> loss = reverse_kd_loss(torch.randn(2, 5, 100), torch.randn(2, 5, 100), axis=-1)
    """
    return divergence_loss(
        student_logits,
        teacher_logits,
        labels,
        divergence="reverse_kl",
        temperature=temperature,
        axis=axis,
        ignore_index=ignore_index,
        normalization=normalization,
        t_squared=t_squared,
        normalizer=normalizer,
        implementation=implementation,
    )


def jsd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    labels: Tensor | None = None,
    *,
    beta: float = 0.5,
    temperature: float = 1.0,
    axis: int = 1,
    ignore_index: int | None = None,
    normalization: Normalization = "valid",
    t_squared: bool = True,
    normalizer: float | Tensor | None = None,
    implementation: Implementation = "auto",
) -> Tensor:
    r"""Generalised Jensen-Shannon divergence between teacher and student.

    .. math::
        \mathrm{JSD}_\beta = (1 - \beta)\,\mathrm{KL}(p^t \| m) + \beta\,\mathrm{KL}(p^s \| m),
        \qquad m = \beta p^t + (1 - \beta) p^s

    ``beta = 0`` gives forward KL, ``beta = 1`` reverse KL and ``beta = 0.5`` the symmetric JSD.
    The mixture is formed in log space, so extreme logits stay finite. Other arguments as in
    :func:`divergence_loss`.

    Example:
        >>> loss = jsd_loss(torch.randn(8, 10), torch.randn(8, 10), beta=0.1, temperature=2.0)
    """
    return divergence_loss(
        student_logits,
        teacher_logits,
        labels,
        divergence="jsd",
        beta=beta,
        temperature=temperature,
        axis=axis,
        ignore_index=ignore_index,
        normalization=normalization,
        t_squared=t_squared,
        normalizer=normalizer,
        implementation=implementation,
    )


def hard_label_loss(
    student_logits: Tensor,
    labels: Tensor,
    *,
    axis: int = 1,
    ignore_index: int | None = None,
    normalization: Normalization = "valid",
    normalizer: float | Tensor | None = None,
) -> Tensor:
    """Cross-entropy of the student's logits (temperature 1) against integer labels.

    Summed over the non-ignored positions and divided by the same normalizer as the soft loss.

    Raises:
        ValueError: a non-ignored label lies outside ``[0, classes)``.
    """
    if not isinstance(student_logits, Tensor) or not student_logits.is_floating_point():
        raise TypeError("student_logits must be a floating-point tensor")
    if student_logits.dim() == 0:
        raise ValueError("student_logits must have at least one dimension, got a scalar")
    normalization = check_choice("normalization", normalization, NORMALIZATIONS)
    ignore_index = check_ignore_index(ignore_index)
    axis = canonical_axis(axis, student_logits.dim())
    shape = student_logits.shape
    outer, inner = outer_inner(shape, axis)
    labels2d = check_labels(labels, shape, axis, student_logits.device)
    mask = valid_mask(labels2d, ignore_index)
    classes = shape[axis]
    if labels2d.numel() and labels2d.device.type != "meta":
        kept = labels2d if mask is None else torch.where(mask, labels2d, torch.zeros_like(labels2d))
        low, high = int(kept.min()), int(kept.max())
    else:
        low, high = 0, 0
    if low < 0 or high >= classes:
        bad = low if low < 0 else high
        raise ValueError(
            f"label {bad} is outside [0, {classes}) for logits with {classes} classes on axis "
            f"{axis}" + ("" if ignore_index is None else f" (ignore_index is {ignore_index})")
        )

    student = student_logits.float() if student_logits.dtype in _LOW_PRECISION else student_logits
    log_probs = F.log_softmax(student, dim=axis).reshape(outer, classes, inner)
    targets = labels2d if mask is None else torch.where(mask, labels2d, torch.zeros_like(labels2d))
    nll = -log_probs.gather(1, targets.long().unsqueeze(1)).squeeze(1)
    if mask is not None:
        nll = torch.where(mask, nll, torch.zeros_like(nll))

    if normalizer is None:
        valid_count = None if mask is None else mask.sum()
        norm = compute_normalizer(normalization, outer, inner, valid_count)
    else:
        norm = _check_normalizer_override(normalizer, student_logits.device)
    return nll.sum() / norm


# --------------------------------------------------------------------------------------------
# Modules
# --------------------------------------------------------------------------------------------


class KDLoss(nn.Module):
    """Module form of :func:`divergence_loss`, the options fixed at construction.

    Args:
        temperature: softening temperature ``T`` > 0.
        axis: the class axis.
        ignore_index: label of positions to leave out, or None.
        normalization: ``"valid"``, ``"full"``, ``"batch_size"`` or ``"none"``.
        t_squared: multiply by ``T**2``.
        loss_weight: constant factor on the loss (Caffe's ``loss_weight``).
        divergence: ``"forward_kl"``, ``"reverse_kl"`` or ``"jsd"``.
        beta: JSD interpolation in [0, 1].
        implementation: ``"auto"``, ``"reference"`` or ``"fused"``.

    Example:
        >>> criterion = KDLoss(temperature=4.0, ignore_index=-100, axis=-1)
        >>> loss = criterion(torch.randn(2, 7, 50), torch.randn(2, 7, 50), torch.zeros(2, 7).long())
    """

    def __init__(
        self,
        temperature: float = 1.0,
        axis: int = 1,
        ignore_index: int | None = None,
        normalization: Normalization = "valid",
        t_squared: bool = True,
        loss_weight: float = 1.0,
        divergence: Divergence = "forward_kl",
        beta: float = 0.5,
        implementation: Implementation = "auto",
    ) -> None:
        super().__init__()
        self.temperature = check_temperature(temperature)
        self.axis = axis
        self.ignore_index = check_ignore_index(ignore_index)
        self.normalization = check_choice("normalization", normalization, NORMALIZATIONS)
        self.t_squared = bool(t_squared)
        self.loss_weight = check_loss_weight(loss_weight)
        self.divergence = check_choice("divergence", divergence, DIVERGENCES)
        self.beta = check_beta(beta)
        self.implementation = check_choice("implementation", implementation, IMPLEMENTATIONS)

    def forward(
        self,
        student_logits: Tensor,
        teacher_logits: Tensor,
        labels: Tensor | None = None,
        *,
        normalizer: float | Tensor | None = None,
    ) -> Tensor:
        return divergence_loss(
            student_logits,
            teacher_logits,
            labels,
            divergence=self.divergence,
            beta=self.beta,
            temperature=self.temperature,
            axis=self.axis,
            ignore_index=self.ignore_index,
            normalization=self.normalization,
            t_squared=self.t_squared,
            normalizer=normalizer,
            loss_weight=self.loss_weight,
            implementation=self.implementation,
        )

    def extra_repr(self) -> str:
        return (
            f"temperature={self.temperature}, axis={self.axis}, ignore_index={self.ignore_index}, "
            f"normalization={self.normalization!r}, t_squared={self.t_squared}, "
            f"loss_weight={self.loss_weight}, divergence={self.divergence!r}"
        )


class DistillationLoss(nn.Module):
    r"""Hinton's combined objective: soft targets from the teacher plus the true labels.

    .. math::
        \ell = \alpha \cdot T^2 \, D(p^t_T, p^s_T) / n
             + (1 - \alpha) \cdot \mathrm{CE}(\mathrm{softmax}(z^s), y) / n

    where both terms are summed over the non-ignored positions and divided by the same
    normalizer ``n``. ``alpha = 1`` is pure distillation, ``alpha = 0`` ordinary training.

    Args:
        temperature: softening temperature of the soft term.
        alpha: weight of the soft term in [0, 1].
        axis, ignore_index, normalization, t_squared, divergence, beta, implementation:
            as in :class:`KDLoss`.

    Example:
        >>> criterion = DistillationLoss(temperature=4.0, alpha=0.9)
        >>> student, teacher = torch.randn(16, 10, requires_grad=True), torch.randn(16, 10)
        >>> total, soft, hard = criterion(student, teacher, torch.randint(0, 10, (16,)),
        ...                               return_parts=True)
    """

    def __init__(
        self,
        temperature: float = 1.0,
        alpha: float = 0.5,
        axis: int = 1,
        ignore_index: int | None = None,
        normalization: Normalization = "valid",
        t_squared: bool = True,
        divergence: Divergence = "forward_kl",
        beta: float = 0.5,
        implementation: Implementation = "auto",
    ) -> None:
        super().__init__()
        alpha = _as_float("alpha", alpha, "a number in [0, 1]")
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
        self.alpha = alpha
        self.soft = KDLoss(
            temperature=temperature,
            axis=axis,
            ignore_index=ignore_index,
            normalization=normalization,
            t_squared=t_squared,
            divergence=divergence,
            beta=beta,
            implementation=implementation,
        )

    @property
    def temperature(self) -> float:
        return self.soft.temperature

    def forward(
        self,
        student_logits: Tensor,
        teacher_logits: Tensor | None,
        labels: Tensor | None,
        *,
        normalizer: float | Tensor | None = None,
        return_parts: bool = False,
    ) -> Tensor | tuple[Tensor, Tensor, Tensor]:
        """Combined loss; with ``return_parts`` also the soft and hard terms (unweighted).

        ``teacher_logits`` may be None only when ``alpha`` is 0, and ``labels`` only when
        ``alpha`` is 1.
        """
        zero = student_logits.new_zeros((), dtype=torch.float32)
        if self.alpha > 0.0:
            if teacher_logits is None:
                raise ValueError(f"alpha is {self.alpha} but no teacher_logits were given")
            soft = self.soft(student_logits, teacher_logits, labels, normalizer=normalizer)
        else:
            soft = zero
        if self.alpha < 1.0:
            if labels is None:
                raise ValueError(f"alpha is {self.alpha} (< 1) so labels are required")
            hard = hard_label_loss(
                student_logits,
                labels,
                axis=self.soft.axis,
                ignore_index=self.soft.ignore_index,
                normalization=self.soft.normalization,
                normalizer=normalizer,
            )
        else:
            hard = zero
        total = self.alpha * soft + (1.0 - self.alpha) * hard
        if return_parts:
            return total, soft, hard
        return total

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}"
