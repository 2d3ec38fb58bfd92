"""File-format readers: IDX (MNIST family) and CIFAR python pickles, strict about their input.

Every reader checks what it decodes against what the format promises (magic numbers, header
dimensions, exact payload length, array shapes, label ranges) and raises
:class:`~groupnorm.data.sources.CorruptDatasetError` naming the file and the expected value, so a
truncated download can never turn into a silently smaller training set.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib
import io
import math
import pickle
import tarfile
import zlib
from pathlib import Path

import numpy as np
import torch

from .sources import CorruptDatasetError

__all__ = ["read_idx", "read_cifar_batch", "read_cifar_batches", "IDX_IMAGES", "IDX_LABELS"]

IDX_LABELS = 0x00000801  # 2049: unsigned byte, 1 dim
IDX_IMAGES = 0x00000803  # 2051: unsigned byte, 3 dims
_GZIP_ERRORS = (EOFError, zlib.error, gzip.BadGzipFile, OSError)


def _read_bytes(path: Path) -> bytes:
    """The (decompressed, for ``.gz``) content of a file, or a CorruptDatasetError naming it."""
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                return f.read()
        return path.read_bytes()
    except _GZIP_ERRORS as e:
        raise CorruptDatasetError(
            f"{path}: the gzip stream is truncated or corrupt ({type(e).__name__}: {e}); delete "
            "the file and download or reinstall it") from e


def _check_official(data: bytes, where: str, official_md5: str) -> None:
    """Raise CorruptDatasetError unless ``data`` (a file's decoded content) has the published MD5.

    Called for files whose header claims the official dataset (its exact size or sample count),
    so that a flipped byte, which no structural check sees, is still caught.
    """
    got = hashlib.md5(data, usedforsecurity=False).hexdigest()
    if got != official_md5:
        raise CorruptDatasetError(
            f"{where}: has the size of the official file but its content fails the checksum: MD5 "
            f"{got}, expected {official_md5}; the file is corrupt: delete it and download or "
            "reinstall it")


def read_idx(path: str | Path, magic: int, official: tuple[int, str] | None = None
             ) -> torch.Tensor:
    """Decode one IDX file (``.gz`` or raw) whose header must carry ``magic``; a uint8 tensor.

    IDX layout: 4-byte big-endian magic ``0x0000 <dtype=0x08> <ndim>``, then ``ndim`` big-endian
    int32 sizes, then exactly prod(sizes) bytes. ``official = (size, md5)`` of the decoded
    official file: content of exactly that size must have that MD5 (other sizes are other data
    sets in the same format and get the structural checks only).
    """
    path = Path(path)
    data = _read_bytes(path)
    kind = {IDX_IMAGES: "images, uint8 with 3 dims", IDX_LABELS: "labels, uint8 with 1 dim"}
    if len(data) < 4 or int.from_bytes(data[:4], "big") != magic:
        got = data[:4].hex() if len(data) >= 4 else f"only {len(data)} bytes"
        raise CorruptDatasetError(
            f"{path}: bad IDX magic number {got}, expected {magic:#010x} "
            f"({kind.get(magic, 'IDX')}); is this the right file (images vs labels), or corrupt?")
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise CorruptDatasetError(
            f"{path}: truncated IDX header: {len(data)} bytes, expected at least {header}")
    dims = tuple(int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
    expected = header + math.prod(dims)
    if len(data) != expected:
        what = "truncated" if len(data) < expected else "has trailing bytes"
        raise CorruptDatasetError(
            f"{path}: {what}: {len(data)} bytes, expected {expected} (header {header} + payload "
            f"for dims {dims}); delete the file and download or reinstall it")
    if official is not None and len(data) == official[0]:
        _check_official(data, str(path), official[1])
    arr = np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims)
    return torch.from_numpy(arr.copy())


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickler that rebuilds numpy arrays and plain containers and nothing else.

    The CIFAR batches are Python pickles; loading a pickle can run arbitrary code, so only the
    globals a numpy array needs are allowed (``numpy.core`` is mapped to numpy 2's ``numpy._core``),
    plus ``_codecs.encode``, which Python 3 uses to pickle ``bytes`` at protocol 2.
    """

    _ALLOWED = {(m, n) for m in ("numpy.core.multiarray", "numpy._core.multiarray")
                for n in ("_reconstruct", "scalar")}
    _ALLOWED |= {("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}

    def find_class(self, module: str, name: str):  # noqa: ANN201 - pickle protocol
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(
                f"global {module}.{name} is not allowed in a dataset pickle")
        if module.startswith("numpy.core") and hasattr(np, "_core"):
            module = module.replace("numpy.core", "numpy._core", 1)
        return getattr(importlib.import_module(module), name)


def _unpickle(raw: bytes, where: str) -> dict:
    try:
        obj = _ArrayUnpickler(io.BytesIO(raw), encoding="bytes").load()
    except Exception as e:  # noqa: BLE001 - any decoding failure means a corrupt file
        raise CorruptDatasetError(
            f"{where}: not a readable CIFAR python pickle ({type(e).__name__}: {e}); it is "
            "truncated or corrupt: delete it and download or re-extract it") from e
    if not isinstance(obj, dict):
        raise CorruptDatasetError(
            f"{where}: expected a pickled dict with 'data' and labels, got {type(obj).__name__}")
    return {(k.decode("latin1") if isinstance(k, bytes) else k): v for k, v in obj.items()}


def read_cifar_batch(raw: bytes, where: str, label_key: str,
                     official: tuple[int, str] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode one CIFAR batch pickle into uint8 images (N, 3, 32, 32) and int64 labels (N,).

    ``official = (images, md5)`` of the official batch: a batch of exactly that many images must
    be byte-identical to it.
    """
    d = _unpickle(raw, where)
    if "data" not in d or label_key not in d:
        raise CorruptDatasetError(
            f"{where}: CIFAR batch must hold 'data' and '{label_key}', found keys {sorted(d)}")
    data = np.asarray(d["data"])
    labels = np.asarray(d[label_key])
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise CorruptDatasetError(
            f"{where}: CIFAR 'data' must be uint8 of shape (N, 3072), got {data.dtype} "
            f"{data.shape}")
    if labels.shape != (data.shape[0],):
        raise CorruptDatasetError(
            f"{where}: {labels.shape[0] if labels.ndim else 0} labels for {data.shape[0]} images; "
            "the file is truncated or corrupt")
    if official is not None and data.shape[0] == official[0]:
        _check_official(raw, where, official[1])
    images = torch.from_numpy(data.reshape(-1, 3, 32, 32).copy())
    return images, torch.from_numpy(labels.astype(np.int64))


def read_cifar_batches(source: Path, members: list[str], label_key: str,
                       official: dict[str, tuple[int, str]] | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Read and concatenate CIFAR batches from a directory or from the official ``.tar.gz``.

    In a tarball, ``members`` are looked up by their path inside the archive (for example
    ``cifar-10-batches-py/data_batch_1``); in a directory, by file name. ``official`` maps a
    member's file name to (images, md5) of the official batch (see :func:`read_cifar_batch`).
    """
    official = official or {}
    parts = []
    if source.is_dir():
        for m in members:
            p = source / Path(m).name
            parts.append(read_cifar_batch(p.read_bytes(), str(p), label_key,
                                          official.get(p.name)))
    else:
        try:
            with tarfile.open(source, "r:gz") as tar:
                for m in members:
                    try:
                        f = tar.extractfile(m)
                    except KeyError:
                        f = None
                    if f is None:
                        raise CorruptDatasetError(
                            f"{source}: archive has no member {m!r}; expected the official CIFAR "
                            "python tarball")
                    parts.append(read_cifar_batch(f.read(), f"{source}:{m}", label_key,
                                                  official.get(Path(m).name)))
        except (tarfile.TarError, *_GZIP_ERRORS) as e:
            raise CorruptDatasetError(
                f"{source}: the tar.gz archive is truncated or corrupt ({type(e).__name__}: {e}); "
                "delete it and download it again") from e
    images = torch.cat([p[0] for p in parts])
    labels = torch.cat([p[1] for p in parts])
    return images, labels
