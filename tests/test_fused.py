"""The fused divergence path against the reference path of kdistill.losses."""

from __future__ import annotations

import logging

import pytest
import torch

from kdistill import _fused_kernel, fused
from kdistill.losses import divergence_loss, kd_loss

TOLERANCE = {
    torch.float64: dict(rtol=1e-10, atol=1e-12),
    torch.float32: dict(rtol=2e-5, atol=1e-6),
    torch.bfloat16: dict(rtol=2e-2, atol=2e-4),
    torch.float16: dict(rtol=2e-3, atol=1e-5),
}
DIVERGENCES = [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.5), ("jsd", 0.0), ("jsd", 0.8)]
ENGINES = ["native", "torch"]


@pytest.fixture(params=ENGINES)
def engine(request, monkeypatch):
    if request.param == "native" and not fused.native_available():
        pytest.skip("no C compiler for the native kernel")
    monkeypatch.setenv("KDISTILL_FUSED_ENGINE", request.param)
    return request.param


def both_paths(student, teacher, labels=None, **kwargs):
    """(loss, grad) for the reference and the fused path, in float64 for comparison."""
    results = []
    for implementation in ("reference", "fused"):
        s = student.detach().clone().requires_grad_(True)
        loss = divergence_loss(s, teacher, labels, implementation=implementation, **kwargs)
        loss.backward()
        results.append((loss.detach(), s.grad))
    return results


def assert_paths_match(student, teacher, labels=None, dtype=torch.float32, **kwargs):
    (ref_loss, ref_grad), (fused_loss, fused_grad) = both_paths(student, teacher, labels, **kwargs)
    tol = TOLERANCE[dtype]
    assert fused_loss.dtype == ref_loss.dtype
    assert fused_grad.dtype == ref_grad.dtype == student.dtype
    torch.testing.assert_close(fused_loss.double(), ref_loss.double(), **tol)
    # Gradients are compared against their own scale so that tiny entries do not dominate.
    grad_scale = ref_grad.double().abs().max().clamp(min=1e-30)
    torch.testing.assert_close(
        fused_grad.double() / grad_scale, ref_grad.double() / grad_scale, **tol
    )


@pytest.mark.parametrize("divergence,beta", DIVERGENCES)
@pytest.mark.parametrize("rows,classes", [(1, 2), (7, 13), (33, 257), (5, 1031)])
def test_fused_matches_reference_across_shapes(engine, divergence, beta, rows, classes):
    gen = torch.Generator().manual_seed(rows * 1000 + classes)
    student = torch.randn(rows, classes, generator=gen) * 3
    teacher = torch.randn(rows, classes, generator=gen) * 3
    assert_paths_match(student, teacher, divergence=divergence, beta=beta, temperature=2.5)


@pytest.mark.parametrize("dtype", list(TOLERANCE))
@pytest.mark.parametrize("divergence,beta", DIVERGENCES)
def test_fused_matches_reference_per_dtype(engine, dtype, divergence, beta):
    gen = torch.Generator().manual_seed(7)
    student = (torch.randn(19, 301, generator=gen) * 4).to(dtype)
    teacher = (torch.randn(19, 301, generator=gen) * 4).to(dtype)
    assert_paths_match(
        student, teacher, dtype=dtype, divergence=divergence, beta=beta, temperature=3.0
    )


@pytest.mark.parametrize("normalization", ["valid", "full", "batch_size", "none"])
def test_fused_matches_reference_with_ignored_positions(engine, normalization):
    gen = torch.Generator().manual_seed(3)
    student = torch.randn(4, 6, 97, generator=gen)
    teacher = torch.randn(4, 6, 97, generator=gen)
    labels = torch.randint(0, 97, (4, 6), generator=gen)
    labels[0, :3] = -100
    labels[2, 5] = -100
    assert_paths_match(
        student,
        teacher,
        labels,
        axis=-1,
        ignore_index=-100,
        normalization=normalization,
        temperature=2.0,
    )


def test_fused_matches_reference_on_a_middle_axis(engine):
    gen = torch.Generator().manual_seed(4)
    student = torch.randn(3, 11, 5, 2, generator=gen)
    teacher = torch.randn(3, 11, 5, 2, generator=gen)
    assert_paths_match(student, teacher, axis=1, temperature=4.0)


def test_fused_matches_reference_with_a_normalizer_override_and_no_t_squared(engine):
    gen = torch.Generator().manual_seed(5)
    student = torch.randn(9, 40, generator=gen)
    teacher = torch.randn(9, 40, generator=gen)
    assert_paths_match(
        student, teacher, normalizer=torch.tensor(37.0), t_squared=False, temperature=3.0
    )


@pytest.mark.parametrize("divergence,beta", [("forward_kl", 0.5), ("jsd", 0.5), ("jsd", 0.0)])
def test_fused_matches_reference_with_teacher_minus_inf(engine, divergence, beta):
    gen = torch.Generator().manual_seed(6)
    student = torch.randn(8, 50, generator=gen)
    teacher = torch.randn(8, 50, generator=gen)
    teacher[:, :20] = float("-inf")
    teacher[3, 21:] = float("-inf")  # a one-hot teacher row
    assert_paths_match(student, teacher, divergence=divergence, beta=beta, temperature=1.5)
    (_, _), (fused_loss, fused_grad) = both_paths(student, teacher, divergence=divergence)
    assert torch.isfinite(fused_loss) and torch.isfinite(fused_grad).all()


@pytest.mark.parametrize("divergence,beta", DIVERGENCES)
def test_fused_matches_reference_with_huge_logits(engine, divergence, beta):
    gen = torch.Generator().manual_seed(8)
    student = torch.randn(6, 64, generator=gen) * 1e4
    teacher = torch.randn(6, 64, generator=gen) * 1e4
    teacher[:, 0] = 1e30
    assert_paths_match(student, teacher, divergence=divergence, beta=beta, temperature=1.0)


def test_fused_reverse_kl_is_infinite_where_the_teacher_excludes_student_mass(engine):
    student = torch.zeros(2, 5)
    teacher = torch.tensor([[0.0, float("-inf"), 0.0, 0.0, 0.0]] * 2)
    loss = kd_loss(student, teacher, implementation="fused")
    reference = divergence_loss(student, teacher, divergence="reverse_kl")
    assert torch.isinf(
        divergence_loss(student, teacher, divergence="reverse_kl", implementation="fused")
    )
    assert torch.isinf(reference)
    assert torch.isfinite(loss)


def test_fused_backward_scales_by_the_incoming_gradient(engine):
    gen = torch.Generator().manual_seed(9)
    student = torch.randn(10, 30, generator=gen, requires_grad=True)
    teacher = torch.randn(10, 30, generator=gen)
    (kd_loss(student, teacher, implementation="reference") * 2.5).backward()
    expected = student.grad.clone()
    student.grad = None
    (kd_loss(student, teacher, implementation="fused") * 2.5).backward()
    torch.testing.assert_close(student.grad, expected, rtol=2e-5, atol=1e-7)


def test_fused_second_backward_raises_a_clear_error(engine):
    student = torch.randn(4, 9, requires_grad=True)
    loss = kd_loss(student, torch.randn(4, 9), implementation="fused")
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backpropagated once"):
        loss.backward()


def test_fused_gives_no_gradient_to_the_teacher_and_works_without_student_grad(engine):
    student = torch.randn(4, 9)
    teacher = torch.randn(4, 9, requires_grad=True)
    fused_loss = kd_loss(student, teacher, implementation="fused")
    reference = kd_loss(student, teacher.detach(), implementation="reference")
    assert not fused_loss.requires_grad
    torch.testing.assert_close(fused_loss, reference)


def test_fused_all_rows_ignored_gives_zero_loss_and_gradient(engine):
    student = torch.randn(3, 8, requires_grad=True)
    labels = torch.full((3,), -1)
    loss = kd_loss(student, torch.randn(3, 8), labels, ignore_index=-1, implementation="fused")
    loss.backward()
    assert loss.item() == 0.0
    assert torch.count_nonzero(student.grad) == 0


def test_auto_picks_fused_only_for_large_last_axis_inputs():
    big = torch.randn(64, 1024)
    assert fused.applies(big, 1, "forward_kl")
    assert not fused.applies(torch.randn(4, 10), 1, "forward_kl")
    assert not fused.applies(torch.randn(8, 1024, 8), 1, "forward_kl")
    assert not fused.applies(big.t(), 1, "forward_kl")
    assert not fused.applies(big.to(torch.int32), 1, "forward_kl")


def test_auto_uses_the_fused_path_when_it_applies(monkeypatch):
    calls = []
    original = fused.fused_divergence_2d

    def spy(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(fused, "fused_divergence_2d", spy)
    kd_loss(torch.randn(64, 1024), torch.randn(64, 1024))
    assert calls == [1]
    kd_loss(torch.randn(64, 1024), torch.randn(64, 1024), implementation="reference")
    assert calls == [1]


def test_no_compile_env_falls_back_to_the_torch_engine(monkeypatch, caplog):
    monkeypatch.setenv("KDISTILL_NO_COMPILE", "1")
    monkeypatch.delenv("KDISTILL_FUSED_ENGINE", raising=False)
    _fused_kernel.reset()
    try:
        assert not fused.native_available()
        assert not fused.applies(torch.randn(64, 1024), 1, "forward_kl")
        student, teacher = torch.randn(5, 70), torch.randn(5, 70)
        fused_loss = kd_loss(student, teacher, implementation="fused")
        torch.testing.assert_close(
            fused_loss, kd_loss(student, teacher, implementation="reference")
        )
        with pytest.raises(ValueError, match="native fused kernel is unavailable"):
            fused.divergence_rows(student, teacher, engine="native")
    finally:
        monkeypatch.delenv("KDISTILL_NO_COMPILE")
        _fused_kernel.reset()


def test_failed_build_logs_a_warning_and_falls_back(monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("CC", str(tmp_path / "missing-cc"))
    monkeypatch.setenv("KDISTILL_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(_fused_kernel, "_compiler", lambda: "/bin/false")
    _fused_kernel.reset()
    try:
        with caplog.at_level(logging.WARNING, logger="kdistill._fused_kernel"):
            assert _fused_kernel.load() is None
        assert "failed" in caplog.text
        student, teacher = torch.randn(5, 70), torch.randn(5, 70)
        torch.testing.assert_close(
            kd_loss(student, teacher, implementation="fused"),
            kd_loss(student, teacher, implementation="reference"),
        )
    finally:
        monkeypatch.undo()
        _fused_kernel.reset()


def test_divergence_rows_rejects_mismatched_inputs():
    with pytest.raises(ValueError, match="equal"):
        fused.divergence_rows(torch.randn(3, 4), torch.randn(3, 5))
    with pytest.raises(ValueError, match="row_mask"):
        fused.divergence_rows(torch.randn(3, 4), torch.randn(3, 4), torch.ones(2, dtype=torch.bool))
    with pytest.raises(ValueError, match="unknown divergence"):
        fused.divergence_rows(torch.randn(3, 4), torch.randn(3, 4), divergence="tv")


def test_fused_works_in_a_forked_child_after_use_in_the_parent():
    import multiprocessing as mp

    if "fork" not in mp.get_all_start_methods():
        pytest.skip("no fork start method")
    student, teacher = torch.randn(64, 700), torch.randn(64, 700)
    expected = kd_loss(student, teacher, implementation="fused")
    with mp.get_context("fork").Pool(1) as pool:
        got = pool.apply_async(_fused_loss_in_child, (student, teacher)).get(timeout=60)
    assert got == pytest.approx(expected.item(), rel=1e-6)


def _fused_loss_in_child(student, teacher):
    return kd_loss(student, teacher, implementation="fused").item()


def test_fused_computes_no_gradient_under_no_grad(monkeypatch):
    seen = []
    original = fused.divergence_rows

    def spy(*args, **kwargs):
        seen.append(kwargs["need_grad"])
        return original(*args, **kwargs)

    monkeypatch.setattr(fused, "divergence_rows", spy)
    student = torch.randn(8, 300, requires_grad=True)
    with torch.no_grad():
        loss = kd_loss(student, torch.randn(8, 300), implementation="fused")
    assert seen == [False] and not loss.requires_grad


def test_gradient_buffers_are_reused_only_after_autograd_released_them(engine):
    gen = torch.Generator().manual_seed(11)
    shape = (1024, 4096)  # 16 MiB: large enough to be pooled
    teacher = torch.randn(*shape, generator=gen)
    student = torch.randn(*shape, generator=gen, requires_grad=True)
    fused.release_cached_memory()

    kd_loss(student, teacher, implementation="fused").backward()
    first_ptr = student.grad.data_ptr()
    kept = student.grad.clone()
    student.grad = None
    other = torch.randn(*shape, generator=gen, requires_grad=True)
    kd_loss(other, teacher * 2, implementation="fused").backward()
    held = other.grad
    assert held.data_ptr() == first_ptr  # the released buffer came back
    kd_loss(student, teacher, implementation="fused").backward()
    assert student.grad.data_ptr() != held.data_ptr()  # a held gradient is never reused
    torch.testing.assert_close(student.grad, kept)

    reference = other.detach().clone().requires_grad_(True)
    kd_loss(reference, teacher * 2, implementation="reference").backward()
    torch.testing.assert_close(held, reference.grad, rtol=2e-5, atol=1e-9)
    fused.release_cached_memory()


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd"])
def test_fused_propagates_nan_like_the_reference(engine, divergence):
    student, teacher = torch.randn(4, 300), torch.randn(4, 300)
    teacher[1, 7] = float("nan")
    fused_loss = divergence_loss(student, teacher, divergence=divergence, implementation="fused")
    reference = divergence_loss(student, teacher, divergence=divergence)
    assert torch.isnan(reference) and torch.isnan(fused_loss)
