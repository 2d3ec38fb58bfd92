"""A run's configuration: one dataclass read top to bottom, checked when it is built.

``TrainConfig`` holds everything that decides a run's numbers plus two runtime knobs (device,
progress). Every field is checked for type and range as the object is built, so a bad value
fails with one line naming the field, the value and the fix, before any run is queued:

    >>> make_config({"lr": "nan"})
    ConfigError: lr=nan: must be a finite number > 0 (e.g. lr=0.1)

Overrides come as ``key=value`` text (``--set``): values are parsed as TOML (numbers, booleans,
lists), and a dotted key reaches into a dict field (``norm_options.num_groups=8``). The dotted
keys are read and written here and nowhere else (:func:`set_dotted`, :func:`flatten`).

A run's identity is its config minus the runtime knobs; ``config_hash()`` is a short hash of it
and names the run in a results database. To add a field: give it a default and a comment below,
a rule in ``_RULES`` if its type alone does not say what is allowed, and, if runs recorded before
it existed implicitly used one value, put that value in ``HASHED_WHEN_NOT`` so that their hashes
(and so the done runs of existing databases) stay valid.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import hashlib
import json
import math
import re
import tomllib
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


class ConfigError(ValueError):
    """A configuration value that cannot run; the message names the field, value and fix."""


@dataclass
class TrainConfig:
    """Everything that decides one training run's numbers (plus the device and progress bars)."""

    # --- model ---
    model: str = "simplenet"  # a name from groupnorm.models.list_models()
    norm: str = "gn"  # bn | gn | ln | in | brn | syncbn | none, optionally "+ws" (gn+ws)
    norm_options: dict[str, Any] = field(default_factory=dict)  # e.g. num_groups, group_size, r_max
    model_options: dict[str, Any] = field(default_factory=dict)  # extra create_model kwargs
    zero_init_residual: bool = True  # gamma = 0 for the last norm of each residual block (paper)
    # --- data ---
    dataset: str = "fashion-mnist"  # a name for groupnorm.data.load_dataset
    dataset_options: dict[str, Any] = field(default_factory=dict)  # e.g. synthetic n, image_size
    train_size: int | None = None  # fixed training subset (drawn with data_seed); None = all
    val_split: str = "test"  # "test": evaluate on the test split; "train": hold out val_size
    val_size: int | None = None  # evaluation subset size; None = the whole split
    data_seed: int = 0  # seed of the subset draws: fixed, so every run sees the same data
    augment: bool = False  # the loader's train-time augmentation
    # --- batch and virtual workers ---
    batch_size: int = 32  # n: images per worker, the batch that BN statistics see
    workers: int = 8  # W: virtual workers; one optimizer step takes W*n images
    eval_batch_size: int = 1000  # evaluation batch (no effect on the numbers: eval stats are fixed)
    # --- optimisation ---
    epochs: int = 10  # the same for every batch size (paper)
    optimizer: str = "sgd"  # sgd | adam | adamw
    lr: float = 0.1  # base learning rate, for ref_batch images per worker
    ref_batch: int = 32  # LR = lr * batch_size / ref_batch when lr_scaling == "linear"
    lr_scaling: str = "linear"  # linear | none
    momentum: float = 0.9  # SGD momentum (Adam beta1 is left at its default)
    nesterov: bool = False  # SGD Nesterov momentum
    weight_decay: float = 1e-4  # L2 on the weights
    wd_norm: bool = True  # also decay gamma/beta and biases (paper: yes)
    schedule: str = "step"  # step | cosine | constant
    milestones: list[float] = field(default_factory=lambda: [0.3, 0.6, 0.9])  # fractions of epochs
    lr_decay: float = 0.1  # step schedule factor at every milestone
    warmup_epochs: float = 0.0  # linear warm-up from warmup_factor * LR over this many epochs
    warmup_factor: float = 0.1  # LR multiplier at the first step of warm-up
    label_smoothing: float = 0.0  # cross-entropy label smoothing
    # --- fine-tuning study: pretrain at a large batch, then train `epochs` more at batch_size ---
    pretrain_epochs: int = 0  # 0 = no pretraining phase
    pretrain_batch_size: int = 32  # n during pretraining
    pretrain_lr: float | None = None  # base LR of pretraining; None = lr
    # --- evaluation and reporting ---
    report_last: int = 5  # reported error = median val error of the last report_last epochs (paper)
    # the epochs before the last report_last are evaluated on a fixed subset of this many val
    # images (drawn with data_seed; the curves only), the last report_last on the whole val set
    # (the reported number); None: the whole val set every epoch
    val_curve_size: int | None = None
    # --- how the numbers are computed ---
    seed: int = 0  # torch seed and loader shuffle seed
    num_threads: int = 1  # torch CPU threads: part of the identity (float sums split by thread)
    deterministic: bool = True  # torch.use_deterministic_algorithms (CPU numbers bit-identical)
    # model and batches in channels-last memory format (a BN step 1.3-1.8x faster on CPU,
    # BENCHMARKS.md); the kernels then sum in another order, so it is part of the identity
    channels_last: bool = False
    # --- runtime (not part of the run's identity: see RUNTIME_FIELDS) ---
    device: str = "cpu"  # cpu | cuda | cuda:1 ...
    progress: bool = True  # tqdm bars when stdout is a terminal, log lines otherwise

    def __post_init__(self) -> None:
        _validate(self)

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form of the config, stored with every run."""
        return dataclasses.asdict(self)

    def identity(self) -> dict[str, Any]:
        """The fields that decide the run's numbers."""
        return identity_of(self.to_dict())

    def config_hash(self) -> str:
        """Stable 16-hex-digit hash of the identity; one run per hash in a results database."""
        ident = {k: v for k, v in self.identity().items()
                 if not (k in HASHED_WHEN_NOT and v == HASHED_WHEN_NOT[k])}
        blob = json.dumps(ident, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def step_lr(self, phase: str = "train") -> float:
        """The learning rate after batch-size scaling (LR = lr * n / ref_batch, paper)."""
        if phase == "pretrain":
            base = self.pretrain_lr if self.pretrain_lr is not None else self.lr
            n = self.pretrain_batch_size
        else:
            base, n = self.lr, self.batch_size
        return base * n / self.ref_batch if self.lr_scaling == "linear" else base


# Fields a user may change when resuming a run: they do not change its numbers on a device.
RUNTIME_FIELDS = frozenset({"device", "progress"})

# Fields that became part of the identity after results were first recorded, with the value
# those runs used; a field at that value is left out of the hash, so earlier hashes stay valid.
# (Shipped presets always ran num_threads = 1; a database row recorded with another value under
# the same hash is refused when enqueued, see Store.enqueue.) Runs before channels_last and
# val_curve_size existed ran NCHW and evaluated the whole val set every epoch.
HASHED_WHEN_NOT: dict[str, Any] = {"num_threads": 1, "channels_last": False,
                                   "val_curve_size": None}


def identity_of(config: dict[str, Any]) -> dict[str, Any]:
    """The identity of a stored config dict (fields it lacks take today's defaults)."""
    full = {**_defaults(), **config}
    return {k: v for k, v in full.items() if k not in RUNTIME_FIELDS}


def _defaults() -> dict[str, Any]:
    return {f.name: (f.default_factory() if f.default_factory is not dataclasses.MISSING
                     else f.default) for f in dataclasses.fields(TrainConfig)}


# ---------------------------------------------------------------------------------------------
# checks: type from the annotation, range from _RULES


def _finite(v: float) -> bool:
    return math.isfinite(v)


_DEVICE = re.compile(r"^(cpu|cuda(:\d+)?)$")

# field -> (allowed?, what "allowed" is, in words with an example)
_RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "val_split": (lambda v: v in ("test", "train"), "'test' or 'train'"),
    "optimizer": (lambda v: v in ("sgd", "adam", "adamw"), "one of sgd, adam, adamw"),
    "lr_scaling": (lambda v: v in ("linear", "none"), "'linear' or 'none'"),
    "schedule": (lambda v: v in ("step", "cosine", "constant"), "one of step, cosine, constant"),
    "device": (lambda v: bool(_DEVICE.match(v)), "cpu, cuda or cuda:K (e.g. device=cpu)"),
    "model": (bool, "a model name (e.g. model=simplenet)"),
    "norm": (bool, "a norm name (e.g. norm=gn)"),
    "dataset": (bool, "a dataset name (e.g. dataset=fashion-mnist)"),
    "train_size": (lambda v: v is None or v >= 1, "an integer >= 1, or none for all"),
    "val_size": (lambda v: v is None or v >= 1, "an integer >= 1, or none for the whole split"),
    "val_curve_size": (lambda v: v is None or v >= 1,
                       "an integer >= 1, or none to evaluate the whole val set every epoch"),
    "data_seed": (lambda v: v >= 0, "an integer >= 0"),
    "seed": (lambda v: v >= 0, "an integer >= 0 (e.g. seed=0)"),
    "batch_size": (lambda v: v >= 1, "an integer >= 1 (e.g. batch_size=32)"),
    "workers": (lambda v: v >= 1, "an integer >= 1 (e.g. workers=8)"),
    "eval_batch_size": (lambda v: v >= 1, "an integer >= 1"),
    "epochs": (lambda v: v >= 1, "an integer >= 1 (e.g. epochs=10)"),
    "ref_batch": (lambda v: v >= 1, "an integer >= 1 (e.g. ref_batch=32)"),
    "report_last": (lambda v: v >= 1, "an integer >= 1 (e.g. report_last=5)"),
    "pretrain_epochs": (lambda v: v >= 0, "an integer >= 0 (0: no pretraining)"),
    "pretrain_batch_size": (lambda v: v >= 1, "an integer >= 1"),
    "num_threads": (lambda v: v >= 1, "an integer >= 1 (e.g. num_threads=1)"),
    "lr": (lambda v: _finite(v) and v > 0, "a finite number > 0 (e.g. lr=0.1)"),
    "pretrain_lr": (lambda v: v is None or (_finite(v) and v > 0),
                    "a finite number > 0, or none for lr"),
    "momentum": (lambda v: _finite(v) and 0 <= v < 1, "a number in [0, 1) (e.g. momentum=0.9)"),
    "weight_decay": (lambda v: _finite(v) and v >= 0,
                     "a finite number >= 0 (e.g. weight_decay=1e-4)"),
    "lr_decay": (lambda v: _finite(v) and 0 < v <= 1, "a number in (0, 1] (e.g. lr_decay=0.1)"),
    "warmup_epochs": (lambda v: _finite(v) and v >= 0, "a finite number >= 0"),
    "warmup_factor": (lambda v: _finite(v) and 0 <= v <= 1, "a number in [0, 1]"),
    "label_smoothing": (lambda v: _finite(v) and 0 <= v < 1, "a number in [0, 1)"),
    "milestones": (lambda v: all(_finite(m) and 0 < m <= 1 for m in v),
                   "fractions of training in (0, 1], e.g. [0.3, 0.6, 0.9] for the paper's "
                   "epochs 30, 60, 90 of 100"),
}


def _type_ok(value: Any, hint: Any) -> bool:
    """Whether `value` has the annotated type (bool is not an int; an int is not a float here:
    make_config converts ints to floats first)."""
    if hint is Any:
        return True
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, h) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if origin is list:
        (item,) = typing.get_args(hint)
        return isinstance(value, list) and all(_type_ok(v, item) for v in value)
    if origin is dict:
        return isinstance(value, dict) and all(isinstance(k, str) for k in value)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, float)
    return isinstance(value, hint)


def _type_words(hint: Any) -> str:
    words = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}
    if typing.get_origin(hint) is list:
        return "a list of numbers"
    if typing.get_origin(hint) is dict:
        return "a table of options (e.g. {num_groups = 8})"
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if args:
        return words.get(args[0], str(args[0])) + " or none"
    return words.get(hint, str(hint))


def _validate(cfg: TrainConfig) -> None:
    hints = config_fields()
    for name, hint in hints.items():
        value = getattr(cfg, name)
        rule = _RULES.get(name)
        if not _type_ok(value, hint):
            # a rule's words say the type too ("an integer >= 1"), except for names and choices
            words = rule[1] if rule is not None and hint is not str else _type_words(hint)
            raise ConfigError(f"{name}={value!r}: must be {words}")
        if rule is not None and not rule[0](value):
            raise ConfigError(f"{name}={value!r}: must be {rule[1]}")
    if cfg.val_split == "train" and cfg.val_size is None:
        raise ConfigError("val_split='train' needs val_size, the number of training images held "
                          "out for evaluation (e.g. val_size=5000)")
    if cfg.nesterov and (cfg.optimizer != "sgd" or cfg.momentum == 0):
        raise ConfigError(f"nesterov=true needs optimizer='sgd' with momentum > 0 (have "
                          f"optimizer={cfg.optimizer!r}, momentum={cfg.momentum}); set "
                          "nesterov=false or momentum=0.9")


# ---------------------------------------------------------------------------------------------
# overrides and dotted keys


@functools.cache
def config_fields() -> dict[str, Any]:
    """Field name -> resolved type annotation of TrainConfig."""
    return typing.get_type_hints(TrainConfig)


def parse_value(text: str) -> Any:
    """Parse one command-line value as TOML (numbers, booleans, lists), else keep the string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        low = text.lower()
        if low in ("none", "null"):
            return None
        return text


def split_values(text: str) -> list[Any]:
    """Split `a,b,c` into parsed values; brackets keep a list value whole: `[0.5,0.75],[0.9]`."""
    parts, depth, cur = [], 0, ""
    for ch in text:
        if ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    parts.append(cur)
    return [parse_value(p.strip()) for p in parts]


def parse_assignment(text: str) -> tuple[str, list[Any]]:
    """Parse `key=v1,v2` into (key, [v1, v2]); the key is checked against TrainConfig's fields."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key=value (e.g. norm=gn or "
                          "seed=0,1)")
    key, _, value = text.partition("=")
    key = key.strip()
    check_key(key)
    return key, split_values(value.strip())


def check_key(key: str) -> None:
    """Raise a ConfigError naming the known fields if `key` (maybe dotted) is not a config field."""
    root = key.split(".", 1)[0]
    fields = config_fields()
    if root not in fields:
        known = ", ".join(sorted(fields))
        raise ConfigError(f"unknown config field {root!r}; known fields: {known}")
    if "." in key and typing.get_origin(fields[root]) is not dict:
        raise ConfigError(f"{root!r} is not a dict field, so {key!r} cannot use a dotted key")


def set_dotted(config: dict[str, Any], key: str, value: Any) -> None:
    """Set `key` in a config dict; `a.b` sets entry b of dict field a (a copy of that dict)."""
    if "." in key:
        root, sub = key.split(".", 1)
        config[root] = {**(config.get(root) or {}), sub: value}
    else:
        config[key] = value


def flatten(config: dict[str, Any]) -> dict[str, Any]:
    """A config dict with its dict fields spread into dotted keys (norm_options.num_groups)."""
    out: dict[str, Any] = {}
    for k, v in config.items():
        if isinstance(v, dict):
            for sk, sv in v.items():
                out[f"{k}.{sk}"] = sv
        else:
            out[k] = v
    return out


def _coerce(key: str, value: Any) -> Any:
    """Turn a parsed value into the field's type where it is unambiguous (int -> float, etc.)."""
    if "." in key:
        return value
    hint = config_fields()[key]
    if hint is str:  # `--norm none` is the name "none", and a name may look like a number
        return "none" if value is None else value if isinstance(value, str) else str(value)
    if value is None:
        return None
    if hint in (float, float | None) and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if typing.get_origin(hint) is list:
        items = value if isinstance(value, list) else [value]
        return [float(v) if isinstance(v, int) and not isinstance(v, bool) else v for v in items]
    return value


def apply_overrides(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Return a copy of the config dict `base` with (maybe dotted) `overrides` applied."""
    out = copy.deepcopy(base)
    for key, value in overrides.items():
        check_key(key)
        set_dotted(out, key, _coerce(key, value))
    return out


def make_config(values: dict[str, Any]) -> TrainConfig:
    """Build a TrainConfig from a (possibly partial, possibly dotted) dict of field values."""
    merged = apply_overrides(TrainConfig().to_dict(), values)
    return TrainConfig(**merged)
