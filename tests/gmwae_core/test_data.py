import gzip
import struct

import numpy as np
import pytest
import torch

from gmwae_core import DataConfig, DataError, load_splits
from gmwae_core.data import read_idx


def write_idx(path, array, compress):
    header = struct.pack(">HBB", 0, 8, array.ndim) + struct.pack(">" + "I" * array.ndim, *array.shape)
    opener = gzip.open if compress else open
    with opener(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def make_idx_folder(folder, n_train=120, n_test=30, compress=True):
    rng = np.random.default_rng(0)
    suffix = ".gz" if compress else ""
    write_idx(folder / f"train-images-idx3-ubyte{suffix}", rng.integers(0, 256, (n_train, 28, 28)), compress)
    write_idx(folder / f"train-labels-idx1-ubyte{suffix}", rng.integers(0, 10, n_train), compress)
    write_idx(folder / f"t10k-images-idx3-ubyte{suffix}", rng.integers(0, 256, (n_test, 28, 28)), compress)
    write_idx(folder / f"t10k-labels-idx1-ubyte{suffix}", rng.integers(0, 10, n_test), compress)


@pytest.mark.parametrize("compress", [True, False])
def test_idx_folder_loads_gzipped_or_not(tmp_path, compress):
    make_idx_folder(tmp_path, compress=compress)
    s = load_splits(DataConfig(dataset="mnist", data_dir=str(tmp_path), val_size=20))
    assert s.train_x.shape == (100, 1, 28, 28) and s.val_x.shape == (20, 1, 28, 28)
    assert s.test_x.shape == (30, 1, 28, 28) and s.test_y.dtype == torch.int64
    assert 0.0 <= s.train_x.min() and s.train_x.max() <= 1.0
    raw = read_idx(next(tmp_path.glob("t10k-images*")))
    assert torch.equal(s.test_x.squeeze(1), torch.from_numpy(raw.copy()).float() / 255)


def test_missing_idx_files_are_named(tmp_path):
    make_idx_folder(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError, match="lacks t10k-labels-idx1-ubyte.*--data-dir"):
        load_splits(DataConfig(dataset="mnist", data_dir=str(tmp_path)))
    with pytest.raises(DataError, match="does not exist"):
        load_splits(DataConfig(dataset="mnist", data_dir=str(tmp_path / "nowhere")))


def test_truncated_idx_file_is_rejected(tmp_path):
    make_idx_folder(tmp_path, compress=False)
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(DataError, match="truncated"):
        load_splits(DataConfig(dataset="mnist", data_dir=str(tmp_path)))


def test_env_variable_names_the_data_folder(tmp_path, monkeypatch):
    make_idx_folder(tmp_path)
    monkeypatch.setenv("GMWAE_DATA_DIR", str(tmp_path))
    assert len(load_splits(DataConfig(dataset="mnist", val_size=10)).test_x) == 30


def test_digits_are_offline_28x28_with_a_fixed_disjoint_validation_split():
    a = load_splits(DataConfig(dataset="digits"))
    b = load_splits(DataConfig(dataset="digits"))
    assert a.train_x.shape[1:] == (1, 28, 28)
    assert len(a.train_x) + len(a.val_x) + len(a.test_x) == 1797
    assert torch.equal(a.val_x, b.val_x)
    train_rows = {r.numpy().tobytes() for r in a.train_x}
    assert not any(r.numpy().tobytes() in train_rows for r in a.val_x)
    assert a.num_classes == 10


def test_validation_larger_than_train_is_an_error():
    with pytest.raises(DataError, match="val_size"):
        load_splits(DataConfig(dataset="synthetic", val_size=5000))


def test_real_mnist_folder_loads_with_the_expected_shapes_and_statistics():
    """The project's MNIST copy (../shared/data/mnist, or $GMWAE_DATA_DIR) as `--data-dir`."""
    import os
    from pathlib import Path

    folder = os.environ.get("GMWAE_DATA_DIR") or str(Path(__file__).parents[3] / "shared/data/mnist")
    s = load_splits(DataConfig(dataset="mnist", data_dir=folder))
    assert (len(s.train_x), len(s.val_x), len(s.test_x)) == (55000, 5000, 10000)
    assert float(torch.cat([s.train_x, s.val_x]).mean()) == pytest.approx(0.1307, abs=5e-4)
    assert torch.bincount(s.test_y).tolist()[:2] == [980, 1135]
