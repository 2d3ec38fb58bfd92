"""Presets: TOML files of defaults and studies, expanded into one TrainConfig per grid point.

A preset has an optional `description` and `out` (the folder `groupnorm reproduce` writes to
without --out; default results/<name>), a `[defaults]` table (fields of `TrainConfig`) and any
number of `[[study]]` tables, each with a `name`, a `kind` (what the report does with it, one
of ``STUDY_KINDS``), optional fixed `set` overrides and a `grid` of field -> list of values. A
dict value replaces the whole dict field (`norm_options = { group_size = 1 }` drops the default
num_groups); a quoted dotted key changes one entry: `"norm_options.num_groups" = [1, 2, 4]`.
Grid keys vary last-fastest.

A study's description may name config fields in braces (``{epochs} epochs``, ``{n_seeds}
seeds``): the report fills them from the runs actually recorded, so the text follows the
overrides a sweep was run with.

Every problem with a preset file -- TOML syntax, an unknown key, a value of the wrong type --
is a :class:`ConfigError` that names the file and the study.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from .config import ConfigError, TrainConfig, check_key, flatten, make_config

#: What a study is, for the report (groupnorm.experiments.kinds says how each is shown).
STUDY_KINDS = ("batch", "norms", "groups", "batch_renorm", "ws", "finetune", "video", "grid")


@dataclass
class Study:
    """One study of a preset: a grid of runs that the report turns into one table/figure."""

    name: str  # unique within the preset, e.g. "batch_size"
    kind: str  # one of STUDY_KINDS
    description: str = ""  # shown in the report; {field} is filled from the recorded runs
    set: dict[str, Any] = field(default_factory=dict)  # fixed overrides of the preset defaults
    grid: dict[str, list[Any]] = field(default_factory=dict)  # field -> values (product)

    def varying(self, overrides: dict[str, list[Any]]) -> list[str]:
        """Fields that take several values in this study (after command-line overrides)."""
        keys = [k for k, v in self.grid.items() if len(v) > 1 and k not in overrides]
        return keys + [k for k, v in overrides.items() if len(v) > 1]


@dataclass
class Point:
    """One grid point of a study: the config and a short label over the study's varying keys."""

    study: Study
    config: TrainConfig
    label: str


@dataclass
class Preset:
    """A named set of defaults and studies, loaded from TOML."""

    name: str
    description: str
    defaults: dict[str, Any]
    studies: list[Study]
    # results folder of `groupnorm reproduce` without --out (None: results/<name>); lets a
    # renamed preset keep pointing at the evidence it produced
    out: str | None = None

    def expand(self, overrides: dict[str, list[Any]] | None = None,
               studies: list[str] | None = None) -> list[Point]:
        """Every grid point; single-valued overrides fix a field, lists become axes.

        Raises ConfigError naming the study and the grid point when a point is not a valid
        config (nothing has been queued by then).
        """
        overrides = overrides or {}
        chosen = self.studies
        if studies:
            unknown = sorted(set(studies) - {s.name for s in self.studies})
            if unknown:
                names = ", ".join(s.name for s in self.studies)
                raise ConfigError(f"unknown studies {unknown} in preset {self.name!r}; have "
                                  f"{names}")
            chosen = [s for s in self.studies if s.name in studies]
        points: list[Point] = []
        for study in chosen:
            grid = dict(study.grid)
            fixed = {**self.defaults, **study.set}
            for key, values in overrides.items():
                if len(values) == 1:
                    fixed[key] = values[0]
                    grid.pop(key, None)
                else:
                    grid[key] = values
            keys = study.varying(overrides)
            for combo in grid_product(grid):
                try:
                    cfg = make_config({**fixed, **combo})
                except ConfigError as exc:
                    where = " ".join(f"{k}={v}" for k, v in combo.items())
                    where = f" ({where})" if where else ""
                    raise ConfigError(f"study {study.name!r}{where}: {exc}") from None
                points.append(Point(study, cfg, _label(cfg, keys)))
        return points


def _label(cfg: TrainConfig, keys: list[str]) -> str:
    flat = flatten(cfg.to_dict())
    return " ".join(f"{k.split('.')[-1]}={flat.get(k)}" for k in keys) or cfg.config_hash()


def grid_product(grid: dict[str, list[Any]]) -> list[dict[str, Any]]:
    """Cartesian product of a field -> values grid, in the grid's key order (last key fastest)."""
    combos: list[dict[str, Any]] = [{}]
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise ConfigError(f"grid value for {key!r} must be a non-empty list, got {values!r}")
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
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"cannot read preset {path}: {exc}") from None
        name, source = path.stem, str(path)
    else:
        res = resources.files("groupnorm").joinpath("presets", f"{name_or_path}.toml")
        if not res.is_file():
            raise ConfigError(
                f"no preset {str(name_or_path)!r}; shipped presets: {', '.join(list_presets())} "
                "(or pass a path to a .toml file)")
        text, name, source = res.read_text(encoding="utf-8"), str(name_or_path), str(res)
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"preset {source} is not valid TOML: {exc}") from None
    try:
        return parse_preset(data, name)
    except ConfigError as exc:
        raise ConfigError(f"preset {source}: {exc}") from None


def parse_preset(data: dict[str, Any], name: str) -> Preset:
    """Build a Preset from parsed TOML, checking every key against TrainConfig's fields."""
    extra = sorted(set(data) - {"description", "out", "defaults", "study"})
    if extra:
        raise ConfigError(f"unknown top-level keys {extra}; a preset has description, out, "
                          "[defaults] and [[study]] tables")
    out = data.get("out")
    if out is not None and (not isinstance(out, str) or not out):
        raise ConfigError(f"out={out!r}: must be a folder name such as \"results/cifar10\"")
    defaults = _table(data.get("defaults", {}), "[defaults]")
    for key in defaults:
        check_key(key)
    raw_studies = data.get("study", [])
    if not isinstance(raw_studies, list):
        raise ConfigError("`study` must be an array of tables: write [[study]], not [study]")
    studies = []
    for i, raw in enumerate(raw_studies, 1):
        raw = _table(raw, f"study #{i}")
        where = f"study {raw.get('name', '#' + str(i))!r}"
        extra = sorted(set(raw) - {"name", "kind", "description", "set", "grid"})
        if extra:
            raise ConfigError(f"{where} has unknown keys {extra}; a study has name, kind, "
                              "description, set and grid")
        if not isinstance(raw.get("name"), str) or not raw["name"]:
            raise ConfigError(f"{where} needs a name (name = \"batch_size\")")
        kind = raw.get("kind", "grid")
        if kind not in STUDY_KINDS:
            raise ConfigError(f"{where}: kind={kind!r} is not one of {', '.join(STUDY_KINDS)}")
        study = Study(name=raw["name"], kind=kind, description=str(raw.get("description", "")),
                      set=_table(raw.get("set", {}), f"{where} set"),
                      grid=_table(raw.get("grid", {}), f"{where} grid"))
        for key in (*study.set, *study.grid):
            try:
                check_key(key)
            except ConfigError as exc:
                raise ConfigError(f"{where}: {exc}") from None
        for key, values in study.grid.items():
            if not isinstance(values, list) or not values:
                raise ConfigError(f"{where}: grid value of {key!r} must be a non-empty list, "
                                  f"got {values!r} (write {key} = [{values!r}])")
        studies.append(study)
    if not studies:
        studies = [Study(name=name, kind="grid")]
    if len({s.name for s in studies}) != len(studies):
        raise ConfigError("two studies have the same name")
    return Preset(name=name, description=str(data.get("description", "")), defaults=defaults,
                  studies=studies, out=out)


def _table(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ConfigError(f"{where} must be a table, got {value!r}")
    return dict(value)
