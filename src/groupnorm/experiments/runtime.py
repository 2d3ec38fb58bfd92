"""What a run needs from the machine: device, torchrun, threads, RNG, checkpoints, who we are.

This is the only module of the harness that reads the environment (``WORLD_SIZE``, ``RANK``,
``LOCAL_RANK``, ``GROUPNORM_DEBUG``), the host name, process ids and the git checkout.

Checkpoints are written atomically (temp file in the same folder, fsync, ``os.replace``: a kill
leaves the previous checkpoint or the new one, never a partial file under the name) and carry a
header line with a SHA-256 of their content, the run's config hash, the id of the record they
belong to (a results database or a run folder) and their epoch. :func:`load_checkpoint` checks
all of these before it unpickles anything, and raises :class:`CheckpointMismatch` naming the
file and what did not match.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import functools
import hashlib
import io
import json
import os
import random
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .config import ConfigError

# ---------------------------------------------------------------------------------------------
# the environment


def debug_enabled() -> bool:
    """GROUPNORM_DEBUG=1: show tracebacks for expected errors too (as --debug does)."""
    return os.environ.get("GROUPNORM_DEBUG", "") not in ("", "0")


def stdout_is_terminal() -> bool:
    """Whether progress bars make sense (else the harness logs one line per epoch)."""
    return sys.stdout.isatty()


class Progress:
    """A tqdm bar over an epoch's steps on a terminal; elsewhere nothing (the run logs a plain
    line per epoch instead)."""

    def __init__(self, total: int, desc: str, enabled: bool) -> None:
        self.bar = None
        if enabled and stdout_is_terminal():
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True)

    def update(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def utc_now() -> str:
    """Current UTC time as an ISO-8601 string with seconds."""
    return _dt.datetime.now(_dt.UTC).replace(microsecond=0).isoformat()


def host_name() -> str:
    """This machine's name, as owner ids record it."""
    return socket.gethostname()


def pid() -> int:
    """This process's id."""
    return os.getpid()


def exit_with_parent(parent: int) -> None:
    """Stop this process (as a kill would) once process `parent` is no longer its parent: a
    SIGKILLed sweep leaves no worker training on behind its back."""
    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def owner_id(pid: int | None = None) -> str:
    """host:pid of this process (or of `pid` on this host), recorded on the runs it runs."""
    return f"{host_name()}:{os.getpid() if pid is None else pid}"


def owner_state(owner: str | None) -> str:
    """'alive', 'dead' or 'unknown' (another host: its processes cannot be checked from here)."""
    if not owner or ":" not in owner:
        return "dead"
    host, _, pid = owner.rpartition(":")
    if host != host_name():
        return "unknown"
    try:
        os.kill(int(pid), 0)
    except (ProcessLookupError, ValueError):
        return "dead"
    except PermissionError:
        return "alive"
    return "alive"


def git_code_version(package_dir: Path) -> str | None:
    """``git:<describe>`` of the checkout holding ``package_dir``, or None outside a checkout.

    ``-dirty`` is added when a file under ``package_dir`` (the code a run imports) differs from
    the commit or is new and not ignored; changes elsewhere in the checkout (a results database a
    sweep is writing, docs) leave the version clean, because they do not change what ran.
    """
    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", *args], cwd=package_dir, capture_output=True, text=True,
                                 timeout=5)
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout if out.returncode == 0 else None

    described = git("describe", "--always", "--tags")
    if not described or not described.strip():
        return None
    status = git("status", "--porcelain", "--untracked-files=normal", "--", ".")
    dirty = "-dirty" if status is None or status.strip() else ""
    return "git:" + described.strip() + dirty


@functools.cache
def code_version() -> str:
    """`git describe` of the package's source when it is a checkout, else the package version.

    Read once per process, so a run records the code its process loaded, not what the working
    tree holds by the time it is claimed. See `git_code_version` for what counts as dirty.
    """
    version_here = git_code_version(Path(__file__).resolve().parent.parent)
    if version_here is not None:
        return version_here
    from importlib.metadata import PackageNotFoundError, version

    try:
        return "groupnorm " + version("groupnorm")
    except PackageNotFoundError:
        return "unknown"


# ---------------------------------------------------------------------------------------------
# device, torchrun, threads


@dataclass(frozen=True)
class Dist:
    """This process's place in a torchrun job (world_size 1 when not distributed)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def dist_info() -> Dist:
    """Where torchrun put this process (read from its environment; joins nothing)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    return Dist(int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0")))


def init_distributed(device: str) -> Dist:
    """Join the torchrun process group if there is one (gloo on CPU, nccl on CUDA)."""
    d = dist_info()
    if d.enabled:
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
    return d


def from_main(d: Dist, value: Any) -> Any:
    """Rank 0's `value` on every rank (so that every rank resumes from the same epoch)."""
    if not d.enabled:
        return value
    box = [value]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def barrier(d: Dist) -> None:
    """Wait for every rank (no-op outside torchrun)."""
    if d.enabled:
        torch.distributed.barrier()


def leave_distributed() -> None:
    """Tear down the process group, if one was joined."""
    if dist_info().enabled:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def check_device(device: str) -> None:
    """Raise ConfigError if `device` cannot run here (checked before anything is queued)."""
    if device == "cpu":
        return
    if not torch.cuda.is_available():
        raise ConfigError(f"device={device!r}: CUDA is not available on this machine; use "
                          "device=cpu (--device cpu)")
    index = int(device.partition(":")[2] or 0)
    if index >= torch.cuda.device_count():
        raise ConfigError(f"device={device!r}: this machine has {torch.cuda.device_count()} "
                          f"GPU(s), cuda:0..cuda:{torch.cuda.device_count() - 1}")


def resolve_device(device: str, d: Dist) -> torch.device:
    """The torch device; under torchrun, plain "cuda" means this rank's local GPU."""
    check_device(device)
    if device.startswith("cuda"):
        if device == "cuda" and d.enabled:
            device = f"cuda:{d.local_rank}"
        torch.cuda.set_device(torch.device(device))
    return torch.device(device)


def configure_torch(num_threads: int, deterministic: bool, device: torch.device) -> None:
    """Thread count and deterministic kernels, as the config asks."""
    torch.set_num_threads(num_threads)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = False


def device_description(device: str) -> str:
    """What a run ran on, for its record: the device plus the CPU model and the vector ISA torch
    uses (CPU results are bit-identical only on the same kind of CPU), or the GPU's name."""
    if device.startswith("cuda") and torch.cuda.is_available():
        dev = torch.device(device)
        name = torch.cuda.get_device_name(dev)
        cap = ".".join(map(str, torch.cuda.get_device_capability(dev)))
        return f"{device} ({name}, sm {cap}, CUDA {torch.version.cuda})"
    from groupnorm._sysinfo import cpu_model

    isa = torch.backends.cpu.get_cpu_capability()
    return f"{device} ({cpu_model() or 'unknown CPU'}, {isa})"


# ---------------------------------------------------------------------------------------------
# random number generators


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """Every RNG state a run draws from, for the checkpoint."""
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what rng_state() saved."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------------------------------------
# checkpoints

_MAGIC = b"groupnorm-checkpoint 2\n"


class CheckpointMismatch(Exception):
    """A checkpoint that must not be resumed (damaged, of another config or another record)."""


@dataclass(frozen=True)
class CheckpointKey:
    """What a checkpoint belongs to: one config of one record (database or run folder)."""

    config_hash: str
    record_id: str


def save_checkpoint(path: Path, key: CheckpointKey, epoch: int, payload: dict[str, Any]) -> None:
    """Write a checkpoint atomically, with a header that load_checkpoint verifies."""
    buf = io.BytesIO()
    torch.save(payload, buf)
    body = buf.getvalue()
    header = {"config_hash": key.config_hash, "record_id": key.record_id, "epoch": epoch,
              "size": len(body), "sha256": hashlib.sha256(body).hexdigest()}
    replace_file(path, _MAGIC + json.dumps(header, sort_keys=True).encode() + b"\n" + body)


def replace_file(path: Path, blob: bytes) -> None:
    """Write `blob` to `path` atomically: a temp file in the same folder (named after this
    process, so a sweep can tell a live writer's from a dead one's), fsync, os.replace."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(blob)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def load_checkpoint(path: Path, key: CheckpointKey, map_location: Any = None
                    ) -> tuple[int, dict[str, Any]]:
    """(epoch, payload) of a checkpoint that belongs to `key` and is intact; else raise
    CheckpointMismatch. Nothing is unpickled before the content hash has matched."""
    try:
        blob = path.read_bytes()
    except OSError as exc:
        raise CheckpointMismatch(f"cannot read it ({exc})") from None
    if not blob.startswith(_MAGIC):
        raise CheckpointMismatch("it is not a checkpoint of this version of groupnorm")
    head, _, body = blob[len(_MAGIC):].partition(b"\n")
    try:
        header = json.loads(head)
        size, digest = int(header["size"]), str(header["sha256"])
    except (ValueError, KeyError, TypeError):
        raise CheckpointMismatch("its header is damaged") from None
    if len(body) != size or hashlib.sha256(body).hexdigest() != digest:
        raise CheckpointMismatch("its content does not match its SHA-256: the file is damaged")
    if header.get("config_hash") != key.config_hash:
        raise CheckpointMismatch(f"it belongs to config {header.get('config_hash')}, not "
                                 f"{key.config_hash}")
    if header.get("record_id") != key.record_id:
        raise CheckpointMismatch(
            f"it belongs to another results database or run folder (id "
            f"{header.get('record_id')}, this one is {key.record_id}): the record it was "
            "written for was deleted or replaced")
    try:
        payload = torch.load(io.BytesIO(body), map_location=map_location, weights_only=False)
    except Exception as exc:  # any unpickling failure means: do not resume
        raise CheckpointMismatch(f"it cannot be loaded ({type(exc).__name__}: {exc})") from None
    return int(header["epoch"]), payload
