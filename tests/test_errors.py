"""Every bad input to the losses ends in a ValueError or TypeError whose message names it."""

from __future__ import annotations

import math

import pytest
import torch

from kdistill import DistillationLoss, KDLoss, hard_label_loss, jsd_loss, kd_loss

S = torch.randn(4, 10)
T = torch.randn(4, 10)


@pytest.mark.parametrize("temperature", [0.0, -1.0, math.inf, math.nan])
def test_bad_temperature(temperature):
    with pytest.raises(ValueError, match="temperature must be finite and > 0"):
        kd_loss(S, T, temperature=temperature)
    with pytest.raises(ValueError, match="temperature"):
        KDLoss(temperature=temperature)


def test_temperature_of_wrong_type():
    with pytest.raises(TypeError, match="temperature must be a number"):
        kd_loss(S, T, temperature="4")


def test_shape_mismatch_names_both_shapes():
    with pytest.raises(ValueError, match=r"\(4, 12\).*\(4, 10\)"):
        kd_loss(S, torch.randn(4, 12))


def test_channel_mismatch_with_equal_totals_is_caught():
    # The Caffe layer compared only outer and inner counts, so (2, 6, 5) vs (2, 5, 6) with
    # axis 1 slipped through whenever the totals happened to agree. Every dimension must match.
    with pytest.raises(ValueError, match=r"\(2, 5, 6\).*\(2, 6, 5\)"):
        kd_loss(torch.randn(2, 6, 5), torch.randn(2, 5, 6))


def test_label_count_mismatch():
    with pytest.raises(ValueError, match=r"one label per position: 4 x 1 = 4"):
        kd_loss(S, T, torch.zeros(5, dtype=torch.long), ignore_index=0)


def test_float_labels_rejected():
    with pytest.raises(TypeError, match="labels must be an integer tensor"):
        kd_loss(S, T, torch.zeros(4), ignore_index=0)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool])
def test_non_floating_logits(dtype):
    with pytest.raises(TypeError, match="student_logits must be a floating-point tensor"):
        kd_loss(S.to(dtype), T)
    with pytest.raises(TypeError, match="teacher_logits must be a floating-point tensor"):
        kd_loss(S, T.to(dtype))


def test_non_tensor_logits():
    with pytest.raises(TypeError, match="student_logits must be a torch.Tensor"):
        kd_loss([[1.0, 2.0]], T)


def test_unknown_normalization():
    with pytest.raises(ValueError, match="unknown normalization 'mean'"):
        kd_loss(S, T, normalization="mean")


def test_unknown_divergence_and_bad_beta():
    with pytest.raises(ValueError, match="unknown divergence"):
        KDLoss(divergence="kl")
    with pytest.raises(ValueError, match="beta must be in"):
        jsd_loss(S, T, beta=1.5)


@pytest.mark.parametrize("axis", [2, -3, 7])
def test_axis_out_of_range(axis):
    with pytest.raises(ValueError, match=f"axis {axis} is out of range"):
        kd_loss(S, T, axis=axis)


def test_scalar_logits():
    with pytest.raises(ValueError, match="at least one dimension"):
        kd_loss(torch.tensor(1.0), torch.tensor(1.0))


def test_bad_normalizer_override():
    with pytest.raises(ValueError, match="normalizer must be finite and > 0"):
        kd_loss(S, T, normalizer=0)


def test_hard_label_out_of_range():
    with pytest.raises(ValueError, match=r"label 10 is outside \[0, 10\)"):
        hard_label_loss(S, torch.tensor([0, 1, 2, 10]))
    # An ignored position may hold any value.
    loss = hard_label_loss(S, torch.tensor([0, 1, 2, -100]), ignore_index=-100)
    assert torch.isfinite(loss)


def test_distillation_loss_bad_alpha_and_missing_inputs():
    with pytest.raises(ValueError, match="alpha must be in"):
        DistillationLoss(alpha=1.5)
    with pytest.raises(ValueError, match="no teacher_logits"):
        DistillationLoss(alpha=0.5)(S, None, torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="labels are required"):
        DistillationLoss(alpha=0.5)(S, T, None)


def test_different_devices():
    with pytest.raises(ValueError, match="is on"):
        kd_loss(S, torch.randn(4, 10, device="meta"))


def test_empty_input_gives_zero_not_nan():
    empty = torch.randn(0, 10)
    assert kd_loss(empty, empty).item() == 0.0
