"""No file makes kdistill run code, and no damaged file is used silently.

Covers the files kdistill reads: checkpoints (``last.safetensors``), weights files
(``.safetensors`` and torch ``.pt``), teacher caches, and, through the command line, the same
files handed to ``distill --teacher``, ``evaluate`` and ``--resume``.
"""

from __future__ import annotations

import ast
import builtins
import json
import pickle
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from kdistill import cli
from kdistill.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from kdistill.models import ModelError, build_model, load_state, load_weights_file
from kdistill.teacher_cache import (
    CorruptTeacherCacheError,
    TeacherCache,
    TeacherCacheError,
    build_teacher_cache,
)

PACKAGE = Path(__file__).resolve().parents[1] / "kdistill"

# torch warns when its safe unpickler meets pickle protocol 4; refusing the file is the point.
pytestmark = pytest.mark.filterwarnings("ignore:Detected pickle protocol")


class CodeOnLoad:
    """Unpickling this creates the marker file: what a malicious checkpoint would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (builtins.open, (self.marker, "w"))


@pytest.fixture
def marker(tmp_path) -> Path:
    return tmp_path / "code-ran"


@pytest.fixture
def malicious_files(tmp_path, marker) -> dict[str, Path]:
    """The same payload as a torch file, a raw pickle, and disguised as safetensors."""
    payload = {"weight": CodeOnLoad(marker), "bias": torch.zeros(3)}
    files = {"torch": tmp_path / "evil.pt", "pickle": tmp_path / "evil.pkl"}
    torch.save(payload, files["torch"])
    files["pickle"].write_bytes(pickle.dumps(payload))
    files["disguised"] = tmp_path / "evil.safetensors"
    files["disguised"].write_bytes(pickle.dumps(payload))
    return files


def test_the_crafted_files_do_run_code_when_loaded_unsafely(malicious_files, marker):
    """Control: proves the payload is live, so the refusals below mean something."""
    torch.load(malicious_files["torch"], weights_only=False)
    assert marker.exists()
    marker.unlink()
    pickle.loads(malicious_files["pickle"].read_bytes())
    assert marker.exists()


@pytest.mark.parametrize("kind", ["torch", "pickle", "disguised"])
def test_weights_loader_refuses_pickled_code(malicious_files, marker, kind):
    path = malicious_files[kind]

    with pytest.raises(ModelError) as info:
        load_weights_file(path)

    assert str(path) in str(info.value)
    assert not marker.exists()


@pytest.mark.parametrize("kind", ["torch", "pickle", "disguised"])
def test_checkpoint_loader_refuses_pickled_code(malicious_files, marker, kind, tmp_path):
    path = tmp_path / "last.safetensors"
    shutil.copy(malicious_files[kind], path)

    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)

    assert str(path) in str(info.value)
    assert not marker.exists()


# --------------------------------------------------------------------------------------------
# Damaged checkpoints and weights files
# --------------------------------------------------------------------------------------------


@pytest.fixture
def checkpoint(tmp_path) -> Path:
    torch.manual_seed(0)
    model = build_model("mlp", {"hidden": [8]})
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(4, 784)).sum().backward()
    optimizer.step()
    path = tmp_path / "last.safetensors"
    save_checkpoint(
        path,
        {
            "model": model.state_dict(),
            "optim": optimizer.state_dict(),
            "progress": {"epoch": 3, "step": 7},
        },
    )
    return path


def _data_offset(path: Path) -> int:
    return 8 + struct.unpack("<Q", path.read_bytes()[:8])[0]


def test_intact_checkpoint_loads(checkpoint):
    state = load_checkpoint(checkpoint)
    assert state["progress"] == {"epoch": 3, "step": 7}
    assert state["model"]["head.weight"].shape == (10, 8)


@pytest.mark.parametrize("keep", [0, 5, 8, 40, -1, -100], ids=lambda k: f"keep{k}")
def test_truncated_checkpoint_is_refused_naming_the_file(checkpoint, keep):
    data = checkpoint.read_bytes()
    checkpoint.write_bytes(data[:keep])

    with pytest.raises(CheckpointError) as info:
        load_checkpoint(checkpoint)
    assert str(checkpoint) in str(info.value)


@pytest.mark.parametrize("where", ["header", "tensor data", "last byte"])
def test_flipped_bit_in_checkpoint_is_detected(checkpoint, where):
    data = bytearray(checkpoint.read_bytes())
    offset = _data_offset(checkpoint)
    position = {"header": 20, "tensor data": offset + 13, "last byte": len(data) - 1}[where]
    data[position] ^= 0x04
    checkpoint.write_bytes(bytes(data))

    with pytest.raises(CheckpointError) as info:
        load_checkpoint(checkpoint)
    assert str(checkpoint) in str(info.value)


def test_edited_progress_in_checkpoint_metadata_is_detected(checkpoint):
    """The JSON state (epoch, step, rng) is covered by the digest, not just the tensors."""
    data = checkpoint.read_bytes()
    edited = data.replace(b'\\"epoch\\", 3', b'\\"epoch\\", 1')
    assert edited != data
    checkpoint.write_bytes(edited)

    with pytest.raises(CheckpointError, match="SHA-256"):
        load_checkpoint(checkpoint)


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.safetensors")


def test_safetensors_file_of_another_program_is_not_a_checkpoint(tmp_path):
    path = tmp_path / "last.safetensors"
    save_file({"w": torch.zeros(2)}, str(path))

    with pytest.raises(CheckpointError, match="not a kdistill checkpoint"):
        load_checkpoint(path)


@pytest.fixture
def weights(tmp_path) -> Path:
    """A weights file as the trainer writes it (with its digest)."""
    from kdistill.trainer import _save_weights

    torch.manual_seed(0)
    path = tmp_path / "model.safetensors"
    _save_weights(build_model("mlp", {"hidden": [8]}), path, {"epochs": "1"})
    return path


def test_weights_file_round_trips_into_the_same_model(weights):
    model = build_model("mlp", {"hidden": [8]})
    load_state(model, load_weights_file(weights), weights)


@pytest.mark.parametrize("damage", ["truncate", "flip data bit", "garbage"])
def test_damaged_weights_file_is_refused_naming_the_file(weights, damage):
    data = bytearray(weights.read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    elif damage == "flip data bit":
        data[_data_offset(weights) + 101] ^= 0x10
    else:
        data = bytearray(b"\x00" * len(data))
    weights.write_bytes(bytes(data))

    with pytest.raises(ModelError) as info:
        load_weights_file(weights)
    assert str(weights) in str(info.value)


def test_weights_of_the_wrong_model_name_every_mismatch(weights):
    model = build_model("mlp", {"hidden": [16, 4]})

    with pytest.raises(ModelError) as info:
        load_state(model, load_weights_file(weights), weights)

    message = str(info.value)
    assert str(weights) in message
    assert "hidden.1.weight" in message  # missing
    assert "hidden.0.weight: file (8, 784) vs model (16, 784)" in message


def test_torch_file_with_plain_tensors_loads(tmp_path):
    path = tmp_path / "w.pt"
    torch.manual_seed(0)
    model = build_model("mlp", {"hidden": [8]})
    torch.save(model.state_dict(), path)

    state = load_weights_file(path)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


# --------------------------------------------------------------------------------------------
# Teacher caches
# --------------------------------------------------------------------------------------------


@pytest.fixture
def teacher_cache(tmp_path):
    torch.manual_seed(0)
    teacher = build_model("mlp", {"hidden": [8]})
    checkpoint = tmp_path / "teacher.safetensors"
    save_file(teacher.state_dict(), str(checkpoint))
    inputs = torch.rand(12, 1, 28, 28)
    path = tmp_path / "cache"
    build_teacher_cache(
        teacher, inputs, path, teacher_checkpoint=checkpoint, dataset_name="synthetic"
    )
    return path, dict(teacher_checkpoint=checkpoint, dataset=inputs, dataset_name="synthetic")


def test_intact_teacher_cache_opens(teacher_cache):
    path, expected = teacher_cache
    assert len(TeacherCache.open(path, **expected)) == 12


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete"])
def test_damaged_teacher_cache_file_is_refused_naming_it(teacher_cache, damage):
    path, expected = teacher_cache
    file = path / "logits.npy"
    data = bytearray(file.read_bytes())
    if damage == "truncate":
        file.write_bytes(bytes(data[:-7]))
    elif damage == "flip":
        data[-3] ^= 0x01
        file.write_bytes(bytes(data))
    else:
        file.unlink()

    with pytest.raises(CorruptTeacherCacheError) as info:
        TeacherCache.open(path, **expected)
    assert "logits.npy" in str(info.value)


def _edit_manifest(path: Path, **changes) -> None:
    manifest = json.loads((path / "manifest.json").read_text())
    manifest.update(changes)
    (path / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize(
    "changes",
    [
        {"files": ["logits.npy"]},
        {"files": {"../teacher.safetensors": "0" * 64}},
        {"files": {}},
        {"shape": ["12", 10]},
        {"shape": [12, 10.5]},
        {"dataset": {"name": "synthetic", "size": "12", "inputs_sha256": 3}},
    ],
    ids=["files-list", "files-escape", "files-empty", "shape-str", "shape-float", "size-str"],
)
def test_malformed_teacher_cache_manifest_is_a_clear_error(teacher_cache, changes):
    path, expected = teacher_cache
    _edit_manifest(path, **changes)

    with pytest.raises(TeacherCacheError) as info:
        TeacherCache.open(path, **expected)
    assert str(path) in str(info.value)


def test_teacher_cache_refuses_pickled_arrays_even_with_a_matching_hash(teacher_cache, marker):
    path, expected = teacher_cache
    from kdistill.teacher_cache import sha256_file

    evil = np.empty((12, 10), dtype=object)
    evil[0, 0] = CodeOnLoad(marker)
    np.save(path / "logits.npy", evil, allow_pickle=True)
    _edit_manifest(path, files={"logits.npy": sha256_file(path / "logits.npy")})

    with pytest.raises(CorruptTeacherCacheError, match="logits.npy"):
        TeacherCache.open(path, **expected)
    assert not marker.exists()


# --------------------------------------------------------------------------------------------
# The command line: one clear message, exit status 2, no traceback, no code run
# --------------------------------------------------------------------------------------------


def _write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 8, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


@pytest.fixture
def experiment(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    data = tmp_path / "data" / "mnist"
    data.mkdir(parents=True)
    for prefix, n in (("train", 32), ("t10k", 16)):
        _write_idx(data / f"{prefix}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28)))
        _write_idx(data / f"{prefix}-labels-idx1-ubyte", rng.integers(0, 10, n))
    config = tmp_path / "experiment.toml"
    config.write_text(
        f"""
[data]
root = "{tmp_path / "data"}"
[teacher]
model = "mlp"
kwargs = {{ hidden = [8] }}
[student]
model = "mlp"
kwargs = {{ hidden = [4] }}
train = {{ epochs = 1, batch_size = 16 }}
[distill]
train = {{ epochs = 1, batch_size = 16 }}
""",
        encoding="utf-8",
    )
    monkeypatch.setenv("KDISTILL_DATA_DIR", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    return tmp_path, config


def _run_cli(capsys, *argv: str) -> tuple[int, str]:
    code = cli.main(["--no-progress" if a == "@np" else a for a in argv])
    return code, capsys.readouterr().err


def test_cli_refuses_a_pickled_teacher(experiment, malicious_files, marker, capsys):
    root, config = experiment
    teacher = malicious_files["torch"]

    code, err = _run_cli(
        capsys, "distill", "-c", str(config), "--teacher", str(teacher), "--run-dir", "d", "@np"
    )

    assert code == 2
    assert str(teacher) in err and "Traceback" not in err
    assert not marker.exists()


def test_cli_evaluate_refuses_pickled_weights(experiment, malicious_files, marker, capsys):
    root, _ = experiment
    weights = malicious_files["pickle"]

    code, err = _run_cli(
        capsys, "evaluate", str(weights), "--model", "mlp", "--data-dir", str(root / "data")
    )

    assert code == 2 and str(weights) in err
    assert not marker.exists()


def test_cli_resume_refuses_damaged_and_foreign_checkpoints(
    experiment, malicious_files, marker, capsys
):
    root, config = experiment
    code, err = _run_cli(capsys, "train-student", "-c", str(config), "--run-dir", "a", "@np")
    assert code == 0, err
    last = root / "a" / "last.safetensors"
    good = last.read_bytes()

    # Pickled code in place of the checkpoint.
    shutil.copy(malicious_files["torch"], last)
    code, err = _run_cli(capsys, "train-student", "--resume", "a", "@np")
    assert code == 2 and "a/last.safetensors" in err and "Traceback" not in err
    assert not marker.exists()

    # A flipped bit in the tensor data.
    damaged = bytearray(good)
    damaged[-5] ^= 0x01
    last.write_bytes(bytes(damaged))
    code, err = _run_cli(capsys, "train-student", "--resume", "a", "@np")
    assert code == 2 and "a/last.safetensors" in err and "SHA-256" in err

    # The checkpoint of a run with another student model (same training settings).
    code, err = _run_cli(
        capsys,
        "train-student",
        "-c",
        str(config),
        "--set",
        "student.kwargs={hidden=[6]}",
        "--run-dir",
        "b",
        "@np",
    )
    assert code == 0, err
    shutil.copy(root / "b" / "last.safetensors", last)
    code, err = _run_cli(capsys, "train-student", "--resume", "a", "@np")
    assert code == 2 and "Traceback" not in err
    assert "a/last.safetensors" in err and "hidden.0.weight" in err, err


def test_cli_evaluate_names_the_mismatch_for_weights_of_another_model(experiment, capsys):
    root, config = experiment
    code, err = _run_cli(capsys, "train-student", "-c", str(config), "--run-dir", "a", "@np")
    assert code == 0, err

    weights = root / "a" / "model.safetensors"
    code, err = _run_cli(
        capsys,
        "evaluate",
        str(weights),
        "--model",
        "mlp",
        "--kwargs",
        '{"hidden": [5]}',
        "--data-dir",
        str(root / "data"),
    )
    assert code == 2
    assert "does not fit the model" in err and "hidden.0.weight" in err


# --------------------------------------------------------------------------------------------
# Source rules: no unpickling anywhere in the package
# --------------------------------------------------------------------------------------------


def _calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            func = node.func
            name = (
                f"{getattr(func.value, 'id', '?')}.{func.attr}"
                if isinstance(func, ast.Attribute)
                else getattr(func, "id", "?")
            )
            yield name, node


def _keyword(node: ast.Call, name: str):
    for keyword in node.keywords:
        if keyword.arg == name:
            return keyword.value
    return None


def test_every_torch_load_in_the_package_passes_weights_only_true():
    sources = sorted(PACKAGE.rglob("*.py"))
    assert len(sources) > 5
    found, offenders = 0, []
    for source in sources:
        for name, node in _calls(ast.parse(source.read_text(), str(source))):
            if name.endswith(".load") and name.split(".")[0] in {"torch", "th"}:
                found += 1
                value = _keyword(node, "weights_only")
                if not (isinstance(value, ast.Constant) and value.value is True):
                    offenders.append(f"{source.name}:{node.lineno}")
            if name.endswith("load") and name.split(".")[0] in {"np", "numpy"}:
                value = _keyword(node, "allow_pickle")
                if value is not None and not (
                    isinstance(value, ast.Constant) and value.value is False
                ):
                    offenders.append(f"{source.name}:{node.lineno} (allow_pickle)")
    assert found >= 1, "the scan found no torch.load call at all; is it looking in the right place?"
    assert not offenders, f"unsafe loads at {offenders}"


def test_the_package_never_imports_an_unpickler():
    banned = {"pickle", "cPickle", "dill", "cloudpickle", "joblib", "shelve", "marshal"}
    offenders = []
    for source in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(source.read_text(), str(source))):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name.split(".")[0] for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module.split(".")[0]]
            offenders += [f"{source.name}:{node.lineno} {n}" for n in names if n in banned]
    assert not offenders, offenders


# --------------------------------------------------------------------------------------------
# Random damage: every mutation is either refused or provably harmless
# --------------------------------------------------------------------------------------------

DAMAGE = settings(
    max_examples=40,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@st.composite
def mutations(draw, size: int):
    """A list of (position, xor mask) byte flips, or a truncation, or appended bytes."""
    kind = draw(st.sampled_from(["flip", "flip", "truncate", "append"]))
    if kind == "truncate":
        return kind, draw(st.integers(0, size - 1))
    if kind == "append":
        return kind, draw(st.binary(min_size=1, max_size=16))
    flips = draw(
        st.lists(st.tuples(st.integers(0, size - 1), st.integers(1, 255)), min_size=1, max_size=3)
    )
    return kind, flips


def _damage(original: bytes, mutation) -> bytes:
    kind, detail = mutation
    if kind == "truncate":
        return original[:detail]
    if kind == "append":
        return original + detail
    data = bytearray(original)
    for position, mask in detail:
        data[position] ^= mask
    return bytes(data)


def _same_tree(a, b) -> bool:
    if isinstance(a, dict):
        return (
            isinstance(b, dict) and a.keys() == b.keys() and all(_same_tree(a[k], b[k]) for k in a)
        )
    if isinstance(a, list):
        return isinstance(b, list) and len(a) == len(b) and all(map(_same_tree, a, b))
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    return a == b


@DAMAGE
@given(data=st.data())
def test_randomly_damaged_checkpoint_is_refused_or_loads_unchanged(checkpoint, data):
    original = checkpoint.read_bytes()
    expected = load_checkpoint(checkpoint)
    damaged = _damage(original, data.draw(mutations(len(original))))
    checkpoint.write_bytes(damaged)
    try:
        state = load_checkpoint(checkpoint)
    except CheckpointError as error:
        assert str(checkpoint) in str(error)
    else:
        # Only harmless edits may load: e.g. bytes appended after the tensor data.
        assert _same_tree(state, expected), "a damaged checkpoint loaded with different content"
    finally:
        checkpoint.write_bytes(original)


@DAMAGE
@given(data=st.data())
def test_randomly_damaged_weights_file_is_refused_or_loads_unchanged(weights, data):
    original = weights.read_bytes()
    expected = load_weights_file(weights)
    weights.write_bytes(_damage(original, data.draw(mutations(len(original)))))
    try:
        state = load_weights_file(weights)
    except ModelError as error:
        assert str(weights) in str(error)
    else:
        assert _same_tree(state, expected), "a damaged weights file loaded with different content"
    finally:
        weights.write_bytes(original)


@DAMAGE
@given(data=st.data())
def test_randomly_damaged_teacher_cache_is_refused_or_reads_the_same_logits(teacher_cache, data):
    path, expected = teacher_cache
    reference = TeacherCache.open(path, **expected).logits(slice(None))
    target = path / data.draw(st.sampled_from(["manifest.json", "logits.npy"]))
    original = target.read_bytes()
    target.write_bytes(_damage(original, data.draw(mutations(len(original)))))
    try:
        logits = TeacherCache.open(path, **expected).logits(slice(None))
    except TeacherCacheError as error:
        assert str(path) in str(error)
    else:
        assert torch.equal(logits, reference), f"damaged {target.name} gave different logits"
    finally:
        target.write_bytes(original)
