"""Image-folder trees (``<split>/<class>/<image>``), a directory or a .tar/.tar.gz, decoded once.

The layout is torchvision's ImageFolder, one level up: ``<source>/<split>/<class>/<file>``
(JPEG or PNG; any depth below the class directory; the whole tree may sit under one top-level
folder, as archives often wrap it). Files with other extensions (a README) are skipped.

* **Labels.** Classes are the class directories' names in sorted order (Python string order,
  so ``"Cat" < "cat" < "dog"``); label k is the k-th name. Every split must hold the same class
  directories. Samples are class-major: all of class 0 in sorted path order, then class 1, ...
* **Pixels.** Decoded by Pillow and converted to RGB (``channels=3``) or grayscale
  (``channels=1``); every image of a source must have the same size. Stored as uint8
  (N, C, H, W).
* **Decode once.** Decoding 60 000 small JPEGs takes tens of seconds, so each split is cached as
  raw uint8 under ``$XDG_CACHE_HOME/groupnorm/decoded`` (``~/.cache/groupnorm/decoded``), or,
  when that is not writable, under ``<first $GROUPNORM_DATA dir>/.groupnorm-cache``. A cache file
  is keyed by the source's identity (an archive's SHA-256; a directory's sorted list of relative
  paths, sizes and mtimes) and by ``channels``, and its payload carries a SHA-256 that is checked
  on every read: a stale cache is never found, a corrupt one is reported, deleted and rebuilt.
  All splits of a source are decoded in one pass over it and cached together.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import os
import tarfile
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from .dataset import DataFile, data_file
from .sources import CorruptDatasetError, DatasetNotFoundError, cache_dir

__all__ = ["FolderSplit", "read_image_folder", "is_archive", "IMAGE_EXTENSIONS"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
_ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz")
_MAGIC = b"GNIMGF\x00\x01"  # groupnorm image-folder cache, format 1
_MODES = {3: "RGB", 1: "L"}


class FolderSplit(NamedTuple):
    """One decoded split of an image folder."""

    images: torch.Tensor  # uint8 (N, C, H, W)
    labels: torch.Tensor  # int64 (N,), class-major
    classes: tuple[str, ...]  # class names by label (sorted)
    source: DataFile  # identity of the archive, or of the directory tree's files
    decode_seconds: float  # time the decode took (when it was decoded, even if cached since)
    cached: bool  # read from the decoded-image cache this time


def is_archive(path: Path) -> bool:
    """True for a path named like a tar archive (.tar, .tar.gz, .tgz)."""
    return path.name.endswith(_ARCHIVE_SUFFIXES)


# --------------------------------------------------------------------------- walking the source


def _image_members(source: Path) -> Iterator[tuple[str, bytes]]:
    """(relative path, bytes) of every image file under ``source``, in the order they are read."""
    if source.is_dir():
        for dirpath, dirnames, filenames in os.walk(source):
            dirnames.sort()
            for name in sorted(filenames):
                if name.lower().endswith(IMAGE_EXTENSIONS):
                    full = Path(dirpath) / name
                    yield full.relative_to(source).as_posix(), full.read_bytes()
        return
    try:
        # Stream mode: one sequential pass, each member read right after its header.
        with tarfile.open(source, "r|*") as tar:
            for member in tar:
                if member.isfile() and member.name.lower().endswith(IMAGE_EXTENSIONS):
                    f = tar.extractfile(member)
                    assert f is not None
                    yield member.name.lstrip("./"), f.read()
    except (tarfile.TarError, EOFError, OSError) as e:
        raise CorruptDatasetError(
            f"{source}: the archive is truncated or corrupt ({type(e).__name__}: {e}); get it "
            "again (or extract it and pass the folder)") from e


def _directory_key(source: Path) -> str:
    """SHA-256 of a directory's sorted (relative path, size, mtime) list of image files: changes
    whenever a file is added, removed, resized or rewritten, without reading any file."""
    h = hashlib.sha256()
    for dirpath, dirnames, filenames in os.walk(source):
        dirnames.sort()
        for name in sorted(filenames):
            if name.lower().endswith(IMAGE_EXTENSIONS):
                full = Path(dirpath) / name
                st = full.stat()
                h.update(f"{full.relative_to(source).as_posix()}\0{st.st_size}\0"
                         f"{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


@functools.lru_cache(maxsize=8)
def _archive_identity(path: str, size: int, mtime_ns: int) -> DataFile:
    """The archive's :class:`DataFile`, hashed once per process per (path, size, mtime)."""
    return data_file(path)


def archive_identity(path: Path) -> DataFile:
    """SHA-256 identity of an archive file (memoized in the process)."""
    st = path.stat()
    return _archive_identity(str(path.resolve()), st.st_size, st.st_mtime_ns)


# --------------------------------------------------------------------------- decoding


def _decode_image(data: bytes, where: str, mode: str, expect_mode: str | None) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()  # decode now: a truncated file fails here, not later
            if expect_mode is not None and im.mode != expect_mode:
                raise CorruptDatasetError(
                    f"{where}: image mode {im.mode}, expected {expect_mode}; this file does not "
                    "belong to the dataset: replace it with the original")
            if im.mode != mode:
                im = im.convert(mode)
            return np.asarray(im)
    except CorruptDatasetError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise CorruptDatasetError(
            f"{where}: not a readable JPEG/PNG image ({type(e).__name__}: {e}); the file is "
            "corrupt or truncated: replace it (extract or download the dataset again)") from e


def _decode_source(source: Path, split: str, channels: int,
                   expect_size: tuple[int, int] | None, expect_mode: str | None
                   ) -> tuple[dict[str, dict], DataFile]:
    """Decode every split of ``source`` in one pass.

    ``split`` (the one asked for) tells where the splits sit: at the top of the tree, or under
    one wrapping folder. Returns ({split: {"images", "labels", "classes"}}, identity); for a
    directory the identity hashes the content read, for an archive it is the archive's SHA-256.
    """
    mode = _MODES[channels]
    is_dir = source.is_dir()
    read: list[tuple[list[str], str, np.ndarray]] = []  # (path parts, where, pixels)
    manifest: list[str] = []  # directories: (relative path, size, sha256) of every file read
    total = 0
    first_size: tuple[tuple[int, int], str] | None = None
    for rel, data in _image_members(source):
        where = str(source / rel) if is_dir else f"{source}:{rel}"
        pixels = _decode_image(data, where, mode, expect_mode)
        size = (pixels.shape[1], pixels.shape[0])  # (width, height) as Pillow says it
        if expect_size is not None and size != expect_size:
            raise CorruptDatasetError(
                f"{where}: image size {size[0]}x{size[1]}, expected {expect_size[0]}x"
                f"{expect_size[1]}; this file does not belong to the dataset: replace it")
        if first_size is None:
            first_size = (size, where)
        elif size != first_size[0]:
            raise CorruptDatasetError(
                f"{where}: image size {size[0]}x{size[1]} differs from {first_size[1]} "
                f"({first_size[0][0]}x{first_size[0][1]}); every image of a folder must have "
                "the same size: resize them first")
        read.append((rel.split("/"), where, pixels))
        if is_dir:
            manifest.append(f"{rel}\0{len(data)}\0{hashlib.sha256(data).hexdigest()}\n")
            total += len(data)
    # The split level: 0 (train/cat/x.jpg) or 1 under one wrapping folder (cifar/train/cat/x.jpg).
    level = 0 if any(parts[0] == split for parts, _, _ in read) else 1
    if level == 1 and not (len({parts[0] for parts, _, _ in read}) == 1
                           and any(len(parts) > 1 and parts[1] == split for parts, _, _ in read)):
        found = sorted({parts[0] for parts, _, _ in read if len(parts) >= 3})
        raise DatasetNotFoundError(
            f"{source} has no {split!r} split directory (found {found or 'no images'}); the "
            "layout is <split>/<class>/<file>, e.g. train/cat/0001.jpg")
    decoded: dict[str, dict[str, dict[str, np.ndarray]]] = {}  # split -> class -> rest -> pixels
    for parts, where, pixels in read:
        if len(parts) < level + 3:
            raise CorruptDatasetError(
                f"{where}: an image outside the <split>/<class>/<file> layout; move it into a "
                "class directory or remove it")
        s, cls = parts[level], parts[level + 1]
        decoded.setdefault(s, {}).setdefault(cls, {})["/".join(parts[level + 2:])] = pixels
    class_sets = {s: sorted(classes) for s, classes in decoded.items()}
    reference_split = "train" if "train" in class_sets else split
    classes = class_sets[reference_split]
    for s, names in class_sets.items():
        if names != classes:
            missing = sorted(set(classes) - set(names))
            extra = sorted(set(names) - set(classes))
            raise CorruptDatasetError(
                f"{source}: split {s!r} has class directories {names}, but {reference_split!r} "
                f"has {classes} (missing in {s!r}: {missing}, extra: {extra}); every split "
                "needs the same classes: restore the missing directories")
    out = {}
    for s, by_class in decoded.items():
        arrays, labels = [], []
        for label, cls in enumerate(classes):
            for name in sorted(by_class[cls]):
                arrays.append(by_class[cls][name])
                labels.append(label)
        stacked = np.stack(arrays)  # (N, H, W) or (N, H, W, C)
        if stacked.ndim == 3:
            stacked = stacked[..., None]
        out[s] = {"images": np.ascontiguousarray(stacked.transpose(0, 3, 1, 2)),
                  "labels": np.asarray(labels, dtype=np.int64), "classes": tuple(classes)}
    if is_dir:
        identity = DataFile(str(source), total,
                            hashlib.sha256("".join(sorted(manifest)).encode()).hexdigest())
    else:
        identity = archive_identity(source)
    return out, identity


# --------------------------------------------------------------------------- the cache


def _cache_dirs() -> list[Path]:
    """Where decoded splits are looked for, in order; the first writable one is written."""
    dirs = [cache_dir() / "decoded"]
    env = os.environ.get("GROUPNORM_DATA")
    if env:
        dirs += [Path(p).expanduser() / ".groupnorm-cache" for p in env.split(os.pathsep) if p]
    return dirs


def _cache_name(key: str, channels: int, split: str) -> str:
    return f"image-folder-{key[:32]}-c{channels}-{split}.bin"


def _write_cache(path: Path, header: dict, images: np.ndarray, labels: np.ndarray) -> bool:
    """Write one split atomically (temp file + rename); False when the directory is not writable."""
    payload_hash = hashlib.sha256(images.data)
    payload_hash.update(labels.astype("<i8").data)
    head = json.dumps({**header, "payload_sha256": payload_hash.hexdigest()}).encode()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        with open(tmp, "wb") as f:
            f.write(_MAGIC + len(head).to_bytes(4, "little") + head)
            f.write(images.data)
            f.write(labels.astype("<i8").data)
        os.replace(tmp, path)
        return True
    except OSError:
        return False


def _read_cache(path: Path, expect: dict) -> tuple[dict, np.ndarray, np.ndarray] | None:
    """(header, images, labels) of a valid cache file; None when there is none. A file that fails
    a check is reported, deleted and treated as absent."""
    try:
        with open(path, "rb") as f:  # into a bytearray: the tensors share it and stay writable
            raw = bytearray(os.fstat(f.fileno()).st_size)
            f.readinto(raw)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as e:
        warnings.warn(f"{path}: cannot read the decoded-image cache ({e}); decoding again",
                      stacklevel=3)
        return None

    def corrupt(why: str) -> None:
        warnings.warn(f"{path}: decoded-image cache is corrupt ({why}); deleting it and decoding "
                      "the source again", stacklevel=4)
        path.unlink(missing_ok=True)

    if bytes(raw[:len(_MAGIC)]) != _MAGIC or len(raw) < len(_MAGIC) + 4:
        return corrupt("bad magic number")
    start = len(_MAGIC) + 4
    head_len = int.from_bytes(raw[len(_MAGIC):start], "little")
    try:
        header = json.loads(raw[start:start + head_len])
        n, c, h, w = header["shape"]
    except (ValueError, KeyError, TypeError) as e:
        return corrupt(f"unreadable header: {e}")
    for key, value in expect.items():
        if header.get(key) != value:
            return corrupt(f"header {key}={header.get(key)!r}, expected {value!r}")
    body = memoryview(raw)[start + head_len:]
    n_pixels = n * c * h * w
    if len(body) != n_pixels + 8 * n:
        return corrupt(f"{len(body)} payload bytes, expected {n_pixels + 8 * n}")
    if hashlib.sha256(body).hexdigest() != header.get("payload_sha256"):
        return corrupt("payload SHA-256 mismatch")
    images = np.frombuffer(body, dtype=np.uint8, count=n_pixels).reshape(n, c, h, w)
    labels = np.frombuffer(body[n_pixels:], dtype="<i8").astype(np.int64)
    return header, images, labels


def read_image_folder(source: str | os.PathLike, split: str, *, channels: int = 3,
                      expect_size: tuple[int, int] | None = None, expect_mode: str | None = None,
                      cache: bool = True) -> FolderSplit:
    """Read one split of an image folder (a directory or a .tar/.tar.gz), through the cache.

    Args:
        source: the folder holding ``<split>/<class>/<file>``, or an archive of it.
        split: the split directory's name ("train", "test", ...).
        channels: 3 (RGB) or 1 (grayscale); images are converted to it.
        expect_size: (width, height) every image must have (else CorruptDatasetError).
        expect_mode: the Pillow mode every image must be stored in, e.g. "RGB" (no conversion).
        cache: read and write the decoded-image cache.

    Raises:
        DatasetNotFoundError: ``source`` does not exist, or has no ``split`` directory.
        CorruptDatasetError: an unreadable image, a wrong size/mode, or splits with different
            class directories; the message names the file.
    """
    src = Path(source).expanduser()
    if channels not in _MODES:
        raise ValueError(f"channels must be 3 (RGB) or 1 (grayscale), got {channels!r}")
    if not src.exists():
        raise DatasetNotFoundError(f"image folder {src} does not exist; pass the folder holding "
                                   "<split>/<class>/<file>, or a .tar/.tar.gz of it")
    src = src.resolve()
    if not src.is_dir() and not is_archive(src):
        raise ValueError(f"{src} is neither a directory nor a .tar/.tar.gz/.tgz archive")
    key = _directory_key(src) if src.is_dir() else archive_identity(src).sha256
    expect = {"version": 1, "key": key, "channels": channels, "split": split}
    name = _cache_name(key, channels, split)
    if cache:
        for d in _cache_dirs():
            hit = _read_cache(d / name, expect)
            if hit is not None:
                header, images, labels = hit
                return FolderSplit(torch.from_numpy(images), torch.from_numpy(labels),
                                   tuple(header["classes"]), DataFile(*header["source"]),
                                   float(header["decode_seconds"]), True)
    t0 = time.perf_counter()
    splits, identity = _decode_source(src, split, channels, expect_size, expect_mode)
    seconds = time.perf_counter() - t0
    if split not in splits:
        raise DatasetNotFoundError(
            f"{src} has no {split!r} split directory (found {sorted(splits)}); the layout is "
            "<split>/<class>/<file>, e.g. train/cat/0001.jpg")
    if cache:
        for d in _cache_dirs():
            written = all(
                _write_cache(d / _cache_name(key, channels, s),
                             {**expect, "split": s, "source_path": str(src),
                              "shape": list(part["images"].shape), "classes": part["classes"],
                              "source": list(identity), "decode_seconds": seconds},
                             part["images"], part["labels"])
                for s, part in splits.items())
            if written:
                break
        else:
            warnings.warn(f"no writable cache directory among {[str(d) for d in _cache_dirs()]}; "
                          f"{src} will be decoded again in the next process", stacklevel=2)
    part = splits[split]
    return FolderSplit(torch.from_numpy(part["images"]), torch.from_numpy(part["labels"]),
                       part["classes"], identity, seconds, False)
