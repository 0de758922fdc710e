"""Property and fuzz tests of the public API's input handling, on a fixed budget.

The contract under test: every call either returns a result, which is finite whenever every
input is finite and in range, or raises ``ValueError``/``TypeError`` with a message. Any other
exception, or a NaN/inf for finite inputs, is a bug. Hypothesis runs derandomized (the same
examples on every run) with a bounded number of examples, so the suite is deterministic.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kdistill import (
    DistillationLoss,
    KDLoss,
    divergence_loss,
    from_prototxt,
    hard_label_loss,
    jsd_loss,
    kd_loss,
    reverse_kd_loss,
)

FUZZ = settings(
    max_examples=250,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

FLOAT_DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
OTHER_DTYPES = [torch.int32, torch.int64, torch.uint8, torch.bool, torch.complex64]
LABEL_DTYPES = [torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8]
BAD_LABEL_DTYPES = [torch.float32, torch.bool, torch.float16]

# Temperatures the losses accept and stay finite for with logits in the range drawn below.
GOOD_TEMPERATURES = st.one_of(
    st.sampled_from([1.0, 2.0, 4.0, 20.0, 0.05, 100.0]),
    st.floats(min_value=0.01, max_value=100.0),
    st.integers(min_value=1, max_value=50),
)
BAD_TEMPERATURES = st.one_of(
    st.sampled_from(
        [0, 0.0, -0.0, -1.0, -1e-9, math.inf, -math.inf, math.nan, True, None, "4", [4.0], 1j]
    ),
    st.sampled_from([1e-40, 1e-30, 1e-9, 2e19, 1e30, 10**400]),
    st.floats(min_value=1e-12, max_value=1e12),
)


def assert_clear_error(error: Exception) -> None:
    """Only ValueError/TypeError with a non-empty message are acceptable failures."""
    assert isinstance(error, (ValueError, TypeError)), f"{type(error).__name__}: {error}"
    assert str(error).strip(), f"{type(error).__name__} raised without a message"


@st.composite
def logits_pair(draw):
    """Student and teacher logits of a random shape, dtype and device, NaN/inf sometimes."""
    ndim = draw(st.integers(min_value=0, max_value=4))
    shape = tuple(draw(st.integers(min_value=0, max_value=5)) for _ in range(ndim))
    if ndim and draw(st.booleans()):
        shape = tuple(max(d, 1) for d in shape)
    seed = draw(st.integers(min_value=0, max_value=2**31 - 1))
    scale = draw(st.sampled_from([0.0, 1e-3, 1.0, 10.0, 300.0, 1e4]))
    generator = torch.Generator().manual_seed(seed)
    student = torch.randn(shape, generator=generator, dtype=torch.float64) * scale
    teacher = torch.randn(shape, generator=generator, dtype=torch.float64) * scale

    finite = True
    if student.numel() and draw(st.integers(0, 5)) == 0:
        special = draw(st.sampled_from([math.nan, math.inf, -math.inf]))
        where = draw(st.sampled_from(["student", "teacher"]))
        index = draw(st.integers(0, student.numel() - 1))
        (student if where == "student" else teacher).view(-1)[index] = special
        finite = False

    student_dtype = draw(st.sampled_from(FLOAT_DTYPES))
    teacher_dtype = student_dtype
    roll = draw(st.integers(0, 9))
    if roll == 0:
        student_dtype = draw(st.sampled_from(OTHER_DTYPES))
    elif roll == 1:
        teacher_dtype = draw(st.sampled_from(OTHER_DTYPES + FLOAT_DTYPES))
    student = student.to(student_dtype) if student_dtype.is_floating_point else student.abs()
    teacher = teacher.to(teacher_dtype) if teacher_dtype.is_floating_point else teacher.abs()
    student, teacher = student.to(student_dtype), teacher.to(teacher_dtype)
    if student_dtype.is_floating_point and not torch.isfinite(student).all():
        finite = False  # float16 overflow of a large value, for example
    if teacher_dtype.is_floating_point and not torch.isfinite(teacher).all():
        finite = False

    if draw(st.integers(0, 9)) == 0:
        if draw(st.booleans()):
            teacher = teacher.to("meta")
        else:
            student, teacher = student.to("meta"), teacher.to("meta")
    if draw(st.integers(0, 9)) == 0 and ndim:
        # A shape mismatch in one dimension.
        bad = list(shape)
        bad[draw(st.integers(0, ndim - 1))] += 1
        teacher = torch.zeros(bad, dtype=teacher.dtype, device=teacher.device)
    return student, teacher, finite


@st.composite
def labels_for(draw, student: torch.Tensor, axis: int):
    """Labels that fit the logits (usually), of a random integer dtype, or something wrong."""
    if draw(st.integers(0, 3)) == 0:
        return None, True
    ndim = student.dim()
    canonical = axis % ndim if ndim and -ndim <= axis < ndim else 0
    outer = math.prod(student.shape[:canonical])
    inner = math.prod(student.shape[canonical + 1 :])
    classes = student.shape[canonical] if ndim else 1
    count = outer * inner
    fits = True
    if draw(st.integers(0, 9)) == 0:
        count += draw(st.integers(1, 3))
        fits = False
    seed = draw(st.integers(0, 2**31 - 1))
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(-2, max(classes, 1) + 2, (count,), generator=generator)
    dtype = draw(st.sampled_from(LABEL_DTYPES))
    if draw(st.integers(0, 9)) == 0:
        dtype = draw(st.sampled_from(BAD_LABEL_DTYPES))
        fits = False
    if dtype == torch.uint8:
        labels = labels.clamp(min=0)
    labels = labels.to(dtype)
    if fits and count and inner > 1 and draw(st.booleans()):
        labels = labels.reshape(outer, inner) if outer else labels
    if draw(st.integers(0, 14)) == 0 or (student.device.type == "meta" and draw(st.booleans())):
        labels = labels.to("meta")
    return labels, fits


IGNORE_INDEX = st.one_of(
    st.none(),
    st.sampled_from([-100, -1, 0, 1, 255, 2**63, -(2**63) - 1, 2**70, 1.0, "1"]),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
)
NORMALIZATION = st.one_of(
    st.sampled_from(["valid", "full", "batch_size", "none", "VALID"]),
    st.sampled_from(["mean", "", None, 1]),
)
NORMALIZER = st.one_of(
    st.none(),
    st.floats(min_value=1e-3, max_value=1e6),
    st.integers(min_value=1, max_value=10**6),
    st.sampled_from([0, -1.0, math.nan, math.inf, "2", True, torch.tensor([1.0, 2.0])]),
    st.sampled_from([torch.tensor(2.0), torch.tensor([7]), torch.tensor(0.5, dtype=torch.float64)]),
    st.sampled_from(
        [
            torch.tensor(0.0),
            torch.tensor(-1.0),
            torch.tensor(math.nan),
            torch.tensor(1 + 1j),
            torch.tensor(True),
            torch.tensor(3.0, device="meta"),
            10**400,
            1e-320,
        ]
    ),
)
AXIS = st.one_of(st.integers(min_value=-5, max_value=4), st.sampled_from([1.0, None, True]))


def _is_finite_normalizer(normalizer) -> bool:
    """None, or a real number or tensor without NaN/inf (zero and negatives count as finite)."""
    if normalizer is None:
        return True
    if isinstance(normalizer, torch.Tensor):
        return not normalizer.is_complex() and bool(torch.isfinite(normalizer).all())
    return isinstance(normalizer, (int, float)) and math.isfinite(normalizer)


def check_result(loss, inputs_finite: bool, student: torch.Tensor) -> None:
    assert isinstance(loss, torch.Tensor) and loss.dim() == 0, loss
    assert loss.dtype.is_floating_point, loss.dtype
    assert loss.device == student.device, f"loss on {loss.device} for logits on {student.device}"
    if loss.device.type == "meta":
        return
    if inputs_finite:
        assert torch.isfinite(loss), f"non-finite loss {loss} for finite inputs"
        if student.requires_grad and loss.requires_grad:
            loss.backward()
            assert student.grad is not None
            assert torch.isfinite(student.grad).all(), "non-finite gradient for finite inputs"


@FUZZ
@given(data=st.data())
def test_divergence_losses_return_finite_values_or_raise_clear_errors(data):
    student, teacher, finite = data.draw(logits_pair())
    axis = data.draw(AXIS)
    labels, labels_fit = data.draw(labels_for(student, axis if isinstance(axis, int) else 1))
    temperature = data.draw(st.one_of(GOOD_TEMPERATURES, BAD_TEMPERATURES))
    ignore_index = data.draw(IGNORE_INDEX)
    normalization = data.draw(NORMALIZATION)
    normalizer = data.draw(NORMALIZER)
    t_squared = data.draw(st.booleans())
    which = data.draw(st.sampled_from(["kd", "reverse", "jsd", "divergence", "module"]))
    beta = data.draw(
        st.one_of(st.floats(0.0, 1.0), st.sampled_from([-0.1, 1.5, math.nan, 10**400]))
    )
    if student.dtype.is_floating_point and student.device.type != "meta":
        student = student.detach().requires_grad_(True)

    options = dict(
        temperature=temperature,
        axis=axis,
        ignore_index=ignore_index,
        normalization=normalization,
        t_squared=t_squared,
        implementation=data.draw(st.sampled_from(["auto", "reference", "fused", "triton"])),
    )
    try:
        if which == "kd":
            loss = kd_loss(student, teacher, labels, normalizer=normalizer, **options)
        elif which == "reverse":
            loss = reverse_kd_loss(student, teacher, labels, normalizer=normalizer, **options)
        elif which == "jsd":
            loss = jsd_loss(student, teacher, labels, beta=beta, normalizer=normalizer, **options)
        elif which == "divergence":
            divergence = data.draw(st.sampled_from(["forward_kl", "reverse_kl", "jsd", "kl"]))
            loss = divergence_loss(
                student,
                teacher,
                labels,
                divergence=divergence,
                beta=beta,
                normalizer=normalizer,
                **options,
            )
        else:
            criterion = KDLoss(**options, divergence="jsd", beta=beta)
            loss = criterion(student, teacher, labels, normalizer=normalizer)
    except Exception as error:  # noqa: BLE001 - the property is about which errors escape
        assert_clear_error(error)
        return

    good_temperature = not isinstance(temperature, bool) and isinstance(temperature, (int, float))
    assert good_temperature and math.isfinite(temperature) and temperature > 0, temperature
    assert labels_fit or labels is None
    check_result(loss, finite and _is_finite_normalizer(normalizer), student)


@FUZZ
@given(data=st.data())
def test_distillation_and_hard_label_losses_return_finite_values_or_raise_clear_errors(data):
    student, teacher, finite = data.draw(logits_pair())
    axis = data.draw(st.integers(min_value=-3, max_value=3))
    labels, _ = data.draw(labels_for(student, axis))
    alpha = data.draw(
        st.one_of(st.floats(0.0, 1.0), st.sampled_from([-0.5, 2.0, math.nan, 10**400]))
    )
    temperature = data.draw(st.one_of(GOOD_TEMPERATURES, BAD_TEMPERATURES))
    ignore_index = data.draw(IGNORE_INDEX)
    use_hard_only = data.draw(st.booleans())
    if student.dtype.is_floating_point and student.device.type != "meta":
        student = student.detach().requires_grad_(True)

    try:
        if use_hard_only:
            loss = hard_label_loss(student, labels, axis=axis, ignore_index=ignore_index)
        else:
            criterion = DistillationLoss(
                temperature=temperature, alpha=alpha, axis=axis, ignore_index=ignore_index
            )
            loss = criterion(student, teacher, labels)
    except Exception as error:  # noqa: BLE001
        assert_clear_error(error)
        return

    check_result(loss, finite, student)


# --------------------------------------------------------------------------------------------
# from_prototxt: random text and random field values
# --------------------------------------------------------------------------------------------

FIELD_VALUES = st.one_of(
    st.integers(min_value=-(2**40), max_value=2**40).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.sampled_from(
        ["inf", "-inf", "nan", "true", "false", "VALID", "FULL", "NONE", "BOGUS", '"x"', "1e40"]
    ),
)


@st.composite
def prototxt_text(draw):
    """A KnowledgeDistillation layer with random values, fields and small mutations."""
    temperature = draw(FIELD_VALUES)
    axis = draw(FIELD_VALUES)
    ignore = draw(FIELD_VALUES)
    normalization = draw(FIELD_VALUES)
    weight = draw(FIELD_VALUES)
    parts = [
        'name: "kd"',
        f'type: "{draw(st.sampled_from(["KnowledgeDistillation", "SoftmaxWithLoss", ""]))}"',
        'bottom: "s"',
        'bottom: "t"',
    ]
    if draw(st.booleans()):
        parts.append('bottom: "label"')
    optional = [
        f"knowledge_distillation_param {{ temperature: {temperature} }}",
        f"softmax_param {{ axis: {axis} }}",
        f"loss_param {{ ignore_label: {ignore} }}",
        f"loss_param {{ normalization: {normalization} }}",
        f"loss_param {{ normalize: {draw(st.sampled_from(['true', 'false', '2']))} }}",
        f"loss_weight: {weight}",
        f"loss_weight: {weight} loss_weight: 1",
        "include { phase: TRAIN }",
        f"unknown_field: {weight}",
        "propagate_down: true",
    ]
    chosen = draw(st.lists(st.sampled_from(optional), max_size=5))
    body = " ".join(parts + chosen)
    text = f"layer {{ {body} }}" if draw(st.booleans()) else body
    cut = draw(st.integers(0, 8))
    if cut == 0:
        text = text[: draw(st.integers(0, len(text)))]
    elif cut == 1:
        position = draw(st.integers(0, len(text)))
        text = (
            text[:position]
            + draw(st.sampled_from(["{", "}", '"', ":", "\x00", "é"]))
            + text[position:]
        )
    return text


def _check_prototxt_outcome(text) -> None:
    try:
        criterion = from_prototxt(text)
    except Exception as error:  # noqa: BLE001
        assert_clear_error(error)
        return

    assert isinstance(criterion, KDLoss)
    assert math.isfinite(criterion.temperature) and criterion.temperature > 0
    student, teacher = torch.randn(3, 4, 2), torch.randn(3, 4, 2)
    labels = torch.randint(0, 4, (3, 2))
    try:
        loss = criterion(student, teacher, labels)
    except Exception as error:  # noqa: BLE001
        assert_clear_error(error)
        return
    assert torch.isfinite(loss), f"from_prototxt({text!r}) gave a loss of {loss}"


@FUZZ
@given(text=prototxt_text())
def test_from_prototxt_builds_a_working_loss_or_raises_clear_errors(text):
    _check_prototxt_outcome(text)


@settings(FUZZ, max_examples=150)
@given(text=st.one_of(st.text(max_size=200), st.binary(max_size=50), st.integers(), st.none()))
def test_from_prototxt_on_random_input_raises_only_clear_errors(text):
    _check_prototxt_outcome(text)


# --------------------------------------------------------------------------------------------
# Minimal cases the fuzzing found; each one states the contract it checks.
# --------------------------------------------------------------------------------------------

STUDENT = torch.tensor([[0.5, -1.0, 2.0], [0.0, 0.3, -0.2]])
TEACHER = torch.tensor([[1.0, 0.0, -1.0], [0.2, 0.2, 0.1]])
LABELS = torch.tensor([0, 2])


def _finite_or_clear_error(call) -> None:
    try:
        loss = call()
    except Exception as error:  # noqa: BLE001
        assert_clear_error(error)
        return
    assert loss.device.type == "meta" or bool(torch.isfinite(loss)), loss
    assert not loss.is_complex(), loss


@pytest.mark.parametrize("ignore_index", [2**63, -(2**63) - 1, 2**70])
def test_ignore_index_outside_int64_is_a_value_error(ignore_index):
    with pytest.raises(ValueError, match="ignore_index"):
        kd_loss(STUDENT, TEACHER, LABELS, ignore_index=ignore_index)


@pytest.mark.parametrize(
    "normalizer",
    [torch.tensor(0.0), torch.tensor(-1.0), torch.tensor(math.nan), torch.tensor(1 + 1j)],
    ids=["zero", "negative", "nan", "complex"],
)
def test_tensor_normalizer_must_be_positive_and_real(normalizer):
    with pytest.raises((ValueError, TypeError), match="normalizer"):
        kd_loss(STUDENT, TEACHER, normalizer=normalizer)


def test_huge_int_normalizer_is_a_value_error():
    with pytest.raises(ValueError, match="normalizer"):
        kd_loss(STUDENT, TEACHER, normalizer=10**400)


@pytest.mark.parametrize("ignore_index", [None, -100])
def test_hard_label_loss_on_meta_tensors_raises_no_internal_error(ignore_index):
    student, labels = STUDENT.to("meta"), LABELS.to("meta")
    _finite_or_clear_error(lambda: hard_label_loss(student, labels, ignore_index=ignore_index))
    criterion = DistillationLoss(temperature=2.0, ignore_index=ignore_index)
    _finite_or_clear_error(lambda: criterion(student, TEACHER.to("meta"), labels))


@pytest.mark.parametrize(
    ("student", "temperature"),
    [(STUDENT, 2e19), (torch.tensor([[1e10, 0.0]]), 1e-30), (torch.tensor([[1.0, 0.0]]), 1e-40)],
)
def test_extreme_temperature_gives_finite_loss_or_value_error(student, temperature):
    teacher = torch.zeros_like(student)
    _finite_or_clear_error(lambda: kd_loss(student, teacher, temperature=temperature))


@pytest.mark.parametrize("loss_weight", ["nan", "inf"])
def test_nonfinite_loss_weight_is_refused_at_construction(loss_weight):
    with pytest.raises(ValueError, match="loss_weight"):
        KDLoss(loss_weight=float(loss_weight))
    with pytest.raises(ValueError, match="loss_weight"):
        from_prototxt(f'type: "KnowledgeDistillation" loss_weight: {loss_weight}')


# --------------------------------------------------------------------------------------------
# The config loader: random overrides and random files
# --------------------------------------------------------------------------------------------

CONFIG_KEYS = [
    "data.name",
    "data.root",
    "data.labeled",
    "data.labeled_seed",
    "teacher.model",
    "teacher.kwargs",
    "teacher.init",
    "student.kwargs.hidden",
    "distill.temperature",
    "distill.alpha",
    "distill.teacher",
    "distill",
    "student",
    "nope",
    "distill.nope",
    "distill.train.nope",
    "distill.temperature.x",
] + [
    f"{section}.train.{key}"
    for section in ("teacher", "student", "distill")
    for key in (
        "epochs",
        "batch_size",
        "optimizer",
        "lr",
        "momentum",
        "weight_decay",
        "schedule",
        "warmup",
        "jitter",
        "seed",
        "checkpoint_every",
        "eval_batch_size",
        "precision",
    )
]
TOML_VALUES = st.one_of(
    st.integers(min_value=-(2**63), max_value=2**63 - 1).map(str),
    st.integers(min_value=-3, max_value=300).map(str),
    st.floats(allow_nan=False, allow_infinity=False).map(repr).filter(lambda v: "e" not in v),
    st.sampled_from(
        [
            "nan",
            "inf",
            "-inf",
            "true",
            "false",
            '"sgd"',
            '"adamw"',
            '"onecycle"',
            '"constant"',
            '"fashion-mnist"',
            '"bf16"',
            "[1, 2]",
            "{ a = 1 }",
            "1979-05-27",
            '""',
            "0.0",
            "1e400",
            "99999999999999999999",
            "9223372036854775807",
            "17592186044416",
            "4294967296",
            "-1",
            "mlp",
        ]
    ),
)


def _check_usable(config) -> None:
    """A configuration the loader accepted must be one training can start from."""
    from kdistill.trainer import epoch_order, learning_rate, seed_everything

    for train in (config.teacher.train, config.student.train, config.distill.train):
        seed_everything(train.seed)
        epoch_order(4, train.seed, min(train.epochs, 10**6))
        steps = max(1, train.epochs)
        for step in (0, steps // 2, steps - 1):
            assert math.isfinite(learning_rate(step, steps, train))
    torch.Generator().manual_seed(config.data.labeled_seed)


@FUZZ
@given(
    overrides=st.lists(
        st.tuples(st.sampled_from(CONFIG_KEYS), TOML_VALUES).map(lambda kv: f"{kv[0]}={kv[1]}"),
        max_size=4,
    )
)
def test_config_overrides_give_a_usable_config_or_a_config_error(overrides):
    from kdistill.config import ConfigError, load_config

    try:
        config = load_config(overrides=overrides)
    except ConfigError as error:
        assert str(error).strip()
        return
    _check_usable(config)


@settings(FUZZ, max_examples=100)
@given(
    content=st.one_of(
        st.text(max_size=200),
        st.binary(max_size=60),
        st.lists(st.tuples(st.sampled_from(CONFIG_KEYS), TOML_VALUES), min_size=1, max_size=4).map(
            lambda kvs: "\n".join(f"{k} = {v}" for k, v in kvs)
        ),
    )
)
def test_config_files_give_a_usable_config_or_a_config_error(tmp_path_factory, content):
    from kdistill.config import ConfigError, load_config

    path = tmp_path_factory.mktemp("config") / "experiment.toml"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8", errors="surrogatepass")
    try:
        config = load_config(path)
    except ConfigError as error:
        assert str(error).strip()
        return
    _check_usable(config)


EDGE_VALUES = [
    "0",
    "-1",
    "1",
    "4294967296",
    "17592186044416",
    "9223372036854775807",
    "99999999999999999999",
    "0.5",
    "-0.0",
    "1e400",
    "nan",
    "inf",
    "true",
    '"x"',
    "[1]",
    "{ a = 1 }",
    "1979-05-27",
]


def test_every_config_key_with_every_edge_value_gives_a_usable_config_or_a_config_error():
    from kdistill.config import ConfigError, load_config

    accepted = 0
    for key in CONFIG_KEYS:
        for value in EDGE_VALUES:
            try:
                config = load_config(overrides=[f"{key}={value}"])
            except ConfigError as error:
                assert str(error).strip()
                continue
            try:
                _check_usable(config)
            except Exception as error:  # noqa: BLE001
                pytest.fail(f"{key}={value} was accepted but training cannot use it: {error!r}")
            accepted += 1
    assert accepted > 50  # the grid exercises acceptance as well as refusal


@pytest.mark.parametrize("option", ["temperature", "beta", "alpha"])
def test_huge_int_options_are_value_errors(option):
    huge = 10**400
    with pytest.raises(ValueError, match=option):
        if option == "temperature":
            kd_loss(STUDENT, TEACHER, temperature=huge)
        elif option == "beta":
            jsd_loss(STUDENT, TEACHER, beta=huge)
        else:
            DistillationLoss(alpha=huge)


def test_normalizer_on_another_device_is_a_value_error():
    with pytest.raises(ValueError, match="normalizer"):
        kd_loss(STUDENT, TEACHER, normalizer=torch.tensor(3.0, device="meta"))


EDGE_SHAPES = [(0,), (1,), (0, 0), (3, 0), (0, 3), (1, 1), (2, 3), (2, 0, 4), (2, 3, 0), (1, 2, 3)]


def test_edge_shapes_on_every_implementation_give_finite_losses_or_clear_errors():
    """Zero-size and size-one dimensions, on every axis, divergence and implementation."""
    generator = torch.Generator().manual_seed(0)
    for shape in EDGE_SHAPES:
        for axis in range(-len(shape), len(shape)):
            for implementation in ("auto", "reference", "fused"):
                for divergence in ("forward_kl", "reverse_kl", "jsd"):
                    for dtype in (torch.float32, torch.bfloat16):
                        student = torch.randn(shape, generator=generator).to(dtype)
                        teacher = torch.randn(shape, generator=generator).to(dtype)
                        student.requires_grad_(True)
                        case = f"{shape} axis={axis} {implementation} {divergence} {dtype}"
                        try:
                            loss = divergence_loss(
                                student,
                                teacher,
                                divergence=divergence,
                                axis=axis,
                                temperature=2.0,
                                implementation=implementation,
                            )
                        except Exception as error:  # noqa: BLE001
                            assert isinstance(error, (ValueError, TypeError)), (
                                f"{case}: {type(error).__name__}: {error}"
                            )
                            assert str(error).strip(), case
                            continue
                        assert loss.dim() == 0 and torch.isfinite(loss), f"{case}: {loss}"
                        loss.backward()
                        assert student.grad is not None and torch.isfinite(student.grad).all()


@pytest.mark.parametrize("shape", [(0,), (3, 0), (0, 0)])
def test_fused_path_with_zero_classes_is_finite_or_a_value_error(shape):
    _finite_or_clear_error(
        lambda: kd_loss(torch.zeros(shape), torch.zeros(shape), axis=-1, implementation="fused")
    )


# --------------------------------------------------------------------------------------------
# The fused path must give what the reference gives, finite or not
# --------------------------------------------------------------------------------------------


def _agree(reference: torch.Tensor, fused: torch.Tensor) -> bool:
    reference, fused = reference.double(), fused.double()
    if reference.isnan() or fused.isnan():
        return bool(reference.isnan() and fused.isnan())
    if reference.isinf() or fused.isinf():
        return bool(reference == fused)
    return bool(torch.isclose(reference, fused, rtol=2e-3, atol=1e-4))


def _reference_and_fused(student, teacher, labels, **options):
    reference = divergence_loss(student, teacher, labels, implementation="reference", **options)
    fused = divergence_loss(student, teacher, labels, implementation="fused", **options)
    return reference, fused


@settings(FUZZ, max_examples=120)
@given(data=st.data())
def test_fused_and_reference_agree_on_finite_inputs(data):
    shape = data.draw(st.sampled_from([(4, 7), (3, 5, 2), (2, 3, 33), (1, 9), (6, 1), (5, 300)]))
    axis = data.draw(st.sampled_from([1, -1]))
    dtype = data.draw(st.sampled_from([torch.float32, torch.float64, torch.bfloat16]))
    generator = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1)))
    scale = data.draw(st.sampled_from([0.1, 3.0, 50.0]))
    student = (torch.randn(shape, generator=generator) * scale).to(dtype)
    teacher = (torch.randn(shape, generator=generator) * scale).to(dtype)
    labels = None
    ignore_index = None
    if data.draw(st.booleans()):
        canonical = axis % len(shape)
        count = math.prod(shape[:canonical]) * math.prod(shape[canonical + 1 :])
        labels = torch.randint(-1, 3, (count,), generator=generator)
        ignore_index = -1
    options = dict(
        divergence=data.draw(st.sampled_from(["forward_kl", "reverse_kl", "jsd"])),
        beta=data.draw(st.sampled_from([0.0, 0.1, 0.5, 1.0])),
        temperature=data.draw(st.sampled_from([0.5, 1.0, 4.0, 20.0])),
        axis=axis,
        ignore_index=ignore_index,
    )
    reference, fused = _reference_and_fused(student, teacher, labels, **options)
    assert _agree(reference, fused), f"reference {reference} vs fused {fused}"


@pytest.mark.parametrize(
    ("who", "value", "divergence", "classes"),
    [
        ("teacher", math.nan, "forward_kl", 7),
        ("teacher", math.inf, "forward_kl", 1),
        ("teacher", -math.inf, "forward_kl", 1),
        ("student", math.nan, "reverse_kl", 1),
        ("student", math.inf, "jsd", 7),
    ],
)
def test_fused_and_reference_agree_on_nonfinite_inputs(who, value, divergence, classes):
    generator = torch.Generator().manual_seed(0)
    student = torch.randn(4, classes, generator=generator)
    teacher = torch.randn(4, classes, generator=generator)
    (teacher if who == "teacher" else student)[1, 0] = value
    reference, fused = _reference_and_fused(
        student, teacher, None, divergence=divergence, temperature=2.0
    )
    assert _agree(reference, fused), f"reference {reference} vs fused {fused}"
