"""Typed recipe: YAML (safe_load) + dotted command-line overrides → a validated `Recipe`, once.

Every error names where the value came from (the recipe file or the command line), the dotted key, and
what is allowed.
"""

from __future__ import annotations

import dataclasses
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lipnext_scale.data.loader_base import AUGMENTS
from lipnext_scale.model.lipnext import SIZES


class ConfigError(ValueError):
    pass


def _choices(*values: str) -> dict:
    return {"choices": values}


def _range(lo: float | None = None, hi: float | None = None, *, lo_open: bool = False) -> dict:
    return {"range": (lo, hi, lo_open)}


@dataclass
class ModelConfig:
    size: str = field(default="L6W64", metadata=_choices(*SIZES))
    image_size: int = field(default=32, metadata=_range(1))
    patch: int = field(default=2, metadata=_range(1))
    num_classes: int = field(default=10, metadata=_range(2))
    alpha: float = field(default=1 / 8, metadata=_range(0, 0.25))
    beta: float = field(default=0.5, metadata=_range(0, 1))
    checkpoint_every: int = field(default=0, metadata=_range(0))
    # torch.compile each block's forward (needs a C++ compiler on CPUs, Triton on GPUs).
    compile: bool = False


@dataclass
class DataConfig:
    source: str = field(default="digits", metadata=_choices("digits", "shards"))
    # digits: shards are written under `root` (default: <output_dir>/data). shards: manifests written by
    # tools/make_shards.py.
    root: str = ""
    train_manifest: str = ""
    val_manifest: str = ""
    batch_size: int = field(default=64, metadata=_range(1))
    eval_batch_size: int = field(default=256, metadata=_range(1))
    augment: str = field(default="none", metadata=_choices(*AUGMENTS))
    backend: str = field(default="auto", metadata=_choices("auto", "dali", "wds"))


@dataclass
class OptimConfig:
    lr: float = field(default=1e-3, metadata=_range(0, lo_open=True))
    euclidean_lr: float = field(default=1e-3, metadata=_range(0, lo_open=True))
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = field(default=1e-8, metadata=_range(0, lo_open=True))
    weight_decay: float = field(default=0.0, metadata=_range(0))
    euclidean: str = field(default="nadam", metadata=_choices("nadam", "adamw"))
    warmup_epochs: float = field(default=1.0, metadata=_range(0))
    min_lr_ratio: float = field(default=0.0, metadata=_range(0, 1))
    lookahead_k: int = field(default=5, metadata=_range(0))
    lookahead_alpha: float = field(default=0.5, metadata=_range(0, 1, lo_open=True))
    reorthogonalize_every: int = field(default=100, metadata=_range(0))
    grad_clip: float = field(default=1.0, metadata=_range(0))


@dataclass
class TrainConfig:
    epochs: int = field(default=10, metadata=_range(1))
    max_steps: int = field(default=0, metadata=_range(0))
    precision: str = field(default="auto", metadata=_choices("auto", "bf16", "fp32"))
    loss: str = field(default="emma", metadata=_choices("emma", "ce"))
    eps: float = field(default=36 / 255, metadata=_range(0, lo_open=True))
    eps_ramp: tuple[float, float] = (0.1, 3.0)
    seed: int = 0
    log_every: int = field(default=10, metadata=_range(1))
    # Per-rank micro-batch; 0 = data.batch_size / ranks (no gradient accumulation).
    micro_batch_size: int = field(default=0, metadata=_range(0))
    # Non-finite steps are skipped on every rank; this many in a row stop the run.
    max_consecutive_skips: int = field(default=10, metadata=_range(1))


@dataclass
class CertifyConfig:
    eps: list[float] = field(default_factory=lambda: [36 / 255, 72 / 255, 108 / 255, 1.0])
    batch_size: int = field(default=256, metadata=_range(1))
    # Published CRA of the configuration this recipe reproduces, as [ε, CRA in [0, 1]] pairs, and where
    # they are published; tools/certify.py draws them beside the measured curve. Empty: none drawn.
    reported_cra: list[tuple[float, float]] = field(default_factory=list)
    reported_source: str = ""


@dataclass
class RunConfig:
    output_dir: str = "runs/quickstart"
    # Weights & Biases logging (offline unless WANDB_MODE is set; `wandb sync <output_dir>/wandb/...` later).
    wandb: bool = False
    wandb_project: str = "lipnext_scale"
    # Checkpoints go to <output_dir>/checkpoints every n optimizer steps and/or every m minutes of wall
    # time (0 = off), on a stop signal (SIGINT/SIGTERM/SIGUSR1) and at the end.
    checkpoint_every: int = field(default=0, metadata=_range(0))
    checkpoint_minutes: float = field(default=0.0, metadata=_range(0))
    keep_checkpoints: int = field(default=2, metadata=_range(1))
    # Continue from the newest complete checkpoint in <output_dir>/checkpoints when there is one.
    resume: bool = True
    # A rank waiting this long in a collective (another rank died or hangs) stops the run with an error.
    collective_timeout_s: float = field(default=300.0, metadata=_range(0, lo_open=True))


@dataclass
class Recipe:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    certify: CertifyConfig = field(default_factory=CertifyConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


_FRACTION = re.compile(r"^\s*(-?\d+(?:\.\d*)?)\s*/\s*(\d+(?:\.\d*)?)\s*$")


def _parse_float(value: Any) -> float:
    # Radii are conventionally written 36/255; YAML reads that as a string.
    if isinstance(value, str) and (m := _FRACTION.match(value)):
        return float(m.group(1)) / float(m.group(2))
    if isinstance(value, str):
        # YAML 1.1 reads 5e-3 (no dot) as a string.
        try:
            return float(value)
        except ValueError:
            raise TypeError("a number (or a fraction such as 36/255)") from None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError("a number (or a fraction such as 36/255)")
    return float(value)


def _coerce(value: Any, tp: Any) -> Any:
    origin = typing.get_origin(tp)
    if tp is bool:
        if not isinstance(value, bool):
            raise TypeError("true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError("an integer")
        return value
    if tp is float:
        return _parse_float(value)
    if tp is str:
        if not isinstance(value, str):
            raise TypeError("a string")
        return value
    if origin in (list, tuple):
        args = typing.get_args(tp)
        if not isinstance(value, list | tuple):
            raise TypeError(f"a list ({tp})")
        if origin is tuple:
            if len(value) != len(args):
                raise TypeError(f"a list of exactly {len(args)} values")
            return tuple(_coerce(v, a) for v, a in zip(value, args))
        return [_coerce(v, args[0]) for v in value]
    raise TypeError(f"unsupported type {tp}")


def _check_metadata(value: Any, meta: typing.Mapping) -> str | None:
    if "choices" in meta and value not in meta["choices"]:
        return f"one of {', '.join(map(str, meta['choices']))}"
    if "range" in meta:
        lo, hi, lo_open = meta["range"]
        if lo is not None and (value <= lo if lo_open else value < lo):
            return f"{'>' if lo_open else '≥'} {lo}" + (f" and ≤ {hi}" if hi is not None else "")
        if hi is not None and value > hi:
            return f"≤ {hi}" + (f" and {'>' if lo_open else '≥'} {lo}" if lo is not None else "")
    return None


def _build_section(cls: type, raw: dict, section: str, source: str, overridden: dict[str, str]) -> Any:
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in known:
            raise ConfigError(
                f"{source}: unknown key '{section}.{key}'; allowed keys in '{section}': {', '.join(known)}"
            )
    values = {}
    for name, f in known.items():
        if name not in raw:
            continue
        key = f"{section}.{name}"
        where = f"{source}, command-line override '{overridden[key]}'" if key in overridden else source
        try:
            values[name] = _coerce(raw[name], hints[name])
        except TypeError as exc:
            raise ConfigError(f"{where}: '{key}' is {raw[name]!r}; expected {exc}") from None
        problem = _check_metadata(values[name], f.metadata)
        if problem:
            raise ConfigError(f"{where}: '{key}' is {raw[name]!r}; allowed: {problem}")
    return cls(**values)


def _validate_across_fields(recipe: Recipe, source: str) -> None:
    m, d, o, t = recipe.model, recipe.data, recipe.optim, recipe.train
    if m.image_size % m.patch:
        raise ConfigError(
            f"{source}: 'model.patch' = {m.patch} does not divide 'model.image_size' = {m.image_size}; "
            "allowed: a divisor of the image size"
        )
    if not 0 <= o.betas[0] < 1 or not 0 <= o.betas[1] < 1:
        raise ConfigError(f"{source}: 'optim.betas' is {list(o.betas)}; allowed: each in [0, 1)")
    if t.eps_ramp[0] < 0 or t.eps_ramp[1] < 0:
        raise ConfigError(f"{source}: 'train.eps_ramp' is {list(t.eps_ramp)}; allowed: non-negative factors")
    if d.source == "shards" and not (d.train_manifest and d.val_manifest):
        raise ConfigError(
            f"{source}: 'data.source' is 'shards' but 'data.train_manifest' / 'data.val_manifest' "
            "are not set; allowed: paths to manifests written by tools/make_shards.py"
        )
    c = recipe.certify
    if any(e <= 0 for e in c.eps):
        raise ConfigError(f"{source}: 'certify.eps' is {c.eps}; allowed: positive radii")
    bad = [list(pair) for pair in c.reported_cra if not (pair[0] > 0 and 0 <= pair[1] <= 1)]
    if bad:
        raise ConfigError(
            f"{source}: 'certify.reported_cra' has {bad}; allowed: [eps > 0, CRA in [0, 1]] pairs"
        )
    if c.reported_cra and not c.reported_source.strip():
        raise ConfigError(
            f"{source}: 'certify.reported_cra' is set but 'certify.reported_source' is empty; "
            "allowed: the publication and table the numbers come from"
        )


def apply_overrides(raw: dict, overrides: list[str]) -> dict[str, str]:
    """Apply `section.key=value` pairs (values parsed as YAML) onto the raw recipe dict in place.

    Returns {dotted key: the override text} so that errors can point at the command line.
    """
    applied = {}
    for item in overrides:
        key, sep, text = item.partition("=")
        parts = key.split(".")
        if not sep or len(parts) != 2 or not all(parts):
            raise ConfigError(f"command line: override {item!r} is not of the form section.key=value")
        section, name = parts
        if section not in {f.name for f in dataclasses.fields(Recipe)}:
            raise ConfigError(
                f"command line: unknown section '{section}' in {item!r}; "
                f"allowed: {', '.join(f.name for f in dataclasses.fields(Recipe))}"
            )
        if not isinstance(raw.setdefault(section, {}), dict):
            raise ConfigError(f"command line: cannot override {item!r}: section '{section}' is not a mapping")
        raw[section][name] = yaml.safe_load(text)
        applied[key] = item
    return applied


def recipe_from_dict(raw: Any, source: str, overridden: dict[str, str] | None = None) -> Recipe:
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: a recipe is a mapping of sections, got {type(raw).__name__}")
    sections = {f.name: f for f in dataclasses.fields(Recipe)}
    hints = typing.get_type_hints(Recipe)
    built = {}
    for section, content in raw.items():
        if section not in sections:
            raise ConfigError(f"{source}: unknown section '{section}'; allowed: {', '.join(sections)}")
        if content is None:
            content = {}
        if not isinstance(content, dict):
            raise ConfigError(f"{source}: section '{section}' must be a mapping, got {content!r}")
        built[section] = _build_section(hints[section], content, section, source, overridden or {})
    recipe = Recipe(**built)
    _validate_across_fields(recipe, source)
    return recipe


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: recipe file not found") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    raw = raw if raw is not None else {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a recipe is a mapping of sections, got {type(raw).__name__}")
    overridden = apply_overrides(raw, list(overrides))
    return recipe_from_dict(raw, str(path), overridden)


__all__ = [
    "CertifyConfig",
    "ConfigError",
    "DataConfig",
    "ModelConfig",
    "OptimConfig",
    "Recipe",
    "RunConfig",
    "TrainConfig",
    "load_recipe",
    "recipe_from_dict",
]
