"""Where dataset files come from: the search path, checksummed downloads, and the errors.

Search order (first directory that holds every file a split needs wins):

1. the explicit ``root=`` argument,
2. ``$GROUPNORM_DATA``,
3. standard system locations (``/usr/share/datasets/<name>/``, where Debian's
   ``dataset-fashion-mnist`` package installs the IDX files),
4. the user cache ``$XDG_CACHE_HOME/groupnorm`` (default ``~/.cache/groupnorm``),

each tried as-is and with the dataset's usual sub-folder names (``<base>/fashion-mnist``,
``<base>/FashionMNIST/raw`` as torchvision lays it out, ...). When nothing is found and
``download=True``, the official files are fetched into ``root`` (or the cache) and verified against
their published MD5 before anything reads them; a failed download ends in the same
:class:`DatasetNotFoundError`, which says what to install or which files to put where.

Downloads are checked against the MD5 of the published file. Local copies may be re-compressed by
their packagers (Debian's Fashion-MNIST ``.gz`` files differ byte-wise from Zalando's while
decoding to the same IDX data), so the readers check them structurally (magic numbers, header
sizes, exact payload length) and, when a file has the official size, check the MD5 of its
*decoded* content against the published one.
"""

from __future__ import annotations

import hashlib
import os
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "DatasetNotFoundError", "CorruptDatasetError", "Remote", "search_dirs", "cache_dir",
    "find_files", "download", "md5sum",
]

#: Seconds to wait for a server before giving up on a download (the CI machine has no network).
DOWNLOAD_TIMEOUT_S = 20.0


class DatasetNotFoundError(FileNotFoundError):
    """No directory on the search path holds the files a dataset split needs."""


class CorruptDatasetError(ValueError):
    """A dataset file exists but is truncated, has the wrong format, or fails its checksum."""


@dataclass(frozen=True)
class Remote:
    """One official file: where to fetch it and the MD5 it must have."""

    filename: str  # name on disk, e.g. "train-images-idx3-ubyte.gz"
    url: str  # official (or official mirror) URL
    md5: str  # published checksum of the file as downloaded
    mirrors: tuple[str, ...] = ()  # further URLs of the same file, tried in order after url


def cache_dir() -> Path:
    """The user cache for downloads: ``$XDG_CACHE_HOME/groupnorm`` or ``~/.cache/groupnorm``."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "groupnorm"


def search_dirs(root: str | os.PathLike | None, subdirs: Sequence[str],
                system: Sequence[str]) -> list[Path]:
    """Candidate directories in search order, each base tried as-is then with each sub-folder."""
    bases: list[Path] = []
    if root is not None:
        bases.append(Path(root).expanduser())
    env = os.environ.get("GROUPNORM_DATA")
    if env:
        bases.extend(Path(p).expanduser() for p in env.split(os.pathsep) if p)
    out: list[Path] = []
    for base in bases:
        out.append(base)
        out.extend(base / s for s in subdirs)
    out.extend(Path(s) for s in system)
    cache = cache_dir()
    out.append(cache)
    out.extend(cache / s for s in subdirs)
    seen: set[Path] = set()
    return [d for d in out if not (d in seen or seen.add(d))]


def find_files(dirs: Sequence[Path], alternatives: Sequence[Sequence[str]]) -> list[Path] | None:
    """The first directory holding one spelling of every required file, as paths; else None.

    ``alternatives[i]`` lists accepted names for required file i (e.g. the ``.gz`` and the raw
    IDX name), the first existing one wins.
    """
    for d in dirs:
        if not d.is_dir():
            continue
        found = []
        for names in alternatives:
            hit = next((d / n for n in names if (d / n).is_file()), None)
            if hit is None:
                break
            found.append(hit)
        else:
            return found
    return None


def md5sum(path: Path, chunk: int = 1 << 20) -> str:
    """Hex MD5 of a file (integrity check against the published value, not security)."""
    h = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _fetch(url: str, part: Path, md5: str) -> None:
    """Write ``url`` to ``part`` and check its MD5 (CorruptDatasetError on a mismatch)."""
    with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as resp, open(part, "wb") as f:
        while block := resp.read(1 << 20):
            f.write(block)
    got = md5sum(part)
    if got != md5:
        raise CorruptDatasetError(
            f"downloaded {url} has MD5 {got}, expected {md5}; the transfer was corrupted or the "
            "server changed the file")


def download(remotes: Sequence[Remote], dest: Path) -> None:
    """Fetch each file into ``dest`` (its URL, then its mirrors) and verify its MD5.

    A file is written to ``<name>.part`` and renamed only after its checksum matches, so an
    interrupted or corrupted transfer never leaves a file that a reader would pick up. Raises
    ``OSError`` naming every URL tried and why it failed when no source delivers a file.
    """
    dest.mkdir(parents=True, exist_ok=True)
    for r in remotes:
        target = dest / r.filename
        if target.is_file() and md5sum(target) == r.md5:
            continue
        part = dest / (r.filename + ".part")
        failures = []
        for url in (r.url, *r.mirrors):
            try:
                _fetch(url, part, r.md5)
                part.replace(target)
                break
            except (OSError, urllib.error.URLError, CorruptDatasetError) as e:
                failures.append(f"{url}: {type(e).__name__}: {e}")
            finally:
                part.unlink(missing_ok=True)
        else:
            raise OSError(f"could not download {r.filename}: " + "; ".join(failures))


def not_found_message(title: str, split: str, dirs: Sequence[Path],
                      files: Sequence[str], how: str, download_error: str | None,
                      downloadable: bool = True) -> str:
    """The text of a :class:`DatasetNotFoundError`: what was looked for, where, and the fix."""
    where = "\n".join(f"  - {d}" for d in dirs)
    if not downloadable:
        dl = "\n(no official download exists for this dataset)"
    elif download_error:
        dl = f"\nDownload failed: {download_error}"
    else:
        dl = "\n(download=False, so no download was attempted)"
    return (f"{title} ({split} split) not found. Looked for {', '.join(files)} in:\n{where}{dl}\n"
            f"Fix: {how} Or put the files in one of the directories above, pass root=..., or set "
            "GROUPNORM_DATA=<dir>.")


def try_download(remotes: Sequence[Remote], root: str | os.PathLike | None,
                 subdir: str) -> tuple[Path | None, str | None]:
    """Download into ``root`` (or the cache) / ``subdir``; return (dir, None) or (None, why)."""
    dest = (Path(root).expanduser() if root is not None else cache_dir()) / subdir
    existed = dest.exists()
    try:
        download(remotes, dest)
    except (OSError, urllib.error.URLError, CorruptDatasetError) as e:
        if not existed and dest.is_dir() and not any(dest.iterdir()):
            dest.rmdir()  # leave no empty folder behind a failed download
        return None, f"{type(e).__name__}: {e}"
    return dest, None
