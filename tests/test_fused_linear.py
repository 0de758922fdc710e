"""fused_linear_kd_loss against full logits followed by the reference loss."""

from __future__ import annotations

import pytest
import torch

from kdistill.fused_linear import default_chunk_size, fused_linear_kd_loss
from kdistill.losses import divergence_loss

TOLERANCE = {
    torch.float64: dict(rtol=1e-9, atol=1e-12),
    torch.float32: dict(rtol=2e-5, atol=1e-6),
    torch.bfloat16: dict(rtol=4e-2, atol=2e-2),
}


def make_inputs(dtype, tokens=(3, 29), hidden=(12, 20), vocab=67, bias=True, seed=0):
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(dtype)

    student = dict(
        hidden=rand(*tokens, hidden[0]).requires_grad_(True),
        weight=rand(vocab, hidden[0], scale=0.5).requires_grad_(True),
        bias=rand(vocab).requires_grad_(True) if bias else None,
    )
    teacher = dict(
        hidden=rand(*tokens, hidden[1]),
        weight=rand(vocab, hidden[1], scale=0.5),
        bias=rand(vocab) if bias else None,
    )
    return student, teacher


def grads_of(loss, student):
    params = [p for p in student.values() if p is not None]
    return torch.autograd.grad(loss, params)


def assert_fused_linear_matches(dtype, labels=None, chunk_size=None, bias=True, **kwargs):
    student, teacher = make_inputs(dtype, bias=bias)
    fused = fused_linear_kd_loss(
        student["hidden"],
        student["weight"],
        teacher["hidden"],
        teacher["weight"],
        labels,
        student_bias=student["bias"],
        teacher_bias=teacher["bias"],
        chunk_size=chunk_size,
        **kwargs,
    )
    fused_grads = grads_of(fused * 1.7, student)

    student_logits = student["hidden"] @ student["weight"].T
    teacher_logits = teacher["hidden"] @ teacher["weight"].T
    if bias:
        student_logits = student_logits + student["bias"]
        teacher_logits = teacher_logits + teacher["bias"]
    reference = divergence_loss(
        student_logits, teacher_logits, labels, axis=-1, implementation="reference", **kwargs
    )
    reference_grads = grads_of(reference * 1.7, student)

    tol = TOLERANCE[dtype]
    assert fused.dtype == reference.dtype
    torch.testing.assert_close(fused.double(), reference.double(), **tol)
    for got, want in zip(fused_grads, reference_grads, strict=True):
        assert got.dtype == want.dtype and got.shape == want.shape
        scale = want.double().abs().max()
        torch.testing.assert_close(got.double() / scale, want.double() / scale, **tol)


@pytest.mark.parametrize("dtype", list(TOLERANCE))
@pytest.mark.parametrize("chunk_size", [None, 3, 10, 1000])
def test_fused_linear_matches_full_logits_reference(dtype, chunk_size):
    assert_fused_linear_matches(dtype, chunk_size=chunk_size, temperature=2.0)


@pytest.mark.parametrize("divergence,beta", [("reverse_kl", 0.5), ("jsd", 0.5), ("jsd", 0.2)])
def test_fused_linear_matches_reference_for_other_divergences(divergence, beta):
    assert_fused_linear_matches(
        torch.float64, chunk_size=16, divergence=divergence, beta=beta, temperature=3.0
    )


@pytest.mark.parametrize("normalization", ["valid", "full", "batch_size", "none"])
def test_fused_linear_matches_reference_with_ignored_tokens(normalization):
    labels = torch.randint(0, 67, (3, 29), generator=torch.Generator().manual_seed(1))
    labels[0, :10] = -100
    labels[2, -1] = -100
    assert_fused_linear_matches(
        torch.float64,
        labels=labels,
        chunk_size=8,
        ignore_index=-100,
        normalization=normalization,
        t_squared=False,
        temperature=1.5,
    )


def test_fused_linear_without_bias_matches_reference():
    assert_fused_linear_matches(torch.float32, bias=False, chunk_size=7)


def test_fused_linear_gives_the_teacher_no_gradient():
    student, teacher = make_inputs(torch.float32)
    teacher["weight"].requires_grad_(True)
    teacher["hidden"].requires_grad_(True)
    loss = fused_linear_kd_loss(
        student["hidden"], student["weight"], teacher["hidden"], teacher["weight"]
    )
    loss.backward()
    assert teacher["weight"].grad is None and teacher["hidden"].grad is None
    assert student["weight"].grad is not None and student["hidden"].grad is not None


def test_fused_linear_rejects_different_vocabularies():
    student, teacher = make_inputs(torch.float32)
    with pytest.raises(ValueError, match="vocabulary 67 but teacher_weight has 68"):
        fused_linear_kd_loss(
            student["hidden"], student["weight"], teacher["hidden"], torch.randn(68, 20)
        )


def test_fused_linear_rejects_mismatched_shapes():
    student, teacher = make_inputs(torch.float32)
    with pytest.raises(ValueError, match="last dim of the hidden states"):
        fused_linear_kd_loss(
            student["hidden"], torch.randn(67, 13), teacher["hidden"], teacher["weight"]
        )
    with pytest.raises(ValueError, match="leading"):
        fused_linear_kd_loss(
            student["hidden"], student["weight"], teacher["hidden"][:2], teacher["weight"]
        )
    with pytest.raises(ValueError, match="labels has"):
        fused_linear_kd_loss(
            student["hidden"],
            student["weight"],
            teacher["hidden"],
            teacher["weight"],
            torch.zeros(5, dtype=torch.long),
        )
    with pytest.raises(ValueError, match="chunk_size"):
        fused_linear_kd_loss(
            student["hidden"],
            student["weight"],
            teacher["hidden"],
            teacher["weight"],
            chunk_size=0,
        )


def test_default_chunk_size_bounds_the_chunk_logits():
    assert default_chunk_size(4096, 32000) == 1024
    assert default_chunk_size(10, 32000) == 10
    assert default_chunk_size(100000, 256000) == 128
