"""The offline teacher cache: round trip, staleness and damage detection, trainer guard."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from kdistill.teacher_cache import (
    CorruptTeacherCacheError,
    StaleTeacherCacheError,
    TeacherCache,
    build_teacher_cache,
    fingerprint_inputs,
)


@pytest.fixture
def setup(tmp_path):
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Flatten(), nn.Linear(12, 7))
    checkpoint = tmp_path / "teacher.pt"
    checkpoint.write_bytes(b"weights v1")
    inputs = torch.randn(23, 3, 4)
    return teacher, checkpoint, inputs, tmp_path / "cache"


def build(setup, **kwargs):
    teacher, checkpoint, inputs, path = setup
    options = dict(teacher_checkpoint=checkpoint, dataset_name="toy", batch_size=5)
    options.update(kwargs)
    return build_teacher_cache(teacher, inputs, path, **options)


def reopen(setup, **kwargs):
    _, checkpoint, inputs, path = setup
    options = dict(teacher_checkpoint=checkpoint, dataset=inputs, dataset_name="toy")
    options.update(kwargs)
    return TeacherCache.open(path, **options)


@pytest.mark.parametrize("dtype,tol", [("float32", 0.0), ("float16", 2e-3)])
def test_cache_returns_the_teacher_logits_of_each_example(setup, dtype, tol):
    teacher, _, inputs, _ = setup
    cache = build(setup, dtype=dtype)
    index = torch.tensor([22, 0, 7, 7])
    expected = teacher(inputs[index]).detach()
    torch.testing.assert_close(cache.logits(index), expected, rtol=tol, atol=tol)
    assert len(reopen(setup)) == 23 and cache.num_classes == 7


def test_topk_cache_stores_the_largest_logits_and_their_classes(setup):
    teacher, _, inputs, _ = setup
    cache = build(setup, top_k=3, dtype="float32")
    values, indices = cache.topk(torch.arange(23))
    full = teacher(inputs).detach()
    ref_values, ref_indices = torch.topk(full, 3, dim=1)
    torch.testing.assert_close(values, ref_values)
    assert torch.equal(indices, ref_indices)
    with pytest.raises(TypeError, match="top-k cache"):
        cache.logits(torch.arange(2))


def test_cache_files_are_npy_memmaps_with_a_manifest(setup):
    cache = build(setup)
    manifest = json.loads((cache.path / "manifest.json").read_text())
    assert manifest["dataset"]["size"] == 23
    assert manifest["dataset"]["inputs_sha256"] == fingerprint_inputs(setup[2])
    assert manifest["dtype"] == "float16" and manifest["shape"] == [23, 7]
    assert isinstance(np.load(cache.path / "logits.npy", mmap_mode="r"), np.memmap)


def test_changed_teacher_checkpoint_is_reported_stale(setup):
    build(setup)
    setup[1].write_bytes(b"weights v2")
    with pytest.raises(StaleTeacherCacheError, match="teacher checkpoint SHA-256"):
        reopen(setup)


def test_changed_inputs_are_reported_stale(setup):
    build(setup)
    changed = setup[2].clone()
    changed[5, 0, 0] += 1e-3
    with pytest.raises(StaleTeacherCacheError, match="input fingerprint"):
        reopen(setup, dataset=changed)
    with pytest.raises(StaleTeacherCacheError, match="dataset size"):
        reopen(setup, dataset=setup[2][:-1])


def test_changed_dataset_name_or_transform_is_reported_stale(setup):
    build(setup, transform="scale 1/255")
    with pytest.raises(StaleTeacherCacheError, match="dataset name"):
        reopen(setup, dataset_name="other", transform="scale 1/255")
    with pytest.raises(StaleTeacherCacheError, match="transform"):
        reopen(setup, transform="none")


def test_altered_logits_file_is_reported_damaged(setup):
    cache = build(setup)
    data = cache.path / "logits.npy"
    raw = bytearray(data.read_bytes())
    raw[-1] ^= 0x01
    data.write_bytes(bytes(raw))
    with pytest.raises(CorruptTeacherCacheError, match="damaged"):
        reopen(setup)


def test_truncated_or_missing_files_are_reported_damaged(setup):
    cache = build(setup)
    data = cache.path / "logits.npy"
    data.write_bytes(data.read_bytes()[:-10])
    with pytest.raises(CorruptTeacherCacheError):
        reopen(setup)
    with pytest.raises(CorruptTeacherCacheError):
        reopen(setup, verify_data=False)
    data.unlink()
    with pytest.raises(CorruptTeacherCacheError, match="missing"):
        reopen(setup)
    (cache.path / "manifest.json").write_text("{not json")
    with pytest.raises(CorruptTeacherCacheError, match="cannot read"):
        reopen(setup)


def test_existing_cache_is_not_overwritten_by_accident(setup):
    build(setup)
    with pytest.raises(ValueError, match="already exists"):
        build(setup)
    build(setup, overwrite=True, dtype="float32")
    assert reopen(setup).manifest["dtype"] == "float32"


def test_training_with_jitter_is_refused(setup):
    cache = build(setup)
    cache.check_training(23, jitter=0)
    with pytest.raises(ValueError, match="deterministic teacher inputs"):
        cache.check_training(23, jitter=2)
    with pytest.raises(ValueError, match="holds 23 examples"):
        cache.check_training(24)


def test_trainer_distilling_from_the_cache_equals_running_the_teacher(tmp_path):
    from safetensors.torch import save_file
    from torch.utils.data import TensorDataset

    from kdistill.config import TrainConfig
    from kdistill.trainer import fit

    gen = torch.Generator().manual_seed(1)
    train = TensorDataset(torch.rand(40, 1, 4, 4, generator=gen), torch.randint(0, 5, (40,)))
    test = TensorDataset(torch.rand(10, 1, 4, 4, generator=gen), torch.randint(0, 5, (10,)))
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Flatten(), nn.Linear(16, 5))
    checkpoint = tmp_path / "teacher.safetensors"
    save_file(teacher.state_dict(), checkpoint)
    cache = build_teacher_cache(
        teacher,
        train,
        tmp_path / "cache",
        teacher_checkpoint=checkpoint,
        dataset_name="toy",
        dtype="float32",
    )
    config = TrainConfig(epochs=2, batch_size=8, seed=3)

    def student_weights(**source):
        torch.manual_seed(5)
        student = nn.Sequential(nn.Flatten(), nn.Linear(16, 5))
        fit(
            student,
            train,
            test,
            config,
            tmp_path / str(len(source)) / next(iter(source)),
            temperature=3.0,
            alpha=0.7,
            **source,
        )
        return student[1].weight.detach().clone()

    torch.testing.assert_close(
        student_weights(teacher_cache=cache), student_weights(teacher=teacher)
    )

    with pytest.raises(ValueError, match="deterministic teacher inputs"):
        fit(
            nn.Sequential(nn.Flatten(), nn.Linear(16, 5)),
            train,
            test,
            TrainConfig(epochs=1, batch_size=8, jitter=1),
            tmp_path / "jitter",
            teacher_cache=cache,
            alpha=0.5,
        )
