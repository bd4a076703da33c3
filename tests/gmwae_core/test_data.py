import gzip
import os
import struct
import subprocess
import sys
from pathlib import Path

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


def mnist_files() -> Path:
    """The MNIST files beside the project (../shared/data/mnist), else $GMWAE_DATA_DIR."""
    folder = Path(__file__).parents[3] / "shared" / "data" / "mnist"
    if (folder / "train-images-idx3-ubyte.gz").is_file():
        return folder
    return Path(os.environ["GMWAE_DATA_DIR"])


MIRROR_CLIENT = """
import hashlib, sys, torchvision
from pathlib import Path
from gmwae_core.config import DataConfig
from gmwae_core.data import load_splits
mirror, files = sys.argv[1], Path(sys.argv[2])
torchvision.datasets.MNIST.mirrors = [mirror]
torchvision.datasets.MNIST.resources = [
    (name, hashlib.md5((files / name).read_bytes()).hexdigest())
    for name, _ in torchvision.datasets.MNIST.resources]
splits = load_splits(DataConfig(dataset="mnist", val_size=100))
print(len(splits.train_x) + len(splits.val_x), len(splits.test_x))
"""


def test_concurrent_loads_without_a_data_folder_download_once_and_never_see_a_partial_folder(
        tmp_path):
    """Four processes that start together on one node (a node's trials) and find no data
    folder: one downloads from the mirror, the others wait and read its finished folder."""
    import functools
    import http.server
    import threading

    from gmwae_core.data import STAGED_MARK

    mnist = mnist_files()
    served = []

    class Mirror(http.server.SimpleHTTPRequestHandler):
        """Counts downloads: torchvision probes each URL for redirects first, with a GET
        that carries a `Method: HEAD` header and is dropped unread; those are not counted."""

        def do_GET(self):
            if self.headers.get("Method") != "HEAD":
                served.append(self.path)
            try:
                return super().do_GET()
            except ConnectionError:
                pass

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(Mirror, directory=str(mnist)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    env = {k: v for k, v in os.environ.items() if k != "GMWAE_DATA_DIR"}
    env["XDG_CACHE_HOME"] = str(tmp_path / "cache")
    try:
        procs = [subprocess.Popen([sys.executable, "-c", MIRROR_CLIENT,
                                   f"http://127.0.0.1:{server.server_port}/", str(mnist)],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                  env=env) for _ in range(4)]
        outs = [p.communicate(timeout=300) for p in procs]
    finally:
        server.shutdown()
    assert all(p.returncode == 0 for p in procs), [err[-2000:] for _, err in outs]
    assert [out.split() for out, _ in outs] == [["60000", "10000"]] * 4
    assert sorted(served) == sorted(f"/{name}" for name in (
        "train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
        "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"))  # each file once
    cache = tmp_path / "cache" / "gmwae"
    assert (cache / "mnist" / STAGED_MARK).is_file()
    assert sorted(p.name for p in cache.iterdir()) == [".mnist.lock", "mnist"]  # no staging left


def test_a_failed_download_leaves_no_folder_behind_and_says_what_to_do(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "GMWAE_DATA_DIR"}
    env["XDG_CACHE_HOME"] = str(tmp_path / "cache")
    done = subprocess.run([sys.executable, "-c", MIRROR_CLIENT, "http://127.0.0.1:9/",
                           str(mnist_files())], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode != 0
    assert "torchvision could not download it" in done.stderr
    assert "Pass --data-dir DIR (or set GMWAE_DATA_DIR)" in done.stderr
    cache = tmp_path / "cache" / "gmwae"
    assert sorted(p.name for p in cache.iterdir()) == [".mnist.lock"]


def _digit_pngs(folder, n):
    from PIL import Image
    from sklearn.datasets import load_digits

    folder.mkdir(parents=True)
    for i, img in enumerate(load_digits().images[:n]):
        (folder / f"sub{i % 2}").mkdir(exist_ok=True)
        Image.fromarray((img * 255 / 16).astype(np.uint8)).save(folder / f"sub{i % 2}" / f"{i}.png")


def test_a_folder_of_images_loads_without_labels_and_evaluates_only_label_free_metrics(tmp_path):
    from gmwae_core import Trainer, from_preset

    _digit_pngs(tmp_path / "images", 300)
    (tmp_path / "images" / "notes.txt").write_text("not an image: skipped")
    cfg = from_preset("cpu", {"dataset": "images", "data_dir": str(tmp_path / "images"),
                              "decoder_width": 8, "pretrain_steps": 2})
    splits = load_splits(cfg.data)
    assert not splits.labelled and splits.num_classes == 0
    sizes = [len(splits.split(w)[0]) for w in ("train", "val", "test")]
    assert sum(sizes) == 300 and sizes[2] == 30  # a tenth held out for testing
    assert splits.train_x.shape[1:] == (1, 28, 28) and 0.0 <= splits.train_x.min() < splits.train_x.max() <= 1.0
    assert (splits.test_y == -1).all()
    trainer = Trainer(cfg, splits)
    trainer.train_steps(3)
    result = trainer.evaluate("val")
    names = {k.split("/", 1)[1] for k in result.metrics}
    assert {"augment_ari", "augment_mi", "silhouette", "mmd", "recon_mse",
            "assignment_entropy", "active_components"} <= names
    assert not names & {"cluster_acc", "ami", "nmi", "ari", "cluster_acc_greedy"}
    assert result.label_by_k.shape == (0, cfg.model.K)


def test_an_npy_array_of_images_loads_in_each_layout(tmp_path):
    from sklearn.datasets import load_digits

    digits = (load_digits().images[:200] / 16.0).astype(np.float32)  # (N, 8, 8) in [0, 1]
    for name, array in (("nhw.npy", digits), ("nchw.npy", digits[:, None]),
                        ("nhwc.npy", np.repeat(digits[..., None], 3, -1)),
                        ("uint8.npy", (digits * 255).astype(np.uint8))):
        np.save(tmp_path / name, array)
        splits = load_splits(DataConfig(dataset="images", data_dir=str(tmp_path / name)))
        assert splits.train_x.shape[1:] == (1, 28, 28) and not splits.labelled, name
        assert len(splits.test_x) == 20


def test_bad_image_data_says_what_is_wrong_and_how_to_fix_it(tmp_path):
    from gmwae_core import ConfigError

    with pytest.raises(ConfigError, match="`data.data_dir` must name the images"):
        DataConfig(dataset="images")
    with pytest.raises(ConfigError, match="must be standard for dataset images"):
        DataConfig(dataset="images", data_dir="x", protocol="paper")
    cases = {
        "empty": (None, "holds no image files"),
        "range.npy": (np.full((200, 8, 8), 255.0), "must lie in \\[0, 1\\]"),
        "shape.npy": (np.zeros((200, 8)), "must be \\(N, H, W\\)"),
        "few.npy": (np.zeros((50, 8, 8), dtype=np.uint8), "needs at least 100"),
        "missing": (None, "neither a folder nor an .npy file"),
    }
    (tmp_path / "empty").mkdir()
    for name, (array, message) in cases.items():
        if array is not None:
            np.save(tmp_path / name, array)
        with pytest.raises(DataError, match=message):
            load_splits(DataConfig(dataset="images", data_dir=str(tmp_path / name)))
    broken = tmp_path / "broken"
    _digit_pngs(broken, 120)
    (broken / "bad.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match="Could not read image .*bad.png"):
        load_splits(DataConfig(dataset="images", data_dir=str(broken)))
