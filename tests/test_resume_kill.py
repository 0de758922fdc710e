"""Crash safety of a real training process: SIGKILL, SIGTERM and SIGINT, then resume.

One distillation run on a tiny synthetic dataset is interrupted three times in a row, each time
at a known point (a test hook in :mod:`kdistill.checkpoint` holds the process at the N-th
checkpoint write until the test acts), and resumed with ``kdistill distill --resume``:

1. SIGKILL right after a mid-epoch checkpoint;
2. SIGKILL while a checkpoint is being written (temporary file complete, not yet renamed);
3. SIGTERM: the process saves, prints how to resume, and exits.

A separate run of the command line, inside the test process, is stopped by SIGINT (Ctrl-C).

A second, uninterrupted run with the same configuration runs alongside. The resumed run's
final student, optimizer state and per-epoch metrics must equal it bit for bit.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from kdistill.checkpoint import load_checkpoint
from kdistill.models import build_model

# 240 images in batches of 16: 15 steps per epoch, 3 epochs. With a checkpoint every 4 global
# steps the writes of last.safetensors fall at steps 4, 8, 12, 15 (end of epoch 1), 16, 20, 24,
# 28, 30 (end of epoch 2), 32, 36, 40, 44, 45.
STEPS_PER_EPOCH = 15
GUARD_SECONDS = 180  # only guards against a hung child; no assertion depends on timing


def _write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 8, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def _make_experiment(root: Path) -> tuple[Path, Path]:
    rng = np.random.default_rng(0)
    data = root / "data" / "mnist"
    data.mkdir(parents=True)
    prototypes = rng.integers(0, 256, size=(10, 28, 28))
    for prefix, n in (("train", 240), ("t10k", 60)):
        labels = rng.integers(0, 10, size=n)
        images = np.clip(prototypes[labels] * 0.6 + rng.integers(0, 100, (n, 28, 28)), 0, 255)
        _write_idx(data / f"{prefix}-images-idx3-ubyte", images)
        _write_idx(data / f"{prefix}-labels-idx1-ubyte", labels)

    torch.manual_seed(0)
    teacher = build_model("mlp", {"hidden": [24]})
    teacher_path = root / "teacher.safetensors"
    save_file({k: v.contiguous() for k, v in teacher.state_dict().items()}, str(teacher_path))

    config = root / "distill.toml"
    config.write_text(
        f"""
[data]
name = "mnist"
root = "{root / "data"}"

[teacher]
model = "mlp"
kwargs = {{ hidden = [24] }}

[student]
model = "mlp"
kwargs = {{ hidden = [16], dropout = 0.1 }}

[distill]
temperature = 4.0
alpha = 0.7
train = {{ epochs = 3, batch_size = 16, lr = 0.05, checkpoint_every = 4, seed = 5, jitter = 1 }}
""",
        encoding="utf-8",
    )
    return config, teacher_path


def _env(root: Path, pause: str | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KDISTILL_")}
    env.update(KDISTILL_DATA_DIR=str(root / "cache"), OMP_NUM_THREADS="1", PYTHONHASHSEED="0")
    if pause:
        env["KDISTILL_TEST_PAUSE"] = pause
    return env


def _start(root: Path, args: list[str], pause: str | None = None) -> subprocess.Popen:
    command = [
        sys.executable,
        "-m",
        "kdistill",
        "distill",
        *args,
        "--threads",
        "1",
        "--no-progress",
    ]
    return subprocess.Popen(
        command,
        cwd=root,
        env=_env(root, pause),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _finish(process: subprocess.Popen) -> tuple[int, str, str]:
    stdout, stderr = process.communicate(timeout=GUARD_SECONDS)
    return process.returncode, stdout, stderr


def _start_held(root: Path, args: list[str], write: int, stage: str):
    """Start a run that will stop at the ``write``-th write of last.safetensors, at ``stage``."""
    marker = root / f"pause-{time.monotonic_ns()}"
    return _start(root, args, f"last.safetensors:{write}:{stage}:{marker}"), marker


def _wait_held(process: subprocess.Popen, marker: Path) -> None:
    """Wait until the run is held at its pause (the marker file exists)."""
    deadline = time.monotonic() + GUARD_SECONDS
    while not marker.exists():
        if process.poll() is not None:
            code, out, err = _finish(process)
            pytest.fail(f"run ended (exit {code}) before reaching the pause:\n{out}\n{err}")
        if time.monotonic() > deadline:
            process.kill()
            pytest.fail("run never reached the pause")
        time.sleep(0.02)


def _hold_at(root: Path, args: list[str], write: int, stage: str):
    """Start a run and wait until it is held at the ``write``-th checkpoint write."""
    process, marker = _start_held(root, args, write, stage)
    _wait_held(process, marker)
    return process, marker


def _run_here_with_signal(root: Path, args: list[str], write: int, signum: int) -> tuple[int, str]:
    """Run the CLI in this process; at the ``write``-th checkpoint, send ``signum`` to it."""
    from kdistill import checkpoint, cli

    marker = root / f"pause-here-{time.monotonic_ns()}"
    saved = {k: os.environ.get(k) for k in ("KDISTILL_TEST_PAUSE", "KDISTILL_DATA_DIR")}
    threads = torch.get_num_threads()

    def deliver() -> None:
        deadline = time.monotonic() + GUARD_SECONDS
        while not marker.exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        os.kill(os.getpid(), signum)
        time.sleep(0.05)  # the handler runs at the held loop's next check, within 10 ms
        marker.unlink(missing_ok=True)

    checkpoint._writes_seen.clear()
    os.environ["KDISTILL_TEST_PAUSE"] = f"last.safetensors:{write}:after-rename:{marker}"
    os.environ["KDISTILL_DATA_DIR"] = str(root / "cache")
    helper = threading.Thread(target=deliver, daemon=True)
    helper.start()
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
            code = cli.main(["distill", *args, "--threads", "1", "--no-progress"])
    finally:
        helper.join(timeout=GUARD_SECONDS)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        torch.set_num_threads(threads)
        checkpoint._writes_seen.clear()
    return code, stderr.getvalue()


def _progress(run_dir: Path) -> tuple[int, int]:
    progress = load_checkpoint(run_dir / "last.safetensors")["progress"]
    return progress["epoch"], progress["step"]


def _metrics(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [
        {k: v for k, v in json.loads(line).items() if k != "epoch_seconds"}
        for line in lines
        if line.strip()
    ]


@pytest.fixture(scope="module")
def interrupted_run(tmp_path_factory):
    """Run the reference and the interrupted runs; record what each stop left behind."""
    root = tmp_path_factory.mktemp("resume")
    config, teacher = _make_experiment(root)
    reference_dir, run_dir, sigint_dir = root / "reference", root / "interrupted", root / "sigint"
    fresh = ["-c", str(config), "--teacher", str(teacher), "--run-dir"]
    resume = ["--resume", str(run_dir)]
    seen: dict[str, object] = {}

    # The reference runs alongside everything else.
    reference = _start(root, [*fresh, str(reference_dir)])

    # 1. SIGKILL just after the 6th checkpoint (global step 20: epoch 2, 5 steps in).
    process, marker = _start_held(root, [*fresh, str(run_dir)], 6, "after-rename")

    # Meanwhile, in this process: the command line stopped by SIGINT (Ctrl-C) while held after
    # its 2nd checkpoint (global step 8); it finishes step 9, saves it and returns.
    code, stderr = _run_here_with_signal(root, [*fresh, str(sigint_dir)], 2, signal.SIGINT)
    seen["int"] = (code, stderr, _progress(sigint_dir), sigint_dir)

    _wait_held(process, marker)
    process.send_signal(signal.SIGKILL)
    seen["kill1"] = (_finish(process)[0], _progress(run_dir))

    # 2. SIGKILL in the middle of writing the end-of-epoch-2 checkpoint (the 3rd write after
    #    resuming, global step 30): the temporary file is complete, the rename not yet done.
    process, _ = _hold_at(root, resume, write=3, stage="before-rename")
    temporaries = sorted(p.name for p in run_dir.glob(".last.safetensors.*.tmp"))
    metrics_before_kill = _metrics(run_dir)
    process.send_signal(signal.SIGKILL)
    seen["kill2"] = (_finish(process)[0], _progress(run_dir), temporaries, metrics_before_kill)

    # 3. SIGTERM while held after the 2nd checkpoint of the next process (global step 32).
    process, marker = _hold_at(root, resume, write=2, stage="after-rename")
    process.send_signal(signal.SIGTERM)
    marker.unlink()
    code, _, stderr = _finish(process)
    seen["term"] = (code, stderr, _progress(run_dir), run_dir)

    # 4. Resume to the end, and wait for the reference.
    seen["final"] = _finish(_start(root, resume))
    seen["reference"] = _finish(reference)
    return root, reference_dir, run_dir, seen


def test_sigkill_mid_epoch_leaves_a_loadable_mid_epoch_checkpoint(interrupted_run):
    _, _, _, seen = interrupted_run
    code, progress = seen["kill1"]
    assert code == -signal.SIGKILL
    assert progress == (1, 5)  # one epoch done, 5 steps into the second


def test_sigkill_during_checkpoint_write_keeps_the_previous_checkpoint(interrupted_run):
    _, _, run_dir, seen = interrupted_run
    code, progress, temporaries, metrics = seen["kill2"]
    assert code == -signal.SIGKILL
    # The write at global step 30 (end of epoch 2) was cut off: the checkpoint of step 28
    # (epoch 1 done + 13 steps) is still the one in place, intact and loadable.
    assert progress == (1, 13)
    assert len(temporaries) == 1, temporaries
    # The epoch-2 metrics line was written before the checkpoint; the resume must drop it
    # and produce it again, so the final metrics have each epoch exactly once.
    assert [m["epoch"] for m in metrics] == [1, 2]
    assert [m["epoch"] for m in _metrics(run_dir)] == [1, 2, 3]
    # The next write of the checkpoint cleared the torn temporary file away.
    assert not list(run_dir.glob(".last.safetensors.*.tmp"))


@pytest.mark.parametrize(
    ("name", "signum", "stopped_at"), [("term", signal.SIGTERM, 33), ("int", signal.SIGINT, 9)]
)
def test_sigterm_and_sigint_save_a_checkpoint_and_print_how_to_resume(
    interrupted_run, name, signum, stopped_at
):
    code, stderr, progress, run_dir = interrupted_run[3][name]
    assert code == 128 + signum, stderr
    assert f"kdistill distill --resume {run_dir}" in stderr
    assert "Traceback" not in stderr
    # Held at the checkpoint of global step 32 (8), the run does one more step, then saves
    # it: the checkpoint is at step 33 (9), no step lost.
    epoch, step = progress
    assert epoch * STEPS_PER_EPOCH + step == stopped_at


def test_resumed_run_is_bit_identical_to_an_uninterrupted_one(interrupted_run):
    _, reference_dir, run_dir, seen = interrupted_run
    for name in ("final", "reference"):
        code, stdout, stderr = seen[name]
        assert code == 0, f"{name} run failed:\n{stdout}\n{stderr}"

    for file_name in ("model.safetensors", "best.safetensors"):
        expected = load_file(str(reference_dir / file_name))
        actual = load_file(str(run_dir / file_name))
        assert expected.keys() == actual.keys()
        for key in expected:
            assert torch.equal(expected[key], actual[key]), f"{file_name}: {key} differs"

    expected_state = load_checkpoint(reference_dir / "last.safetensors")
    actual_state = load_checkpoint(run_dir / "last.safetensors")
    for group in ("model", "optim"):
        flat_expected = _flatten(expected_state[group])
        flat_actual = _flatten(actual_state[group])
        assert flat_expected.keys() == flat_actual.keys()
        for key, value in flat_expected.items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(value, flat_actual[key]), f"{group}.{key} differs"
            else:
                assert value == flat_actual[key], f"{group}.{key} differs"
    assert _metrics(run_dir) == _metrics(reference_dir)


def _flatten(tree, prefix: str = "") -> dict:
    if isinstance(tree, dict):
        out = {}
        for key, value in tree.items():
            out.update(_flatten(value, f"{prefix}.{key}"))
        return out
    if isinstance(tree, list):
        out = {}
        for index, value in enumerate(tree):
            out.update(_flatten(value, f"{prefix}.{index}"))
        return out
    return {prefix: tree}


def test_resume_tolerates_a_metrics_line_torn_by_a_crash(tmp_path):
    """A crash while an epoch's record is appended leaves half a line; resuming still works."""
    from torch.utils.data import TensorDataset

    from kdistill.config import TrainConfig
    from kdistill.trainer import TrainingInterrupted, fit

    generator = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.rand(32, 1, 28, 28, generator=generator), torch.arange(32) % 10)
    config = TrainConfig(epochs=2, batch_size=8, lr=0.05, seed=1)

    def student():
        torch.manual_seed(0)
        return build_model("mlp", {"hidden": [4]})

    with pytest.raises(TrainingInterrupted):
        fit(student(), data, data, config, tmp_path, stop_after_steps=6)
    metrics = tmp_path / "metrics.jsonl"
    with open(metrics, "a", encoding="utf-8") as f:
        f.write('{"name": "train", "epoch": 2, "ste')

    result = fit(student(), data, data, config, tmp_path, resume=True)

    assert result.epochs == 2
    assert [m["epoch"] for m in _metrics(tmp_path)] == [1, 2]


def test_resume_refuses_metrics_damaged_before_the_last_line(tmp_path):
    from torch.utils.data import TensorDataset

    from kdistill.checkpoint import CheckpointError
    from kdistill.config import TrainConfig
    from kdistill.trainer import TrainingInterrupted, fit

    data = TensorDataset(torch.zeros(16, 1, 28, 28), torch.arange(16) % 10)
    config = TrainConfig(epochs=2, batch_size=8, seed=1)
    with pytest.raises(TrainingInterrupted):
        fit(build_model("mlp", {"hidden": [4]}), data, data, config, tmp_path, stop_after_steps=3)
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("{broken\n" + metrics.read_text(), encoding="utf-8")

    with pytest.raises(CheckpointError, match="metrics.jsonl line 1"):
        fit(build_model("mlp", {"hidden": [4]}), data, data, config, tmp_path, resume=True)
