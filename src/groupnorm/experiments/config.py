"""Run configuration: one dataclass read top to bottom, TOML presets, and `key=value` overrides.

A preset is a TOML file with a `[defaults]` table (fields of `TrainConfig`) and any number of
`[[study]]` tables, each with a `name`, a `kind` (what the report does with it), optional fixed
`set` overrides and a `grid` of field -> list of values. A dict value replaces the whole dict
field (`norm_options = { group_size = 1 }` drops the default num_groups); a quoted dotted key
changes one entry: `"norm_options.num_groups" = [1, 2, 4]`. Grid keys vary last-fastest.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import tomllib
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any


@dataclass
class TrainConfig:
    """Everything that decides one training run's numbers (plus a few runtime knobs)."""

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
    # --- runtime (not part of the run's identity: see RUNTIME_FIELDS) ---
    seed: int = 0  # torch seed and loader shuffle seed
    device: str = "cpu"  # cpu | cuda | cuda:1 ...
    num_threads: int = 0  # torch CPU threads; 0 = leave torch's default
    deterministic: bool = True  # torch.use_deterministic_algorithms (CPU numbers bit-identical)
    progress: bool = True  # tqdm bars when stdout is a terminal, log lines otherwise

    def __post_init__(self) -> None:
        _validate(self)

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form of the config, stored with every run."""
        return dataclasses.asdict(self)

    def identity(self) -> dict[str, Any]:
        """The fields that decide the run's numbers (the config hash is over these)."""
        return {k: v for k, v in self.to_dict().items() if k not in RUNTIME_FIELDS}

    def config_hash(self) -> str:
        """Stable 16-hex-digit hash of `identity()`; one run per hash in a results database."""
        blob = json.dumps(self.identity(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def step_lr(self, phase: str = "train") -> float:
        """The learning rate after batch-size scaling (LR = lr * n / ref_batch, paper)."""
        if phase == "pretrain":
            base, n = (self.pretrain_lr if self.pretrain_lr is not None else self.lr), (
                self.pretrain_batch_size
            )
        else:
            base, n = self.lr, self.batch_size
        return base * n / self.ref_batch if self.lr_scaling == "linear" else base


# Fields that do not change a run's numbers on a given device, or that a user may change when
# resuming (device, threads, progress bars). Seed IS part of the identity.
RUNTIME_FIELDS = frozenset({"device", "num_threads", "progress"})

_CHOICES = {
    "optimizer": ("sgd", "adam", "adamw"),
    "lr_scaling": ("linear", "none"),
    "schedule": ("step", "cosine", "constant"),
    "val_split": ("test", "train"),
}


def _validate(cfg: TrainConfig) -> None:
    for name, choices in _CHOICES.items():
        value = getattr(cfg, name)
        if value not in choices:
            raise ValueError(f"{name}={value!r} is not one of {choices}")
    for name in ("batch_size", "workers", "epochs", "eval_batch_size", "ref_batch", "report_last"):
        value = getattr(cfg, name)
        if not isinstance(value, int) or value < (0 if name == "epochs" else 1):
            raise ValueError(f"{name}={value!r} must be a positive integer")
    if cfg.pretrain_epochs < 0:
        raise ValueError(f"pretrain_epochs={cfg.pretrain_epochs} must be >= 0")
    if any(not 0.0 < m <= 1.0 for m in cfg.milestones):
        raise ValueError(
            f"milestones={cfg.milestones} are fractions of training; use values in (0, 1], "
            "e.g. [0.3, 0.6, 0.9] for the paper's epochs 30, 60, 90 of 100"
        )


# ---------------------------------------------------------------------------------------------
# overrides


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
        raise ValueError(f"override {text!r} must look like key=value (e.g. norm=gn or seed=0,1)")
    key, _, value = text.partition("=")
    key = key.strip()
    check_key(key)
    return key, split_values(value.strip())


def check_key(key: str) -> None:
    """Raise a ValueError naming the known fields if `key` (maybe dotted) is not a config field."""
    root = key.split(".", 1)[0]
    fields = config_fields()
    if root not in fields:
        known = ", ".join(sorted(fields))
        raise ValueError(f"unknown config field {root!r}; known fields: {known}")
    if "." in key and not isinstance(TrainConfig().to_dict()[root], dict):
        raise ValueError(f"{root!r} is not a dict field, so {key!r} cannot use a dotted key")


def _coerce(key: str, value: Any) -> Any:
    """Turn a parsed value into the field's type where it is unambiguous (int -> float, etc.)."""
    if "." in key:
        return value
    hint = config_fields()[key]
    if value is None:
        return None
    if hint in (float, float | None) and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is str and not isinstance(value, str):
        return str(value)
    if typing.get_origin(hint) is list and not isinstance(value, list):
        return [value]
    return value


def apply_overrides(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Return a copy of the config dict `base` with (maybe dotted) `overrides` applied."""
    out = copy.deepcopy(base)
    for key, value in overrides.items():
        check_key(key)
        if "." in key:
            root, sub = key.split(".", 1)
            out.setdefault(root, {})
            out[root] = dict(out[root] or {})
            out[root][sub] = value
        else:
            out[key] = _coerce(key, value)
    return out


def make_config(values: dict[str, Any]) -> TrainConfig:
    """Build a TrainConfig from a (possibly partial, possibly dotted) dict of field values."""
    merged = apply_overrides(TrainConfig().to_dict(), values)
    return TrainConfig(**merged)


# ---------------------------------------------------------------------------------------------
# presets


@dataclass
class Study:
    """One study of a preset: a grid of runs that the report turns into one table/figure."""

    name: str  # unique within the preset, e.g. "batch_size"
    kind: str  # batch | norms | groups | batch_renorm | ws | finetune | video | grid
    description: str = ""  # one line shown in the report
    set: dict[str, Any] = field(default_factory=dict)  # fixed overrides of the preset defaults
    grid: dict[str, list[Any]] = field(default_factory=dict)  # field -> values (product)


@dataclass
class Preset:
    """A named set of defaults and studies, loaded from TOML."""

    name: str
    description: str
    defaults: dict[str, Any]
    studies: list[Study]

    def expand(
        self, overrides: dict[str, list[Any]] | None = None, studies: list[str] | None = None
    ) -> list[tuple[Study, TrainConfig]]:
        """All (study, config) pairs; single-valued overrides fix a field, lists become axes."""
        overrides = overrides or {}
        pairs: list[tuple[Study, TrainConfig]] = []
        chosen = self.studies
        if studies:
            unknown = sorted(set(studies) - {s.name for s in self.studies})
            if unknown:
                names = ", ".join(s.name for s in self.studies)
                raise ValueError(f"unknown studies {unknown} in preset {self.name!r}; have {names}")
            chosen = [s for s in self.studies if s.name in studies]
        for study in chosen:
            grid = dict(study.grid)
            fixed = {**self.defaults, **study.set}
            for key, values in overrides.items():
                if len(values) == 1:
                    fixed[key] = values[0]
                    grid.pop(key, None)
                else:
                    grid[key] = values
            for combo in grid_product(grid):
                pairs.append((study, make_config({**fixed, **combo})))
        return pairs


def grid_product(grid: dict[str, list[Any]]) -> list[dict[str, Any]]:
    """Cartesian product of a field -> values grid, in the grid's key order (last key fastest)."""
    combos: list[dict[str, Any]] = [{}]
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise ValueError(f"grid value for {key!r} must be a non-empty list, got {values!r}")
        combos = [{**c, key: v} for c in combos for v in values]
    return combos


def list_presets() -> list[str]:
    """Names of the presets shipped in groupnorm/presets/."""
    root = resources.files("groupnorm").joinpath("presets")
    return sorted(p.name[:-5] for p in root.iterdir() if p.name.endswith(".toml"))


def load_preset(name_or_path: str | Path) -> Preset:
    """Load a shipped preset by name (`quick`) or any TOML file by path."""
    path = Path(name_or_path)
    if path.suffix == ".toml" or path.exists():
        text, name = path.read_text(), path.stem
    else:
        res = resources.files("groupnorm").joinpath("presets", f"{name_or_path}.toml")
        if not res.is_file():
            raise ValueError(
                f"no preset {str(name_or_path)!r}; shipped presets: {', '.join(list_presets())} "
                "(or pass a path to a .toml file)"
            )
        text, name = res.read_text(), str(name_or_path)
    return parse_preset(tomllib.loads(text), name)


def parse_preset(data: dict[str, Any], name: str) -> Preset:
    """Build a Preset from parsed TOML, checking every key against TrainConfig's fields."""
    defaults = dict(data.get("defaults", {}))
    for key in defaults:
        check_key(key)
    studies = []
    for raw in data.get("study", []):
        known = {"name", "kind", "description", "set", "grid"}
        extra = set(raw) - known
        if extra:
            raise ValueError(f"study {raw.get('name')!r} has unknown keys {sorted(extra)}")
        study = Study(
            name=raw["name"],
            kind=raw.get("kind", "grid"),
            description=raw.get("description", ""),
            set=dict(raw.get("set", {})),
            grid=dict(raw.get("grid", {})),
        )
        for key in (*study.set, *study.grid):
            check_key(key)
        studies.append(study)
    if not studies:
        studies = [Study(name=name, kind="grid")]
    return Preset(name=name, description=data.get("description", ""), defaults=defaults,
                  studies=studies)
