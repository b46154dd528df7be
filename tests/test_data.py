"""Offline data sets: IDX and CIFAR binary readers on synthetic files, digits splits, INR targets."""

from __future__ import annotations

import gzip
import math

import numpy as np
import pytest
import torch

import deepalign.data as D
from deepalign.data.cifar import RECORD
from deepalign.data.idx import read_idx, write_idx
from deepalign.errors import DeepAlignError


def _fake_mnist(folder, n_train=12, n_test=5, gz=True, seed=0):
    rng = np.random.default_rng(seed)
    out = {}
    for stem, n in (("train", n_train), ("t10k", n_test)):
        img = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        lab = rng.integers(0, 10, size=n, dtype=np.uint8)
        sfx = ".gz" if gz else ""
        write_idx(folder / f"{stem}-images-idx3-ubyte{sfx}", img)
        write_idx(folder / f"{stem}-labels-idx1-ubyte{sfx}", lab)
        out[stem] = (img, lab)
    return out


def _hand_idx(dims, data: bytes, code=0x08) -> bytes:
    head = bytes([0, 0, code, len(dims)]) + b"".join(d.to_bytes(4, "big") for d in dims)
    return head + data


def test_read_idx_hand_written_bytes(tmp_path):
    # header written by hand (not by write_idx): 2x3 uint8 and a big-endian int16 vector
    p = tmp_path / "a.idx"
    p.write_bytes(_hand_idx([2, 3], bytes(range(6))))
    np.testing.assert_array_equal(read_idx(p), np.arange(6, dtype=np.uint8).reshape(2, 3))
    q = tmp_path / "b.idx.gz"
    q.write_bytes(gzip.compress(_hand_idx([2], (258).to_bytes(2, "big") * 2, code=0x0B)))
    np.testing.assert_array_equal(read_idx(q), [258, 258])


@pytest.mark.parametrize(
    "payload, message",
    [
        (b"\x01\x00\x08\x01" + (3).to_bytes(4, "big") + b"abc", "magic"),
        (b"\x00\x00\x07\x01" + (3).to_bytes(4, "big") + b"abc", "magic"),
        (b"\x00\x00\x08\x01" + (4).to_bytes(4, "big") + b"abc", "size mismatch"),
        (b"\x00\x00\x08\x01" + (2).to_bytes(4, "big") + b"abc", "size mismatch"),
        (b"\x00\x00\x08\x02" + (2).to_bytes(4, "big"), "truncated"),
        (b"\x00", "magic"),
    ],
)
def test_read_idx_rejects_bad_files(tmp_path, payload, message):
    p = tmp_path / "bad-idx"
    p.write_bytes(payload)
    with pytest.raises(DeepAlignError, match=message):
        read_idx(p)


def test_read_idx_wrong_rank_and_bad_gzip(tmp_path):
    p = tmp_path / "v.idx"
    p.write_bytes(_hand_idx([4], bytes(4)))
    with pytest.raises(DeepAlignError, match="expected 3"):
        read_idx(p, ndim=3)
    g = tmp_path / "x.gz"
    g.write_bytes(b"\x1f\x8bnot really gzip")
    with pytest.raises(DeepAlignError, match="cannot read"):
        read_idx(g)


@pytest.mark.parametrize("gz", [True, False])
def test_mnist_loader_from_folder(tmp_path, gz):
    raw = _fake_mnist(tmp_path, gz=gz)
    for split, stem in (("train", "train"), ("test", "t10k")):
        ds = D.load("mnist", split, data_dir=tmp_path)
        img, lab = raw[stem]
        assert ds.x.shape == (len(lab), 1, 28, 28) and ds.x.dtype == torch.float32
        assert ds.y.dtype == torch.long
        np.testing.assert_array_equal(ds.y.numpy(), lab)
        expect = (img / 255.0 - 0.13066) / 0.30811
        np.testing.assert_allclose(ds.x[:, 0].numpy(), expect, atol=1e-5)
        np.testing.assert_allclose(ds.pixels()[:, 0].numpy(), img / 255.0, atol=1e-5)


def test_idx_loader_errors(tmp_path):
    with pytest.raises(DeepAlignError, match="no data folder"):
        D.load("mnist")
    with pytest.raises(DeepAlignError, match="does not exist"):
        D.load("mnist", data_dir=tmp_path / "nope")
    with pytest.raises(DeepAlignError, match="train-images-idx3-ubyte.*not found"):
        D.load("mnist", data_dir=tmp_path)
    with pytest.raises(DeepAlignError, match="apt-get install dataset-fashion-mnist"):
        D.load("fashion-mnist", data_dir=tmp_path)
    # images and labels disagree on the count
    rng = np.random.default_rng(1)
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", rng.integers(0, 255, (4, 28, 28), np.uint8))
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.zeros(3, np.uint8))
    with pytest.raises(DeepAlignError, match="4 images but"):
        D.load("mnist", data_dir=tmp_path)
    with pytest.raises(DeepAlignError, match="unknown data set"):
        D.load("imagenet")
    with pytest.raises(DeepAlignError, match="unknown split"):
        D.load("digits", "validation")


def test_cifar_binary_reader(tmp_path):
    rng = np.random.default_rng(0)
    recs = {}
    for name in [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]:
        labels = rng.integers(0, 10, 3, dtype=np.uint8)
        pix = rng.integers(0, 256, (3, 3072), dtype=np.uint8)
        (tmp_path / name).write_bytes(np.concatenate([labels[:, None], pix], 1).tobytes())
        recs[name] = (labels, pix)
    train = D.load("cifar10", "train", data_dir=tmp_path)
    test = D.load("cifar10", "test", data_dir=tmp_path)
    assert train.x.shape == (15, 3, 32, 32) and test.x.shape == (3, 3, 32, 32)
    labels, pix = recs["test_batch.bin"]
    np.testing.assert_array_equal(test.y.numpy(), labels)
    # record layout: 1024 red, then green, then blue, each row-major 32x32
    np.testing.assert_allclose(
        test.pixels()[1, 2, 5, 7].item(), pix[1, 2 * 1024 + 5 * 32 + 7] / 255.0, atol=1e-5
    )
    np.testing.assert_array_equal(train.y[6:9].numpy(), recs["data_batch_3.bin"][0])


def test_cifar_errors(tmp_path):
    with pytest.raises(DeepAlignError, match="data_batch_1.bin not found"):
        D.load("cifar10", data_dir=tmp_path)
    (tmp_path / "test_batch.bin").write_bytes(bytes(RECORD + 5))
    with pytest.raises(DeepAlignError, match="not a CIFAR-10 binary batch"):
        D.load("cifar10", "test", data_dir=tmp_path)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "test_batch.bin").write_bytes(bytes([11]) + bytes(RECORD - 1))
    with pytest.raises(DeepAlignError, match="out of range"):
        D.load("cifar10", "test", data_dir=tmp_path / "sub")


def test_digits_splits_are_fixed_and_disjoint():
    train, test = D.load("digits", "train"), D.load("digits", "test")
    assert train.x.shape[1:] == (1, 8, 8) and train.n_classes == 10
    assert len(train) + len(test) == 1797
    assert abs(len(test) - 0.2 * 1797) < 1
    from sklearn.datasets import load_digits

    raw = load_digits()
    known = {r.astype(np.float32).tobytes() for r in raw.images.reshape(1797, -1)}
    for part in (train, test):  # every image is a digits image, undone from the normalisation
        rows = np.round(part.pixels().reshape(len(part), -1).numpy() * 16).astype(np.float32)
        assert all(r.tobytes() in known for r in rows)
    # together the splits hold every example once: class counts add up to the full set's
    both = torch.bincount(torch.cat([train.y, test.y]), minlength=10)
    assert both.tolist() == np.bincount(raw.target).tolist()
    # normalised with fixed constants: near zero mean and unit std on train
    assert abs(train.x.mean().item()) < 0.05 and abs(train.x.std().item() - 1) < 0.05
    # a second load returns the same (cached) tensors
    assert D.load("digits", "train").x is train.x


def test_batches_and_subset():
    ds = D.load("digits", "test")
    got = list(ds.batches(100))
    assert [len(b[1]) for b in got] == [100, 100, 100, len(ds) - 300]
    assert torch.equal(torch.cat([b[0] for b in got]), ds.x)
    s1 = list(ds.batches(64, torch.Generator().manual_seed(3), shuffle=True))
    s2 = list(ds.batches(64, torch.Generator().manual_seed(3), shuffle=True))
    y1 = torch.cat([b[1] for b in s1])
    assert torch.equal(y1, torch.cat([b[1] for b in s2]))
    assert not torch.equal(y1, ds.y) and torch.equal(y1.sort().values, ds.y.sort().values)
    sub = ds.subset(50, seed=1)
    assert len(sub) == 50 and torch.equal(sub.x, ds.subset(50, seed=1).x)
    assert not torch.equal(sub.x, ds.subset(50, seed=2).x)
    with pytest.raises(DeepAlignError):
        ds.subset(len(ds) + 1)
    with pytest.raises(DeepAlignError):
        next(ds.batches(0))


def test_image_targets_grid_and_values():
    ds = D.load("digits", "train")
    t = D.image_targets(ds, [3, 7])
    assert t.coords.shape == (64, 2) and t.values.shape == (2, 64, 1)
    assert t.coords.min() == -1 and t.coords.max() == 1
    # coordinate (row, col) of pixel (2, 5) in an 8x8 grid
    k = 2 * 8 + 5
    assert torch.allclose(t.coords[k], torch.tensor([-1 + 2 * 2 / 7, -1 + 2 * 5 / 7]))
    assert torch.allclose(t.values[1, k, 0], ds.pixels()[7, 0, 2, 5] - 0.5, atol=1e-6)
    with pytest.raises(DeepAlignError):
        D.image_targets(ds, [len(ds)])


def test_sine_targets():
    a = [D.sine_frequency(0, i) for i in range(200)]
    assert all(0.5 <= v <= 10 for v in a) and len(set(a)) == 200
    assert D.sine_frequency(0, 5) == a[5] and D.sine_frequency(1, 5) != a[5]
    t = D.sine_targets([2.0, 3.5], points=33)
    assert t.coords.shape == (33, 1) and t.values.shape == (2, 33, 1)
    assert math.isclose(t.coords[0, 0].item(), -math.pi, rel_tol=1e-6)
    x = t.coords[10, 0].item()
    assert math.isclose(t.values[1, 10, 0].item(), math.sin(3.5 * x), abs_tol=1e-6)


def test_real_fashion_mnist_when_installed():
    folder = D.FASHION_MNIST_DIR
    if not (folder / "t10k-labels-idx1-ubyte.gz").is_file():
        pytest.fail(
            "dataset-fashion-mnist is not installed (make install adds it; apt-get install dataset-fashion-mnist)"
        )
    ds = D.load("fashion-mnist", "test")
    assert ds.x.shape == (10000, 1, 28, 28)
    assert torch.bincount(ds.y).tolist() == [1000] * 10
