"""``kdistill bench``: the fused loss against plain PyTorch, torch.compile, a peer and the floors.

Every timing is taken side by side in one process. The cases of a group share their inputs and
are timed in turns: every case is warmed up, then each of ``repeat`` rounds runs every case once,
so a change in the machine's load touches all of them alike. Medians are reported (compile time,
the first call's excess over the median, separately). Peak memory is measured in a fresh
subprocess per case, as the peak resident set size during one call minus the resident size just
before it, so that the inputs, the imported libraries and any compiled code are not counted; the
gradient the call leaves behind is. Only the compiled cases get a warm-up call there (to
compile). On Linux the peak is reset through ``/proc/self/clear_refs`` just before the measured
call; elsewhere the ``ru_maxrss`` delta is used.

Cases:

- loss (``N`` tokens x ``V`` classes, float32, forward + backward at temperature ``T``):
  ``plain`` (log_softmax of both, ``kl_div``, backward), ``plain-compiled`` (the same under
  ``torch.compile``), ``kdistill`` (``kd_loss``, which takes the fused path and, from the second
  call on, writes its gradient into the buffer autograd released after the previous call),
  ``kdistill-fresh-grad`` (the same with a freshly allocated gradient every call), and the floors
  ``exp-one`` (one ``exp`` over one logits tensor), ``exp-two`` (over both inputs) and
  ``read2-write1`` (``a + b`` into a new tensor).
- fused linear (``N`` x hidden ``H`` x ``V``): ``linear-plain`` (full logits, then the plain loss),
  ``linear-kdistill`` (:func:`kdistill.fused_linear_kd_loss`), ``linear-liger`` and
  ``linear-liger-compiled`` (Liger-Kernel's ``LigerFusedLinearJSDLoss`` with ``beta=0``, skipped
  with a note when ``liger-kernel`` is not installed) and the floor ``linear-4-matmuls`` (the
  student and teacher logits and the two gradient products, into preallocated outputs).
- teacher cache (the paper's MNIST models, 784-1200-1200-10 teacher and 784-800-800-10 student):
  one distillation epoch running the teacher on each batch (``epoch-teacher``) against one read
  from a float16 teacher cache (``epoch-cache``). The inputs are random MNIST-shaped images: the
  time does not depend on their values.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

LOSS_CASES = (
    "plain",
    "plain-compiled",
    "kdistill",
    "kdistill-fresh-grad",
    "exp-one",
    "exp-two",
    "read2-write1",
)
LINEAR_CASES = (
    "linear-plain",
    "linear-kdistill",
    "linear-liger",
    "linear-liger-compiled",
    "linear-4-matmuls",
)
CACHE_CASES = ("epoch-teacher", "epoch-cache")
ALL_CASES = LOSS_CASES + LINEAR_CASES + CACHE_CASES
COMPILED_CASES = ("plain-compiled", "linear-liger-compiled")
LINEAR_REPEAT_CAP = 2  # the fused-linear cases take seconds each; fewer repetitions suffice


@dataclass
class Sizes:
    """Problem sizes of one benchmark run."""

    tokens: int = 4096
    vocab: int = 32000
    hidden: int = 1024
    temperature: float = 4.0
    cache_examples: int = 60000
    batch_size: int = 128
    repeat: int = 3
    warmup: int = 1

    @classmethod
    def quick(cls) -> Sizes:
        """Tiny sizes for a smoke test (seconds, not minutes)."""
        return cls(tokens=128, vocab=500, hidden=32, cache_examples=512, repeat=1, warmup=1)


class Skip(Exception):
    """A case cannot run here (an optional dependency is missing); the message says why."""


# --------------------------------------------------------------------------------------------
# Cases: each setup returns a zero-argument callable that does one measured call
# --------------------------------------------------------------------------------------------


def _plain_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    log_p_student = F.log_softmax(student / temperature, dim=-1)
    log_p_teacher = F.log_softmax(teacher / temperature, dim=-1)
    kl = F.kl_div(log_p_student, log_p_teacher, reduction="sum", log_target=True)
    return kl * temperature**2 / student.shape[0]


# Inputs shared by the cases of one group, so that they can be timed in turns; cleared after it.
_shared: dict[tuple, Any] = {}


def _loss_inputs(sizes: Sizes) -> tuple[torch.Tensor, torch.Tensor]:
    key = ("loss", sizes.tokens, sizes.vocab)
    if key not in _shared:
        gen = torch.Generator().manual_seed(0)
        student = torch.randn(sizes.tokens, sizes.vocab, generator=gen).mul_(3)
        teacher = torch.randn(sizes.tokens, sizes.vocab, generator=gen).mul_(3)
        _shared[key] = (student.requires_grad_(True), teacher)
    return _shared[key]


def _linear_inputs(sizes: Sizes) -> tuple[torch.Tensor, ...]:
    key = ("linear", sizes.tokens, sizes.hidden, sizes.vocab)
    if key not in _shared:
        gen = torch.Generator().manual_seed(1)
        n, h, v = sizes.tokens, sizes.hidden, sizes.vocab
        _shared[key] = (
            torch.randn(n, h, generator=gen).requires_grad_(True),
            torch.randn(v, h, generator=gen).mul_(h**-0.5).requires_grad_(True),
            torch.randn(n, h, generator=gen),
            torch.randn(v, h, generator=gen).mul_(h**-0.5),
            torch.randn(n, v, generator=gen),
        )
    return _shared[key]


def _setup_loss(name: str, sizes: Sizes) -> Callable[[], Any]:
    from kdistill.losses import kd_loss

    student, teacher = _loss_inputs(sizes)
    if name == "kdistill-fresh-grad":
        # Its own leaf, so that freeing its gradient never touches the pooled case's buffer.
        student = student.detach().clone().requires_grad_(True)
    temperature = sizes.temperature
    if name in ("plain", "plain-compiled", "kdistill", "kdistill-fresh-grad"):
        if name == "plain":
            loss_fn = _plain_loss
        elif name == "plain-compiled":
            loss_fn = torch.compile(_plain_loss)
        elif name == "kdistill":

            def loss_fn(s, t, temp):
                return kd_loss(s, t, temperature=temp, axis=-1, normalization="batch_size")

        else:
            # The gradient buffer is allocated (and page-faulted) afresh on every call, as the
            # floors allocate their outputs, instead of reusing the one released last step.
            def loss_fn(s, t, temp):
                previous = os.environ.get("KDISTILL_GRAD_POOL")
                os.environ["KDISTILL_GRAD_POOL"] = "0"
                try:
                    return kd_loss(s, t, temperature=temp, axis=-1, normalization="batch_size")
                finally:
                    if previous is None:
                        del os.environ["KDISTILL_GRAD_POOL"]
                    else:
                        os.environ["KDISTILL_GRAD_POOL"] = previous

        def step():
            student.grad = None
            loss_fn(student, teacher, temperature).backward()

        step.clear = lambda: setattr(student, "grad", None)
        return step

    data_s, data_t = student.detach(), teacher
    if name == "exp-one":
        return lambda: torch.exp(data_s)
    if name == "exp-two":
        return lambda: (torch.exp(data_s), torch.exp(data_t))
    if name == "read2-write1":
        return lambda: torch.add(data_s, data_t)
    raise ValueError(f"unknown loss case {name!r}")


def _setup_linear(name: str, sizes: Sizes) -> Callable[[], Any]:
    from kdistill.fused_linear import fused_linear_kd_loss

    n, h, v, temperature = sizes.tokens, sizes.hidden, sizes.vocab, sizes.temperature
    student_hidden, student_weight, teacher_hidden, teacher_weight, grad_logits = _linear_inputs(
        sizes
    )
    params = (student_hidden, student_weight)

    def clear():
        for p in params:
            p.grad = None

    if name == "linear-plain":

        def step():
            clear()
            student_logits = student_hidden @ student_weight.T
            teacher_logits = teacher_hidden @ teacher_weight.T
            _plain_loss(student_logits, teacher_logits, temperature).backward()

        step.clear = clear
        return step
    if name == "linear-kdistill":

        def step():
            clear()
            fused_linear_kd_loss(
                student_hidden,
                student_weight,
                teacher_hidden,
                teacher_weight,
                temperature=temperature,
                normalization="full",
            ).backward()

        step.clear = clear
        return step
    if name in ("linear-liger", "linear-liger-compiled"):
        try:
            from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss
        except ImportError as err:
            raise Skip(
                f"liger-kernel is not installed ({err}); `pip install --no-deps liger-kernel`"
            ) from err
        liger = LigerFusedLinearJSDLoss(
            weight_hard_loss=0.0,
            weight_soft_loss=1.0,
            beta=0.0,
            temperature=temperature,
            compiled=name.endswith("compiled"),
        )
        labels = torch.zeros(n, dtype=torch.long)

        def step():
            clear()
            liger(student_hidden, student_weight, teacher_hidden, teacher_weight, labels).backward()

        step.clear = clear
        return step
    if name == "linear-4-matmuls":
        outs = (torch.empty(n, v), torch.empty(n, v), torch.empty(n, h), torch.empty(v, h))
        sh, sw = student_hidden.detach(), student_weight.detach()

        def step():
            torch.mm(sh, sw.T, out=outs[0])
            torch.mm(teacher_hidden, teacher_weight.T, out=outs[1])
            torch.mm(grad_logits, sw, out=outs[2])
            torch.mm(grad_logits.T, sh, out=outs[3])

        return step
    raise ValueError(f"unknown fused-linear case {name!r}")


def _setup_cache(name: str, sizes: Sizes, workdir: Path) -> Callable[[], Any]:
    from safetensors.torch import save_file

    from kdistill.losses import DistillationLoss
    from kdistill.models import hinton_student, hinton_teacher
    from kdistill.teacher_cache import build_teacher_cache

    gen = torch.Generator().manual_seed(2)
    inputs = torch.rand(sizes.cache_examples, 1, 28, 28, generator=gen)
    labels = torch.randint(0, 10, (sizes.cache_examples,), generator=gen)
    torch.manual_seed(0)
    teacher = hinton_teacher().eval()
    student = hinton_student()
    criterion = DistillationLoss(temperature=sizes.temperature, alpha=0.9)
    optimizer = torch.optim.SGD(student.parameters(), lr=0.01, momentum=0.9)
    order = torch.randperm(sizes.cache_examples, generator=gen)

    cache = None
    if name == "epoch-cache":
        checkpoint = workdir / "teacher.safetensors"
        save_file(teacher.state_dict(), checkpoint)
        cache = build_teacher_cache(
            teacher,
            inputs,
            workdir / "teacher-cache",
            teacher_checkpoint=checkpoint,
            dataset_name="random-mnist-shaped",
            overwrite=True,
        )

    def step():
        for start in range(0, sizes.cache_examples, sizes.batch_size):
            index = order[start : start + sizes.batch_size]
            x = inputs[index]
            if cache is not None:
                teacher_logits = cache.logits(index)
            else:
                with torch.no_grad():
                    teacher_logits = teacher(x)
            loss = criterion(student(x), teacher_logits, labels[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

    return step


def setup_case(name: str, sizes: Sizes, workdir: Path) -> Callable[[], Any]:
    """Allocate the inputs of case ``name`` and return its measured call."""
    if name in LOSS_CASES:
        return _setup_loss(name, sizes)
    if name in LINEAR_CASES:
        return _setup_linear(name, sizes)
    if name in CACHE_CASES:
        return _setup_cache(name, sizes, workdir)
    raise ValueError(f"unknown benchmark case {name!r}; expected one of {', '.join(ALL_CASES)}")


# --------------------------------------------------------------------------------------------
# Timing (in process) and memory (one subprocess per case)
# --------------------------------------------------------------------------------------------


def _repeats(name: str, sizes: Sizes) -> int:
    if name in LINEAR_CASES:
        return max(1, min(sizes.repeat, LINEAR_REPEAT_CAP))
    return sizes.repeat


def time_group(names: tuple[str, ...], sizes: Sizes, workdir: Path) -> dict[str, dict[str, Any]]:
    """Time the cases of one group in turns: all warm up, then each repetition runs every case
    once, so a change in the machine's load during the run touches every case alike.

    Returns:
        ``{case: {"median_s", "times_s", "setup_s"[, "compile_s"]}}``, or ``{"skipped"}`` /
        ``{"error"}`` for a case that could not run.
    """
    results: dict[str, dict[str, Any]] = {}
    steps: dict[str, Callable[[], Any]] = {}
    first: dict[str, float] = {}

    def guarded(name: str, action: Callable[[], Any]) -> None:
        try:
            action()
        except Skip as skip:
            results[name] = {"case": name, "skipped": str(skip)}
            steps.pop(name, None)
        except Exception as err:  # a failing case must not hide the others' numbers
            logger.exception("benchmark case %s failed", name)
            results[name] = {"case": name, "error": f"{type(err).__name__}: {err}"}
            steps.pop(name, None)

    try:
        for name in names:
            started = time.perf_counter()

            def setup(name=name):
                steps[name] = setup_case(name, sizes, workdir)

            guarded(name, setup)
            if name in steps:
                results[name] = {"case": name, "setup_s": time.perf_counter() - started}
        for i in range(max(1, sizes.warmup)):
            for name in list(steps):
                started = time.perf_counter()
                guarded(name, steps[name])
                if i == 0:
                    first[name] = time.perf_counter() - started
        repeats = min(_repeats(name, sizes) for name in names)
        for _ in range(repeats):
            for name in list(steps):
                started = time.perf_counter()
                guarded(name, steps[name])
                if name in steps:
                    results[name].setdefault("times_s", []).append(time.perf_counter() - started)
        for name in steps:
            times = results[name]["times_s"]
            results[name]["median_s"] = statistics.median(times)
            if name in COMPILED_CASES:
                results[name]["compile_s"] = max(0.0, first[name] - results[name]["median_s"])
    finally:
        steps.clear()
        _shared.clear()
        gc.collect()
    return {name: results[name] for name in names if name in results}


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return _status_kib("VmHWM") is not None


def measure_memory_here(name: str, sizes: Sizes, workdir: Path) -> dict[str, Any]:
    """Extra peak resident memory of one call of ``name``, in this process (see module doc)."""
    step = setup_case(name, sizes, workdir)
    can_reset = _reset_peak()
    if name in COMPILED_CASES:
        step()  # warm-up: compilation is not the call's cost
    # Drop the gradients a warm-up left, so the measured call's own gradient counts.
    getattr(step, "clear", lambda: None)()
    gc.collect()
    if can_reset:
        baseline = _status_kib("VmRSS")
        _reset_peak()
        step()
        peak = _status_kib("VmHWM")
        method = "VmHWM after clear_refs"
    else:
        baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        step()
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        method = "ru_maxrss delta"
    return {"case": name, "extra_peak_bytes": max(0, peak - baseline) * 1024, "method": method}


def measure_memory(name: str, sizes: Sizes, timeout: float = 1800) -> dict[str, Any]:
    """Run :func:`measure_memory_here` for ``name`` in a fresh Python process."""
    env = dict(os.environ)
    # Freed blocks above 128 KiB go straight back to the OS, so a warm-up's freed buffers are
    # not silently reused inside the measured call.
    env.setdefault("MALLOC_MMAP_THRESHOLD_", str(128 * 1024))
    cmd = [sys.executable, "-m", "kdistill.bench", "--_memory-case", name, "--_sizes"]
    cmd.append(json.dumps(asdict(sizes)))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    if proc.returncode != 0:
        tail = proc.stderr.strip().splitlines()[-1:] or ["no output"]
        return {"case": name, "error": f"memory subprocess failed: {tail[0]}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------------------------
# The whole run, targets and the table
# --------------------------------------------------------------------------------------------


def run_benchmark(
    sizes: Sizes,
    cases: tuple[str, ...] = ALL_CASES,
    *,
    memory: bool = True,
    on_result: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Time (and optionally measure the memory of) ``cases``; return the JSON-ready report.

    Args:
        sizes: problem sizes and repetitions.
        cases: case names from :data:`ALL_CASES`.
        memory: also measure extra peak memory, one subprocess per case.
        on_result: called with each case's result as soon as it is known.

    Returns:
        ``{"sizes", "environment", "results": {case: {...}}, "targets": [...]}``.
    """
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="kdistill-bench-") as tmp:
        for group in (LOSS_CASES, LINEAR_CASES, CACHE_CASES):
            names = tuple(name for name in group if name in cases)
            if not names:
                continue
            for name, result in time_group(names, sizes, Path(tmp)).items():
                if memory and "median_s" in result:
                    mem = measure_memory(name, sizes)
                    result.update({k: v for k, v in mem.items() if k != "case"})
                results[name] = result
                if on_result:
                    on_result(result)
    report = {
        "sizes": asdict(sizes),
        "environment": environment(),
        "results": results,
    }
    report["targets"] = evaluate_targets(report)
    return report


def environment() -> dict[str, Any]:
    """Versions and machine facts that the numbers depend on."""
    from kdistill import fused

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "processor": _cpu_name(),
        "fused_engine": "native" if fused.native_available() else "torch",
    }


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _get(report: dict[str, Any], case: str, key: str) -> float | None:
    value = report["results"].get(case, {}).get(key)
    return float(value) if isinstance(value, (int, float)) else None


def evaluate_targets(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Each target with its measured ratio, the bound, and whether it is met."""
    sizes = report["sizes"]
    logits_bytes = sizes["tokens"] * sizes["vocab"] * 4
    t = lambda case: _get(report, case, "median_s")  # noqa: E731
    m = lambda case: _get(report, case, "extra_peak_bytes")  # noqa: E731

    def ratio(a, b):
        return None if a is None or b is None or b == 0 else a / b

    targets = [
        ("kdistill speed-up over plain", ratio(t("plain"), t("kdistill")), ">=", 8.0),
        (
            "kdistill speed-up over plain+torch.compile",
            ratio(t("plain-compiled"), t("kdistill")),
            ">=",
            1.5,
        ),
        ("kdistill time / two exp passes", ratio(t("kdistill"), t("exp-two")), "<=", 2.5),
        (
            "kdistill, fresh gradient buffer, / two exp passes",
            ratio(t("kdistill-fresh-grad"), t("exp-two")),
            "<=",
            2.5,
        ),
        (
            "kdistill, fresh gradient buffer, speed-up over plain",
            ratio(t("plain"), t("kdistill-fresh-grad")),
            ">=",
            8.0,
        ),
        (
            "kdistill extra peak / one logits tensor",
            ratio(m("kdistill"), logits_bytes),
            "<=",
            1.2,
        ),
        (
            "fused-linear extra peak / plain full-logits path",
            ratio(m("linear-kdistill"), m("linear-plain")),
            "<=",
            0.15,
        ),
        (
            "fused-linear time / four matmuls",
            ratio(t("linear-kdistill"), t("linear-4-matmuls")),
            "<=",
            1.15,
        ),
        (
            "fused-linear time / Liger eager",
            ratio(t("linear-kdistill"), t("linear-liger")),
            "<",
            1.0,
        ),
        (
            "fused-linear time / Liger compiled",
            ratio(t("linear-kdistill"), t("linear-liger-compiled")),
            "<",
            1.0,
        ),
        (
            "fused-linear extra peak / Liger eager",
            ratio(m("linear-kdistill"), m("linear-liger")),
            "<",
            1.0,
        ),
        (
            "fused-linear extra peak / Liger compiled",
            ratio(m("linear-kdistill"), m("linear-liger-compiled")),
            "<",
            1.0,
        ),
        (
            "teacher-cache epoch speed-up",
            ratio(t("epoch-teacher"), t("epoch-cache")),
            ">=",
            2.0,
        ),
    ]
    out = []
    for what, value, op, bound in targets:
        if value is None:
            status = "not measured"
        else:
            ok = {">=": value >= bound, "<=": value <= bound, "<": value < bound}[op]
            if ok:
                status = "met"
            else:
                factor = bound / value if op == ">=" else value / bound
                status = f"missed by {factor:.2f}x"
        out.append({"target": what, "value": value, "bound": f"{op} {bound}", "status": status})
    return out


def format_table(report: dict[str, Any]) -> str:
    """The results and targets as a plain-text table."""
    sizes = report["sizes"]
    logits_bytes = sizes["tokens"] * sizes["vocab"] * 4
    lines = [
        f"N={sizes['tokens']} V={sizes['vocab']} H={sizes['hidden']} T={sizes['temperature']} "
        f"float32, forward+backward; {report['environment']['threads']} threads, torch "
        f"{report['environment']['torch']}, fused engine {report['environment']['fused_engine']}",
        "",
        f"{'case':<24}{'median s':>10}{'min s':>9}{'compile s':>11}{'extra MB':>10}"
        f"{'x logits':>10}",
    ]
    for name, r in report["results"].items():
        if "median_s" not in r:
            lines.append(f"{name:<24}{'':>10}  {r.get('skipped') or r.get('error')}")
            continue
        compile_s = f"{r['compile_s']:.2f}" if "compile_s" in r else ""
        mem = r.get("extra_peak_bytes")
        mem_mb = f"{mem / 2**20:.0f}" if mem is not None else ""
        mem_x = f"{mem / logits_bytes:.2f}" if mem is not None else ""
        lines.append(
            f"{name:<24}{r['median_s']:>10.3f}{min(r['times_s']):>9.3f}{compile_s:>11}"
            f"{mem_mb:>10}{mem_x:>10}"
        )
    lines += ["", f"{'target':<50}{'measured':>10}  {'bound':<8}  status"]
    for target in report["targets"]:
        value = "" if target["value"] is None else f"{target['value']:.3f}"
        lines.append(f"{target['target']:<50}{value:>10}  {target['bound']:<8}  {target['status']}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Command line: `kdistill bench` and `python -m kdistill.bench`
# --------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``kdistill bench`` options."""
    defaults = Sizes()
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for a smoke test")
    parser.add_argument("--tokens", type=int, help=f"rows N (default {defaults.tokens})")
    parser.add_argument("--vocab", type=int, help=f"classes V (default {defaults.vocab})")
    parser.add_argument("--hidden", type=int, help=f"hidden size H (default {defaults.hidden})")
    parser.add_argument("--temperature", type=float, help="temperature T (default 4)")
    parser.add_argument(
        "--cache-examples", type=int, help=f"epoch size (default {defaults.cache_examples})"
    )
    parser.add_argument("--repeat", type=int, help=f"timed calls (default {defaults.repeat})")
    parser.add_argument("--warmup", type=int, help=f"warm-up calls (default {defaults.warmup})")
    parser.add_argument(
        "--cases", help=f"comma-separated subset of: {','.join(ALL_CASES)} (default all)"
    )
    parser.add_argument(
        "--no-compile", action="store_true", help="skip the torch.compile cases (slow to build)"
    )
    parser.add_argument("--no-memory", action="store_true", help="skip the memory subprocesses")
    parser.add_argument("--json", type=Path, help="write the full report to this JSON file")
    parser.add_argument("--_memory-case", dest="memory_case", help=argparse.SUPPRESS)
    parser.add_argument("--_sizes", dest="sizes_json", help=argparse.SUPPRESS)


def sizes_from_args(args: argparse.Namespace) -> Sizes:
    """The :class:`Sizes` the command-line options ask for."""
    sizes = Sizes.quick() if args.quick else Sizes()
    for field in ("tokens", "vocab", "hidden", "temperature", "cache_examples", "repeat", "warmup"):
        value = getattr(args, field)
        if value is not None:
            if value <= 0 and not (field == "warmup" and value == 0):
                raise ValueError(f"--{field.replace('_', '-')} must be positive, got {value}")
            setattr(sizes, field, value)
    return sizes


def run(args: argparse.Namespace) -> int:
    """Run the benchmark, print the table, optionally write JSON; returns the exit status."""
    if args.memory_case:
        sizes = Sizes(**json.loads(args.sizes_json))
        with tempfile.TemporaryDirectory(prefix="kdistill-bench-mem-") as tmp:
            print(json.dumps(measure_memory_here(args.memory_case, sizes, Path(tmp))))
        return 0

    from kdistill.cli import UserError

    try:
        sizes = sizes_from_args(args)
    except ValueError as err:
        raise UserError(str(err)) from err
    cases = tuple(c.strip() for c in args.cases.split(",")) if args.cases else ALL_CASES
    unknown = [c for c in cases if c not in ALL_CASES]
    if unknown:
        raise UserError(f"unknown cases {unknown}; expected some of {', '.join(ALL_CASES)}")
    if args.no_compile:
        cases = tuple(c for c in cases if c not in COMPILED_CASES)

    def show(result: dict[str, Any]) -> None:
        if "median_s" in result:
            extra = result.get("extra_peak_bytes")
            memory = "" if extra is None else f", extra peak {extra / 2**20:.0f} MB"
            print(f"  {result['case']}: {result['median_s']:.3f} s{memory}", flush=True)
        else:
            print(f"  {result['case']}: {result.get('skipped') or result.get('error')}", flush=True)

    print(f"kdistill bench: {len(cases)} cases, sizes {asdict(sizes)}", flush=True)
    report = run_benchmark(sizes, cases, memory=not args.no_memory, on_result=show)
    report["argv"] = list(sys.argv)
    print()
    print(format_table(report))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        print(f"\nwrote {args.json}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m kdistill.bench`` (also what the memory subprocesses run)."""
    parser = argparse.ArgumentParser(prog="python -m kdistill.bench", description=__doc__)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
