"""The training loop: distillation works, runs are deterministic, resuming is exact."""

from __future__ import annotations

import json
import os
import signal

import pytest
import torch
from torch.utils.data import TensorDataset

from kdistill.checkpoint import (
    CheckpointError,
    atomic_write,
    load_checkpoint,
    save_checkpoint,
)
from kdistill.config import TrainConfig
from kdistill.models import MLP
from kdistill.trainer import (
    NonFiniteLossError,
    TrainingInterrupted,
    epoch_order,
    evaluate,
    fit,
    learning_rate,
    seed_everything,
)


@pytest.fixture(autouse=True)
def one_thread():
    # One thread: identical results whatever the machine, and no oversubscription on shared CPUs.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _rule_problem() -> tuple[TensorDataset, TensorDataset]:
    """5 balanced classes given by a fixed random ReLU network of 20 inputs."""
    g = torch.Generator().manual_seed(0)
    w1, w2 = torch.randn(20, 64, generator=g), torch.randn(64, 5, generator=g)
    x = torch.randn(3000, 20, generator=g)
    scores = torch.relu(x @ w1) @ w2
    y = (scores - scores.mean(0)).argmax(1)
    return TensorDataset(x[:2000], y[:2000]), TensorDataset(x[2000:], y[2000:])


def test_distilled_student_beats_the_student_trained_alone_on_the_same_few_labels(tmp_path):
    train, test = _rule_problem()
    seed_everything(0)
    teacher = MLP(20, (128,), 5)
    fit(teacher, train, test, TrainConfig(epochs=8, batch_size=100, lr=0.2), tmp_path / "t")

    few = TensorDataset(train.tensors[0][:50], train.tensors[1][:50])
    seed_everything(1)
    alone = MLP(20, (64,), 5)
    alone_result = fit(
        alone, few, test, TrainConfig(epochs=40, batch_size=10, lr=0.05), tmp_path / "s"
    )
    seed_everything(1)
    student = MLP(20, (64,), 5)
    # The transfer set's labels are never read: poison them to prove it.
    unlabeled = TensorDataset(train.tensors[0], torch.full((2000,), -1))
    distilled = fit(
        student,
        unlabeled,
        test,
        TrainConfig(epochs=4, batch_size=100, lr=0.2),
        tmp_path / "d",
        teacher=teacher,
        temperature=2.0,
        alpha=1.0,
        use_labels=False,
    )
    assert distilled.errors < 0.7 * alone_result.errors
    assert all(not p.requires_grad for p in teacher.parameters())


def _image_problem() -> tuple[TensorDataset, TensorDataset]:
    g = torch.Generator().manual_seed(1)
    x = torch.rand(150, 1, 8, 8, generator=g)
    y = (x[:, 0, :4].sum((1, 2)) > x[:, 0, 4:].sum((1, 2))).long()
    return TensorDataset(x[:120], y[:120]), TensorDataset(x[120:], y[120:])


CONFIG = TrainConfig(epochs=3, batch_size=32, lr=0.1, jitter=1, checkpoint_every=3, seed=5)


def _model(seed: int = 0) -> MLP:
    seed_everything(seed)
    return MLP(64, (16,), 2, input_dropout=0.1, dropout=0.3, max_norm=1.0)


def _distill(run_dir, *, resume=False, stop_after_steps=None, progress=None, seed=0):
    train, test = _image_problem()
    teacher = _model(seed=99)
    student = _model(seed)
    result = fit(
        student,
        train,
        test,
        CONFIG,
        run_dir,
        teacher=teacher,
        temperature=3.0,
        alpha=0.7,
        resume=resume,
        stop_after_steps=stop_after_steps,
        progress=progress,
    )
    return student, result


def _metrics(run_dir) -> list[dict]:
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "epoch_seconds"} for r in records]


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_two_runs_with_the_same_seed_give_identical_students(tmp_path, reference_run):
    first = reference_run[0]
    second, _ = _distill(tmp_path / "b")
    different_init, _ = _distill(tmp_path / "c", seed=1)
    assert _same_weights(first, second)
    assert not _same_weights(first, different_init)


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    """An uninterrupted distillation run: its student, result and run folder."""
    run_dir = tmp_path_factory.mktemp("reference")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    student, result = _distill(run_dir)
    torch.set_num_threads(threads)
    return student, result, run_dir


# 120 examples / 32 = 4 steps per epoch: stop mid-epoch, exactly at an epoch's last step, and
# in the last epoch.
@pytest.mark.parametrize("stop", [2, 4, 11])
def test_resuming_a_stopped_run_is_bit_identical_to_an_uninterrupted_one(
    tmp_path, stop, reference_run
):
    reference, reference_result, reference_dir = reference_run
    with pytest.raises(TrainingInterrupted):
        _distill(tmp_path / "run", stop_after_steps=stop)
    assert load_checkpoint(tmp_path / "run" / "last.safetensors")["progress"]["step"] > 0
    resumed, result = _distill(tmp_path / "run", resume=True)

    assert _same_weights(reference, resumed)
    assert _metrics(reference_dir) == _metrics(tmp_path / "run")
    ref_optim = load_checkpoint(reference_dir / "last.safetensors")["optim"]
    run_optim = load_checkpoint(tmp_path / "run" / "last.safetensors")["optim"]
    for key, state in ref_optim["state"].items():
        assert torch.equal(state["momentum_buffer"], run_optim["state"][key]["momentum_buffer"])
    assert result.errors == reference_result.errors and result.epochs == 3


def test_sigterm_saves_a_checkpoint_and_the_run_resumes_exactly(tmp_path, reference_run):
    reference = reference_run[0]
    steps = []

    def send_sigterm_at_step_5(event):
        if event["event"] == "step":
            steps.append(1)
            if len(steps) == 5:
                os.kill(os.getpid(), signal.SIGTERM)

    previous = signal.getsignal(signal.SIGTERM)
    with pytest.raises(TrainingInterrupted) as stopped:
        _distill(tmp_path / "run", progress=send_sigterm_at_step_5)
    assert stopped.value.signum == signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) == previous  # the handler is put back
    assert load_checkpoint(tmp_path / "run" / "last.safetensors")["progress"]["global_step"] == 5
    resumed, _ = _distill(tmp_path / "run", resume=True)
    assert _same_weights(reference, resumed)


def test_resume_refuses_a_checkpoint_of_different_settings(tmp_path):
    with pytest.raises(TrainingInterrupted):
        _distill(tmp_path / "run", stop_after_steps=2)
    train, test = _image_problem()
    with pytest.raises(CheckpointError, match="was written by a different run"):
        fit(_model(), train, test, CONFIG, tmp_path / "run", resume=True)


def test_atomic_write_leaves_the_old_file_when_writing_fails(tmp_path):
    path = tmp_path / "last.safetensors"
    save_checkpoint(path, {"model": {"w": torch.ones(3)}, "progress": {"epoch": 1}})

    def fail_halfway(f):
        f.write(b"partial")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, fail_halfway)
    assert load_checkpoint(path)["progress"] == {"epoch": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["last.safetensors"]


def test_checkpoint_round_trip_keeps_nested_tensors_and_values(tmp_path):
    state = {
        "model": {"a.weight": torch.arange(6.0).view(2, 3)},
        "optim": {"state": {0: {"step": torch.tensor(3.0)}}, "groups": [{"lr": 0.1, "x": None}]},
        "progress": {"epoch": 2, "name": "t", "flag": True},
    }
    save_checkpoint(tmp_path / "c.safetensors", state)
    loaded = load_checkpoint(tmp_path / "c.safetensors")
    assert torch.equal(loaded["model"]["a.weight"], state["model"]["a.weight"])
    assert loaded["optim"]["state"][0]["step"] == 3.0
    assert loaded["optim"]["groups"] == [{"lr": 0.1, "x": None}]
    assert loaded["progress"] == state["progress"]


@pytest.mark.parametrize("damage", ["truncate", "garbage", "pickle", "plain-safetensors"])
def test_damaged_or_foreign_checkpoints_raise_an_error_naming_the_file(tmp_path, damage):
    path = tmp_path / "last.safetensors"
    save_checkpoint(path, {"model": {"w": torch.ones(100)}, "progress": {"epoch": 1}})
    data = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "garbage":
        path.write_bytes(b"\x00" * 64)
    elif damage == "pickle":
        torch.save({"w": torch.ones(2)}, path)
    else:
        from safetensors.torch import save_file

        save_file({"w": torch.ones(2)}, str(path))
    with pytest.raises(CheckpointError, match=str(path)):
        load_checkpoint(path)


def test_onecycle_warms_up_to_the_peak_then_decays_to_almost_zero():
    config = TrainConfig(lr=0.1, warmup=0.2, schedule="onecycle")
    rates = [learning_rate(s, 100, config) for s in range(100)]
    assert rates[0] == pytest.approx(0.1 / 25)
    assert max(rates) == pytest.approx(0.1) and rates.index(max(rates)) == 20
    assert rates[-1] < 1e-3 and all(a >= b for a, b in zip(rates[20:], rates[21:], strict=False))
    cosine = TrainConfig(lr=0.1, schedule="cosine")
    assert learning_rate(0, 100, cosine) == 0.1 and learning_rate(50, 100, cosine) == 0.05


def test_epoch_order_depends_only_on_seed_and_epoch():
    assert torch.equal(epoch_order(50, 3, 7), epoch_order(50, 3, 7))
    assert not torch.equal(epoch_order(50, 3, 7), epoch_order(50, 3, 8))
    assert sorted(epoch_order(50, 3, 7).tolist()) == list(range(50))


def test_evaluate_counts_errors():
    model = torch.nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.eye(2))
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    scores = evaluate(model, TensorDataset(x, torch.tensor([0, 1, 1])), batch_size=2)
    assert scores["errors"] == 1 and scores["count"] == 3


def test_a_non_finite_loss_stops_training_and_keeps_the_last_good_checkpoint(tmp_path):
    train, test = _rule_problem()
    x, y = train.tensors
    config = TrainConfig(epochs=1, batch_size=100, lr=0.1, checkpoint_every=1)
    # Poison one example of the sixth batch: five good steps are checkpointed before it.
    order = epoch_order(len(x), config.seed, 0)
    poisoned_x = x.clone()
    poisoned_x[order[550]] = float("nan")

    seed_everything(0)
    with pytest.raises(NonFiniteLossError, match="training loss is nan at epoch 1, step 6"):
        fit(MLP(20, (16,), 5), TensorDataset(poisoned_x, y), test, config, tmp_path / "run")

    state = load_checkpoint(tmp_path / "run" / "last.safetensors")
    assert state["progress"]["global_step"] == 5
    assert state["model"] and all(torch.isfinite(w).all() for w in state["model"].values())
