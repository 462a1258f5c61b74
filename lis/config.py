"""Typed run configuration: YAML -> OmegaConf structured config -> dataclasses.

Section and key names follow ``docs/design.md`` section 9. A config file
names only what differs from the defaults below; every field can be
overridden on the command line as ``section.key=value``. ``load_config``
rejects unknown keys (suggesting the closest), wrong types and out-of-range
values with one ``ConfigError`` line naming the key and the fix.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from lis.errors import LISError


class ConfigError(LISError):
    """A config file or override that cannot be used as given."""


@dataclass
class RunConfig:
    name: str = "run"  #: run directory name under ``dir``
    dir: str = "runs"  #: parent folder of run directories (and of the teacher cache)
    seed: int = 0  #: seeds python, numpy, torch and the batch order (not the teacher or the meta and val splits)
    device: str = "auto"  #: ``auto`` (cuda when present), ``cpu``, ``cuda``, ``cuda:N``
    amp: str = "off"  #: ``bf16``: forward passes under bfloat16 autocast (GPU speed); ``off``: float32
    channels_last: bool = False  #: channels_last memory layout for 2-D conv nets (GPU speed)
    sync_bn: bool = False  #: under torchrun on GPUs: BatchNorm statistics over the global batch; not with the dean
    #: CPU threads (torch.set_num_threads); the numbers of a CPU run depend on it. null: the process's current
    #: setting (torch's default: one per core), recorded as a number in config.yaml. ``lis compare`` sets 1.
    threads: Optional[int] = None


@dataclass
class DataConfig:
    #: cifar10 | cifar100 | imagenet | folder | digits | mnist1d | mnist1d_hard | fake | pkg.module:build_fn (your own)
    name: str = "mnist1d"
    root: str = "data"  #: where datasets live (and where mnist1d is cached)
    download: bool = False  #: let torchvision download CIFAR (needs network)
    batch_size: int = 128  #: training batch size (also used for evaluation and latency)
    num_workers: int = 0  #: DataLoader worker processes
    meta_fraction: float = 0.1  #: fraction of train held out as the meta split, in [0, 1)
    #: fraction of train held out as the val split (val_acc, for choosing settings), in [0, 1); 0: no val split
    val_fraction: float = 0.1
    image_size: int = 32  #: input side in pixels for fake / imagenet / folder data
    num_classes: int = 10  #: classes of ``fake`` and of a ``pkg.module:build_fn`` dataset (others know their own)
    fake_size: int = 512  #: training samples of the ``fake`` dataset (test: a quarter)
    # the MNIST-1D generator (``mnist1d``, ``mnist1d_hard``): null takes the variant's value (lis.data.MNIST1D_VARIANTS)
    mnist1d_train_size: Optional[int] = None  #: training samples (the meta split is carved from them)
    mnist1d_test_size: Optional[int] = None  #: test samples
    mnist1d_corr_noise_scale: Optional[float] = None  #: scale of the smoothed (correlated) background noise
    mnist1d_iid_noise_scale: Optional[float] = None  #: scale of the per-point noise
    mnist1d_max_translation: Optional[int] = None  #: largest shift of the digit, in points of the 72-point canvas
    mnist1d_shear_scale: Optional[float] = None  #: scale of the random linear trend added to the signal
    mnist1d_scale_coeff: Optional[float] = None  #: amplitude scaled by 1 + scale_coeff * U(-0.5, 0.5)
    mnist1d_seed: Optional[int] = None  #: the generator's seed (a different draw of the dataset)


@dataclass
class ModelConfig:
    name: str = "mnist1d_cnn"  #: teacher architecture, see ``lis.models.names()``, or ``pkg.module:build_fn``


@dataclass
class TeacherConfig:
    checkpoint: Optional[str] = None  #: use this trained teacher instead of training one
    seed: int = 0  #: the teacher's own seed: runs with other run.seed values share one teacher
    epochs: int = 30
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5.0e-4
    schedule: str = "cosine"  #: cosine | step (x0.1 at 50% and 75% of the epochs)
    label_smoothing: float = 0.0


@dataclass
class StudentConfig:
    model: Optional[str] = None  #: null: a copy of the teacher (the LIS setting)


@dataclass
class KDPConfig:
    epochs: int = 30
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5.0e-4
    temperature: float = 4.0  #: Hinton temperature tau of the logit distillation
    feature_layers: str = "all"  #: all | none: which channel groups get a feature-distillation term
    #: attention: attention transfer, which asks nothing of single channels, so the channels ADMM removes are
    #: not held to the teacher's | maps: L2-normalised maps, channel by channel
    feature_loss: str = "attention"


@dataclass
class ADMMConfig:
    interval: int = 50  #: iterations between Z/U updates


@dataclass
class PruneConfig:
    #: 1 - MACs(pruned student)/MACs(unpruned student), in (0, 1); the student is the teacher's copy unless
    #: student.model is set (summary.json's macs_reduction is always against the teacher)
    target_macs_reduction: Optional[float] = 0.75
    target_params_reduction: Optional[float] = None  #: the same for parameters; both may be set
    min_keep_ratio: float = 0.1  #: every channel group keeps at least this fraction of channels


@dataclass
class PolicyConfig:
    name: str = "dean"  #: dean | fixed | prune_only | ...
    #: fixed a_l: feature-distillation weight, one number for every layer or a list of one per channel group
    #: (in depth order; the dean starts from one number)
    alpha: Any = 1.0
    alpha_out: float = 1.0  #: fixed a_out: logit-distillation weight
    #: fixed r_l: ADMM penalty weight (lr * rho * admm.interval of order 0.1-1, docs/design.md 2), one number or a
    #: list of one per channel group, like alpha
    rho: Any = 0.1
    dean_checkpoint: Optional[str] = None  #: start the dean from a trained one
    a_max: float = 2.0  #: the dean's a_l and a_out lie in [0, a_max]; it starts at alpha, alpha_out inside (0, a_max)
    r_min: float = 1.0e-4  #: the dean's r_l lie in [r_min, r_max] (log scale); it starts at rho inside (r_min, r_max)
    r_max: float = 1.0


@dataclass
class SignalsConfig:
    interval: int = 10  #: iterations between measurements of distillability
    ema: float = 0.9  #: smoothing of the signals between measurements, in [0, 1)


@dataclass
class MetaConfig:
    interval: int = 20  #: iterations between meta steps of the dean
    dean: str = "layerwise"  #: layerwise: global level + per-layer split (docs/design.md 4) | mlp: one shared MLP
    unroll: int = 1  #: differentiable student steps per meta step
    beta: float = 1.0  #: weight of the sparse-structure term of the meta objective
    lr: float = 1.0e-3  #: Adam learning rate of the dean
    batch_size: Optional[int] = None  #: samples of the meta split per meta step (null: data.batch_size)
    backend: str = "higher"  #: higher | func
    learn_rho: bool = True  #: false: the dean's r_l stay at policy.rho, it only sets the distillation weights
    objective: str = "ce"  #: ce: CE(W') on the meta batch | pruned_ce: CE of W' masked to Z's support (the hard prune)
    truncate: Optional[int] = None  #: backpropagate through only the last k of the unroll steps (null: all)
    accumulate: int = 1  #: meta steps whose hypergradients are averaged into one update of the dean
    finetune_steps: int = 0  #: pruned_ce: differentiable fine-tuning steps (at finetune.lr) of the masked W'
    estimator: str = "hypergradient"  #: hypergradient: backpropagate through the unroll | es: evolution strategies
    es_sigma: float = 0.01  #: es: standard deviation of the perturbations of the dean's parameters
    es_population: int = 8  #: es: evaluations per meta step (antithetic pairs: even)
    #: true: the policy is not meta-learned; its hypergradients are measured at every meta step and logged (a fixed
    #: policy's, or a frozen dean's), the student trains as without
    measure: bool = False


@dataclass
class FinetuneConfig:
    epochs: int = 10
    lr: float = 0.01


@dataclass
class TrackingConfig:
    wandb: str = "offline"  #: disabled | offline | online
    project: str = "lis"


@dataclass
class CheckpointConfig:
    every_iters: int = 0  #: also checkpoint every N iterations (0: only at epoch ends)


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    kdp: KDPConfig = field(default_factory=KDPConfig)
    admm: ADMMConfig = field(default_factory=ADMMConfig)
    prune: PruneConfig = field(default_factory=PruneConfig)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    signals: SignalsConfig = field(default_factory=SignalsConfig)
    meta: MetaConfig = field(default_factory=MetaConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)


CHOICES = {
    "data.name": ("cifar10", "cifar100", "imagenet", "folder", "digits", "mnist1d", "mnist1d_hard", "fake"),
    "teacher.schedule": ("cosine", "step"),
    "kdp.feature_layers": ("all", "none"),
    "kdp.feature_loss": ("maps", "attention"),
    "meta.backend": ("higher", "func"),
    "meta.dean": ("layerwise", "mlp"),
    "meta.objective": ("ce", "pruned_ce"),
    "meta.estimator": ("hypergradient", "es"),
    "tracking.wandb": ("disabled", "offline", "online"),
    "run.amp": ("off", "bf16"),
}

def _per_layer(value: Any, ok: Callable[[float], bool]) -> bool:
    """Whether ``value`` is a finite number, or a non-empty list of them, that ``ok`` accepts (bools are not)."""
    values = value if isinstance(value, list) and value else [value]
    return all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and ok(v) for v in values)


# (key, test, what the value must be)
RANGES = [
    ("run.threads", lambda v: v is None or v >= 1, "an integer >= 1 or null"),
    ("data.batch_size", lambda v: v >= 1, "an integer >= 1"),
    ("data.num_workers", lambda v: v >= 0, "an integer >= 0"),
    ("data.meta_fraction", lambda v: 0.0 <= v < 1.0, "a fraction in [0, 1)"),
    ("data.val_fraction", lambda v: 0.0 <= v < 1.0, "a fraction in [0, 1)"),
    ("data.image_size", lambda v: v >= 8, "an integer >= 8"),
    ("data.num_classes", lambda v: v >= 2, "an integer >= 2"),
    ("data.fake_size", lambda v: v >= 4, "an integer >= 4"),
    ("data.mnist1d_train_size", lambda v: v is None or v >= 1, "an integer >= 1 or null"),
    ("data.mnist1d_test_size", lambda v: v is None or v >= 1, "an integer >= 1 or null"),
    ("data.mnist1d_corr_noise_scale", lambda v: v is None or v >= 0, "a number >= 0 or null"),
    ("data.mnist1d_iid_noise_scale", lambda v: v is None or v >= 0, "a number >= 0 or null"),
    ("data.mnist1d_max_translation", lambda v: v is None or v >= 1, "an integer >= 1 or null"),
    ("data.mnist1d_shear_scale", lambda v: v is None or v >= 0, "a number >= 0 or null"),
    ("data.mnist1d_scale_coeff", lambda v: v is None or 0 <= v < 2, "in [0, 2) or null"),
    ("data.mnist1d_seed", lambda v: v is None or 0 <= v < 2**32, "an integer in [0, 2^32) or null"),
    ("teacher.epochs", lambda v: v >= 0, "an integer >= 0"),
    ("teacher.lr", lambda v: v > 0, "a positive number"),
    ("teacher.momentum", lambda v: 0.0 <= v < 1.0, "in [0, 1)"),
    ("teacher.weight_decay", lambda v: v >= 0, "a number >= 0"),
    ("teacher.label_smoothing", lambda v: 0.0 <= v < 1.0, "in [0, 1)"),
    ("kdp.epochs", lambda v: v >= 0, "an integer >= 0"),
    ("kdp.lr", lambda v: v > 0, "a positive number"),
    ("kdp.momentum", lambda v: 0.0 <= v < 1.0, "in [0, 1)"),
    ("kdp.weight_decay", lambda v: v >= 0, "a number >= 0"),
    ("kdp.temperature", lambda v: v > 0, "a positive number"),
    ("admm.interval", lambda v: v >= 1, "an integer >= 1"),
    ("prune.target_macs_reduction", lambda v: v is None or 0.0 < v < 1.0, "a fraction in (0, 1) or null"),
    ("prune.target_params_reduction", lambda v: v is None or 0.0 < v < 1.0, "a fraction in (0, 1) or null"),
    ("prune.min_keep_ratio", lambda v: 0.0 < v <= 1.0, "a fraction in (0, 1]"),
    ("policy.alpha", lambda v: _per_layer(v, lambda x: x >= 0), "a number >= 0 or a list of them, one per layer"),
    ("policy.alpha_out", lambda v: v >= 0, "a number >= 0"),
    ("policy.rho", lambda v: _per_layer(v, lambda x: x >= 0), "a number >= 0 or a list of them, one per layer"),
    ("policy.a_max", lambda v: v > 0, "a positive number"),
    ("policy.r_min", lambda v: v > 0, "a positive number"),
    ("policy.r_max", lambda v: v > 0, "a positive number"),
    ("signals.interval", lambda v: v >= 1, "an integer >= 1"),
    ("signals.ema", lambda v: 0.0 <= v < 1.0, "in [0, 1)"),
    ("meta.interval", lambda v: v >= 1, "an integer >= 1"),
    ("meta.unroll", lambda v: v >= 1, "an integer >= 1"),
    ("meta.beta", lambda v: v >= 0, "a number >= 0"),
    ("meta.lr", lambda v: v > 0, "a positive number"),
    ("meta.batch_size", lambda v: v is None or v >= 1, "an integer >= 1 or null"),
    ("meta.truncate", lambda v: v is None or v >= 1, "an integer >= 1 or null"),
    ("meta.accumulate", lambda v: v >= 1, "an integer >= 1"),
    ("meta.finetune_steps", lambda v: v >= 0, "an integer >= 0"),
    ("meta.es_sigma", lambda v: v > 0, "a positive number"),
    ("meta.es_population", lambda v: v >= 2 and v % 2 == 0, "an even integer >= 2"),
    ("finetune.epochs", lambda v: v >= 0, "an integer >= 0"),
    ("finetune.lr", lambda v: v > 0, "a positive number"),
    ("checkpoint.every_iters", lambda v: v >= 0, "an integer >= 0"),
]


def all_keys() -> list[str]:
    """Every ``section.key`` a config may set."""
    return [
        f"{s.name}.{k.name}"
        for s in dataclasses.fields(Config)
        for k in dataclasses.fields(s.default_factory())
    ]


def _closest(key: str) -> str:
    match = difflib.get_close_matches(key, all_keys(), n=1, cutoff=0.5)
    return f" (did you mean '{match[0]}'?)" if match else " (see the config reference in README.md)"


def _type_name(key: str) -> str:
    """'an integer', 'a number', ... for the field ``section.key``."""
    section, name = key.split(".")
    hint = typing.get_type_hints(typing.get_type_hints(Config)[section])[name]
    optional = type(None) in typing.get_args(hint)
    base = next((a for a in typing.get_args(hint) if a is not type(None)), hint)
    words = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}
    return words.get(base, str(base)) + (" or null" if optional else "")


def _get(cfg: Config, key: str) -> Any:
    section, name = key.split(".")
    return getattr(getattr(cfg, section), name)


class _DuplicateKey(yaml.YAMLError):
    def __init__(self, key: Any, mark: yaml.Mark):
        super().__init__(key)
        self.key, self.mark = key, mark


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key given twice in one mapping, where PyYAML would silently
    keep the last (a second ``kdp:`` block appended to a file would drop the first one's keys)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # '<<: *base' may be overridden key by key
                continue
            key = self.construct_object(key_node, deep=deep)
            try:
                if key in seen:
                    raise _DuplicateKey(key, key_node.start_mark)
                seen.add(key)
            except TypeError:  # an unhashable key: the base class refuses it with its own message
                break
        return super().construct_mapping(node, deep)


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist: give the path of a YAML file (see experiments/)")
    try:
        data = yaml.load(path.read_text(), Loader=_UniqueKeyLoader)
    except _DuplicateKey as e:
        raise ConfigError(f"{path} line {e.mark.line + 1} repeats the key '{e.key}' (YAML would silently keep "
                          f"only the last one): give each key once") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}{where} is not valid YAML ({getattr(e, 'problem', e)}): fix the syntax") from None
    if data is None:
        return {}
    if not isinstance(data, dict) or not all(isinstance(v, dict) or v is None for v in data.values()):
        raise ConfigError(f"{path} must map sections to key: value blocks, e.g. 'kdp: {{epochs: 5}}'")
    return data


def _check_keys(data: dict, origin: str) -> None:
    sections = {f.name for f in dataclasses.fields(Config)}
    known = set(all_keys())
    for section, values in data.items():
        if section not in sections:
            raise ConfigError(f"unknown config section '{section}' in {origin}{_closest(str(section) + '.x')}")
        for key in values or {}:
            full = f"{section}.{key}"
            if full not in known:
                raise ConfigError(f"unknown config key '{full}' in {origin}{_closest(full)}")


def _parse_override(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise ConfigError(f"override '{text}' is not of the form section.key=value (e.g. kdp.epochs=5)")
    key, raw = text.split("=", 1)
    key = key.strip()
    if key not in set(all_keys()):
        raise ConfigError(f"unknown config key '{key}' in override '{text}'{_closest(key)}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key, value


def validate(cfg: Config) -> None:
    """Raise ``ConfigError`` naming the first key whose value is out of range."""
    for key, choices in CHOICES.items():
        own = key == "data.name" and ":" in cfg.data.name  # a builder of the user's, imported when the data loads
        if _get(cfg, key) not in choices and not own:
            raise ConfigError(f"{key}={_get(cfg, key)!r} is not one of {', '.join(choices)}: pick one of them")
    for key in all_keys():
        value = _get(cfg, key)
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{key}={value} is out of range: it must be a finite number")
    for key, ok, what in RANGES:
        value = _get(cfg, key)
        if not ok(value):
            raise ConfigError(f"{key}={value} is out of range: it must be {what}")
    if cfg.prune.target_macs_reduction is None and cfg.prune.target_params_reduction is None:
        raise ConfigError("no pruning budget: set prune.target_macs_reduction and/or prune.target_params_reduction")
    if cfg.data.meta_fraction + cfg.data.val_fraction >= 1.0:
        raise ConfigError(f"data.meta_fraction={cfg.data.meta_fraction} and data.val_fraction="
                          f"{cfg.data.val_fraction} leave no training set: their sum must be below 1")
    if cfg.meta.measure and cfg.policy.name in ("l1_prune", "scratch", "tp_group_norm"):
        raise ConfigError(f"meta.measure=true measures hypergradients during KDP, which policy.name="
                          f"{cfg.policy.name} does not run: use it with dean, fixed, prune_only or kd_only")
    if cfg.run.sync_bn and (cfg.policy.name == "dean" or cfg.meta.measure):
        raise ConfigError("run.sync_bn=true cannot run the dean or meta.measure (a meta step differentiates through "
                          "BatchNorm's backward, which SyncBatchNorm has no derivative of): set run.sync_bn=false")
    parts = cfg.run.name.split("/")
    if len(parts) > 2 or any(p in ("", ".", "..") for p in parts) or (len(parts) == 2 and parts[0] == "teachers"):
        raise ConfigError(f"run.name={cfg.run.name!r} must be a plain folder name, or <comparison>/<run> for a run "
                          f"of a comparison (what 'lis compare --plan' prints)")
    m = cfg.meta
    if m.truncate is not None and m.truncate > m.unroll:
        raise ConfigError(f"meta.truncate={m.truncate} is above meta.unroll={m.unroll}: it counts the last unroll "
                          f"steps to backpropagate through, so lower it or raise meta.unroll")
    if m.truncate is not None and m.estimator == "es":
        raise ConfigError("meta.truncate does nothing with meta.estimator=es (evolution strategies do not "
                          "backpropagate; they see the whole unroll): set meta.truncate=null")
    if m.finetune_steps and m.objective != "pruned_ce":
        raise ConfigError(f"meta.finetune_steps={m.finetune_steps} fine-tunes the student as the hard prune leaves "
                          f"it: set meta.objective=pruned_ce or meta.finetune_steps=0")


def check_dean_start(cfg: Config) -> None:
    """A fresh dean starts at the fixed constants through sigmoids, which reach only the open ranges: refuse a
    start outside them (clamping it would give another constant, with the sigmoid saturated). Checked when
    the dean is built: the same constants are free for the fixed-weight policies."""
    p, learn_rho = cfg.policy, cfg.meta.learn_rho
    for key in ("alpha", "rho"):
        if isinstance(getattr(p, key), list):
            raise ConfigError(f"policy.{key}={getattr(p, key)} is a list, but a fresh dean starts from one number "
                              f"for every layer (it sets per-layer weights itself): give one number")
    if not p.r_min < p.r_max:
        raise ConfigError(f"policy.r_min={p.r_min} must be below policy.r_max={p.r_max}: swap or fix them")
    for key, value in (("alpha", p.alpha), ("alpha_out", p.alpha_out)):
        if not 0.0 < value < p.a_max:
            raise ConfigError(f"policy.{key}={value} is outside (0, policy.a_max={p.a_max}), where a fresh dean "
                              f"can start: pick a value inside or raise policy.a_max")
    if learn_rho and not p.r_min < p.rho < p.r_max:
        raise ConfigError(f"policy.rho={p.rho} is outside (policy.r_min={p.r_min}, policy.r_max={p.r_max}), where "
                          f"a fresh dean can start: pick a value inside or widen the range")


def check_per_layer(cfg: Config, layers: Sequence[str]) -> None:
    """Refuse a per-layer ``policy.alpha`` or ``policy.rho`` whose length is not the number of the student's channel
    groups ``layers`` (in depth order): known only once the model is built, before anything is written."""
    for key in ("alpha", "rho"):
        value = getattr(cfg.policy, key)
        if isinstance(value, list) and len(value) != len(layers):
            raise ConfigError(f"policy.{key} has {len(value)} values but the student has {len(layers)} channel groups "
                              f"({', '.join(layers)}): give one number, or one per group in this order")


def load_config(path: str | Path | None = None, overrides: list[str] = (), base: Optional[Config] = None) -> Config:
    """Defaults (or ``base``) <- YAML file <- ``section.key=value`` overrides, validated."""
    schema = OmegaConf.structured(base or Config)
    layers = []
    if path is not None:
        data = _read_yaml(Path(path))
        _check_keys(data, str(path))
        layers.append(OmegaConf.create({k: v or {} for k, v in data.items()}))
    dotlist = {}
    for text in overrides:
        key, value = _parse_override(text)
        dotlist[key] = value
    if dotlist:
        nested: dict = {}
        for key, value in dotlist.items():
            section, name = key.split(".")
            nested.setdefault(section, {})[name] = value
        layers.append(OmegaConf.create(nested))
    try:
        merged = OmegaConf.merge(schema, *layers)
        cfg = OmegaConf.to_object(merged)
    except ValidationError as e:
        key = e.full_key or "?"
        raise ConfigError(f"{key}={e.value!r} has the wrong type: it must be {_type_name(key)}") from None
    except (ConfigKeyError, OmegaConfBaseException) as e:
        raise ConfigError(f"invalid config: {str(e).splitlines()[0]}") from None
    for key in ("alpha", "rho"):  # typed Any (a number or a list): numbers as a float field would give them
        setattr(cfg.policy, key, _floats(getattr(cfg.policy, key)))
    validate(cfg)
    return cfg


def _floats(value: Any) -> Any:
    """Numbers, numeric strings ('1e-3', which YAML reads as a string) and lists of them as floats; else
    ``value`` as it is, for ``validate`` to refuse."""
    if isinstance(value, list):
        return [_floats(v) for v in value]
    if isinstance(value, bool):
        return value
    try:
        return float(value)
    except (TypeError, ValueError):
        return value


def to_yaml(cfg: Config) -> str:
    """The fully resolved config as YAML (what ``config.yaml`` of a run holds)."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)
