"""The KD loss family against the Caffe layer, autograd, torch's own kl_div and its properties."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kdistill import DistillationLoss, KDLoss, divergence_loss, jsd_loss, kd_loss, reverse_kd_loss
from kdistill.losses import NORMALIZATIONS
from tests.caffe_reference import caffe_forward_backward

SHAPES_AND_AXES = [
    ((6, 5), 1),
    ((6, 5), 0),
    ((6, 5), -1),
    ((3, 7, 4), 1),
    ((3, 7, 4), -1),
    ((3, 7, 4), 0),
    ((2, 5, 3, 4), 1),
    ((2, 5, 3, 4), 2),
    ((2, 5, 3, 4), -1),
]


def _inputs(shape, axis, dtype, seed, ignore_label=None):
    g = torch.Generator().manual_seed(seed)
    student = (torch.randn(shape, generator=g) * 3).to(dtype)
    teacher = (torch.randn(shape, generator=g) * 3).to(dtype)
    axis_c = axis % len(shape)
    label_shape = shape[:axis_c] + shape[axis_c + 1 :]
    labels = torch.randint(0, 4, label_shape, generator=g)
    return student, teacher, labels


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("normalization", NORMALIZATIONS)
@pytest.mark.parametrize("with_ignore", [False, True])
@pytest.mark.parametrize(("shape", "axis"), SHAPES_AND_AXES)
def test_forward_and_gradient_equal_caffe_layer(shape, axis, normalization, with_ignore, dtype):
    temperature = 2.5
    loss_weight = 0.7
    student, teacher, labels = _inputs(shape, axis, dtype, seed=len(shape) * 10 + axis)
    ignore = 2 if with_ignore else None

    expected_loss, expected_grad = caffe_forward_backward(
        student.numpy(),
        teacher.numpy(),
        labels.numpy() if with_ignore else None,
        temperature=temperature,
        axis=axis,
        ignore_label=ignore,
        normalization=normalization,
        loss_weight=loss_weight,
    )

    student.requires_grad_(True)
    criterion = KDLoss(
        temperature=temperature,
        axis=axis,
        ignore_index=ignore,
        normalization=normalization,
        loss_weight=loss_weight,
        t_squared=True,
        implementation="reference",
    )
    loss = criterion(student, teacher, labels if with_ignore else None)
    loss.backward()

    tol = dict(rtol=1e-4, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-12)
    # The layer reports the plain KL / normalizer; only its gradient carries loss_weight * T^2.
    np.testing.assert_allclose(loss.item() / (loss_weight * temperature**2), expected_loss, **tol)
    np.testing.assert_allclose(student.grad.numpy(), expected_grad, **tol)


def test_labels_in_caffe_shape_n1hw_are_accepted():
    student, teacher, labels = _inputs((2, 5, 3, 4), 1, torch.float64, seed=3)
    a = kd_loss(student, teacher, labels, ignore_index=1)
    b = kd_loss(student, teacher, labels.unsqueeze(1), ignore_index=1)
    assert torch.equal(a, b)


def test_large_logits_give_the_true_kl_where_the_layer_clamps():
    student = torch.tensor([[1000.0, -1000.0]])
    teacher = torch.tensor([[-1000.0, 1000.0]])
    caffe_loss, _ = caffe_forward_backward(
        student.numpy(),
        teacher.numpy(),
        None,
        temperature=1.0,
        axis=1,
        ignore_label=None,
        normalization="valid",
    )
    # The true KL is 2000 nats (the teacher's mass sits where the student has log p = -2000).
    assert kd_loss(student, teacher).item() == pytest.approx(2000.0, rel=1e-6)
    assert caffe_loss < 100.0


def test_teacher_minus_inf_entries_give_finite_loss_and_gradient():
    g = torch.Generator().manual_seed(0)
    student = torch.randn(4, 9, generator=g, requires_grad=True)
    teacher = torch.randn(4, 9, generator=g)
    teacher[:, 3:6] = float("-inf")
    for fn in (kd_loss, jsd_loss):
        student.grad = None
        loss = fn(student, teacher, temperature=2.0, implementation="reference")
        loss.backward()
        assert torch.isfinite(loss)
        assert torch.isfinite(student.grad).all()
    both_masked = student.detach().clone()
    both_masked[:, 3:6] = float("-inf")
    assert torch.isfinite(reverse_kd_loss(both_masked, teacher, implementation="reference"))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_is_computed_in_float32_and_grad_keeps_dtype(dtype):
    student32, teacher32, _ = _inputs((8, 12), 1, torch.float32, seed=5)
    student = student32.to(dtype).requires_grad_(True)
    teacher = teacher32.to(dtype)
    loss = kd_loss(student, teacher, temperature=3.0, implementation="reference")
    loss.backward()
    reference = kd_loss(student.detach().float(), teacher.float(), temperature=3.0)
    assert loss.dtype == torch.float32
    assert student.grad.dtype == dtype
    assert loss.item() == pytest.approx(reference.item(), rel=1e-6)


def test_float64_stays_float64():
    student, teacher, _ = _inputs((4, 6), 1, torch.float64, seed=6)
    student.requires_grad_(True)
    loss = kd_loss(student, teacher)
    loss.backward()
    assert loss.dtype == torch.float64 and student.grad.dtype == torch.float64


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd"])
@pytest.mark.parametrize("with_ignore", [False, True])
def test_gradcheck_float64(divergence, with_ignore):
    student, teacher, labels = _inputs((3, 5, 2), 1, torch.float64, seed=7)
    student.requires_grad_(True)

    def fn(s):
        return divergence_loss(
            s,
            teacher,
            labels if with_ignore else None,
            divergence=divergence,
            beta=0.3,
            temperature=1.7,
            ignore_index=1 if with_ignore else None,
            implementation="reference",
        )

    assert torch.autograd.gradcheck(fn, (student,))


def test_teacher_gets_no_gradient():
    student, teacher, _ = _inputs((4, 6), 1, torch.float64, seed=8)
    student.requires_grad_(True)
    teacher.requires_grad_(True)
    kd_loss(student, teacher, temperature=2.0).backward()
    assert teacher.grad is None
    assert student.grad is not None


def test_plain_2d_case_agrees_with_torch_kl_div():
    student, teacher, _ = _inputs((16, 10), 1, torch.float64, seed=9)
    temperature = 4.0
    expected = (
        F.kl_div(
            F.log_softmax(student / temperature, 1),
            F.log_softmax(teacher / temperature, 1),
            reduction="batchmean",
            log_target=True,
        )
        * temperature**2
    )
    assert kd_loss(student, teacher, temperature=temperature).item() == pytest.approx(
        expected.item(), rel=1e-12
    )


def test_jsd_endpoints_are_forward_and_reverse_kl_and_midpoint_is_symmetric():
    student, teacher, _ = _inputs((5, 7), 1, torch.float64, seed=10)
    kw = dict(temperature=2.0, implementation="reference")
    assert jsd_loss(student, teacher, beta=0.0, **kw).item() == pytest.approx(
        kd_loss(student, teacher, **kw).item(), rel=1e-12
    )
    assert jsd_loss(student, teacher, beta=1.0, **kw).item() == pytest.approx(
        reverse_kd_loss(student, teacher, **kw).item(), rel=1e-12
    )
    near_zero = jsd_loss(student, teacher, beta=1e-9, **kw).item()
    assert near_zero == pytest.approx(kd_loss(student, teacher, **kw).item(), rel=1e-6)
    assert jsd_loss(student, teacher, beta=0.5, **kw).item() == pytest.approx(
        jsd_loss(teacher, student, beta=0.5, **kw).item(), rel=1e-12
    )
    # The symmetric JSD is bounded by log 2 per position (times T^2 here).
    assert jsd_loss(student * 100, teacher * 100, beta=0.5, **kw).item() <= 4 * math.log(2) + 1e-9


def test_jsd_is_finite_at_extreme_logits():
    student = torch.tensor([[3000.0, -3000.0, 0.0]], requires_grad=True)
    teacher = torch.tensor([[-3000.0, 3000.0, 0.0]])
    loss = jsd_loss(student, teacher, beta=0.5)
    loss.backward()
    assert loss.item() == pytest.approx(math.log(2), rel=1e-6)
    assert torch.isfinite(student.grad).all()


def test_all_ignored_gives_zero_loss_and_zero_gradient():
    student, teacher, labels = _inputs((3, 5, 4), 1, torch.float32, seed=11)
    student.requires_grad_(True)
    labels.fill_(-100)
    for normalization in NORMALIZATIONS:
        student.grad = None
        loss = kd_loss(student, teacher, labels, ignore_index=-100, normalization=normalization)
        loss.backward()
        assert loss.item() == 0.0
        assert torch.count_nonzero(student.grad) == 0


def test_ignored_positions_do_not_affect_loss_even_when_nan():
    student, teacher, labels = _inputs((4, 6, 3), 1, torch.float32, seed=12)
    labels[0, 1] = -1
    loss = kd_loss(student, teacher, labels, ignore_index=-1)
    poisoned = student.clone()
    poisoned[0, :, 1] = float("nan")
    assert torch.equal(kd_loss(poisoned, teacher, labels, ignore_index=-1), loss)


def test_labels_without_ignore_index_mask_nothing():
    student, teacher, labels = _inputs((4, 6), 1, torch.float64, seed=13)
    assert torch.equal(kd_loss(student, teacher, labels), kd_loss(student, teacher))


def test_normalizer_override_replaces_the_count():
    student, teacher, labels = _inputs((4, 6), 1, torch.float64, seed=14)
    summed = kd_loss(student, teacher, normalization="none")
    assert kd_loss(student, teacher, normalizer=7.0).item() == pytest.approx(summed.item() / 7)
    assert kd_loss(student, teacher, normalizer=torch.tensor(7.0)).item() == pytest.approx(
        summed.item() / 7
    )


def test_distillation_loss_mixes_soft_and_hard_terms():
    student, teacher, labels = _inputs((6, 4, 3), 1, torch.float64, seed=15)
    criterion = DistillationLoss(temperature=3.0, alpha=0.25, ignore_index=0)
    total, soft, hard = criterion(student, teacher, labels, return_parts=True)
    mask = labels != 0
    log_p = F.log_softmax(student, 1)
    expected_hard = F.nll_loss(log_p, labels.masked_fill(~mask, -100), ignore_index=-100)
    expected_soft = kd_loss(student, teacher, labels, temperature=3.0, ignore_index=0)
    assert hard.item() == pytest.approx(expected_hard.item(), rel=1e-12)
    assert soft.item() == pytest.approx(expected_soft.item(), rel=1e-12)
    assert total.item() == pytest.approx(0.25 * soft.item() + 0.75 * hard.item(), rel=1e-12)


def test_distillation_loss_alpha_zero_needs_no_teacher():
    student, _, labels = _inputs((6, 4), 1, torch.float64, seed=16)
    loss = DistillationLoss(alpha=0.0)(student, None, labels)
    assert loss.item() == pytest.approx(F.cross_entropy(student, labels).item(), rel=1e-12)


# ---------------------------------------------------------------- properties (hypothesis)

_shapes = st.lists(st.integers(1, 5), min_size=1, max_size=4).map(tuple)


@st.composite
def _case(draw):
    shape = draw(_shapes)
    axis = draw(st.integers(-len(shape), len(shape) - 1))
    seed = draw(st.integers(0, 2**16))
    temperature = draw(st.floats(0.1, 50.0))
    scale = draw(st.floats(0.01, 30.0))
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(shape, generator=g, dtype=torch.float64) * scale
    teacher = torch.randn(shape, generator=g, dtype=torch.float64) * scale
    return student, teacher, axis, temperature


_prop = settings(
    max_examples=60, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)


@_prop
@given(_case(), st.sampled_from(["forward_kl", "reverse_kl", "jsd"]))
def test_property_loss_is_non_negative_and_zero_for_equal_inputs(case, divergence):
    student, teacher, axis, temperature = case
    kw = dict(axis=axis, temperature=temperature, divergence=divergence)
    assert divergence_loss(student, teacher, **kw).item() >= -1e-12
    assert abs(divergence_loss(teacher, teacher, **kw).item()) <= 1e-9


@_prop
@given(_case(), st.floats(-100, 100))
def test_property_invariant_to_a_constant_shift_along_the_axis(case, shift):
    student, teacher, axis, temperature = case
    a = kd_loss(student, teacher, axis=axis, temperature=temperature)
    b = kd_loss(student + shift, teacher - shift, axis=axis, temperature=temperature)
    assert b.item() == pytest.approx(a.item(), rel=1e-6, abs=1e-9)


@_prop
@given(_case())
def test_property_t_squared_relation_and_normalization_ratios(case):
    student, teacher, axis, temperature = case
    kw = dict(axis=axis, temperature=temperature)
    with_t2 = kd_loss(student, teacher, **kw).item()
    without = kd_loss(student, teacher, t_squared=False, **kw).item()
    assert with_t2 == pytest.approx(without * temperature**2, rel=1e-9, abs=1e-12)

    canonical = axis % student.dim()
    outer = math.prod(student.shape[:canonical])
    inner = math.prod(student.shape[canonical + 1 :])
    summed = kd_loss(student, teacher, normalization="none", **kw).item()
    assert kd_loss(student, teacher, normalization="full", **kw).item() == pytest.approx(
        summed / (outer * inner), rel=1e-9, abs=1e-12
    )
    assert kd_loss(student, teacher, normalization="batch_size", **kw).item() == pytest.approx(
        summed / outer, rel=1e-9, abs=1e-12
    )


@_prop
@given(_case(), st.integers(0, 2**16))
def test_property_valid_normalizer_counts_only_kept_positions(case, seed):
    student, teacher, axis, temperature = case
    canonical = axis % student.dim()
    label_shape = student.shape[:canonical] + student.shape[canonical + 1 :]
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 3, label_shape, generator=g)
    kw = dict(axis=axis, temperature=temperature, ignore_index=0)
    summed = kd_loss(student, teacher, labels, normalization="none", **kw).item()
    kept = int((labels != 0).sum())
    valid = kd_loss(student, teacher, labels, normalization="valid", **kw).item()
    assert valid == pytest.approx(summed / max(kept, 1), rel=1e-9, abs=1e-12)
