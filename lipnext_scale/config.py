"""Typed recipe: YAML (safe_load) + dotted command-line overrides → a validated `Recipe`, once.

Every error names where the value came from (the recipe file or the command line), the dotted key, and
what is allowed.
"""

from __future__ import annotations

import dataclasses
import difflib
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


def _choices(*values: str, help: str = "") -> dict:
    return {"choices": values, "help": help}


def _range(
    lo: float | None = None, hi: float | None = None, *, lo_open: bool = False, help: str = ""
) -> dict:
    return {"range": (lo, hi, lo_open), "help": help}


def _help(text: str) -> dict:
    return {"help": text}


# Every field carries its `help`: README.md's recipe-key table is generated from these
# (`python tools/check_readme.py keys --write`), and tests/test_readme.py keeps the two equal.


@dataclass
class ModelConfig:
    size: str = field(
        default="L6W64",
        metadata=_choices(
            *SIZES, help="`L{depth}W{width}`, 2·depth·width² weights (L32W1024: 67M; L32W4096: 1.07B)"
        ),
    )
    image_size: int = field(default=32, metadata=_range(1, help="input side in pixels"))
    patch: int = field(default=2, metadata=_range(1, help="patch side P; must divide `image_size`"))
    num_classes: int = field(default=10, metadata=_range(2, help="classes"))
    alpha: float = field(
        default=1 / 8, metadata=_range(0, 0.25, help="shift ratio α: 4α·W channels are shifted")
    )
    beta: float = field(default=0.5, metadata=_range(0, 1, help="β-Abs ratio: |·| on the first β·W channels"))
    activation_checkpointing: int | str = field(
        default=0,
        metadata={
            "words": ("auto",),
            **_range(
                0,
                help="recompute blocks 0, k, 2k, … in backward (1 = every block; 0 = off); `auto`: the "
                "memory planner picks the least recomputation that fits the GPU (its memory; 80 GiB "
                "elsewhere). Not the training checkpoints of `run.checkpoint_every`; formerly "
                "`model.checkpoint_every`",
            ),
        },
    )
    compile: bool = field(
        default=False,
        metadata=_help(
            "`torch.compile` each block (same parameter names, gradients within 1e-6 of eager; needs a C++ "
            "compiler on CPUs, Triton on GPUs)"
        ),
    )


@dataclass
class DataConfig:
    source: str = field(
        default="digits",
        metadata=_choices(
            "digits", "shards", help="`digits` (the quickstart's, written under `data.root`) or `shards`"
        ),
    )
    root: str = field(
        default="", metadata=_help("where digits shards are written (empty: `<output_dir>/data`)")
    )
    train_manifest: str = field(
        default="", metadata=_help("training manifest from `tools/make_shards.py` (`source: shards`)")
    )
    val_manifest: str = field(
        default="", metadata=_help("evaluation manifest from `tools/make_shards.py` (`source: shards`)")
    )
    batch_size: int = field(default=64, metadata=_range(1, help="global training batch (all ranks)"))
    augment: str = field(
        default="none",
        metadata=_choices(
            *AUGMENTS,
            help="`none`; `flip`; `crop_flip` (pad-4 random crop + flip); `rrc_flip` (random-resized "
            "crop + flip; eval: resize to size/0.875, centre crop); `randaugment` (`rrc_flip` + "
            "RandAugment n=2, m=9)",
        ),
    )
    backend: str = field(
        default="auto",
        metadata=_choices(
            "auto", "dali", "wds", help="`auto`: DALI where installed, else `wds` (webdataset + PIL)"
        ),
    )


@dataclass
class OptimConfig:
    lr: float = field(
        default=1e-3,
        metadata=_range(0, lo_open=True, help="learning rate of the orthogonal matrices (Riemannian Adam)"),
    )
    euclidean_lr: float = field(
        default=1e-3,
        metadata=_range(0, lo_open=True, help="learning rate of biases, positional terms and the head"),
    )
    betas: tuple[float, float] = field(default=(0.9, 0.999), metadata=_help("Adam moments' decay rates"))
    eps: float = field(default=1e-8, metadata=_range(0, lo_open=True, help="Adam's ε"))
    weight_decay: float = field(
        default=0.0, metadata=_range(0, help="decoupled weight decay (Euclidean parameters only)")
    )
    euclidean: str = field(
        default="nadam", metadata=_choices("nadam", "adamw", help="optimizer of the Euclidean parameters")
    )
    warmup_epochs: float = field(default=1.0, metadata=_range(0, help="linear warm-up, then cosine"))
    min_lr_ratio: float = field(
        default=0.0, metadata=_range(0, 1, help="the cosine ends at `min_lr_ratio`·lr")
    )
    lookahead_k: int = field(default=5, metadata=_range(0, help="manifold Lookahead every k steps (0 = off)"))
    lookahead_alpha: float = field(
        default=0.5, metadata=_range(0, 1, lo_open=True, help="Lookahead's step towards the fast weights")
    )
    reorthogonalize_every: int = field(
        default=100,
        metadata=_range(0, help="polar re-orthogonalisation of the masters every n steps (0: off)"),
    )
    grad_clip: float = field(default=1.0, metadata=_range(0, help="global gradient-norm clipping (0 = off)"))


@dataclass
class TrainConfig:
    epochs: int = field(default=10, metadata=_range(1, help="epochs"))
    max_steps: int = field(default=0, metadata=_range(0, help="a step cap for quick checks (0 = none)"))
    precision: str = field(
        default="auto",
        metadata=_choices(
            "auto", "bf16", "fp32", help="compute dtype; `auto`: bf16 on GPUs, fp32 on CPUs (masters: fp32)"
        ),
    )
    loss: str = field(
        default="emma", metadata=_choices("emma", "ce", help="`emma` (margin-aware, LiResNet) or `ce`")
    )
    eps: float = field(
        default=36 / 255, metadata=_range(0, lo_open=True, help="EMMA's target training radius (L2, pixels)")
    )
    eps_ramp: tuple[float, float] = field(
        default=(0.1, 3.0), metadata=_help("EMMA's radius ramps linearly from ramp[0]·eps to ramp[1]·eps")
    )
    seed: int = field(default=0, metadata=_help("seed of the weights and the data order"))
    log_every: int = field(default=10, metadata=_range(1, help="log to metrics.jsonl every n steps"))
    micro_batch_size: int = field(
        default=0,
        metadata=_range(0, help="per-rank micro-batch; 0 = batch / ranks; smaller ones accumulate gradients"),
    )
    max_consecutive_skips: int = field(
        default=10,
        metadata=_range(1, help="non-finite steps are skipped on all ranks; this many in a row stop the run"),
    )


@dataclass
class CertifyConfig:
    eps: list[float] = field(
        default_factory=lambda: [36 / 255, 72 / 255, 108 / 255, 1.0],
        metadata=_help("radii at which CRA is reported (each epoch and in `eval.json`)"),
    )
    batch_size: int = field(default=256, metadata=_range(1, help="evaluation and certification batch"))
    mode: str = field(
        default="fp32",
        metadata=_choices(
            "fp32",
            "sound",
            help="`fp32`: IEEE fp32 forward, its rounding not covered; `sound`: float64 forward with a "
            "rigorous bound on its rounding, so the certificate holds for the float64 classifier "
            "(docs/soundness.md)",
        ),
    )
    reported_cra: list[tuple[float, float]] = field(
        default_factory=list,
        metadata=_help(
            "published `[ε, CRA]` pairs of the configuration the recipe reproduces (DESIGN.md §6); "
            "`tools/certify.py` draws them beside its curve"
        ),
    )
    reported_source: str = field(default="", metadata=_help("where `reported_cra` is published"))


@dataclass
class RunConfig:
    output_dir: str = field(
        default="runs/quickstart",
        metadata=_help(
            "where everything is written (relative to the current directory, also for `launch.sh`)"
        ),
    )
    wandb: bool = field(
        default=False,
        metadata=_help("log to Weights & Biases, offline unless `WANDB_MODE` is set (`wandb sync` later)"),
    )
    wandb_project: str = field(default="lipnext_scale", metadata=_help("the W&B project"))
    checkpoint_every: int = field(
        default=0,
        metadata=_range(
            0, help="checkpoint to `<output_dir>/checkpoints` every n steps (0: at the end only)"
        ),
    )
    checkpoint_minutes: float = field(
        default=0.0,
        metadata=_range(
            0,
            help="also checkpoint every m minutes of wall time (0 = off); a stop signal (SIGINT, SIGTERM, "
            "SIGUSR1) checkpoints too, after the step every rank is in",
        ),
    )
    keep_checkpoints: int = field(default=2, metadata=_range(1, help="newest checkpoints kept on disk"))
    resume: bool = field(
        default=True,
        metadata=_help("continue from the newest complete checkpoint in `<output_dir>/checkpoints`"),
    )
    collective_timeout_s: float = field(
        default=300.0,
        metadata=_range(
            0,
            lo_open=True,
            help="a rank waiting this long in a collective (another rank died or hangs) stops the run "
            "with an error",
        ),
    )
    comms_logger: bool = field(
        default=False,
        metadata=_help(
            "DeepSpeed's comms logger: every collective counted, sized and timed, rank 0 prints the table at "
            "the end; it synchronises the device after each collective, so on GPUs nothing overlaps while on"
        ),
    )
    wall_clock_breakdown: bool = field(
        default=False,
        metadata=_help(
            "DeepSpeed's timers, printed by rank 0 after every micro-batch and step: fwd, bwd, step and the "
            "optimizer's waits for communication (`comm_wait_reduce`, `comm_wait_gather`); DeepSpeed reads "
            "them on the host each time (a device sync)"
        ),
    )


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
    if tp == int | str:  # a number or a word (the field's metadata lists the words)
        return value if isinstance(value, str) else _coerce(value, int)
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
    if "words" in meta and isinstance(value, str):
        return None if value in meta["words"] else f"an integer or one of {', '.join(meta['words'])}"
    if "choices" in meta and value not in meta["choices"]:
        return f"one of {', '.join(map(str, meta['choices']))}"
    if "range" in meta:
        lo, hi, lo_open = meta["range"]
        if lo is not None and (value <= lo if lo_open else value < lo):
            return f"{'>' if lo_open else '≥'} {lo}" + (f" and ≤ {hi}" if hi is not None else "")
        if hi is not None and value > hi:
            return f"≤ {hi}" + (f" and {'>' if lo_open else '≥'} {lo}" if lo is not None else "")
    return None


# Old key → new key, for recipes written before a rename.
_RENAMED = {
    # Activation checkpointing, renamed so that it cannot be confused with run.checkpoint_every.
    "model.checkpoint_every": "model.activation_checkpointing",
}


def _did_you_mean(name: str, known: typing.Iterable[str], section: str = "") -> str:
    close = difflib.get_close_matches(name, list(known), n=1)
    return f" (did you mean '{section + '.' if section else ''}{close[0]}'?)" if close else ""


def _build_section(cls: type, raw: dict, section: str, source: str, overridden: dict[str, str]) -> Any:
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls)}
    for key in raw:
        if (new := _RENAMED.get(f"{section}.{key}")) is not None:
            old = f"{section}.{key}"
            where = f"{source}, command-line override '{overridden[old]}'" if old in overridden else source
            raise ConfigError(f"{where}: '{old}' was renamed to '{new}'; use the new name")
        if key not in known:
            dotted = f"{section}.{key}"
            where = f"command line: override {overridden[dotted]!r}" if dotted in overridden else source
            raise ConfigError(
                f"{where}: unknown key '{dotted}'{_did_you_mean(key, known, section)}; "
                f"allowed keys in '{section}': {', '.join(known)}"
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
            sections = [f.name for f in dataclasses.fields(Recipe)]
            raise ConfigError(
                f"command line: unknown section '{section}' in {item!r}{_did_you_mean(section, sections)}; "
                f"allowed: {', '.join(sections)}"
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
            raise ConfigError(
                f"{source}: unknown section '{section}'{_did_you_mean(section, sections)}; "
                f"allowed: {', '.join(sections)}"
            )
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


def _default_text(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        # Radii are written k/255 and the shift ratio 1/8, as in the recipes.
        k255, k8 = value * 255, value * 8
        if abs(k255 - round(k255)) < 1e-9 and round(k255) % 255 and abs(k8 - round(k8)) > 1e-9:
            return f"{round(k255)}/255"
        if abs(k8 - round(k8)) < 1e-12 and round(k8) % 2:
            return f"{round(k8)}/8"
        return f"{value:g}"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_default_text(v) for v in value) + "]"
    if isinstance(value, str):
        return f"`{value}`" if value else ""
    return str(value)


def _allowed_text(meta: typing.Mapping) -> str:
    if "choices" in meta:
        return "one of " + ", ".join(f"`{c}`" for c in meta["choices"])
    if "range" in meta:
        lo, hi, lo_open = meta["range"]
        bounds = [f"{'>' if lo_open else '≥'} {lo:g}"] if lo is not None else []
        return " and ".join(bounds + ([f"≤ {hi:g}"] if hi is not None else []))
    return ""


def recipe_keys() -> list[tuple[str, str, str, str]]:
    """(dotted key, default as a recipe would write it, meaning, allowed values) for every recipe key,
    from the fields' metadata: the source of README.md's key table."""
    rows = []
    for section in dataclasses.fields(Recipe):
        defaults = section.default_factory()
        for f in dataclasses.fields(defaults):
            default = _default_text(getattr(defaults, f.name))
            rows.append(
                (f"{section.name}.{f.name}", default, f.metadata.get("help", ""), _allowed_text(f.metadata))
            )
    return rows


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
    "recipe_keys",
]
