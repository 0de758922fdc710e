r"""Distillation loss straight from hidden states: the output projection fused with the loss.

For a language model the logits are ``hidden @ weight.T + bias`` over a vocabulary of tens of
thousands of entries, and materialising them for every token costs far more memory than the model
needs anywhere else. :func:`fused_linear_kd_loss` walks the tokens in chunks; for each chunk it
forms the student's and the teacher's logits, computes the divergence and its gradient with the
fused row kernel (:mod:`kdistill.fused`), and immediately turns that gradient into the gradients
of the student's hidden states, weight and bias. Only one chunk of logits ever exists; backward
just hands over the gradients accumulated in forward, scaled by the incoming gradient.
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from kdistill import fused
from kdistill.losses import (
    DIVERGENCES,
    NORMALIZATIONS,
    _check_normalizer_override,
    check_beta,
    check_choice,
    check_ignore_index,
    check_temperature,
    compute_normalizer,
)

logger = logging.getLogger(__name__)

# Logits per chunk buffer (128 MiB in float32): large enough that the weight-gradient products
# are few and efficient (each re-reads and re-writes the whole weight gradient), small enough
# that the two chunk buffers stay far below the logits of a long sequence batch.
CHUNK_ELEMENTS = 1 << 25


def default_chunk_size(tokens: int, vocab: int) -> int:
    """Tokens per chunk: about ``CHUNK_ELEMENTS`` logits, a multiple of 64, at least 64."""
    size = max(64, (CHUNK_ELEMENTS // max(vocab, 1)) // 64 * 64)
    return max(1, min(tokens, size))


def _check_linear(name: str, hidden: Tensor, weight: Tensor, bias: Tensor | None) -> None:
    for part, t in ((f"{name}_hidden", hidden), (f"{name}_weight", weight)):
        if not isinstance(t, Tensor) or not t.is_floating_point():
            raise TypeError(f"{part} must be a floating-point tensor")
    if weight.dim() != 2:
        raise ValueError(f"{name}_weight must be (vocab, hidden), got {tuple(weight.shape)}")
    if hidden.dim() < 1 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"{name}_hidden has shape {tuple(hidden.shape)} but {name}_weight has shape "
            f"{tuple(weight.shape)}; the last dim of the hidden states must equal weight.shape[1]"
        )
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(
            f"{name}_bias has shape {tuple(bias.shape)}, expected ({weight.shape[0]},) to match "
            f"{name}_weight {tuple(weight.shape)}"
        )


class _FusedLinearDivergence(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx,
        student_hidden,
        student_weight,
        student_bias,
        teacher_hidden,
        teacher_weight,
        teacher_bias,
        row_mask,
        temperature,
        divergence,
        beta,
        scale,
        chunk_size,
        grad_mode,
    ):
        tokens, vocab = student_hidden.shape[0], student_weight.shape[0]
        # needs_input_grad is set even under torch.no_grad(); the grad mode is passed in.
        need_hidden = grad_mode and ctx.needs_input_grad[0]
        need_weight = grad_mode and ctx.needs_input_grad[1]
        need_bias = grad_mode and student_bias is not None and ctx.needs_input_grad[2]
        need_any = need_hidden or need_weight or need_bias
        dtype = student_hidden.dtype
        accumulate = fused.compute_dtype(dtype)

        grad_hidden = torch.empty_like(student_hidden) if need_hidden else None
        # Filled by the first chunk's product, then accumulated into.
        grad_weight = (
            torch.empty(student_weight.shape, dtype=accumulate, device=student_weight.device)
            if need_weight
            else None
        )
        grad_bias = (
            torch.zeros(vocab, dtype=accumulate, device=student_weight.device)
            if need_bias
            else None
        )
        total = torch.zeros((), dtype=torch.float64, device=student_hidden.device)

        # The two chunk buffers are allocated once and reused: a fresh allocation of this size
        # would be returned to the OS and page-faulted in again on every chunk. The gradient of
        # the logits overwrites the student's logits in place (the row kernel reads a row fully
        # before it writes it).
        rows = min(chunk_size, tokens)
        device = student_hidden.device
        student_buf = torch.empty(rows, vocab, dtype=dtype, device=device)
        teacher_buf = torch.empty(rows, vocab, dtype=teacher_hidden.dtype, device=device)
        teacher_weight_t = teacher_weight.t()
        student_weight_t = student_weight.t()

        for r0 in range(0, tokens, chunk_size):
            r1 = min(tokens, r0 + chunk_size)
            n = r1 - r0
            hidden = student_hidden[r0:r1]
            student_logits = student_buf[:n]
            teacher_logits = teacher_buf[:n]
            if student_bias is None:
                torch.mm(hidden, student_weight_t, out=student_logits)
            else:
                torch.addmm(student_bias, hidden, student_weight_t, out=student_logits)
            if teacher_bias is None:
                torch.mm(teacher_hidden[r0:r1], teacher_weight_t, out=teacher_logits)
            else:
                torch.addmm(
                    teacher_bias, teacher_hidden[r0:r1], teacher_weight_t, out=teacher_logits
                )

            row_loss, grad_logits = fused.divergence_rows(
                student_logits,
                teacher_logits,
                None if row_mask is None else row_mask[r0:r1],
                temperature=temperature,
                divergence=divergence,
                beta=beta,
                grad_coef=scale / temperature,
                need_grad=need_any,
                grad_out=student_logits if need_any else None,
            )
            total += row_loss.sum()
            if grad_logits is None:
                continue
            if need_hidden:
                torch.mm(grad_logits, student_weight, out=grad_hidden[r0:r1])
            if need_weight:
                if accumulate == dtype and r0 == 0:
                    torch.mm(grad_logits.t(), hidden, out=grad_weight)
                elif accumulate == dtype:
                    grad_weight.addmm_(grad_logits.t(), hidden)
                elif r0 == 0:
                    grad_weight.copy_(grad_logits.t() @ hidden)
                else:
                    grad_weight += (grad_logits.t() @ hidden).to(accumulate)
            if need_bias:
                grad_bias += grad_logits.sum(0, dtype=accumulate)

        if tokens == 0 and grad_weight is not None:
            grad_weight.zero_()
        ctx.fused_grads = (
            grad_hidden,
            None if grad_weight is None else grad_weight.to(student_weight.dtype),
            None if grad_bias is None else grad_bias.to(student_bias.dtype),
        )
        return (total * scale).to(accumulate)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        grads = getattr(ctx, "fused_grads", None)
        if grads is None:
            raise RuntimeError(
                "fused_linear_kd_loss gives its stored gradients away in backward, so it can be "
                "backpropagated once"
            )
        ctx.fused_grads = None
        unit = grad_output.device.type == "cpu" and float(grad_output) == 1.0
        if not unit:
            grads = tuple(None if g is None else g.mul_(grad_output.to(g.dtype)) for g in grads)
        return (*grads, None, None, None, None, None, None, None, None, None, None)


def fused_linear_kd_loss(
    student_hidden: Tensor,
    student_weight: Tensor,
    teacher_hidden: Tensor,
    teacher_weight: Tensor,
    labels: Tensor | None = None,
    *,
    student_bias: Tensor | None = None,
    teacher_bias: Tensor | None = None,
    temperature: float = 1.0,
    ignore_index: int | None = None,
    normalization: str = "valid",
    t_squared: bool = True,
    chunk_size: int | None = None,
    divergence: str = "forward_kl",
    beta: float = 0.5,
    normalizer: float | Tensor | None = None,
) -> Tensor:
    r"""Distillation loss of the logits ``hidden @ weight.T + bias``, never holding all of them.

    Equal to :func:`kdistill.divergence_loss` applied to ``student_hidden @ student_weight.T +
    student_bias`` and ``teacher_hidden @ teacher_weight.T + teacher_bias`` with ``axis=-1``,
    computed chunk by chunk over the tokens:

    .. math::
        \ell = T^2 \frac{1}{\mathrm{normalizer}} \sum_{i \in V} D\big(\mathrm{softmax}(z^t_i/T),
        \mathrm{softmax}(z^s_i/T)\big)

    Gradients flow to ``student_hidden``, ``student_weight`` and ``student_bias``; they are
    computed during forward, chunk by chunk. The teacher's tensors get none.

    Shape:
        - student_hidden: ``(..., H_s)``; teacher_hidden: ``(..., H_t)`` with the same leading
          dims (``N`` tokens in all).
        - student_weight: ``(V, H_s)``; teacher_weight: ``(V, H_t)``; biases ``(V,)``.
        - labels: ``N`` integers in any shape, only used to leave out ``ignore_index``.

    Args:
        student_hidden: the student's last hidden states.
        student_weight: the student's output projection (``lm_head.weight``).
        teacher_hidden: the teacher's last hidden states.
        teacher_weight: the teacher's output projection.
        labels: optional token labels for masking.
        student_bias: optional student projection bias.
        teacher_bias: optional teacher projection bias.
        temperature: softening temperature ``T`` > 0.
        ignore_index: label value of tokens to leave out; needs ``labels``.
        normalization: ``"valid"``, ``"full"``, ``"batch_size"`` (all ``N``, as the loss over
            ``(N, V)`` logits with ``axis=-1`` would) or ``"none"``.
        t_squared: multiply by ``T**2``.
        chunk_size: tokens per chunk; default about ``2**25 / V`` tokens, a multiple of 64
            (1024 at ``V = 32000``).
        divergence: ``"forward_kl"``, ``"reverse_kl"`` or ``"jsd"``.
        beta: JSD interpolation in [0, 1].
        normalizer: replaces the computed normalizer (for example a global token count).

    Returns:
        A 0-dim tensor: float32 for float16/bfloat16 inputs, else the input dtype.

    Raises:
        ValueError: the vocabularies differ (``student_weight.shape[0] !=
            teacher_weight.shape[0]``; slice the larger weight yourself if the extra rows are
            padding), the token counts differ, a hidden size does not match its weight, the
            labels do not hold one entry per token, or an option is out of range.
        TypeError: non-floating inputs or non-integer labels.

    Example:
        >>> h_s, w_s = torch.randn(512, 64, requires_grad=True), torch.randn(1000, 64)
        >>> h_t, w_t = torch.randn(512, 128), torch.randn(1000, 128)
        >>> loss = fused_linear_kd_loss(h_s, w_s, h_t, w_t, temperature=2.0)
        >>> loss.backward()
    """
    temperature = check_temperature(temperature)
    divergence = check_choice("divergence", divergence, DIVERGENCES)
    normalization = check_choice("normalization", normalization, NORMALIZATIONS)
    beta = check_beta(beta)
    ignore_index = check_ignore_index(ignore_index)
    _check_linear("student", student_hidden, student_weight, student_bias)
    _check_linear("teacher", teacher_hidden, teacher_weight, teacher_bias)
    if student_weight.shape[0] != teacher_weight.shape[0]:
        raise ValueError(
            f"student_weight has vocabulary {student_weight.shape[0]} but teacher_weight has "
            f"{teacher_weight.shape[0]}; the two distributions must cover the same classes "
            "(slice the larger weight and bias to the shared vocabulary first if the extra rows "
            "are padding)"
        )
    if student_hidden.shape[:-1] != teacher_hidden.shape[:-1]:
        raise ValueError(
            f"student_hidden has shape {tuple(student_hidden.shape)} and teacher_hidden "
            f"{tuple(teacher_hidden.shape)}; their leading (token) dims must match"
        )
    if chunk_size is not None and (
        isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1
    ):
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")

    hidden_size = student_hidden.shape[-1]
    hidden2d = student_hidden.reshape(-1, hidden_size)
    teacher2d = teacher_hidden.detach().reshape(-1, teacher_hidden.shape[-1])
    tokens, vocab = hidden2d.shape[0], student_weight.shape[0]
    dtype = student_hidden.dtype
    if student_weight.dtype != dtype or (student_bias is not None and student_bias.dtype != dtype):
        raise TypeError(
            f"student_hidden ({dtype}), student_weight ({student_weight.dtype}) and student_bias "
            "must share a dtype"
        )
    teacher_weight = teacher_weight.detach().to(teacher2d.dtype)
    teacher_bias = None if teacher_bias is None else teacher_bias.detach().to(teacher2d.dtype)

    row_mask = None
    valid_count = None
    if labels is not None:
        if not isinstance(labels, Tensor) or labels.is_floating_point():
            raise TypeError("labels must be an integer tensor")
        if labels.numel() != tokens:
            raise ValueError(
                f"labels has {labels.numel()} entries but there are {tokens} tokens "
                f"(student_hidden {tuple(student_hidden.shape)})"
            )
        if ignore_index is not None:
            row_mask = labels.reshape(-1).to(student_hidden.device) != ignore_index
            valid_count = row_mask.sum()

    if normalizer is None:
        norm = compute_normalizer(normalization, tokens, 1, valid_count)
    else:
        norm = _check_normalizer_override(normalizer, student_hidden.device)
    scale = (temperature**2 if t_squared else 1.0) / float(norm)
    chunk = chunk_size or default_chunk_size(tokens, vocab)

    loss = _FusedLinearDivergence.apply(
        hidden2d,
        student_weight,
        student_bias,
        teacher2d,
        teacher_weight,
        teacher_bias,
        row_mask,
        temperature,
        divergence,
        beta,
        scale,
        chunk,
        torch.is_grad_enabled(),
    )
    return loss
