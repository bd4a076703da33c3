"""Datasets as tensors: train, validation (carved from train with a fixed seed) and test.

Every dataset is 28x28 grey images in [0, 1] with integer labels, or -1 for every image of
a dataset without labels (dataset `images`: a folder of image files or an .npy array,
converted to grey and resized to 28x28). The whole split lives as one tensor on the
training device; batches are index draws (see training.py).
"""
from __future__ import annotations

import gzip
import hashlib
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from .config import UNLABELLED_DATASETS, DataConfig

__all__ = ["DataError", "Splits", "load_splits", "read_idx", "find_idx_files", "DATA_DIR_ENV",
           "describe_splits", "paper_split", "PAPER_HELD_OUT"]

PAPER_HELD_OUT = 1000
"""The paper's test set (Section 3.1): the last 1,000 of the pooled images."""

DATA_DIR_ENV = "GMWAE_DATA_DIR"
STAGED_MARK = ".complete"
"""Written last into a downloaded data folder: the folder is whole."""
IDX_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".pgm")
"""Files a folder of images (dataset `images`) is read from, case-insensitive."""
IMAGES_TEST_SHARE = 10
"""Dataset `images` holds out one image in this many (a fixed draw) as its test split."""
NO_LABEL = -1
# Where Debian's dataset-fashion-mnist package puts the files.
FASHION_MNIST_APT_DIR = "/usr/share/datasets/fashion-mnist"


class DataError(ValueError):
    """The data could not be found or read; the message says where it looked and the fix."""


@dataclass(frozen=True)
class Splits:
    """Images (N, 1, 28, 28) float32 in [0, 1] and labels (N,) int64 for each split."""

    name: str
    train_x: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor

    def split(self, which: str) -> tuple[torch.Tensor, torch.Tensor]:
        if which not in ("train", "val", "test"):
            raise ValueError(f"`split` must be train, val or test, but got {which!r}.")
        return getattr(self, f"{which}_x"), getattr(self, f"{which}_y")

    def to(self, device: torch.device | str) -> "Splits":
        return Splits(self.name, *(t.to(device) for t in (
            self.train_x, self.train_y, self.val_x, self.val_y, self.test_x, self.test_y)))

    @property
    def labelled(self) -> bool:
        """False for images without labels (data.dataset=images): every label is -1."""
        return bool(len(self.test_y)) and int(self.test_y.min()) >= 0

    @property
    def num_classes(self) -> int:
        """Number of label values; 0 for images without labels."""
        return int(self.test_y.max().item()) + 1 if self.labelled else 0


def read_idx(path: Path) -> np.ndarray:
    """Read one IDX file (gzipped or not) into a numpy array."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
        zero, dtype_code, ndim = struct.unpack(">HBB", raw[:4])
        if zero != 0 or dtype_code != 0x08:
            raise DataError(f"{path} is not an unsigned-byte IDX file (header {raw[:4].hex()}).")
        shape = struct.unpack(">" + "I" * ndim, raw[4: 4 + 4 * ndim])
        data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
        if data.size != int(np.prod(shape)):
            raise DataError(f"{path} is truncated: header says {shape}, file holds {data.size} bytes.")
        return data.reshape(shape)
    except (OSError, EOFError, struct.error) as e:
        raise DataError(f"Could not read IDX file {path}: {e}. Replace it with a good copy.") from None


def find_idx_files(folder: Path) -> dict[str, Path]:
    """The four IDX files in `folder` (gzipped or not), or a DataError naming the missing ones."""
    if not folder.is_dir():
        raise DataError(f"Data folder {folder} does not exist. Pass --data-dir (or set "
                        f"{DATA_DIR_ENV}) to a folder holding the four IDX files: "
                        f"{', '.join(IDX_FILES.values())} (optionally .gz).")
    found, missing = {}, []
    for key, stem in IDX_FILES.items():
        for candidate in (folder / stem, folder / (stem + ".gz")):
            if candidate.is_file():
                found[key] = candidate
                break
        else:
            missing.append(stem)
    if missing:
        raise DataError(f"Data folder {folder} lacks {', '.join(missing)} (or .gz). It must hold "
                        f"the four IDX files {', '.join(IDX_FILES.values())}; point --data-dir "
                        f"(or {DATA_DIR_ENV}) at such a folder.")
    return found


def _from_idx_folder(folder: Path) -> tuple[np.ndarray, ...]:
    files = find_idx_files(folder)
    arrays = {k: read_idx(p) for k, p in files.items()}
    for split in ("train", "test"):
        n_img, n_lab = len(arrays[f"{split}_images"]), len(arrays[f"{split}_labels"])
        if n_img != n_lab or arrays[f"{split}_images"].shape[1:] != (28, 28):
            raise DataError(f"{folder}: {split} images {arrays[f'{split}_images'].shape} do not "
                            f"match {n_lab} labels of 28x28 images. Check the files.")
    return (arrays["train_images"], arrays["train_labels"], arrays["test_images"],
            arrays["test_labels"])


def _from_torchvision(dataset: str) -> tuple[np.ndarray, ...]:
    """The download path for users with internet (torchvision's own mirrors), once per
    machine: the first process downloads into a staging folder under a lock and renames it
    into place; every other process (the trials starting together on a node) waits for the
    lock and reads the finished folder. A folder never holds a partial download."""
    import fcntl
    import shutil
    import tempfile

    import torchvision

    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "gmwae"
    root = cache / dataset
    cls = {"mnist": torchvision.datasets.MNIST,
           "fashion-mnist": torchvision.datasets.FashionMNIST}[dataset]
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / f".{dataset}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (root / STAGED_MARK).is_file():
            staging = Path(tempfile.mkdtemp(prefix=f".{dataset}-staging-", dir=cache))
            try:
                cls(str(staging), train=True, download=True)
                cls(str(staging), train=False, download=True)
                (staging / STAGED_MARK).write_text("")
                shutil.rmtree(root, ignore_errors=True)  # a folder some earlier code left
                os.rename(staging, root)
            except Exception as e:  # noqa: BLE001 - any network or file failure means the same
                raise DataError(
                    f"No data folder was given for {dataset} and torchvision could not download "
                    f"it ({type(e).__name__}: {e}). Pass --data-dir DIR (or set {DATA_DIR_ENV}) "
                    f"to a folder with the four IDX files, or use --dataset digits, which needs "
                    f"no files.") from None
            finally:
                shutil.rmtree(staging, ignore_errors=True)
    train = cls(str(root), train=True, download=False)
    test = cls(str(root), train=False, download=False)
    return (train.data.numpy(), train.targets.numpy(), test.data.numpy(), test.targets.numpy())


def _digits() -> tuple[np.ndarray, ...]:
    """scikit-learn's bundled 8x8 digits, upsampled to 28x28; a fixed 20% test split."""
    from sklearn.datasets import load_digits

    d = load_digits()
    img = torch.from_numpy(d.images).float().unsqueeze(1) / 16.0  # (1797, 1, 8, 8)
    img = torch.nn.functional.interpolate(img, size=(28, 28), mode="bilinear",
                                          align_corners=False)
    img = (img.clamp(0, 1) * 255).round().to(torch.uint8).squeeze(1).numpy()
    order = np.random.default_rng(1234).permutation(len(img))
    n_test = len(img) // 5
    test, train = order[:n_test], order[n_test:]
    return img[train], d.target[train], img[test], d.target[test]


def _synthetic(n_train: int = 2400, n_test: int = 600, classes: int = 10) -> tuple[np.ndarray, ...]:
    """Ten classes of noisy bar patterns: a fast, deterministic set for tests."""
    rng = np.random.default_rng(0)
    templates = np.zeros((classes, 28, 28), dtype=np.float32)
    for c in range(classes):
        if c < 5:
            templates[c, 3 + 5 * c: 7 + 5 * c, 2:26] = 1.0  # horizontal bar
        else:
            templates[c, 2:26, 3 + 5 * (c - 5): 7 + 5 * (c - 5)] = 1.0  # vertical bar

    def make(n: int) -> tuple[np.ndarray, np.ndarray]:
        y = rng.integers(0, classes, n)
        x = templates[y] * rng.uniform(0.6, 1.0, (n, 1, 1)) + rng.normal(0, 0.1, (n, 28, 28))
        return (np.clip(x, 0, 1) * 255).astype(np.uint8), y

    train_x, train_y = make(n_train)
    test_x, test_y = make(n_test)
    return train_x, train_y, test_x, test_y


def _grey_28(images: np.ndarray, where: str) -> np.ndarray:
    """(N, H, W) uint8 or float in [0, 1] -> (N, 28, 28) uint8, bilinear."""
    if images.dtype == np.uint8:
        x = torch.from_numpy(images.astype(np.float32) / 255.0)
    elif np.issubdtype(images.dtype, np.floating) or np.issubdtype(images.dtype, np.integer):
        lo, hi = float(images.min()), float(images.max())
        if lo < 0.0 or hi > 1.0:
            raise DataError(f"{where} holds values in [{lo:g}, {hi:g}], but images that are not "
                            f"uint8 must lie in [0, 1]. Divide them by their maximum (255 for "
                            f"8-bit images) or save them as uint8.")
        x = torch.from_numpy(images.astype(np.float32))
    else:
        raise DataError(f"{where} has dtype {images.dtype}, but images must be uint8 or float "
                        f"in [0, 1]. Convert the array.")
    if x.shape[1:] != (28, 28):
        x = torch.nn.functional.interpolate(x.unsqueeze(1), size=(28, 28), mode="bilinear",
                                            align_corners=False).squeeze(1)
    return (x.clamp(0, 1) * 255).round().to(torch.uint8).numpy()


def _npy_images(path: Path) -> np.ndarray:
    try:
        a = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise DataError(f"Could not read {path} as an .npy array ({e}). Save the images with "
                        f"numpy.save as an (N, H, W) array.") from None
    if a.ndim == 4 and a.shape[1] == 1:
        a = a[:, 0]
    elif a.ndim == 4 and a.shape[3] in (1, 3, 4):
        a = a[..., :3].mean(-1).astype(a.dtype) if a.shape[3] > 1 else a[..., 0]
    if a.ndim != 3 or min(a.shape) < 1:
        raise DataError(f"{path} has shape {a.shape}, but an array of images must be "
                        f"(N, H, W), (N, 1, H, W) or (N, H, W, C) with C 1, 3 or 4. Reshape it.")
    return _grey_28(a, str(path))


def _folder_images(folder: Path) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    files = sorted(f for f in folder.rglob("*") if f.is_file()
                   and f.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise DataError(f"Image folder {folder} holds no image files ({', '.join(IMAGE_SUFFIXES)}"
                        f", subfolders included). Point data_dir at the folder of your images.")
    images = []
    for f in files:
        try:
            with Image.open(f) as img:
                grey = img.convert("L").resize((28, 28), Image.Resampling.BILINEAR)
                images.append(np.asarray(grey, dtype=np.uint8))
        except (OSError, UnidentifiedImageError) as e:
            raise DataError(f"Could not read image {f} ({e}). Remove or replace it.") from None
    return np.stack(images)


def _images(path: Path) -> tuple[np.ndarray, ...]:
    """A folder of image files or an .npy array, without labels: train and a held-out
    test split (one image in IMAGES_TEST_SHARE, a fixed draw), every label NO_LABEL."""
    if path.is_file() and path.suffix == ".npy":
        images = _npy_images(path)
    elif path.is_dir():
        images = _folder_images(path)
    else:
        raise DataError(f"data_dir {path} is neither a folder nor an .npy file. Point it at a "
                        f"folder of image files or at an .npy array of images.")
    n_test = len(images) // IMAGES_TEST_SHARE
    if n_test < 10:
        raise DataError(f"{path} holds {len(images)} images; dataset images needs at least "
                        f"{10 * IMAGES_TEST_SHARE} (a tenth is held out for testing, at least "
                        f"10). Add images.")
    order = np.random.default_rng(1234).permutation(len(images))
    test, train = order[:n_test], order[n_test:]
    no_labels = np.full(len(images), NO_LABEL, dtype=np.int64)
    return images[train], no_labels[train], images[test], no_labels[test]


def resolve_data_dir(cfg: DataConfig) -> Optional[Path]:
    """--data-dir, else $GMWAE_DATA_DIR, else Debian's Fashion-MNIST folder, else None."""
    if cfg.data_dir:
        return Path(cfg.data_dir).expanduser()
    if os.environ.get(DATA_DIR_ENV):
        return Path(os.environ[DATA_DIR_ENV]).expanduser()
    if cfg.dataset == "fashion-mnist" and Path(FASHION_MNIST_APT_DIR).is_dir():
        return Path(FASHION_MNIST_APT_DIR)
    return None


def load_splits(cfg: DataConfig) -> Splits:
    """Load `cfg.dataset` and carve the validation split with `cfg.split_seed`."""
    if cfg.dataset in ("mnist", "fashion-mnist"):
        folder = resolve_data_dir(cfg)
        arrays = _from_idx_folder(folder) if folder is not None else _from_torchvision(cfg.dataset)
    elif cfg.dataset in UNLABELLED_DATASETS:
        arrays = _images(Path(cfg.data_dir).expanduser())
    elif cfg.dataset == "digits":
        arrays = _digits()
    else:
        arrays = _synthetic()
    train_x, train_y, test_x, test_y = arrays
    if cfg.protocol == "paper":
        train_x, train_y, test_x, test_y = paper_split(np.concatenate([train_x, test_x]),
                                                       np.concatenate([train_y, test_y]))
    val_size = cfg.val_size if cfg.val_size is not None else len(train_x) // 12
    if val_size >= len(train_x):
        raise DataError(f"`data.val_size` must be smaller than the {len(train_x)} training "
                        f"images of {cfg.dataset}, but got {val_size}. Lower it.")
    order = np.random.default_rng(cfg.split_seed).permutation(len(train_x))
    val, train = order[:val_size], order[val_size:]

    def images(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.array(a, dtype=np.float32)).div_(255.0).unsqueeze(1)

    def labels(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.asarray(a, dtype=np.int64))

    return Splits(cfg.dataset, images(train_x[train]), labels(train_y[train]),
                  images(train_x[val]), labels(train_y[val]), images(test_x), labels(test_y))


def paper_split(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, ...]:
    """The paper's protocol on the pooled images (train then test, as the files order
    them): the last PAPER_HELD_OUT are the test split, the rest train (and validation).
    MNIST: 69,000 and 1,000. A set too small to spare 1,000 holds out a tenth."""
    held = PAPER_HELD_OUT if len(x) >= 10 * PAPER_HELD_OUT else len(x) // 10
    return x[:-held], y[:-held], x[-held:], y[-held:]


def describe_splits(cfg: DataConfig) -> dict:
    """What a run trains and is scored on: the dataset's name, where it came from, the split
    sizes and a digest of the split images and labels (the same digest means the same data
    in the same train/validation split)."""
    splits = load_splits(cfg)
    digest = hashlib.sha256()
    for which in ("train", "val", "test"):
        for tensor in splits.split(which):
            digest.update(tensor.numpy().tobytes())
    folder = (resolve_data_dir(cfg) if cfg.dataset in ("mnist", "fashion-mnist", *UNLABELLED_DATASETS)
              else None)
    source = (str(folder.resolve()) if folder is not None else
              "torchvision" if cfg.dataset in ("mnist", "fashion-mnist") else
              "scikit-learn" if cfg.dataset == "digits" else "generated")
    return {"name": cfg.dataset, "source": source, "digest": digest.hexdigest()[:20],
            "sizes": {w: len(splits.split(w)[0]) for w in ("train", "val", "test")},
            "split_seed": cfg.split_seed, "protocol": cfg.protocol, "labelled": splits.labelled}
