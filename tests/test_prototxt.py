"""Caffe layer definitions load into the equivalent KDLoss, and bad ones are refused by name."""

from __future__ import annotations

import pytest
import torch

from kdistill import KDLoss, PrototxtError, from_prototxt, kd_loss

# The two examples of the original layer's README, verbatim (including the misspelt bottom).
COMMON = """
layer {
  name: "KD"
  type: "KnowledgeDistillation"
  bottom: "student_logits"
  bottom: "taecher_logits"
  top: "KL_div"
  include { phase: TRAIN }
  knowledge_distillation_param { temperature: 4 } #usually larger than 1
  loss_weight: 1
}
"""

WITH_IGNORE = """
layer {
  name: "KD"
  type: "KnowledgeDistillation"
  bottom: "student_logits"
  bottom: "taecher_logits"
  bottom: "label"
  top: "KL_div"
  include { phase: TRAIN }
  knowledge_distillation_param { temperature: 4 }
  loss_param {ignore_label: 2}
  loss_weight: 1
}
"""


def test_readme_example_without_labels():
    criterion = from_prototxt(COMMON)
    assert isinstance(criterion, KDLoss)
    assert (criterion.temperature, criterion.axis, criterion.ignore_index) == (4.0, 1, None)
    assert (criterion.normalization, criterion.loss_weight) == ("valid", 1.0)


def test_readme_example_with_ignore_label_masks_that_label():
    criterion = from_prototxt(WITH_IGNORE)
    assert criterion.ignore_index == 2
    student, teacher = torch.randn(6, 5), torch.randn(6, 5)
    labels = torch.tensor([2, 0, 1, 2, 3, 4])
    expected = kd_loss(student, teacher, labels, temperature=4.0, ignore_index=2)
    assert torch.equal(criterion(student, teacher, labels), expected)


def test_body_without_layer_wrapper_and_all_fields():
    criterion = from_prototxt(
        """
        type: "KnowledgeDistillation"
        knowledge_distillation_param { temperature: 2.5 }
        softmax_param { axis: -1 }
        loss_param { normalization: BATCH_SIZE }
        loss_weight: 0.5
        """
    )
    assert (criterion.temperature, criterion.axis) == (2.5, -1)
    assert (criterion.normalization, criterion.loss_weight) == ("batch_size", 0.5)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("loss_param { normalize: false }", "batch_size"),
        ("loss_param { normalize: true }", "valid"),
        ("loss_param { normalize: false normalization: FULL }", "full"),
        ("loss_param { normalization: NONE }", "none"),
        ("", "valid"),
    ],
)
def test_legacy_normalize_and_normalization(text, expected):
    assert from_prototxt(text).normalization == expected


def test_layer_among_others_in_a_net():
    net = 'layer { name: "fc" type: "InnerProduct" }\n' + COMMON
    assert from_prototxt(net).temperature == 4.0


def test_loss_weight_scales_the_loss():
    student, teacher = torch.randn(3, 4), torch.randn(3, 4)
    half = from_prototxt("loss_weight: 0.5 knowledge_distillation_param { temperature: 3 }")
    assert half(student, teacher).item() == pytest.approx(
        0.5 * kd_loss(student, teacher, temperature=3.0).item()
    )


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('layer { type: "KnowledgeDistillation" temprature: 4 }', 'no field named "temprature"'),
        ("knowledge_distillation_param { temp: 4 }", 'no field named "temp"'),
        ('layer { type: "SoftmaxWithLoss" }', "exactly one layer of type"),
        ('type: "SoftmaxWithLoss"', "expected 'KnowledgeDistillation'"),
        ("knowledge_distillation_param { temperature: 0 }", "temperature must be finite and > 0"),
        ("knowledge_distillation_param { temperature: -2 }", "temperature must be finite"),
        ("loss_weight: 1 loss_weight: 2", "at most one loss_weight"),
        ('layer { type: "KnowledgeDistillation"', "cannot parse"),
        ("loss_param { normalization: MEAN }", "cannot parse"),
        (
            'bottom: "s" bottom: "t" loss_param { ignore_label: 2 }',
            "labels must be given as the third bottom",
        ),
    ],
)
def test_bad_prototxt_is_refused_with_a_message(text, message):
    with pytest.raises(PrototxtError, match=message):
        from_prototxt(text)


def test_non_string_input():
    with pytest.raises(TypeError, match="expects the prototxt as a str"):
        from_prototxt(b"loss_weight: 1")
