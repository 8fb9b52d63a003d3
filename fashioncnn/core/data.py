"""Fashion-MNIST, held whole in memory as normalised tensors.

The four original IDX files (torchvision's FashionMNIST raw format, gzipped or not) are looked for in
the configured directory (also in its FashionMNIST/raw/, where torchvision puts them), then in Debian's
dataset-fashion-mnist package, then fetched by torchvision's own download. Reading them once into
tensors and batching by index is what keeps per-sample PIL transforms out of the training loop.

The validation split is a class-stratified hold-out of the 60,000 training images, drawn with a fixed
seed (so every run, whatever its own seed, validates on the same images) before `subset` applies:
`subset=500` trains on 500 of the remaining images and validates on the same hold-out as a full run.
"""

from __future__ import annotations

import gzip
import hashlib
import logging
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # torch loads when the data becomes tensors, not when files are only checked
    import torch

log = logging.getLogger(__name__)

DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
TRAIN_COUNT, TEST_COUNT = 60_000, 10_000
VAL_SPLIT_SEED = 0  # fixed: the same hold-out for every run, so their validation scores compare
# Mean and standard deviation of the 60,000 training images, scaled to [0, 1].
MEAN, STD = 0.2860, 0.3530
_IDX_TYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}

HOW_TO_GET_DATA = (
    "Fashion-MNIST not found. Get it one of these ways: "
    "(1) on Debian/Ubuntu: apt-get install dataset-fashion-mnist (puts it in {debian}); "
    "(2) copy the four files {names} (.gz or not) into {data_dir}; "
    "(3) on a machine with internet, run again: torchvision downloads it into {data_dir} "
    "(tried and failed: {download_error})"
)


class DataNotFoundError(RuntimeError):
    pass


class DataDamagedError(ValueError):
    """A data file that cannot be read whole; the message names it and says how to get good data."""


HOW_TO_GET_GOOD_DATA = (f"delete it and get the four files again: apt-get install --reinstall dataset-fashion-mnist "
                        f"(into {DEBIAN_DIR}), copy them into data_dir, or let torchvision download them into data_dir "
                        "on a machine with internet")


def check_local(data_dir: str | Path, val_size: int = 0) -> Path | None:
    """Read and verify the data where it is on this machine (about a second); None when it is not here.

    The command line calls it before any job starts, so damaged data is one line, not a FAILED run per job.
    """
    try:
        paths = locate(data_dir, download=False)
    except DataNotFoundError:
        return None  # maybe a download, or another machine (a cluster's node), has it: the job will tell
    load(data_dir, val_size=val_size, download=False)
    return paths["train_images"].parent


@dataclass
class FashionMNIST:
    train_images: torch.Tensor  # float32, N x 1 x 28 x 28, normalised
    train_labels: torch.Tensor  # int64, N
    test_images: torch.Tensor
    test_labels: torch.Tensor
    source: Path | None
    val_images: torch.Tensor = field(default_factory=lambda: _empty(0, 1, 28, 28))
    val_labels: torch.Tensor = field(default_factory=lambda: _empty(0, long=True))
    digest: str = ""  # of the four files read: which version of the data a run saw

    def to(self, device: torch.device) -> FashionMNIST:
        return FashionMNIST(
            self.train_images.to(device),
            self.train_labels.to(device),
            self.test_images.to(device),
            self.test_labels.to(device),
            self.source,
            self.val_images.to(device),
            self.val_labels.to(device),
            self.digest,
        )


def read_idx(path: Path) -> np.ndarray:
    """Read one IDX file (http://yann.lecun.com/exdb/mnist/ format), gzipped or not."""
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (EOFError, gzip.BadGzipFile, zlib.error) as error:  # cut short or corrupted on the way
            raise DataDamagedError(f"{path} is damaged ({error}); {HOW_TO_GET_GOOD_DATA}") from error
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_TYPES:
        raise ValueError(f"{path}: not an IDX file (bad magic number {raw[:4].hex()})")
    dtype, ndim = np.dtype(_IDX_TYPES[raw[2]]), raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    offset = 4 + 4 * ndim
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(raw) - offset != expected:
        raise DataDamagedError(f"{path} is damaged: its header says shape {shape} ({expected} bytes) but "
                               f"{len(raw) - offset} bytes follow; {HOW_TO_GET_GOOD_DATA}")
    return np.frombuffer(raw, dtype=dtype, offset=offset).reshape(shape)


def _find_file(directory: Path, stem: str) -> Path | None:
    for folder in (directory, directory / "FashionMNIST" / "raw"):
        for name in (stem + ".gz", stem):
            if (folder / name).is_file():
                return folder / name
    return None


def _find_files(directory: Path) -> dict[str, Path] | None:
    found = {key: _find_file(directory, stem) for key, stem in FILES.items()}
    return found if all(found.values()) else None  # type: ignore[return-value]


def locate(data_dir: str | Path, download: bool = True) -> dict[str, Path]:
    """Paths of the four IDX files: configured directory, Debian's package, then torchvision's download."""
    data_dir = Path(data_dir)
    for directory in (data_dir, DEBIAN_DIR):
        found = _find_files(directory)
        if found:
            return found
    download_error = "download not attempted"
    if download:
        try:
            from torchvision.datasets import FashionMNIST as TorchvisionFashionMNIST

            log.info("Fashion-MNIST not found locally; downloading with torchvision into %s", data_dir)
            TorchvisionFashionMNIST(str(data_dir), train=True, download=True)
            TorchvisionFashionMNIST(str(data_dir), train=False, download=True)
            found = _find_files(data_dir)
            if found:
                return found
        except Exception as error:  # torchvision raises RuntimeError/URLError/OSError depending on the failure
            download_error = f"{type(error).__name__}: {error}".splitlines()[0][:200]
    raise DataNotFoundError(
        HOW_TO_GET_DATA.format(
            debian=DEBIAN_DIR,
            names=", ".join(FILES.values()),
            data_dir=data_dir.resolve(),
            download_error=download_error,
        )
    )


def _check(images: np.ndarray, labels: np.ndarray, count: int, split: str, source: Path) -> None:
    if images.shape != (count, 28, 28) or images.dtype != np.uint8:
        raise ValueError(f"{source}: {split} images have shape {images.shape} ({images.dtype}), expected ({count}, 28, 28) uint8")
    if labels.shape != (count,):
        raise ValueError(f"{source}: {split} labels have shape {labels.shape}, expected ({count},)")
    if labels.min() < 0 or labels.max() > 9:
        raise ValueError(f"{source}: {split} labels range {labels.min()}..{labels.max()}, expected 0..9")


def _empty(*shape: int, long: bool = False) -> torch.Tensor:
    import torch

    return torch.empty(*shape, dtype=torch.long if long else torch.float32)


def _to_tensor(images: np.ndarray) -> torch.Tensor:
    import torch

    # Normalised once here, so the training loop only indexes.
    scaled = torch.from_numpy(images.astype(np.float32)).div_(255.0)
    return scaled.sub_(MEAN).div_(STD).unsqueeze(1)


def validation_indices(labels: np.ndarray, size: int, seed: int = VAL_SPLIT_SEED) -> np.ndarray:
    """`size` indices of a class-stratified random hold-out (each class in proportion, as in the whole), sorted."""
    if size == 0:
        return np.empty(0, dtype=np.int64)
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(labels, return_counts=True)
    share = counts * size / len(labels)
    per_class = np.floor(share).astype(int)
    # Largest remainders get the images that rounding down left over, so the sizes add up to `size`.
    per_class[np.argsort(-(share - per_class), kind="stable")[: size - per_class.sum()]] += 1
    chosen = [rng.permutation(np.flatnonzero(labels == c))[:n] for c, n in zip(classes, per_class)]
    return np.sort(np.concatenate(chosen))


def file_digest(paths: dict[str, Path]) -> str:
    """SHA-256 (first 16 hex digits) of the four files as read, in a fixed order."""
    digest = hashlib.sha256()
    for key in sorted(paths):
        digest.update(paths[key].read_bytes())
    return digest.hexdigest()[:16]


def load(
    data_dir: str | Path,
    subset: int | None = None,
    val_size: int = 0,
    download: bool = True,
    expected_counts: tuple[int, int] = (TRAIN_COUNT, TEST_COUNT),
) -> FashionMNIST:
    """Load and verify Fashion-MNIST; hold out `val_size` training images for validation, then keep the
    first `subset` of the rest for training (the test set stays whole)."""
    paths = locate(data_dir, download=download)
    arrays = {key: read_idx(path) for key, path in paths.items()}
    source = paths["train_images"].parent
    _check(arrays["train_images"], arrays["train_labels"], expected_counts[0], "train", source)
    _check(arrays["test_images"], arrays["test_labels"], expected_counts[1], "test", source)
    train_images, train_labels = arrays["train_images"], arrays["train_labels"]
    held_out = validation_indices(train_labels, val_size)
    keep = np.setdiff1d(np.arange(len(train_labels)), held_out)
    val_images, val_labels = train_images[held_out], train_labels[held_out]
    train_images, train_labels = train_images[keep], train_labels[keep]
    if subset is not None:
        train_images, train_labels = train_images[:subset], train_labels[:subset]
    import torch

    return FashionMNIST(
        train_images=_to_tensor(train_images),
        train_labels=torch.from_numpy(train_labels.astype(np.int64)),
        test_images=_to_tensor(arrays["test_images"]),
        test_labels=torch.from_numpy(arrays["test_labels"].astype(np.int64)),
        source=source,
        val_images=_to_tensor(val_images),
        val_labels=torch.from_numpy(val_labels.astype(np.int64)),
        digest=file_digest(paths),
    )
