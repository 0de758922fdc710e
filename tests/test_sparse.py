"""Top-k teacher targets against the dense loss with a teacher that is -inf outside its top-k."""

from __future__ import annotations

import pytest
import torch

from kdistill.losses import divergence_loss
from kdistill.sparse import dense_teacher_from_topk, sparse_kd_loss, topk_teacher


def compare_with_dense(student, values, indices, labels=None, axis=1, rtol=2e-5, **kwargs):
    classes = student.shape[axis]
    dense_teacher = dense_teacher_from_topk(values, indices, classes, axis=axis)
    s_ref = student.detach().clone().requires_grad_(True)
    ref = divergence_loss(
        s_ref, dense_teacher, labels, axis=axis, implementation="reference", **kwargs
    )
    ref.backward()
    s = student.detach().clone().requires_grad_(True)
    loss = sparse_kd_loss(s, values, indices, labels, axis=axis, **kwargs)
    loss.backward()
    torch.testing.assert_close(loss.double(), ref.double(), rtol=rtol, atol=1e-6)
    scale = s_ref.grad.double().abs().max()
    torch.testing.assert_close(
        s.grad.double() / scale, s_ref.grad.double() / scale, rtol=rtol, atol=1e-6
    )
    return loss


@pytest.mark.parametrize("k", [1, 5, 97])
@pytest.mark.parametrize("divergence", ["forward_kl", "jsd"])
def test_sparse_equals_dense_loss_with_minus_inf_outside_topk(k, divergence):
    gen = torch.Generator().manual_seed(k)
    student = torch.randn(13, 97, generator=gen) * 2
    teacher = torch.randn(13, 97, generator=gen) * 2
    values, indices = topk_teacher(teacher, k)
    compare_with_dense(student, values, indices, temperature=2.0, divergence=divergence)


def test_sparse_renormalises_the_teacher_over_its_topk():
    # One position, teacher keeps classes 0 and 1 with equal logits: targets are 1/2, 1/2, 0, 0.
    student = torch.tensor([[0.0, 0.0, 0.0, 0.0]], requires_grad=True)
    values = torch.tensor([[3.0, 3.0]])
    indices = torch.tensor([[0, 1]])
    loss = sparse_kd_loss(student, values, indices, t_squared=False)
    expected = 0.5 * torch.log(torch.tensor(0.5 / 0.25)) * 2
    torch.testing.assert_close(loss, expected)
    loss.backward()
    torch.testing.assert_close(student.grad, torch.tensor([[-0.25, -0.25, 0.25, 0.25]]))


def test_sparse_full_topk_equals_the_dense_teacher():
    gen = torch.Generator().manual_seed(1)
    student = torch.randn(6, 20, generator=gen)
    teacher = torch.randn(6, 20, generator=gen)
    values, indices = topk_teacher(teacher, 20)
    dense = divergence_loss(student, teacher, temperature=3.0, implementation="reference")
    torch.testing.assert_close(sparse_kd_loss(student, values, indices, temperature=3.0), dense)


def test_sparse_on_tokens_with_ignored_positions_and_unordered_indices():
    gen = torch.Generator().manual_seed(2)
    student = torch.randn(2, 7, 50, generator=gen)
    teacher = torch.randn(2, 7, 50, generator=gen)
    values, indices = topk_teacher(teacher, 8, axis=-1)
    perm = torch.randperm(8, generator=gen)
    values, indices = values[..., perm], indices[..., perm]
    labels = torch.randint(0, 50, (2, 7), generator=gen)
    labels[1, :4] = -100
    compare_with_dense(
        student, values, indices, labels, axis=-1, ignore_index=-100, temperature=1.5
    )


@pytest.mark.parametrize("dtype,rtol", [(torch.float64, 1e-10), (torch.bfloat16, 2e-2)])
def test_sparse_matches_dense_in_other_dtypes(dtype, rtol):
    gen = torch.Generator().manual_seed(3)
    student = torch.randn(9, 64, generator=gen).to(dtype)
    values, indices = topk_teacher(torch.randn(9, 64, generator=gen).to(dtype), 10)
    loss = compare_with_dense(student, values, indices, rtol=rtol, temperature=2.0)
    assert loss.dtype == (torch.float32 if dtype == torch.bfloat16 else dtype)


def test_sparse_accepts_minus_inf_padding_slots():
    gen = torch.Generator().manual_seed(4)
    student = torch.randn(3, 30, generator=gen)
    values, indices = topk_teacher(torch.randn(3, 30, generator=gen), 6)
    values[:, 4:] = float("-inf")
    loss = compare_with_dense(student, values, indices)
    assert torch.isfinite(loss)


def test_sparse_rejects_bad_indices_and_shapes():
    student = torch.randn(4, 10)
    values = torch.randn(4, 3)
    with pytest.raises(ValueError, match=r"\[0, 10\)"):
        sparse_kd_loss(student, values, torch.tensor([[0, 1, 10]] * 4))
    with pytest.raises(ValueError, match="repeats"):
        sparse_kd_loss(student, values, torch.tensor([[0, 1, 1]] * 4))
    with pytest.raises(ValueError, match="must match"):
        sparse_kd_loss(student, values, torch.tensor([[0, 1]] * 4))
    with pytest.raises(ValueError, match="does not fit"):
        sparse_kd_loss(student, torch.randn(5, 3), torch.tensor([[0, 1, 2]] * 5))
    with pytest.raises(TypeError, match="integer"):
        sparse_kd_loss(student, values, values)
    with pytest.raises(ValueError, match="k must be"):
        topk_teacher(student, 11)


def test_sparse_normalizer_override_divides_the_summed_loss():
    g = torch.Generator().manual_seed(3)
    student = torch.randn(6, 20, generator=g, dtype=torch.float64)
    values, indices = topk_teacher(torch.randn(6, 20, generator=g, dtype=torch.float64), 5)
    summed = sparse_kd_loss(student, values, indices, normalization="none")
    for normalizer in (7.0, torch.tensor(7.0, dtype=torch.float64)):
        loss = sparse_kd_loss(student, values, indices, normalizer=normalizer)
        assert loss.item() == pytest.approx(summed.item() / 7.0, rel=1e-12)
