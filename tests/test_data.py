import gzip

import numpy as np
import pytest
import torch
from conftest import write_idx

from fashioncnn.core.data import DEBIAN_DIR, MEAN, STD, DataNotFoundError, load, locate, read_idx


def test_reads_gzipped_and_plain_idx_files(tmp_path):
    array = np.arange(2 * 28 * 28, dtype=np.uint8).reshape(2, 28, 28)
    write_idx(tmp_path / "a.gz", array)
    write_idx(tmp_path / "b", array)
    assert np.array_equal(read_idx(tmp_path / "a.gz"), array)
    assert np.array_equal(read_idx(tmp_path / "b"), array)


def test_rejects_a_file_that_is_not_idx(tmp_path):
    (tmp_path / "x.gz").write_bytes(gzip.compress(b"<html>not found</html>"))
    with pytest.raises(ValueError, match="not an IDX file"):
        read_idx(tmp_path / "x.gz")


def test_rejects_a_truncated_file(tmp_path):
    array = np.zeros((3, 28, 28), dtype=np.uint8)
    write_idx(tmp_path / "t", array)
    (tmp_path / "t").write_bytes((tmp_path / "t").read_bytes()[:-10])
    with pytest.raises(ValueError, match=r"header says shape \(3, 28, 28\)"):
        read_idx(tmp_path / "t")


def test_loads_a_configured_directory_into_normalised_tensors(tiny_dataset):
    data = load(tiny_dataset, expected_counts=(60, 20), download=False)
    assert data.train_images.shape == (60, 1, 28, 28) and data.train_images.dtype == torch.float32
    assert data.test_images.shape == (20, 1, 28, 28)
    assert data.train_labels.tolist() == [i % 10 for i in range(60)]
    assert data.source == tiny_dataset
    assert data.train_images.min() >= (0 - MEAN) / STD - 1e-6 and data.train_images.max() <= (1 - MEAN) / STD + 1e-6


def test_finds_torchvisions_layout_too(tiny_dataset, tmp_path):
    raw = tmp_path / "root" / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for file in tiny_dataset.iterdir():
        (raw / file.name).write_bytes(file.read_bytes())
    assert locate(tmp_path / "root", download=False)["train_labels"] == raw / "train-labels-idx1-ubyte.gz"


def test_subset_keeps_the_first_images(tiny_dataset):
    data = load(tiny_dataset, subset=13, expected_counts=(60, 20), download=False)
    assert len(data.train_images) == 13 and len(data.test_images) == 20


def test_wrong_counts_and_labels_are_refused(tiny_dataset):
    with pytest.raises(ValueError, match=r"train images have shape \(60, 28, 28\).*expected \(60000, 28, 28\)"):
        load(tiny_dataset, download=False)
    write_idx(tiny_dataset / "t10k-labels-idx1-ubyte.gz", np.full(20, 11, dtype=np.uint8))
    with pytest.raises(ValueError, match="test labels range 11..11, expected 0..9"):
        load(tiny_dataset, expected_counts=(60, 20), download=False)


def test_missing_data_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setattr("fashioncnn.core.data.DEBIAN_DIR", tmp_path / "no-debian-package")
    with pytest.raises(DataNotFoundError) as caught:
        locate(tmp_path / "empty", download=False)
    message = str(caught.value)
    assert "apt-get install dataset-fashion-mnist" in message
    assert str((tmp_path / "empty").resolve()) in message
    assert "train-images-idx3-ubyte" in message and "\n" not in message


@pytest.mark.skipif(not DEBIAN_DIR.exists(), reason="needs Debian's dataset-fashion-mnist (CI installs it)")
def test_the_real_data_set(tmp_path):
    data = load(tmp_path / "nothing-here", download=False)
    assert data.source == DEBIAN_DIR
    assert data.train_images.shape == (60_000, 1, 28, 28) and data.test_images.shape == (10_000, 1, 28, 28)
    assert torch.bincount(data.train_labels).tolist() == [6000] * 10
    assert torch.bincount(data.test_labels).tolist() == [1000] * 10
    # Normalised once with the training set's own statistics.
    assert abs(data.train_images.mean().item()) < 1e-3 and abs(data.train_images.std().item() - 1) < 1e-3
