"""Data-parallel training: two gloo processes equal one process over the same global batches."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from kdistill import distributed
from kdistill.config import TrainConfig
from kdistill.distributed import DistributedContext
from kdistill.trainer import fit

REPO = Path(__file__).resolve().parents[1]

# Shared by the in-process reference run and the torchrun workers: 23 training images, global
# batches of 7 (the last one of 2), so with two processes the parts are 4/3 and 1/1 examples,
# and at batch size 5 the last batch of 3 is split 2/1. Jitter is on to show every process
# applies the same shifts as the single process.
PROBLEM = textwrap.dedent(
    """
    import torch
    from torch import nn
    from torch.utils.data import TensorDataset

    from kdistill.config import TrainConfig


    def make_model(seed, hidden):
        torch.manual_seed(seed)
        return nn.Sequential(
            nn.Flatten(), nn.Linear(36, hidden), nn.Tanh(), nn.Linear(hidden, 5)
        )


    def make_data():
        generator = torch.Generator().manual_seed(0)
        x = torch.rand(31, 1, 6, 6, generator=generator)
        y = torch.randint(0, 5, (31,), generator=generator)
        return TensorDataset(x[:23], y[:23]), TensorDataset(x[23:], y[23:])


    CLI_CONFIG = "tiny.toml"
    TINY_TOML = '''
    [data]
    name = "mnist"
    [teacher]
    model = "mlp"
    kwargs = { hidden = [16] }
    train = { epochs = 2, lr = 0.1, seed = 1, batch_size = 25 }
    [student]
    model = "mlp"
    kwargs = { hidden = [8] }
    [distill]
    temperature = 4.0
    alpha = 0.7
    train = { epochs = 2, lr = 0.1, seed = 3, batch_size = 25 }
    '''


    def run_hf(output_dir, world_size):
        # Two SGD steps of the HF trainer on 8 causal-LM examples, 4 per global batch. Valid
        # target counts per process and step: 9 + 1 | 1 + 2, then 8 + 3 | 0 + 5.
        from torch.utils.data import SequentialSampler

        from kdistill.hf import DistillationTrainer
        from tests.test_hf import causal_examples, causal_lm, collate, training_args

        teacher, student = causal_lm(32, seed=1), causal_lm(16, seed=2)
        trainer = DistillationTrainer(
            model=student,
            teacher_model=teacher,
            args=training_args(
                output_dir, max_steps=2, per_device_train_batch_size=4 // world_size,
                optim="sgd", learning_rate=1.0,
            ),
            train_dataset=causal_examples([12, 4, 4, 5, 11, 6, 2, 8]),
            data_collator=collate,
        )
        trainer._get_train_sampler = lambda *a, **k: SequentialSampler(trainer.train_dataset)
        trainer.train()
        weights = {k: v.detach().clone() for k, v in student.named_parameters()}
        return weights, trainer.state.log_history


    def make_config(batch_size):
        return TrainConfig(
            epochs=2, batch_size=batch_size, optimizer="sgd", lr=0.2, momentum=0.9,
            schedule="onecycle", jitter=1, seed=3, eval_batch_size=3,
        )
    """
)

WORKER = textwrap.dedent(
    """
    import sys

    import torch

    from kdistill import distributed
    from kdistill.trainer import fit
    from problem import make_config, make_data, make_model

    torch.set_num_threads(1)
    ctx = distributed.init_distributed(backend="gloo", timeout_s=60)
    assert ctx.world_size == 2, ctx
    train, test = make_data()
    for batch_size in (7, 5):
        teacher, student = make_model(1, 24), make_model(2, 8)
        fit(student, train, test, make_config(batch_size), f"ddp-{batch_size}",
            teacher=teacher, temperature=2.0, alpha=0.7)

    # The command line in the same process group: train a teacher, then distil it.
    from kdistill.cli import main
    from problem import CLI_CONFIG

    TEACHER = "cli-ddp/teacher/model.safetensors"
    for argv in (
        ["train-teacher", "--run-dir", "cli-ddp/teacher"],
        ["distill", "--run-dir", "cli-ddp/distill", "--teacher", TEACHER],
    ):
        status = main([*argv, "-c", CLI_CONFIG, "--data-dir", "data", "--no-progress"])
        assert status == 0, status

    # The Hugging Face trainer, through accelerate, in the same process group.
    import importlib.util

    if importlib.util.find_spec("transformers") is not None:
        from problem import run_hf

        weights, _ = run_hf("hf-ddp", 2)
        if ctx.is_main:
            torch.save(weights, "hf-ddp/weights.pt")
    torch.distributed.destroy_process_group()
    """
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _problem(tmp_path: Path):
    (tmp_path / "problem.py").write_text(PROBLEM)
    namespace: dict = {}
    exec(compile(PROBLEM, str(tmp_path / "problem.py"), "exec"), namespace)
    return namespace


def _cli_data(tmp_path: Path, problem: dict) -> None:
    """120 training and 30 test images in IDX files, and the command line's config."""
    generator = torch.Generator().manual_seed(5)
    for prefix, count in (("train", 120), ("t10k", 30)):
        images = torch.randint(0, 256, (count, 28, 28), generator=generator, dtype=torch.uint8)
        labels = torch.randint(0, 10, (count,), generator=generator, dtype=torch.uint8)
        for kind, array in (("images-idx3", images), ("labels-idx1", labels)):
            header = bytes([0, 0, 8, array.dim()]) + b"".join(
                d.to_bytes(4, "big") for d in array.shape
            )
            path = tmp_path / "data" / "mnist" / f"{prefix}-{kind}-ubyte"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(header + array.numpy().tobytes())
    (tmp_path / problem["CLI_CONFIG"]).write_text(problem["TINY_TOML"])


def _torchrun(tmp_path: Path) -> str:
    """Both batch sizes in one launch (starting the processes is most of the cost)."""
    (tmp_path / "worker.py").write_text(WORKER)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(tmp_path), str(REPO)]),
        "OMP_NUM_THREADS": "1",
    }
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "--master_addr=127.0.0.1",
        f"--master_port={_free_port()}",
        str(tmp_path / "worker.py"),
    ]
    result = subprocess.run(
        command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("ddp")
    _cli_data(tmp_path, _problem(tmp_path))
    return tmp_path, _torchrun(tmp_path)


@pytest.fixture(scope="module")
def single_runs(tmp_path_factory):
    """The same training in this one process, for both batch sizes."""
    tmp_path = tmp_path_factory.mktemp("single")
    problem = _problem(tmp_path)
    train, test = problem["make_data"]()
    runs = {}
    for batch_size in (7, 5):
        teacher, student = problem["make_model"](1, 24), problem["make_model"](2, 8)
        runs[batch_size] = fit(
            student,
            train,
            test,
            problem["make_config"](batch_size),
            tmp_path / f"single-{batch_size}",
            teacher=teacher,
            temperature=2.0,
            alpha=0.7,
        )
    return runs


@pytest.mark.parametrize("batch_size", [7, 5])
def test_two_gloo_processes_train_the_same_student_as_one(
    tmp_path, ddp_runs, single_runs, batch_size
):
    problem = _problem(tmp_path)
    single = single_runs[batch_size]

    ddp_dir = ddp_runs[0] / f"ddp-{batch_size}"
    expected = load_file(single.run_dir / "model.safetensors")
    got = load_file(ddp_dir / "model.safetensors")
    assert expected.keys() == got.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(expected["1.weight"], problem["make_model"](2, 8)[1].weight)

    # Metrics are reduced over the processes and written once, by rank 0.
    records = [json.loads(line) for line in (ddp_dir / "metrics.jsonl").open()]
    assert [r["epoch"] for r in records] == [1, 2]
    for record, reference in zip(records, single.history, strict=True):
        assert record["test_errors"] == reference["test_errors"]
        assert record["train_loss"] == pytest.approx(reference["train_loss"], rel=1e-5)
        assert record["test_loss"] == pytest.approx(reference["test_loss"], rel=1e-5)
    result = json.loads((ddp_dir / "result.json").read_text())
    assert result["errors"] == single.errors


def test_each_process_normalising_by_its_own_batch_would_differ(tmp_path):
    """The normaliser matters: with the uneven split, a per-process mean moves the student."""
    problem = _problem(tmp_path)
    train, test = problem["make_data"]()
    x, y = train.tensors
    student = problem["make_model"](2, 8)
    teacher = problem["make_model"](1, 24)
    from kdistill.losses import DistillationLoss

    criterion = DistillationLoss(temperature=2.0, alpha=0.7)
    with torch.no_grad():
        t = teacher(x[:7])
    global_grad = torch.autograd.grad(criterion(student(x[:7]), t, y[:7]), student[1].weight)[0]

    grads = {"global": [], "local": []}
    for rank in range(2):
        ctx = DistributedContext(rank=rank, world_size=2)
        part = distributed.shard(7, ctx)
        s = student(x[:7][part])
        for kind, normalizer in (
            ("global", distributed.local_normalizer(7, ctx)),
            ("local", None),
        ):
            loss = criterion(s, t[part], y[:7][part], normalizer=normalizer)
            grads[kind].append(torch.autograd.grad(loss, student[1].weight, retain_graph=True)[0])
    ddp_mean = {kind: sum(g) / 2 for kind, g in grads.items()}
    torch.testing.assert_close(ddp_mean["global"], global_grad, rtol=1e-5, atol=1e-7)
    assert (ddp_mean["local"] - global_grad).abs().max() > 1e-4


def test_shard_covers_the_global_batch_in_order():
    for count in (0, 1, 5, 7, 8):
        for world in (1, 2, 3):
            parts = [
                distributed.shard(count, DistributedContext(rank=r, world_size=world))
                for r in range(world)
            ]
            covered = [i for p in parts for i in range(count)[p]]
            assert covered == list(range(count))
            sizes = [len(range(count)[p]) for p in parts]
            assert max(sizes) - min(sizes) <= 1


def test_single_process_context_without_torchrun():
    ctx = distributed.context()
    assert (ctx.rank, ctx.world_size, ctx.is_main, ctx.enabled) == (0, 1, True, False)
    assert distributed.local_normalizer(12, ctx) == 12.0
    assert distributed.local_normalizer(0, ctx) == 1.0


def test_bf16_autocast_runs_forward_in_bfloat16_and_loss_in_float32(tmp_path, single_runs):
    layer = nn.Linear(4, 3)
    with distributed.autocast("bf16", torch.device("cpu")):
        out = layer(torch.randn(2, 4))
    assert out.dtype == torch.bfloat16
    with distributed.autocast("fp32", torch.device("cpu")):
        assert layer(torch.randn(2, 4)).dtype == torch.float32
    with pytest.raises(ValueError, match="precision must be one of"):
        distributed.autocast("fp16", torch.device("cpu"))

    problem = _problem(tmp_path)
    train, test = problem["make_data"]()
    config = TrainConfig(**{**problem["make_config"](7).__dict__, "precision": "bf16"})
    results = {"fp32": single_runs[7]}
    results["bf16"] = fit(
        problem["make_model"](2, 8),
        train,
        test,
        config,
        tmp_path / "bf16",
        teacher=problem["make_model"](1, 24),
        temperature=2.0,
        alpha=0.7,
    )
    fp32, bf16 = (results[p].history[-1]["train_loss"] for p in ("fp32", "bf16"))
    assert fp32 != bf16  # the bf16 run really ran in lower precision
    assert bf16 == pytest.approx(fp32, rel=0.05)


def test_torchrun_command_line_matches_one_process_and_prints_once(tmp_path, ddp_runs, monkeypatch):
    ddp_dir, stdout = ddp_runs
    # Two commands ran under torchrun; each printed its table once, from rank 0 only.
    assert stdout.count("weights:") == 2, stdout

    from kdistill.cli import main

    monkeypatch.chdir(ddp_dir)
    teacher = tmp_path / "teacher" / "model.safetensors"
    for argv in (
        ["train-teacher", "--run-dir", f"{tmp_path}/teacher"],
        ["distill", "--run-dir", f"{tmp_path}/distill", "--teacher", str(teacher)],
    ):
        assert main([*argv, "-c", "tiny.toml", "--data-dir", "data", "--no-progress"]) == 0
    for phase in ("teacher", "distill"):
        expected = load_file(tmp_path / phase / "model.safetensors")
        got = load_file(ddp_dir / "cli-ddp" / phase / "model.safetensors")
        for name in expected:
            torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-6)
        lines = (ddp_dir / "cli-ddp" / phase / "metrics.jsonl").read_text().splitlines()
        assert len(lines) == 2


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The models here are tiny: a second thread only adds synchronisation cost."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_hf_trainer_on_two_processes_matches_one_despite_uneven_token_counts(tmp_path, ddp_runs):
    pytest.importorskip("transformers")
    problem = _problem(tmp_path)
    expected, _ = problem["run_hf"](str(tmp_path / "hf"), 1)
    got = torch.load(ddp_runs[0] / "hf-ddp" / "weights.pt")
    assert expected.keys() == got.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-6)
