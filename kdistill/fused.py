r"""Fused, chunked distillation divergences: loss and student gradient in one forward pass.

The reference path in :mod:`kdistill.losses` builds the log-softmax of both inputs, the
divergence terms and, in backward, as many tensors again: about five logits-sized temporaries and
a dozen passes over memory. Here each row (one position's classes) is finished while it sits in
cache: the maxima, then the exponentials and their sums, then the loss and the gradient
:math:`\partial \ell / \partial z^s` written once into the only full-size output, the gradient
itself. Backward then multiplies that stored gradient by the incoming scalar.

Two row engines compute the same thing:

* a native C kernel (:mod:`kdistill._fused_kernel`) built with the system compiler on first use
  and cached, with a vectorised ``exp``; rows are split over ``torch.get_num_threads()`` threads.
  It serves float32, float64, bfloat16 and float16 on CPU.
* a vectorised PyTorch engine that processes blocks of rows; it serves CUDA, CPU when no compiler
  is available or ``KDISTILL_NO_COMPILE=1`` is set, and is the fallback when the build fails.

float16 and bfloat16 inputs are computed in float32; their gradient is stored in the input dtype.
The gradient of the divergence with respect to the scaled student logits :math:`a = z^s / T` is,
with :math:`p = \mathrm{softmax}(a)`, :math:`q = \mathrm{softmax}(z^t / T)`:

* forward KL, :math:`KL(q \| p)`: :math:`p - q`
* reverse KL, :math:`KL(p \| q)`: :math:`p \odot (\log p - \log q - KL(p \| q))`
* JSD with mixture :math:`m = \beta q + (1 - \beta) p`:
  :math:`h - p \sum_k h_k`, where :math:`h = \beta p (\log p - \log m) - (1 - \beta) p ((1 - \beta)
  q + \beta p) / m`.

Limitations: the stored gradient is handed to autograd in backward, so the graph can be
backpropagated once (a second ``backward`` raises) and double backward is not supported; use
``implementation="reference"`` for those.
"""

from __future__ import annotations

import logging
import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from kdistill import _fused_kernel

logger = logging.getLogger(__name__)

DIVERGENCE_CODES = {"forward_kl": 0, "reverse_kl": 1, "jsd": 2}
ENGINES = ("auto", "native", "torch")

# Below this many logits the reference path is as fast and the fused one buys nothing.
MIN_FUSED_NUMEL = 1 << 15

_NATIVE_VARIANT = {
    torch.float32: "f32",
    torch.float64: "f64",
    torch.bfloat16: "bf16",
    torch.float16: "f16",
}
_LOW_PRECISION = (torch.float16, torch.bfloat16)

_pool: ThreadPoolExecutor | None = None
_pool_key: tuple[int, int] = (0, 0)
_pool_lock = threading.Lock()


def _executor(workers: int) -> ThreadPoolExecutor:
    global _pool, _pool_key
    # Keyed by process id too: a forked child (a DataLoader worker) inherits the pool object but
    # not its threads, and would wait forever on it.
    key = (os.getpid(), workers)
    with _pool_lock:
        if _pool is None or _pool_key != key:
            if _pool is not None and _pool_key[0] == key[0]:
                _pool.shutdown(wait=False)
            _pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="kdistill-fused")
            _pool_key = key
        return _pool


_MADV_HUGEPAGE = 14
_HUGE = 1 << 21
_libc = None


def _madvise_huge(tensor: Tensor) -> None:
    global _libc
    if _libc is None:
        try:
            import ctypes

            _libc = ctypes.CDLL(None, use_errno=True)
            _libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        except (OSError, AttributeError):
            _libc = False
    if not _libc:
        return
    start = (tensor.data_ptr() + _HUGE - 1) & ~(_HUGE - 1)
    end = (tensor.data_ptr() + tensor.nbytes) & ~(_HUGE - 1)
    if end > start:
        _libc.madvise(start, end - start, _MADV_HUGEPAGE)


def _new_cpu_buffer(reference: Tensor) -> Tensor:
    out = torch.empty_like(reference, memory_format=torch.contiguous_format)
    if out.device.type == "cpu" and out.nbytes >= 4 * _HUGE and os.name == "posix":
        _madvise_huge(out)
    return out


class _GradientPool:
    """Reuses large CPU gradient buffers once nothing but the pool refers to them.

    A fresh half-gigabyte tensor costs more in first-touch page faults than the fused kernel
    spends computing (0.3 s and more here, worse where the host reclaims freed memory). A
    training loop frees the gradient of the logits after every backward, so the next step can
    write into the same memory. A buffer is handed out again only when its storage has no user
    besides the pool (the storage's use count says so), so a gradient still held anywhere, as
    ``.grad`` or in any view, is never overwritten. At most ``capacity`` buffers are kept;
    :func:`release_cached_memory` frees them.
    """

    def __init__(self, capacity: int = 2) -> None:
        self.capacity = capacity
        self._buffers: list[tuple[Tensor, int]] = []
        self._lock = threading.Lock()

    @staticmethod
    def _use_count(tensor: Tensor) -> int:
        return torch._C._storage_Use_Count(tensor.untyped_storage()._cdata)

    def take(self, reference: Tensor) -> Tensor:
        with self._lock:
            for base, idle_count in self._buffers:
                if (
                    base.dtype == reference.dtype
                    and base.numel() == reference.numel()
                    and self._use_count(base) == idle_count
                ):
                    return base.view(reference.shape)
            base = _new_cpu_buffer(reference.reshape(-1))
            idle_count = self._use_count(base)
            self._buffers.append((base, idle_count))
            if len(self._buffers) > self.capacity:
                # Drop the oldest; if it is still in use its owner keeps it alive.
                self._buffers.pop(0)
            return base.view(reference.shape)

    def clear(self) -> None:
        with self._lock:
            self._buffers.clear()


_POOL_MIN_BYTES = 16 << 20
_gradient_pool = _GradientPool()


def release_cached_memory() -> None:
    """Free the gradient buffers the fused path keeps for reuse between steps."""
    _gradient_pool.clear()


def empty_like_fast(reference: Tensor) -> Tensor:
    """An uninitialised contiguous tensor like ``reference``, cheap to fill on CPU.

    Large CPU tensors come from a small pool of released gradient buffers (see
    :class:`_GradientPool`; ``KDISTILL_GRAD_POOL=0`` turns it off) or are freshly allocated
    with transparent huge pages requested, which cuts first-touch page faults about fourfold.
    """
    big = reference.device.type == "cpu" and reference.nbytes >= _POOL_MIN_BYTES
    if big and os.environ.get("KDISTILL_GRAD_POOL", "1") != "0":
        try:
            return _gradient_pool.take(reference)
        except (AttributeError, RuntimeError):  # private use-count API missing: no pooling
            pass
    return _new_cpu_buffer(reference)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the fused path computes in: float32 for 16-bit inputs, else the input dtype."""
    return torch.float32 if dtype in _LOW_PRECISION else dtype


def native_available() -> bool:
    """Whether the compiled row kernel can be used (building it on first call)."""
    return _fused_kernel.load() is not None


def applies(student_logits: Tensor, axis: int, divergence: str) -> bool:
    """Whether ``implementation="auto"`` should take the fused path for these logits.

    The fused path applies to CPU and CUDA floating-point tensors with at least
    ``MIN_FUSED_NUMEL`` elements whose softmax axis is the last one (or is followed only by
    dimensions of size 1), so the rows can be viewed as ``(rows, classes)`` without a copy, and
    on CPU only when the native kernel is available. The
    fused path cannot be differentiated twice; double backward needs
    ``implementation="reference"``.

    Args:
        student_logits: the student's logits as passed to the loss.
        axis: the canonical (non-negative) softmax axis.
        divergence: ``"forward_kl"``, ``"reverse_kl"`` or ``"jsd"``.

    Returns:
        True when the fused path should be used.
    """
    if divergence not in DIVERGENCE_CODES:
        return False
    if student_logits.device.type not in ("cpu", "cuda"):
        return False
    if student_logits.dtype not in _NATIVE_VARIANT:
        return False
    if student_logits.numel() < MIN_FUSED_NUMEL:
        return False
    if math.prod(student_logits.shape[axis + 1 :]) != 1 or not student_logits.is_contiguous():
        return False
    # Without the native kernel the PyTorch engine still saves memory but is slower than the
    # reference on CPU, so "auto" keeps the reference there.
    return student_logits.device.type == "cuda" or native_available()


# --------------------------------------------------------------------------------------------
# Row engines: per-row divergence (float64) and, optionally, the gradient
# --------------------------------------------------------------------------------------------


def _rows_torch(
    student: Tensor,
    teacher: Tensor,
    mask: Tensor | None,
    code: int,
    inv_temperature: float,
    beta: float,
    grad_coef: float,
    grad: Tensor | None,
    row_loss: Tensor,
) -> None:
    """Vectorised PyTorch engine over a block of rows; writes ``row_loss`` and ``grad`` in place."""
    dtype = compute_dtype(student.dtype)
    a = student.to(dtype) * inv_temperature
    b = teacher.to(dtype) * inv_temperature
    log_p = torch.log_softmax(a, dim=-1)
    log_q = torch.log_softmax(b, dim=-1)
    del a, b
    p = log_p.exp()
    q = log_q.exp()
    zero = torch.zeros((), dtype=dtype, device=student.device)

    if code == 0:
        loss = torch.where(q != 0, q * (log_q - log_p), zero).sum(-1)
        g = p.sub_(q) if grad is not None else None
    elif code == 1:
        d = log_p - log_q
        loss = torch.where(p != 0, p * d, zero).sum(-1)
        g = torch.where(p != 0, p * (d - loss.unsqueeze(-1)), zero) if grad is not None else None
    else:
        m = q * beta + p * (1.0 - beta)
        log_m = torch.where(m > 0, m.log(), torch.full_like(m, -math.inf))
        loss = (
            torch.where(q != 0, (1.0 - beta) * q * (log_q - log_m), zero)
            + torch.where(p != 0, beta * p * (log_p - log_m), zero)
        ).sum(-1)
        g = None
        if grad is not None:
            ratio_at_zero = 1.0 / (1.0 - beta) if beta < 1.0 else 0.0
            ratio = torch.where(m > 0, p / m, torch.full_like(m, ratio_at_zero))
            h = torch.where(p != 0, beta * p * (log_p - log_m), zero)
            h -= (1.0 - beta) * ((1.0 - beta) * q + beta * p) * ratio
            g = h - p * h.sum(-1, keepdim=True)

    if mask is not None:
        loss = torch.where(mask, loss, torch.zeros_like(loss))
    row_loss.copy_(loss)
    if grad is not None:
        g = g * grad_coef
        if mask is not None:
            g = torch.where(mask.unsqueeze(-1), g, zero)
        grad.copy_(g)


def _run_torch(student, teacher, mask, code, inv_t, beta, coef, grad, row_loss) -> None:
    rows, cols = student.shape
    budget = (1 << 24) if student.is_cuda else (1 << 20)
    step = max(1, budget // max(cols, 1))
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        _rows_torch(
            student[r0:r1],
            teacher[r0:r1],
            None if mask is None else mask[r0:r1],
            code,
            inv_t,
            beta,
            coef,
            None if grad is None else grad[r0:r1],
            row_loss[r0:r1],
        )


def _run_native(kernel, student, teacher, mask, code, inv_t, beta, coef, grad, row_loss) -> None:
    rows, cols = student.shape
    item = student.element_size()
    scratch_dtype = compute_dtype(student.dtype)
    mask_u8 = None if mask is None else mask.contiguous().view(torch.uint8)
    workers = max(1, min(torch.get_num_threads(), rows))

    def block(r0: int, r1: int) -> None:
        scratch = torch.empty(2 * cols, dtype=scratch_dtype)
        kernel(
            student.data_ptr() + r0 * cols * item,
            teacher.data_ptr() + r0 * cols * item,
            None if mask_u8 is None else mask_u8.data_ptr() + r0,
            r1 - r0,
            cols,
            code,
            inv_t,
            beta,
            coef,
            None if grad is None else grad.data_ptr() + r0 * cols * item,
            row_loss.data_ptr() + r0 * 8,
            scratch.data_ptr(),
        )

    if workers == 1:
        block(0, rows)
        return
    bounds = [rows * w // workers for w in range(workers + 1)]
    futures = [_executor(workers).submit(block, bounds[w], bounds[w + 1]) for w in range(workers)]
    for future in futures:
        future.result()


def divergence_rows(
    student: Tensor,
    teacher: Tensor,
    row_mask: Tensor | None = None,
    *,
    temperature: float = 1.0,
    divergence: str = "forward_kl",
    beta: float = 0.5,
    grad_coef: float = 1.0,
    need_grad: bool = True,
    engine: str = "auto",
    grad_out: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    r"""Per-row divergence of ``(rows, classes)`` logits and the scaled gradient, no autograd.

    Args:
        student: ``(rows, classes)`` student logits, softmax over the last dim.
        teacher: ``(rows, classes)`` teacher logits, same dtype and device.
        row_mask: optional bool ``(rows,)``; False rows get loss 0 and gradient 0.
        temperature: softening temperature ``T`` > 0.
        divergence: ``"forward_kl"``, ``"reverse_kl"`` or ``"jsd"``.
        beta: JSD interpolation in [0, 1].
        grad_coef: the gradient is ``grad_coef * T * d(divergence)/d(student)``, i.e.
            ``grad_coef`` times the derivative with respect to ``student / T``.
        need_grad: compute the gradient (else None is returned for it).
        engine: ``"native"`` (the C kernel, CPU only), ``"torch"`` or ``"auto"``.
        grad_out: optional contiguous buffer shaped and typed like ``student`` to write the
            gradient into; it may be ``student`` itself (each row is read in full before its
            gradient is written), as :func:`kdistill.fused_linear_kd_loss` does.

    Returns:
        ``(row_loss, grad)``: float64 ``(rows,)`` divergences and the gradient in the input dtype
        (or None).

    Raises:
        ValueError: on shape, dtype or device mismatch, an unknown divergence or engine, or
            ``engine="native"`` when the kernel is unavailable or the tensors are not on the CPU.
    """
    if student.dim() != 2 or student.shape != teacher.shape:
        raise ValueError(
            f"divergence_rows needs equal (rows, classes) inputs, got student "
            f"{tuple(student.shape)} and teacher {tuple(teacher.shape)}"
        )
    if divergence not in DIVERGENCE_CODES:
        raise ValueError(f"unknown divergence {divergence!r}; expected one of {DIVERGENCE_CODES}")
    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}; expected one of {ENGINES}")
    if student.device != teacher.device:
        raise ValueError(f"student is on {student.device} but teacher is on {teacher.device}")
    if student.dtype not in _NATIVE_VARIANT:
        raise ValueError(
            f"fused divergence supports float16/bfloat16/float32/float64, got {student.dtype}"
        )

    student = student.detach().contiguous()
    teacher = teacher.detach().to(student.dtype).contiguous()
    if row_mask is not None:
        if row_mask.shape != (student.shape[0],):
            raise ValueError(
                f"row_mask has shape {tuple(row_mask.shape)}, expected ({student.shape[0]},)"
            )
        row_mask = row_mask.to(device=student.device, dtype=torch.bool).contiguous()

    rows = student.shape[0]
    row_loss = torch.empty(rows, dtype=torch.float64, device=student.device)
    grad = None
    if need_grad:
        grad = empty_like_fast(student) if grad_out is None else grad_out
        if grad.shape != student.shape or grad.dtype != student.dtype or not grad.is_contiguous():
            raise ValueError(
                f"grad_out must be a contiguous {student.dtype} tensor of shape "
                f"{tuple(student.shape)}, got {grad.dtype} {tuple(grad.shape)}"
            )
    code = DIVERGENCE_CODES[divergence]
    if divergence == "jsd" and beta in (0.0, 1.0):
        # The mixture is then the student (or the teacher) itself; the KL forms keep its log
        # exact where its probability underflows.
        code = 0 if beta == 0.0 else 1
    inv_t = 1.0 / float(temperature)
    args = (student, teacher, row_mask, code, inv_t, float(beta), float(grad_coef), grad, row_loss)

    kernels = None
    if engine != "torch" and student.device.type == "cpu":
        kernels = _fused_kernel.load()
    kernel = None if kernels is None else kernels.get(_NATIVE_VARIANT[student.dtype])
    if engine == "native" and kernel is None:
        raise ValueError(
            f"the native fused kernel is unavailable for {student.dtype} on {student.device} "
            "(no compiler, KDISTILL_NO_COMPILE set, the build failed, or not a CPU tensor)"
        )
    if rows and student.shape[1]:
        if kernel is not None:
            _run_native(kernel, *args)
        else:
            _run_torch(*args)
    else:
        row_loss.zero_()
        if grad is not None:
            grad.zero_()
    return row_loss, grad


class _FusedDivergence(torch.autograd.Function):
    """Loss in forward; backward scales the gradient computed there by ``grad_output``."""

    @staticmethod
    def forward(
        ctx, student, teacher, row_mask, temperature, divergence, beta, scale, engine, grad_mode
    ):
        scale_on_device = isinstance(scale, Tensor) and scale.device.type != "cpu"
        coef = 1.0 if scale_on_device else float(scale)
        row_loss, grad = divergence_rows(
            student,
            teacher,
            row_mask,
            temperature=temperature,
            divergence=divergence,
            beta=beta,
            grad_coef=coef / temperature,
            # needs_input_grad is set even under torch.no_grad(); the grad mode is passed in.
            need_grad=ctx.needs_input_grad[0] and grad_mode,
            engine=engine,
        )
        out_dtype = compute_dtype(student.dtype)
        total = row_loss.sum()
        if scale_on_device:
            if grad is not None:
                grad.mul_(scale.to(grad.dtype))
            total = total * scale.to(total.dtype)
        else:
            total = total * coef
        # Kept off save_for_backward so that backward can hand over the only reference.
        ctx.fused_grad = grad
        return total.to(out_dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        grad = getattr(ctx, "fused_grad", None)
        if grad is None:
            raise RuntimeError(
                "the fused distillation loss gives its stored gradient away in backward, so it "
                "can be backpropagated once; use implementation='reference' to call backward twice"
            )
        ctx.fused_grad = None
        unit = (
            grad_output.device.type == "cpu"
            and grad_output.numel() == 1
            and (float(grad_output) == 1.0)
        )
        if not unit:
            grad.mul_(grad_output.to(grad.dtype))
        return grad, None, None, None, None, None, None, None, None


def fused_divergence_2d(
    student2d: Tensor,
    teacher2d: Tensor,
    row_mask: Tensor | None,
    *,
    temperature: float,
    divergence: str,
    beta: float = 0.5,
    scale: float | Tensor = 1.0,
    engine: str = "auto",
) -> Tensor:
    r"""``scale * sum over valid rows of divergence(row)``, with the student gradient precomputed.

    This is the hook :func:`kdistill.losses.divergence_loss` calls for the fused path; the row
    divergences are those of the reference path (see :mod:`kdistill.fused`).

    Args:
        student2d: ``(rows, classes)`` student logits, softmax over the last dim.
        teacher2d: ``(rows, classes)`` teacher logits; gets no gradient.
        row_mask: optional bool ``(rows,)`` of rows to include.
        temperature: softening temperature ``T`` > 0.
        divergence: ``"forward_kl"``, ``"reverse_kl"`` or ``"jsd"``.
        beta: JSD interpolation in [0, 1].
        scale: factor applied to the sum (``T**2``, loss weight and ``1 / normalizer``).
        engine: ``"auto"``, ``"native"`` or ``"torch"`` (see :func:`divergence_rows`).

    Returns:
        A 0-dim tensor (float32 for 16-bit inputs, else the input dtype) whose gradient flows to
        ``student2d`` only.

    Example:
        >>> s = torch.randn(64, 1000, requires_grad=True)
        >>> loss = fused_divergence_2d(s, torch.randn(64, 1000), None,
        ...                            temperature=2.0, divergence="forward_kl", scale=4.0)
        >>> loss.backward()
    """
    if os.environ.get("KDISTILL_FUSED_ENGINE"):
        engine = os.environ["KDISTILL_FUSED_ENGINE"]
    return _FusedDivergence.apply(
        student2d,
        teacher2d.detach(),
        row_mask,
        temperature,
        divergence,
        beta,
        scale,
        engine,
        torch.is_grad_enabled(),
    )
