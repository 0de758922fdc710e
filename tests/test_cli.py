"""The kdistill command line: help, a short end-to-end run, and clean errors for user mistakes."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from kdistill.cli import COMMANDS, main

TINY = [
    "--set", "teacher.model=mlp",
    "--set", "teacher.kwargs={hidden=[16], dropout=0.2}",
    "--set", "teacher.train={epochs=2, batch_size=32, lr=0.1, jitter=1, checkpoint_every=3}",
    "--set", "student.model=mlp",
    "--set", "student.kwargs={hidden=[8]}",
    "--set", "distill.train={epochs=2, batch_size=32, lr=0.1}",
    "--set", "distill.temperature=3",
    "--no-progress", "--offline",
]  # fmt: skip


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 8, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    """A tiny MNIST-shaped dataset in IDX files: 10 noisy class prototypes."""
    rng = np.random.default_rng(0)
    folder = tmp_path / "data" / "mnist"
    folder.mkdir(parents=True)
    prototypes = rng.integers(0, 256, size=(10, 28, 28))
    for prefix, n in (("train", 160), ("t10k", 40)):
        labels = rng.integers(0, 10, size=n)
        images = np.clip(prototypes[labels] * 0.6 + rng.integers(0, 100, (n, 28, 28)), 0, 255)
        _write_idx(folder / f"{prefix}-images-idx3-ubyte", images)
        _write_idx(folder / f"{prefix}-labels-idx1-ubyte", labels)
    return tmp_path / "data"


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("command", [None, *COMMANDS])
def test_help_lists_the_commands_and_their_options(capsys, command):
    with pytest.raises(SystemExit) as exit_:
        main(["--help"] if command is None else [command, "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    if command is None:
        assert all(name in out for name in ("train-teacher", "distill", "reproduce", "demo"))
    else:
        assert "usage: kdistill " + command in out


def test_train_distill_evaluate_and_resume_end_to_end(tmp_path, data_dir, capsys):
    teacher_dir, distill_dir = tmp_path / "teacher", tmp_path / "distill"
    code, out, _ = _run(
        capsys, "train-teacher", *TINY, "--data-dir", data_dir, "--run-dir", teacher_dir
    )
    assert code == 0 and "test errors" in out
    for name in ("model.safetensors", "last.safetensors", "metrics.jsonl", "curve.png"):
        assert (teacher_dir / name).is_file()
    assert len((teacher_dir / "metrics.jsonl").read_text().splitlines()) == 2

    code, out, _ = _run(
        capsys, "distill", *TINY, "--data-dir", data_dir, "--run-dir", distill_dir,
        "--teacher", teacher_dir / "model.safetensors",
    )  # fmt: skip
    assert code == 0
    errors = json.loads((distill_dir / "result.json").read_text())["errors"]

    code, out, _ = _run(capsys, "evaluate", distill_dir, "--data-dir", data_dir, "--offline")
    assert code == 0 and f"  {errors}  " in out

    # A finished run resumed again is a no-op that ends with the same numbers.
    code, out, _ = _run(capsys, "distill", "--resume", distill_dir, "--no-progress")
    assert code == 0
    assert json.loads((distill_dir / "result.json").read_text())["errors"] == errors


def _assert_clean_error(code: int, err: str, *fragments: str) -> None:
    assert code == 2
    assert "Traceback" not in err and err.startswith("kdistill: error: ")
    assert len(err.strip().splitlines()) == 1
    for fragment in fragments:
        assert fragment in err


def test_bad_config_key_is_one_clear_line(tmp_path, data_dir, capsys):
    config = tmp_path / "bad.toml"
    config.write_text("[teacher.train]\nlrr = 0.1\n")
    code, _, err = _run(capsys, "train-teacher", "-c", config, "--data-dir", data_dir)
    _assert_clean_error(code, err, "unknown key teacher.train.lrr", str(config))


def test_missing_data_says_where_to_put_it(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    code, _, err = _run(capsys, "train-teacher", "--data-dir", empty, "--offline")
    _assert_clean_error(code, err, str(empty))


def test_weights_that_do_not_fit_the_model_are_one_clear_line(tmp_path, data_dir, capsys):
    code, _, _ = _run(
        capsys, "train-teacher", *TINY, "--data-dir", data_dir, "--run-dir", tmp_path / "t"
    )
    assert code == 0
    weights = tmp_path / "t" / "model.safetensors"
    code, _, err = _run(
        capsys, "evaluate", weights, "--model", "mlp", "--kwargs", '{"hidden": [9]}',
        "--data-dir", data_dir, "--offline",
    )  # fmt: skip
    _assert_clean_error(
        code, err, str(weights), "hidden.0.weight: file (16, 784) vs model (9, 784)"
    )


def test_resume_of_a_folder_without_a_run_is_one_clear_line(tmp_path, capsys):
    code, _, err = _run(capsys, "distill", "--resume", tmp_path / "nothing-here")
    _assert_clean_error(code, err, "config.json")


def test_distill_without_a_teacher_is_one_clear_line(data_dir, capsys):
    code, _, err = _run(capsys, "distill", "--data-dir", data_dir, "--offline")
    _assert_clean_error(code, err, "--teacher")


def test_reproduce_runs_three_phases_and_a_rerun_reuses_them(tmp_path, data_dir, capsys):
    run_dir = tmp_path / "repro"
    args = ["reproduce", "hinton-mnist", *TINY, "--data-dir", data_dir, "--run-dir", run_dir]
    code, out, _ = _run(capsys, *args)
    assert code == 0 and "paper" in out and (run_dir / "curves.png").is_file()
    summary = json.loads((run_dir / "summary.json").read_text())["phases"]
    assert set(summary) == {"teacher", "student", "distill"}
    stamp = (run_dir / "teacher" / "model.safetensors").stat().st_mtime_ns

    code, _, _ = _run(capsys, *args)
    assert code == 0
    assert (run_dir / "teacher" / "model.safetensors").stat().st_mtime_ns == stamp
    assert json.loads((run_dir / "summary.json").read_text())["phases"] == summary


def test_demo_reports_the_three_students_and_caches_its_teacher(
    tmp_path, data_dir, capsys, monkeypatch
):
    monkeypatch.setenv("KDISTILL_DATA_DIR", str(tmp_path / "cache"))
    args = ["demo", *TINY, "--set", "data.labeled=40", "--data-dir", data_dir]
    code, out, _ = _run(capsys, *args, "--run-dir", tmp_path / "demo")
    assert code == 0
    assert "student alone" in out and "distilled student" in out and "What this shows" in out
    assert len(list((tmp_path / "cache" / "teachers").iterdir())) == 1

    code, out, _ = _run(capsys, *args, "--run-dir", tmp_path / "demo2")
    assert code == 0 and "reusing the cached teacher" in out


def test_distillation_from_a_teacher_cache_builds_it_once_then_reads_it(tmp_path, data_dir, capsys):
    cache = tmp_path / "teacher-cache"
    base = [*TINY, "--data-dir", data_dir, "--set", f'distill.teacher_cache="{cache}"']
    code, _, err = _run(capsys, "reproduce", "hinton-mnist", *base, "--run-dir", tmp_path / "r1")
    assert code == 0, err
    assert json.loads((cache / "manifest.json").read_text())["shape"][0] == 160
    stamp = (cache / "manifest.json").stat().st_mtime_ns

    # The same teacher again: the verified cache is read, not rebuilt.
    teacher = tmp_path / "r1" / "teacher" / "model.safetensors"
    code, _, err = _run(capsys, "distill", *base, "--teacher", teacher, "--run-dir", tmp_path / "d")
    assert code == 0, err
    assert (cache / "manifest.json").stat().st_mtime_ns == stamp

    # Another teacher (another seed): the cache is stale and refused, not used.
    other = [*base, "--set", "teacher.train.seed=7", "--run-dir", tmp_path / "r2"]
    code, _, err = _run(capsys, "reproduce", "hinton-mnist", *other)
    assert code == 2
    assert "is stale" in err and "Traceback" not in err


def test_a_teacher_cache_with_jittered_inputs_is_one_clear_line(tmp_path, data_dir, capsys):
    args = [
        "reproduce", "hinton-mnist", *TINY, "--data-dir", data_dir,
        "--set", f'distill.teacher_cache="{tmp_path / "cache"}"',
        "--set", "distill.train={epochs=1, batch_size=32, lr=0.1, jitter=1}",
        "--run-dir", tmp_path / "repro",
    ]  # fmt: skip
    code, _, err = _run(capsys, *args)
    assert code == 2
    assert "distill.teacher_cache needs distill.train.jitter = 0" in err
    assert "Traceback" not in err
