"""Datasets and loader: readers on real and hand-written official-format files, splits, Loader."""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import importlib.util
import io
import os
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from groupnorm.data import (
    CorruptDatasetError,
    DataFile,
    DatasetNotFoundError,
    ImageDataset,
    Loader,
    catalog,
    channel_stats,
    list_datasets,
    load_dataset,
    sources,
    subset,
    train_val_split,
)

FMNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
HAVE_FMNIST = (FMNIST_DIR / "train-images-idx3-ubyte.gz").is_file()
needs_fmnist = pytest.mark.skipif(not HAVE_FMNIST, reason="dataset-fashion-mnist not installed")


@pytest.fixture(autouse=True)
def _isolated(monkeypatch, tmp_path):
    """No $GROUPNORM_DATA, an empty user cache, and no accidental network waits."""
    monkeypatch.delenv("GROUPNORM_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(sources, "DOWNLOAD_TIMEOUT_S", 2.0)


# --------------------------------------------------------------------------- writers


def write_idx(path: Path, arr: np.ndarray, gz: bool) -> Path:
    """Write ``arr`` (uint8) as an IDX file, the format of the MNIST family."""
    header = bytes([0, 0, 0x08, arr.ndim]) + b"".join(
        int(d).to_bytes(4, "big") for d in arr.shape)
    data = header + arr.astype(np.uint8).tobytes()
    if gz:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(data))
    else:
        path.write_bytes(data)
    return path


def make_idx_set(root: Path, gz: bool, n_train=30, n_test=10, seed=0):
    rng = np.random.default_rng(seed)
    out = {}
    for stem, n in (("train", n_train), ("t10k", n_test)):
        x = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        y = (np.arange(n) % 10).astype(np.uint8)
        write_idx(root / f"{stem}-images-idx3-ubyte", x, gz)
        write_idx(root / f"{stem}-labels-idx1-ubyte", y, gz)
        out[stem] = (x, y)
    return out


def cifar_batch(n: int, label_key: str, rng, classes: int) -> dict:
    return {b"batch_label": b"test", label_key.encode(): list(rng.integers(0, classes, n)),
            b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8)}


def make_cifar10(root: Path, as_tar: bool, n=8, seed=0):
    rng = np.random.default_rng(seed)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    batches = {name: cifar_batch(n, "labels", rng, 10) for name in names}
    if as_tar:
        with tarfile.open(root / "cifar-10-python.tar.gz", "w:gz") as tar:
            for name, b in batches.items():
                raw = pickle.dumps(b, protocol=2)
                info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
                info.size = len(raw)
                tar.addfile(info, io.BytesIO(raw))
    else:
        d = root / "cifar-10-batches-py"
        d.mkdir(parents=True)
        for name, b in batches.items():
            (d / name).write_bytes(pickle.dumps(b, protocol=2))
    return batches


# --------------------------------------------------------------------------- real data


@needs_fmnist
def test_real_fashion_mnist():
    train = load_dataset("fashion-mnist", "train")
    test = load_dataset("fashion-mnist", "test")
    assert train.images.shape == (60000, 1, 28, 28) and train.images.dtype == torch.uint8
    assert test.images.shape == (10000, 1, 28, 28)
    assert train.labels.dtype == torch.int64 and train.num_classes == 10
    assert train.class_counts().tolist() == [6000] * 10
    assert test.class_counts().tolist() == [1000] * 10
    # The published normalization constants of Fashion-MNIST; test uses the train statistics.
    assert train.mean[0] == pytest.approx(0.2860, abs=1e-4)
    assert train.std[0] == pytest.approx(0.3530, abs=1e-4)
    assert test.mean == train.mean and test.std == train.std
    assert load_dataset("fashion-mnist").images is train.images  # decoded once per process


@needs_fmnist
def test_moving_fashion_mnist_clips():
    ds = load_dataset("moving-fashion-mnist", "test", n=64, frames=6, size=40)
    assert ds.images.shape == (64, 1, 6, 40, 40) and ds.num_classes == 10
    again = load_dataset("moving-fashion-mnist", "test", n=64, frames=6, size=40, seed=0)
    assert torch.equal(ds.images, again.images) and torch.equal(ds.labels, again.labels)
    # Every frame shows one whole item (the item's pixel sum is preserved), and the items move.
    sums = ds.images.flatten(3).sum(-1, dtype=torch.int64)[:, 0]  # (n, T)
    assert torch.all(sums == sums[:, :1])
    assert (ds.images[:, :, 0] != ds.images[:, :, -1]).flatten(1).any(1).float().mean() > 0.9
    assert ds.class_counts().min() > 0


def test_moving_clips_labels_follow_items():
    from groupnorm.data.synthetic import make_moving_clips
    items = (torch.arange(5, dtype=torch.uint8) + 1)[:, None, None, None].expand(5, 1, 6, 6)
    labels = torch.tensor([0, 1, 2, 0, 1])
    clips, y = make_moving_clips(items.contiguous(), labels, n=12, frames=4, size=16, seed=0)
    assert clips.shape == (12, 1, 4, 16, 16)
    for i in range(12):
        values = clips[i].unique()
        assert len(values) == 2  # background and one item
        assert int(y[i]) == int(labels[int(values[1]) - 1])
        assert torch.all((clips[i, 0] > 0).flatten(1).sum(1) == 36)  # whole item in every frame


# --------------------------------------------------------------------------- IDX format


@pytest.mark.parametrize("gz", [True, False])
def test_idx_reader_roundtrip(tmp_path, gz):
    ref = make_idx_set(tmp_path, gz)
    train = load_dataset("mnist", "train", root=tmp_path, download=False)
    test = load_dataset("mnist", "test", root=tmp_path, download=False)
    assert torch.equal(train.images[:, 0], torch.from_numpy(ref["train"][0]))
    assert torch.equal(test.labels, torch.from_numpy(ref["t10k"][1]).long())
    x = ref["train"][0] / 255.0
    assert train.mean[0] == pytest.approx(x.mean()) and train.std[0] == pytest.approx(x.std())
    assert test.mean == train.mean


def test_idx_found_through_env_and_subfolder(tmp_path, monkeypatch):
    sub = tmp_path / "data" / "MNIST" / "raw"
    sub.mkdir(parents=True)
    make_idx_set(sub, gz=True, n_train=20)
    monkeypatch.setenv("GROUPNORM_DATA", str(tmp_path / "data"))
    assert len(load_dataset("mnist", download=False)) == 20


def test_idx_truncated_gzip(tmp_path):
    make_idx_set(tmp_path, gz=True)
    p = tmp_path / "train-images-idx3-ubyte.gz"
    p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2])
    with pytest.raises(CorruptDatasetError, match="train-images-idx3-ubyte.gz.*truncated"):
        load_dataset("mnist", root=tmp_path, download=False)


def test_idx_truncated_payload(tmp_path):
    make_idx_set(tmp_path, gz=False)
    p = tmp_path / "train-images-idx3-ubyte"
    p.write_bytes(p.read_bytes()[:-100])
    with pytest.raises(CorruptDatasetError, match=r"truncated: \d+ bytes, expected 23536"):
        load_dataset("mnist", root=tmp_path, download=False)


def test_idx_trailing_bytes(tmp_path):
    make_idx_set(tmp_path, gz=False)
    p = tmp_path / "train-labels-idx1-ubyte"
    p.write_bytes(p.read_bytes() + b"\0")
    with pytest.raises(CorruptDatasetError, match="trailing bytes"):
        load_dataset("mnist", root=tmp_path, download=False)


def test_idx_wrong_magic(tmp_path):
    make_idx_set(tmp_path, gz=True)
    # A labels file where the images should be: magic 0x00000801 instead of 0x00000803.
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(
        (tmp_path / "train-labels-idx1-ubyte.gz").read_bytes())
    with pytest.raises(CorruptDatasetError, match="bad IDX magic number 00000801, expected "
                                                  "0x00000803"):
        load_dataset("mnist", root=tmp_path, download=False)


def test_idx_count_mismatch(tmp_path):
    make_idx_set(tmp_path, gz=True)
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.zeros(29, np.uint8), gz=True)
    with pytest.raises(CorruptDatasetError, match="30 images but .* 29 labels"):
        load_dataset("mnist", root=tmp_path, download=False)


def test_replaced_file_is_reread(tmp_path):
    make_idx_set(tmp_path, gz=True, n_train=30)
    assert len(load_dataset("mnist", root=tmp_path, download=False)) == 30
    make_idx_set(tmp_path, gz=True, n_train=40, seed=1)
    os.utime(tmp_path / "train-images-idx3-ubyte.gz", ns=(1, 1))  # make sure mtime changes
    assert len(load_dataset("mnist", root=tmp_path, download=False)) == 40


def test_search_order_root_then_env_then_cache(tmp_path, monkeypatch):
    for name, n in (("root", 20), ("env", 30), ("cache", 40)):
        (tmp_path / name).mkdir()
        make_idx_set(tmp_path / name, gz=True, n_train=n)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))  # the cache is <XDG>/groupnorm
    (tmp_path / "cache").rename(tmp_path / "groupnorm")
    monkeypatch.setenv("GROUPNORM_DATA", str(tmp_path / "env"))
    assert len(load_dataset("mnist", root=tmp_path / "root", download=False)) == 20
    assert len(load_dataset("mnist", download=False)) == 30
    monkeypatch.delenv("GROUPNORM_DATA")
    assert len(load_dataset("mnist", download=False)) == 40


def test_official_size_must_have_official_checksum(tmp_path):
    # A t10k labels file of the official size (10 000 labels) whose bytes are not the official
    # ones: structurally fine, so only the published MD5 of the decoded content can catch it.
    make_idx_set(tmp_path, gz=False)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.arange(10000, dtype=np.uint8) % 10, gz=True)
    with pytest.raises(CorruptDatasetError,
                       match=r"t10k-labels-idx1-ubyte.gz: has the size of the official file but "
                             r"its content fails the checksum: MD5 [0-9a-f]{32}, expected "
                             "27ae3e4e09519cfbb04c329615203637"):
        load_dataset("mnist", "test", root=tmp_path, download=False)


@needs_fmnist
def test_real_fashion_mnist_flipped_byte_is_caught(tmp_path):
    for stem in ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        (tmp_path / stem).write_bytes(gzip.decompress((FMNIST_DIR / f"{stem}.gz").read_bytes()))
    for stem in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"):
        (tmp_path / f"{stem}.gz").symlink_to(FMNIST_DIR / f"{stem}.gz")
    assert len(load_dataset("fashion-mnist", "test", root=tmp_path, download=False)) == 10000
    p = tmp_path / "t10k-images-idx3-ubyte"
    data = bytearray(p.read_bytes())
    data[5_000_000] ^= 1  # one pixel, one bit
    p.write_bytes(bytes(data))
    with pytest.raises(CorruptDatasetError, match="t10k-images-idx3-ubyte: .*fails the checksum.*"
                                                  "expected 8181f5470baa50b63fa0f6fddb340f0a"):
        load_dataset("fashion-mnist", "test", root=tmp_path, download=False)


# --------------------------------------------------------------------------- CIFAR


@pytest.mark.parametrize("as_tar", [False, True])
def test_cifar10_reader(tmp_path, as_tar):
    batches = make_cifar10(tmp_path, as_tar)
    train = load_dataset("cifar10", "train", root=tmp_path, download=False)
    test = load_dataset("cifar10", "test", root=tmp_path, download=False)
    assert train.images.shape == (40, 3, 32, 32) and test.images.shape == (8, 3, 32, 32)
    ref = batches["data_batch_2"][b"data"][3].reshape(3, 32, 32)
    assert torch.equal(train.images[8 + 3], torch.from_numpy(ref))
    assert test.labels.tolist() == [int(v) for v in batches["test_batch"][b"labels"]]
    assert len(train.mean) == 3 and test.mean == train.mean


def test_cifar100_fine_and_coarse(tmp_path):
    rng = np.random.default_rng(0)
    d = tmp_path / "cifar-100-python"
    d.mkdir()
    for split, n in (("train", 12), ("test", 4)):
        b = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
             b"fine_labels": list(rng.integers(0, 100, n)),
             b"coarse_labels": list(rng.integers(0, 20, n))}
        (d / split).write_bytes(pickle.dumps(b, protocol=2))
    fine = load_dataset("cifar100", root=tmp_path, download=False)
    coarse = load_dataset("cifar100", root=tmp_path, download=False, label_mode="coarse")
    assert fine.num_classes == 100 and coarse.num_classes == 20
    assert fine.images.shape == (12, 3, 32, 32)
    assert coarse.labels.max() < 20


def test_cifar_root_may_be_the_extracted_folder(tmp_path):
    make_cifar10(tmp_path, as_tar=False)
    ds = load_dataset("cifar10", "test", root=tmp_path / "cifar-10-batches-py", download=False)
    assert len(ds) == 8


def test_cifar_official_count_must_have_official_checksum(tmp_path):
    make_cifar10(tmp_path, as_tar=False)
    rng = np.random.default_rng(0)  # a full-size (10 000 image) test batch that is not the real one
    (tmp_path / "cifar-10-batches-py" / "test_batch").write_bytes(
        pickle.dumps(cifar_batch(10000, "labels", rng, 10), protocol=2))
    with pytest.raises(CorruptDatasetError, match="test_batch: has the size of the official file "
                                                  ".*expected 40351d587109b95175f43aff81a1287e"):
        load_dataset("cifar10", "test", root=tmp_path, download=False)


def test_cifar_truncated_pickle(tmp_path):
    make_cifar10(tmp_path, as_tar=False)
    p = tmp_path / "cifar-10-batches-py" / "data_batch_3"
    p.write_bytes(p.read_bytes()[:5000])
    with pytest.raises(CorruptDatasetError, match="data_batch_3.*truncated or corrupt"):
        load_dataset("cifar10", root=tmp_path, download=False)


def test_cifar_truncated_tarball(tmp_path):
    make_cifar10(tmp_path, as_tar=True)
    p = tmp_path / "cifar-10-python.tar.gz"
    p.write_bytes(p.read_bytes()[: len(p.read_bytes()) * 2 // 3])
    with pytest.raises(CorruptDatasetError, match="cifar-10-python.tar.gz"):
        load_dataset("cifar10", root=tmp_path, download=False)


def test_cifar_wrong_shape_and_unsafe_pickle(tmp_path):
    make_cifar10(tmp_path, as_tar=False)
    d = tmp_path / "cifar-10-batches-py"
    (d / "data_batch_1").write_bytes(pickle.dumps(
        {b"data": np.zeros((8, 100), np.uint8), b"labels": [0] * 8}))
    with pytest.raises(CorruptDatasetError, match=r"shape \(N, 3072\)"):
        load_dataset("cifar10", root=tmp_path, download=False)
    (d / "data_batch_1").write_bytes(pickle.dumps({b"data": os.getcwd}))  # a non-numpy global
    with pytest.raises(CorruptDatasetError, match="not allowed"):
        load_dataset("cifar10", root=tmp_path, download=False)


# --------------------------------------------------------------------------- not found / download


def test_not_found_says_what_to_install(tmp_path, monkeypatch):
    spec = catalog._CATALOG["fashion-mnist"]
    monkeypatch.setitem(catalog._CATALOG, "fashion-mnist",
                        dataclasses.replace(spec, system=(str(tmp_path / "nowhere"),)))
    with pytest.raises(DatasetNotFoundError) as e:
        load_dataset("fashion-mnist", root=tmp_path / "empty", download=False)
    msg = str(e.value)
    assert "apt-get install dataset-fashion-mnist" in msg
    assert "train-images-idx3-ubyte.gz or train-images-idx3-ubyte," in msg
    assert str(tmp_path / "empty") in msg


def _with_remotes(monkeypatch, name, remotes):
    spec = catalog._CATALOG[name]
    monkeypatch.setitem(catalog._CATALOG, name, dataclasses.replace(
        spec, system=(), remotes=tuple(remotes)))


def test_failed_download_ends_in_clear_error(tmp_path, monkeypatch):
    _with_remotes(monkeypatch, "mnist", [
        sources.Remote("train-images-idx3-ubyte.gz", "http://127.0.0.1:9/x.gz", "0" * 32,
                       ("http://127.0.0.1:9/mirror.gz",))])
    with pytest.raises(DatasetNotFoundError, match=r"Download failed: OSError: could not download "
                                                   r"train-images-idx3-ubyte.gz: http://127.0.0.1"
                                                   r":9/x.gz: .*Error.*; http://127.0.0.1:9/mirror"):
        load_dataset("mnist", root=tmp_path / "dl", download=True)


def _local_server(tmp_path) -> tuple[Path, list[str]]:
    """A folder of MNIST-format .gz files standing in for a download server (file:// URLs)."""
    src = tmp_path / "server"
    src.mkdir()
    make_idx_set(src, gz=True)
    return src, ["train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
                 "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"]


def test_download_falls_back_to_a_mirror(tmp_path, monkeypatch):
    src, names = _local_server(tmp_path)
    remotes = [sources.Remote(n, f"http://127.0.0.1:9/{n}", sources.md5sum(src / n),
                              ((src / n).as_uri(),)) for n in names]
    _with_remotes(monkeypatch, "mnist", remotes)
    assert len(load_dataset("mnist", root=tmp_path / "dl", download=True)) == 30


def test_download_verifies_md5(tmp_path, monkeypatch):
    src, names = _local_server(tmp_path)
    good = [sources.Remote(n, (src / n).as_uri(), sources.md5sum(src / n)) for n in names]
    bad = [dataclasses.replace(good[0], md5="f" * 32)] + good[1:]
    _with_remotes(monkeypatch, "mnist", bad)
    with pytest.raises(DatasetNotFoundError, match="has MD5 .* expected f{32}"):
        load_dataset("mnist", root=tmp_path / "dl", download=True)
    assert not (tmp_path / "dl" / "mnist" / names[0]).exists()  # nothing half-verified left
    _with_remotes(monkeypatch, "mnist", good)
    ds = load_dataset("mnist", root=tmp_path / "dl", download=True)
    assert len(ds) == 30 and (tmp_path / "dl" / "mnist" / names[0]).is_file()


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown dataset 'imagenet'"):
        load_dataset("imagenet")
    with pytest.raises(ValueError, match="unknown split 'val'"):
        load_dataset("synthetic", "val")
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['frames'\]"):
        load_dataset("synthetic", frames=3)
    assert {"fashion-mnist", "mnist", "cifar10", "cifar100", "digits", "synthetic",
            "moving-fashion-mnist"} <= set(list_datasets())


# --------------------------------------------------------------------------- generated / bundled


def test_digits():
    pytest.importorskip("sklearn")
    train, test = load_dataset("digits", "train"), load_dataset("digits", "test")
    assert train.images.shape[1:] == (1, 8, 8) and len(train) + len(test) == 1797
    assert int(train.images.max()) == 255 and test.mean == train.mean
    assert len(test) == 359 and min(test.class_counts().tolist()) >= 34


def test_synthetic_is_seeded_and_learnable():
    a = load_dataset("synthetic", n=400, num_classes=4, image_size=16, channels=2, seed=3)
    b = load_dataset("synthetic", n=400, num_classes=4, image_size=16, channels=2, seed=3)
    c = load_dataset("synthetic", n=400, num_classes=4, image_size=16, channels=2, seed=4)
    assert a.images.shape == (400, 2, 16, 16) and a.num_classes == 4
    assert torch.equal(a.images, b.images) and not torch.equal(a.images, c.images)
    assert a.class_counts().tolist() == [100] * 4
    test = load_dataset("synthetic", "test", n=200, num_classes=4, image_size=16, channels=2,
                        seed=3)
    # Nearest class mean (fit on train) is well above chance (25%) on test.
    xa, xt = a.images.flatten(1).float(), test.images.flatten(1).float()
    means = torch.stack([xa[a.labels == k].mean(0) for k in range(4)])
    acc = (torch.cdist(xt, means).argmin(1) == test.labels).float().mean()
    assert acc > 0.6


# --------------------------------------------------------------------------- splits


def _toy(n=103, classes=4, shape=(1, 4, 4)) -> ImageDataset:
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, *shape), generator=g, dtype=torch.uint8)
    images[:, 0, 0, 0] = torch.arange(n, dtype=torch.uint8)  # identifies the sample
    labels = torch.arange(n) % classes
    return ImageDataset(images, labels, classes, "toy", (0.5,) * shape[0], (0.25,) * shape[0])


@pytest.mark.parametrize("val_size", [20, 0.2])
def test_train_val_split_stratified_and_deterministic(val_size):
    ds = _toy()
    tr, va = train_val_split(ds, val_size, seed=1)
    tr2, va2 = train_val_split(ds, val_size, seed=1)
    assert torch.equal(va.images, va2.images) and torch.equal(tr.labels, tr2.labels)
    assert len(va) == (20 if val_size == 20 else round(103 * 0.2)) and len(tr) + len(va) == 103
    ids = torch.cat([tr.images[:, 0, 0, 0], va.images[:, 0, 0, 0]]).sort().values
    assert torch.equal(ids, torch.arange(103, dtype=torch.uint8))
    counts = va.class_counts()
    assert counts.max() - counts.min() <= 1
    assert va.mean == ds.mean
    other = train_val_split(ds, val_size, seed=2)[1]
    assert not torch.equal(other.images, va.images)


def test_split_errors():
    with pytest.raises(ValueError, match="leave at least one sample"):
        train_val_split(_toy(), 103)
    with pytest.raises(ValueError, match=r"must be an int in \[1, 103\]"):
        subset(_toy(), 0)


def test_subset_balanced_nested_deterministic():
    ds = _toy(n=100, classes=4)
    s10, s20 = subset(ds, 10, seed=0), subset(ds, 20, seed=0)
    assert s10.class_counts().tolist() == [3, 3, 2, 2]
    assert s20.class_counts().tolist() == [5] * 4
    assert set(s10.images[:, 0, 0, 0].tolist()) <= set(s20.images[:, 0, 0, 0].tolist())
    assert torch.equal(subset(ds, 10, seed=0).images, s10.images)
    # A class with too few samples gives all it has; the others make up the difference.
    skew = ds.select(torch.cat([torch.arange(0, 100, 4)[:2], torch.nonzero(ds.labels != 0)[:, 0]]))
    s = subset(skew, 40)
    assert s.class_counts().tolist() == [2, 13, 13, 12] and len(s) == 40


# --------------------------------------------------------------------------- loader


def _ids(x: torch.Tensor, ds: ImageDataset) -> torch.Tensor:
    """Recover sample ids from normalized batches of _toy (pixel 0 holds the id)."""
    mean, std = ds.mean[0], ds.std[0]
    return ((x[:, 0, 0, 0] * std + mean) * 255).round().long()


def test_loader_every_sample_once_and_deterministic():
    ds = _toy()
    loader = Loader(ds, 16, shuffle=True, seed=5)
    assert len(loader) == 7
    epoch0 = torch.cat([_ids(x, ds) for x, _ in loader])
    assert torch.equal(epoch0.sort().values, torch.arange(103))
    again = torch.cat([_ids(x, ds) for x, _ in Loader(ds, 16, shuffle=True, seed=5)])
    assert torch.equal(epoch0, again)
    loader.set_epoch(1)
    epoch1 = torch.cat([_ids(x, ds) for x, _ in loader])
    assert not torch.equal(epoch0, epoch1) and torch.equal(epoch1.sort().values, torch.arange(103))
    other_seed = torch.cat([_ids(x, ds) for x, _ in Loader(ds, 16, seed=6)])
    assert not torch.equal(epoch0, other_seed)


def test_loader_values_labels_and_drop_last():
    ds = _toy()
    x, y = next(iter(Loader(ds, 10, shuffle=False)))
    assert x.dtype == torch.float32 and y.dtype == torch.int64
    ref = (ds.images[:10].float() / 255 - 0.5) / 0.25
    torch.testing.assert_close(x, ref)
    assert torch.equal(y, ds.labels[:10])
    sizes = [len(b[1]) for b in Loader(ds, 10, drop_last=True)]
    assert sizes == [10] * 10 and len(Loader(ds, 10, drop_last=True)) == 10
    assert [len(b[1]) for b in Loader(ds, 50)] == [50, 50, 3]


@pytest.mark.parametrize("drop_last", [False, True])
def test_loader_rank_sharding_covers_the_data(drop_last):
    ds = _toy()
    shards = []
    for rank in range(3):
        loader = Loader(ds, 8, seed=1, rank=rank, world_size=3, drop_last=drop_last)
        loader.set_epoch(4)
        shards.append(torch.cat([_ids(x, ds) for x, _ in loader]))
    sizes = {len(s) for s in shards}
    union = torch.cat(shards).unique()
    if drop_last:
        assert sizes == {32} and len(union) == 96  # 103 // 3 = 34 per rank, then whole batches
    else:
        assert sizes == {35} and torch.equal(union, torch.arange(103))  # padded by wrapping
        assert len(torch.cat(shards)) == 105


def test_loader_augment_is_crop_and_flip_of_the_source():
    n, h, w, pad = 12, 5, 6, 1
    images = torch.arange(n * h * w, dtype=torch.float64).reshape(n, 1, h, w) % 251 + 1
    ds = ImageDataset(images.to(torch.uint8), torch.zeros(n, dtype=torch.int64), 2, "t",
                      (0.0,), (1 / 255,))  # normalization = identity on 0..255
    loader = Loader(ds, n, shuffle=False, augment=True, pad=pad, seed=0)
    (x, _), = list(loader)
    assert x.shape == (n, 1, h, w)
    padded = torch.nn.functional.pad(ds.images.float(), (pad,) * 4)
    flips = 0
    for i in range(n):
        cands = []
        for dy in range(2 * pad + 1):
            for dx in range(2 * pad + 1):
                crop = padded[i, :, dy:dy + h, dx:dx + w]
                cands += [(crop, False), (crop.flip(-1), True)]
        hit = [f for c, f in cands if torch.equal(c, x[i])]
        assert hit, f"sample {i} is not a crop/flip of its source"
        flips += hit[0]
    assert 0 < flips < n  # both flipped and unflipped samples occur
    (x2, _), = list(Loader(ds, n, shuffle=False, augment=True, pad=pad, seed=0))
    assert torch.equal(x, x2)


def test_loader_three_channels_per_channel_norm_and_one_crop():
    n, h, w = 16, 6, 6
    torch.manual_seed(0)
    base = torch.randint(1, 200, (n, 1, h, w), dtype=torch.uint8)
    images = torch.cat([base, base + 20, base + 40], 1)  # channel c = channel 0 + 20c
    ds = ImageDataset(images, torch.zeros(n, dtype=torch.int64), 2, "rgb",
                      (0.1, 0.3, 0.5), (0.2, 0.4, 0.8))
    (x, _), = list(Loader(ds, n, shuffle=False))
    mean = torch.tensor(ds.mean).view(1, 3, 1, 1)
    std = torch.tensor(ds.std).view(1, 3, 1, 1)
    torch.testing.assert_close(x, (images.float() / 255 - mean) / std)
    (xa, _), = list(Loader(ds, n, shuffle=False, augment=True, pad=2, seed=3))
    u8 = (xa * std + mean) * 255  # back to pixel values (zero padding maps to 0)
    # One crop and flip per sample across its channels: where channel 0 shows an image pixel,
    # channels 1 and 2 show the same pixel plus 20 and 40.
    inside = u8[:, 0] > 0.5
    torch.testing.assert_close(u8[:, 1][inside], u8[:, 0][inside] + 20, atol=1e-3, rtol=0)
    torch.testing.assert_close(u8[:, 2][inside], u8[:, 0][inside] + 40, atol=1e-3, rtol=0)
    assert (~inside).any()  # some padding was cropped in


def test_loader_video_augment_same_crop_all_frames():
    n, t = 6, 3
    frame = torch.randint(1, 256, (n, 1, 1, 8, 8), dtype=torch.uint8)
    clips = frame.expand(n, 1, t, 8, 8).contiguous()
    ds = ImageDataset(clips, torch.zeros(n, dtype=torch.int64), 2, "v", (0.5,), (0.5,))
    x, y = next(iter(Loader(ds, n, augment=True, pad=2)))
    assert x.shape == (n, 1, t, 8, 8)
    assert torch.equal(x[:, :, 0], x[:, :, 1]) and torch.equal(x[:, :, 0], x[:, :, 2])


def test_loader_argument_errors():
    with pytest.raises(ValueError, match="rank < world_size"):
        Loader(_toy(), 4, rank=2, world_size=2)
    with pytest.raises(ValueError, match="batch_size"):
        Loader(_toy(), 0)


def test_loader_channels_last_same_values():
    """channels_last=True: the same batches (values, labels, order, augmentation), laid out
    channels-last; clips channels_last_3d."""
    ds = load_dataset("synthetic", n=100, image_size=12)
    for augment in (False, True):
        a = list(Loader(ds, 32, augment=augment, seed=5))
        b = list(Loader(ds, 32, augment=augment, seed=5, channels_last=True))
        assert len(a) == len(b) == 4
        for (xa, ya), (xb, yb) in zip(a, b, strict=True):
            assert torch.equal(xa, xb) and torch.equal(ya, yb)
            assert xa.is_contiguous() and xb.is_contiguous(memory_format=torch.channels_last)
            assert not xb.is_contiguous()
    clips = torch.randint(0, 256, (4, 2, 3, 8, 8), dtype=torch.uint8)  # C=2: layouts differ
    video = ImageDataset(clips, torch.zeros(4, dtype=torch.int64), 2, "v", (0.5,) * 2, (0.5,) * 2)
    x, _ = next(iter(Loader(video, 4, augment=True, channels_last=True)))
    assert x.is_contiguous(memory_format=torch.channels_last_3d) and not x.is_contiguous()
    assert "channels_last=True" in repr(Loader(ds, 4, channels_last=True))


# --------------------------------------------------------------------------- Dataset protocol


def test_image_dataset_is_a_torch_dataset():
    ds = _toy(n=10, classes=3, shape=(2, 4, 4))
    assert isinstance(ds, torch.utils.data.Dataset) and len(ds) == 10
    img, label = ds[7]
    assert torch.equal(img, ds.images[7]) and label == 7 % 3 and isinstance(label, int)
    assert torch.equal(ds[-1][0], ds.images[9])
    with pytest.raises(IndexError):
        ds[10]
    batches = list(torch.utils.data.DataLoader(ds, batch_size=4, shuffle=False))
    assert [len(b[1]) for b in batches] == [4, 4, 2]
    x, y = batches[1]
    assert x.dtype == torch.uint8 and torch.equal(x, ds.images[4:8])
    assert torch.equal(y, ds.labels[4:8])
    assert repr(ds) == "ImageDataset('toy', n=10, image_shape=(2, 4, 4), num_classes=3, files=0)"
    with pytest.raises(ValueError, match=r"classes has 2 names but num_classes is 3"):
        dataclasses.replace(ds, classes=("a", "b"))


def _identity(path: Path) -> DataFile:
    data = path.read_bytes()
    return DataFile(str(path.resolve()), len(data), hashlib.sha256(data).hexdigest())


def test_files_name_what_each_dataset_was_read_from(tmp_path):
    (tmp_path / "idx").mkdir()
    make_idx_set(tmp_path / "idx", gz=True)
    train = load_dataset("mnist", "train", root=tmp_path / "idx", download=False)
    test = load_dataset("mnist", "test", root=tmp_path / "idx", download=False)
    idx = {n: _identity(tmp_path / "idx" / f"{n}-ubyte.gz") for n in (
        "train-images-idx3", "train-labels-idx1", "t10k-images-idx3", "t10k-labels-idx1")}
    assert train.files == (idx["train-images-idx3"], idx["train-labels-idx1"])
    # a test split carries the train split's mean/std, so its files too
    assert test.files == (idx["t10k-images-idx3"], idx["t10k-labels-idx1"],
                          idx["train-images-idx3"], idx["train-labels-idx1"])
    assert train_val_split(train, 10)[1].files == train.files  # cuts keep the identity
    (tmp_path / "dir").mkdir()
    (tmp_path / "tar").mkdir()
    make_cifar10(tmp_path / "dir", as_tar=False)
    folder = tmp_path / "dir" / "cifar-10-batches-py"
    ds = load_dataset("cifar10", "test", root=tmp_path / "dir", download=False)
    assert ds.files == (_identity(folder / "test_batch"),
                        *(_identity(folder / f"data_batch_{i}") for i in range(1, 6)))
    make_cifar10(tmp_path / "tar", as_tar=True)
    ds = load_dataset("cifar10", "test", root=tmp_path / "tar", download=False)
    assert ds.files == (_identity(tmp_path / "tar" / "cifar-10-python.tar.gz"),)
    assert load_dataset("synthetic", n=20).files == ()  # generated: its options are its identity
    if importlib.util.find_spec("sklearn") is not None:
        (digits,) = load_dataset("digits").files
        assert digits.path.endswith("digits.csv.gz") and digits == _identity(Path(digits.path))


def test_channel_stats_are_the_float64_sums_bit_for_bit():
    """The histogram sums are the exact integers the float64 per-channel sums computed."""
    g = torch.Generator().manual_seed(0)
    for shape in ((37, 3, 5, 7), (9, 1, 4, 3, 3), (5, 2, 1, 1)):
        images = torch.randint(0, 256, shape, generator=g, dtype=torch.uint8)
        images[0].fill_(255)
        x = images.transpose(0, 1).reshape(shape[1], -1).to(torch.float64)
        mean = x.sum(1) / x.shape[1]
        var = (x.square().sum(1) / x.shape[1] - mean.square()).clamp_min(0)
        expected = (tuple((mean / 255.0).tolist()),
                    tuple(max(s, 1e-8) for s in (var.sqrt() / 255.0).tolist()))
        assert channel_stats(images) == expected
