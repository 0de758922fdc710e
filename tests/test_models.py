"""Reference models, the model registry, weights files and the input jitter."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from kdistill.models import (
    MLP,
    ModelError,
    build_model,
    hinton_student,
    hinton_teacher,
    load_state,
    load_weights_file,
    random_shift,
)


def test_paper_architectures_have_the_papers_layer_sizes():
    teacher, student = hinton_teacher(), hinton_student()
    assert [m.out_features for m in teacher.hidden] == [1200, 1200]
    assert [m.out_features for m in student.hidden] == [800, 800]
    assert teacher.input_dropout.p == 0.2 and teacher.dropout.p == 0.5
    assert student.dropout.p == 0.0 and student.max_norm is None
    assert teacher(torch.zeros(3, 1, 28, 28)).shape == (3, 10)


def test_max_norm_clips_every_hidden_units_incoming_weights():
    model = MLP(hidden=(8, 8), max_norm=0.5)
    with torch.no_grad():
        for layer in model.hidden:
            layer.weight.mul_(100)
    model.apply_constraints()
    for layer in model.hidden:
        assert layer.weight.norm(dim=1).max() <= 0.5 + 1e-6


def test_random_shift_moves_images_by_at_most_max_shift_and_is_seeded():
    x = torch.zeros(64, 1, 28, 28)
    x[:, :, 14, 14] = 1.0
    out = random_shift(x, 2, torch.Generator().manual_seed(0))
    again = random_shift(x, 2, torch.Generator().manual_seed(0))
    assert torch.equal(out, again)
    rows, cols = out[:, 0].nonzero()[:, 1], out[:, 0].nonzero()[:, 2]
    assert out.sum() == 64  # the single bright pixel survives in every image
    assert (rows - 14).abs().max() == 2 and (cols - 14).abs().max() == 2
    assert len({(int(r), int(c)) for r, c in zip(rows, cols, strict=True)}) > 10


def test_build_model_accepts_an_import_path_factory():
    model = build_model("kdistill.models:MLP", {"hidden": [5], "num_classes": 3})
    assert model.head.out_features == 3


@pytest.mark.parametrize(
    "spec, kwargs, message",
    [
        ("resnet9000", {}, "unknown model 'resnet9000'"),
        ("no_such_module_xyz:f", {}, "cannot import model factory"),
        ("mlp", {"widths": 3}, "rejected its arguments"),
        ("kdistill.models:random_shift", {}, "rejected its arguments"),
    ],
)
def test_build_model_errors_name_the_problem(spec, kwargs, message):
    with pytest.raises(ModelError, match=message):
        build_model(spec, kwargs)


def test_weights_that_do_not_fit_name_the_file_and_the_keys(tmp_path):
    path = tmp_path / "w.safetensors"
    state = MLP(hidden=(16,)).state_dict()
    state["extra.bias"] = torch.zeros(2)
    save_file(state, str(path))
    with pytest.raises(ModelError) as err:
        load_state(MLP(hidden=(32, 32)), load_weights_file(path), path)
    text = str(err.value)
    assert str(path) in text and "missing ['hidden.1.bias'" in text
    assert "unexpected ['extra.bias']" in text and "hidden.0.weight: file (16, 784)" in text


def test_torch_weights_files_are_read_without_unpickling_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (exec, ("import sys; sys.exit(99)",))

    path = tmp_path / "evil.pt"
    torch.save({"w": Evil()}, path)
    with pytest.raises(ModelError, match="cannot read weights from"):
        load_weights_file(path)

    good = tmp_path / "good.pt"
    torch.save(MLP(hidden=(4,)).state_dict(), good)
    load_state(MLP(hidden=(4,)), load_weights_file(good), good)


def test_a_training_checkpoint_serves_as_a_weights_file(tmp_path):
    from kdistill.checkpoint import save_checkpoint

    model = MLP(hidden=(4,))
    path = tmp_path / "last.safetensors"
    save_checkpoint(path, {"model": model.state_dict(), "optim": {"state": {}}, "progress": {}})
    state = load_weights_file(path)
    assert set(state) == set(model.state_dict())
    load_state(MLP(hidden=(4,)), state, path)
