"""Typed, frozen configuration for every stage, loaded once from ``params.yaml``.

``params.yaml`` holds base values, a ``profiles:`` mapping of named overrides and a
top-level ``profile:`` choosing one; ``--set KEY=VALUE`` overrides come last.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml


class ConfigError(ValueError):
    """A key or value in the configuration is invalid (message names it)."""


Auto = Literal["auto"]
Never = Literal["never"]


@dataclass(frozen=True)
class DataConfig:
    source: str = "../shared/data/cifar10-jpeg.tar.gz"
    image_size: int = 32
    prepared_dir: str = "data/prepared"
    # Use a seeded random subset of this many training / test images (None = all).
    train_limit: int | None = None
    test_limit: int | None = None
    # Validation images carved (seeded) out of the training set after train_limit; no client trains on them.
    # They are the kNN monitor's queries (so Optuna's objective) and the linear probe's epoch selection.
    val_size: int = 5000
    # Normalization mean/std: reference = the reference code's CIFAR-10 constants, dataset = the prepared
    # training set's statistics, auto = reference when the data is CIFAR-10, else dataset.
    normalization: Literal["auto", "dataset", "reference"] = "auto"


@dataclass(frozen=True)
class PartitionConfig:
    method: Literal["noniid-shards", "dirichlet", "iid"] = "noniid-shards"
    num_clients: int = 1000
    shards_per_client: int = 2
    dirichlet_alpha: float = 0.5
    out_dir: str = "data/partitions"


BOTTLENECK_PATTERN = re.compile(r"C([1-9][0-9]*)S([1-9][0-9]*)")


def parse_bottleneck(text: str) -> tuple[int, int] | None:
    """``"C4S2"`` -> (4 channels, stride 2); ``"none"`` -> None. ValueError names the key otherwise."""
    if text == "none":
        return None
    match = BOTTLENECK_PATTERN.fullmatch(text)
    if not match:
        raise ValueError(f"model.bottleneck={text!r} is invalid: 'none' or C<channels>S<stride>, e.g. 'C4S2'")
    return int(match.group(1)), int(match.group(2))


@dataclass(frozen=True)
class ModelConfig:
    width: int = 64
    cut_layers: Literal[1, 3, 5] = 1
    proj_hidden_dim: int = 1024
    proj_dim: int = 1024
    gn_channels_per_group: int = 4  # GroupNorm groups = channels // this, in every norm (the reference: 4)
    # none, or C<c>S<s>: the client ends in a stride-s conv to c channels, the server starts with the transposed
    # conv back (the reference's privacy runs use C4S2: smashed data 4x16x16 instead of width x 32 x 32)
    bottleneck: str = "none"


@dataclass(frozen=True)
class AugmentConfig:
    """MoCo v2 augmentation ranges (the other constants of the recipe are fixed, as in the reference)."""

    crop_scale: tuple[float, float] = (0.08, 1.0)  # RandomResizedCrop area fraction (torchvision's default)
    blur_sigma: tuple[float, float] = (0.1, 2.0)  # Gaussian blur sigma in pixels (PIL GaussianBlur radius)


@dataclass(frozen=True)
class SflConfig:
    clients_per_round: int | Auto = "auto"
    client_batch_size: int | Auto = "auto"
    # Steps between re-sampling the participants; auto = one pass over a participant's shard (the
    # reference re-samples once per epoch). Independent of sync_period.
    sample_period: int | Auto = "auto"
    # FedAvg of the client models every sync_period steps; auto = the reference's rule (1000 // (b*N)
    # syncs per pass over the shards: every 45 steps on 45,000 training images at any N); never = each
    # client keeps its own model (evaluated as the FedAvg of all trained clients' models at the end).
    sync_period: int | Auto | Never = "auto"
    sync_targets: bool = True
    stateful_clients: bool = False
    # Storage of the O(N) per-client state (stateful momentum, unsynced targets); compute stays float32.
    client_state_dtype: Literal["float32", "bfloat16"] = "float32"
    # memory: a tensor in RAM; file: a memory-mapped scratch file in pretrain.runs_dir (N beyond RAM)
    client_state_storage: Literal["memory", "file"] = "memory"
    fedavg_weights: Literal["samples_seen", "shard_size"] = "samples_seen"


@dataclass(frozen=True)
class MocoConfig:
    queue_size: int = 6000
    temperature: float = 0.1
    ema: float = 0.99
    feature_sharing: bool = True
    symmetric: bool = True


@dataclass(frozen=True)
class PretrainConfig:
    epochs: int = 200
    steps: int | None = None
    lr: float = 0.06
    momentum: float = 0.9
    weight_decay: float = 5e-4
    knn_every: int = 500
    knn_bank_size: int = 5000
    knn_query_size: int = 1000  # validation images the kNN monitor queries (at most data.val_size)
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    runs_dir: str = "runs"
    num_threads: int | None = None
    # torch.compile the server model: auto = eager (compiled steps were measured slower on CPU).
    compile: Literal["auto", "on", "off"] = "auto"
    # Forward passes (clients and server) in fp32 or under bf16 autocast; auto = bf16 where the hardware has native
    # bf16 (mocosfl/precision.py). Run ids hash the resolved choice, not "auto".
    precision: Literal["auto", "fp32", "bf16"] = "auto"


@dataclass(frozen=True)
class DistributedConfig:
    """MocoSFL's clients and server as separate processes on torch.distributed (``mocosfl.distributed``)."""

    # Client hosts, each a process owning a fixed block of clients and only their images; rank 0 is the
    # server. 0 = the in-process simulation.
    client_hosts: int = 0
    # Rendezvous host:port of the server (rank 0); port 0 = a free port on this host (one-host launch).
    endpoint: str = "127.0.0.1:0"
    timeout_s: float = 60.0  # a rank that does not join within this fails the run with one line
    client_host_threads: int = 1  # torch intra-op threads per client host (the server: pretrain.num_threads)
    # torchrun restarts every rank from the last checkpoint all of them hold this many times after a failure.
    max_restarts: int = 3


@dataclass(frozen=True)
class EvaluateConfig:
    encoder: Literal["trained", "random"] = "trained"
    knn_k: int = 200
    knn_temperature: float = 0.1
    linear_epochs: int = 100
    linear_lr: float = 1e-3
    linear_batch_size: int = 256
    batch_size: int = 500


@dataclass(frozen=True)
class AttackConfig:
    """The honest-but-curious server's model-inversion attack on the trained client model (``mocosfl attack``)."""

    seeds: int = 3  # attacks (decoder initialisation and batch order); the table gives mean +- std over them
    aux_fraction: float = 0.01  # of the training images (or of aux_source's), the attacker's own images
    aux_source: str | None = None  # an ImageFolder dir/.tar.gz (its train/ split) instead of the training images
    victims: int = 128  # fixed test images whose smashed data the attacker inverts
    decoder: Literal["res_normN4C64"] = "res_normN4C64"  # the reference's decoder family
    decoder_width: int = 64  # channels of the decoder (the reference: 64)
    decoder_blocks: int = 4  # residual blocks after the first (the reference: 4)
    epochs: int = 50
    batch_size: int = 32
    lr: float = 1e-3  # Adam
    val_fraction: float = 0.1  # of the auxiliary images, held out to select the decoder's epoch


@dataclass(frozen=True)
class TaressflConfig:
    """Target-aware ResSFL (``mocosfl.privacy.taressfl``): a trusted party first trains an attacker-aware "expert"
    client (phase 1); MocoSFL then starts every client, the server and their EMA targets from it (phase 2)."""

    enabled: bool = False
    alpha: float = 2.0  # weight of the hinge alpha * (SSIM - target_ssim); 0 = the control (no regulariser)
    # tau: the simulated attacker's SSIM the regulariser pushes the client below; 0 = always alpha * dSSIM/dh
    target_ssim: float = 0.6
    # dp: fraction of the clients' training images the expert also trains on ("target-aware" when > 0)
    target_fraction: float = 0.0
    # The expert's own images: an ImageFolder dir/.tar.gz (its train/ split); null = the training-set images
    # that data.train_limit's slice leaves out (disjoint from every client, validation and test image).
    aux_source: str | None = None
    steps: int = 78200  # phase-1 steps (the reference: 200 epochs x 391)
    batch_size: int = 128  # auxiliary images per step, plus as many target images when target_fraction > 0
    decoder_width: int = 64  # the simulated attacker's res_normN{blocks}C{width} decoder
    decoder_blocks: int = 4
    decoder_lr: float = 1e-3  # Adam
    freeze_clients: bool = True  # phase 2: clients keep the expert's weights (the reference: client lr 0)


@dataclass(frozen=True)
class BenchConfig:
    steps: int = 20
    warmup: int = 3


@dataclass(frozen=True)
class TrackingConfig:
    enabled: bool = True
    experiment: str = "mocosfl"
    db: str = "mlflow.db"  # SQLite store (absolute URI built from it) unless MLFLOW_TRACKING_URI is set
    # A finished pretrain registers its encoder as a new version of this model ("" = no registration; a baseline's
    # goes to "<name>-<method>") and points model_alias at it unless the run collapsed: models:/<name>@<alias>.
    registered_model: str = "mocosfl-encoder"
    model_alias: str = "good"
    system_metrics: bool = True  # CPU, memory, disk, network (GPU with nvidia-ml-py) of pretrain runs


@dataclass(frozen=True)
class TuneConfig:
    n_trials: int = 20
    steps: int = 300  # pretrain steps per trial
    knn_every: int = 50  # kNN reported to the pruner this often
    sync_period_min: int = 1
    sync_period_max: int = 500
    queue_size_min: int = 256
    queue_size_max: int = 16384
    pruner: Literal["median", "hyperband", "threshold", "none"] = "median"
    threshold_knn: float = 0.0  # threshold pruner: prune a trial whose kNN top-1 is below this
    study_name: str = "mocosfl"
    # A path (SQLite file) or a database URL (postgresql://user:pass@host:port/db, sqlite:///abs/path.db) that
    # several `mocosfl tune` processes, on one host or many, share.
    storage: str = "optuna.db"
    # Each running trial beats this often; one silent for 3 beats (its process killed) is marked failed by the next
    # trial to start and run again, up to max_retries times.
    heartbeat_s: int = 60
    max_retries: int = 2
    # local: this process runs the trials. pool: it also submits pool_runs - 1 flow runs of the Prefect
    # deployment mocosfl-tune-trials/tune-trials to the work pool `mocosfl`, which run trials of the same study.
    executor: Literal["local", "pool"] = "local"
    pool_runs: int = 2
    out_dir: str = "tune"


@dataclass(frozen=True)
class ReportConfig:
    out_dir: str = "reports"
    mlflow_ui: str = "http://127.0.0.1:5000"


@dataclass(frozen=True)
class Config:
    profile: str = "default"
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    metrics_dir: str = "metrics"
    data: DataConfig = field(default_factory=DataConfig)
    partition: PartitionConfig = field(default_factory=PartitionConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    sfl: SflConfig = field(default_factory=SflConfig)
    moco: MocoConfig = field(default_factory=MocoConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    attack: AttackConfig = field(default_factory=AttackConfig)
    taressfl: TaressflConfig = field(default_factory=TaressflConfig)
    bench: BenchConfig = field(default_factory=BenchConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)
    report: ReportConfig = field(default_factory=ReportConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **overrides: Any) -> Config:
        """Copy with dotted-key overrides, validated like ``--set``."""
        raw = self.to_dict()
        for key, value in overrides.items():
            _set_dotted(raw, key.replace("__", "."), value)
        return from_dict(raw)


# Keys that name where things live or how fast to run, or that run ids hash resolved (precision): left out
# of config hashes.
PATH_KEYS = {
    "profile",
    "data.source",
    "data.prepared_dir",
    "partition.out_dir",
    "pretrain.runs_dir",
    "metrics_dir",
    "device",
    "pretrain.num_threads",
    "pretrain.checkpoint_every",
    "pretrain.keep_checkpoints",
    "pretrain.compile",
    "pretrain.precision",  # hashed resolved (fp32/bf16) by the run id, not as written
    "distributed.endpoint",
    "distributed.timeout_s",
    "distributed.client_host_threads",
    "distributed.max_restarts",
}
PATH_FIELDS = {
    "data.source",
    "attack.aux_source",
    "taressfl.aux_source",
    "data.prepared_dir",
    "partition.out_dir",
    "pretrain.runs_dir",
    "metrics_dir",
    "tracking.db",
    "tune.storage",
    "tune.out_dir",
    "report.out_dir",
}


# ----------------------------------------------------------------------------- validation


def _check_type(key: str, value: Any, tp: Any) -> Any:
    """Return ``value`` coerced to ``tp`` or raise ConfigError naming ``key``."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        errors = []
        for arm in typing.get_args(tp):
            try:
                return _check_type(key, value, arm)
            except ConfigError as e:
                errors.append(str(e))
        allowed = " or ".join(_describe(a) for a in typing.get_args(tp))
        raise ConfigError(f"{key}={value!r} is invalid: expected {allowed}")
    if origin is tuple:
        arms = typing.get_args(tp)
        if isinstance(value, (list, tuple)) and len(value) == len(arms):
            try:
                return tuple(_check_type(key, v, arm) for v, arm in zip(value, arms, strict=True))
            except ConfigError:
                pass
        raise ConfigError(f"{key}={value!r} is invalid: expected {_describe(tp)}")
    if origin is Literal:
        choices = typing.get_args(tp)
        if isinstance(value, bool) and {"on", "off"} <= set(choices):
            value = "on" if value else "off"  # YAML 1.1 reads a bare on/off as a boolean
        if value in choices and type(value) is type(choices[choices.index(value)]):
            return value
        raise ConfigError(f"{key}={value!r} is invalid: allowed {', '.join(map(repr, choices))}")
    if tp is type(None):
        if value is None:
            return None
        raise ConfigError(f"{key}={value!r} is invalid: expected null")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}={value!r} is invalid: expected true or false")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}={value!r} is invalid: expected an integer")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "5e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}={value!r} is invalid: expected a number")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}={value!r} is invalid: expected a string")
    raise TypeError(f"unsupported config type {tp!r} for {key}")


def _describe(tp: Any) -> str:
    if typing.get_origin(tp) is tuple:
        return f"a list [{', '.join(_describe(a) for a in typing.get_args(tp))}]"
    if typing.get_origin(tp) is Literal:
        return " or ".join(map(repr, typing.get_args(tp)))
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _build(cls: type, raw: Any, prefix: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix or 'params'} must be a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        key = f"{prefix}{unknown[0]}"
        raise ConfigError(f"unknown config key '{key}' (known: {', '.join(sorted(names))})")
    kwargs = {}
    for name in names & set(raw):
        tp = hints[name]
        key = f"{prefix}{name}"
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, raw[name], key + ".")  # type: ignore[arg-type]
        else:
            kwargs[name] = _check_type(key, raw[name], tp)
    return cls(**kwargs)


def _positive(key: str, value: Any, minimum: float = 1) -> None:
    if value is not None and value not in ("auto", "never") and value < minimum:
        raise ConfigError(f"{key}={value!r} is invalid: must be >= {minimum}")


def validate(cfg: Config) -> Config:
    """Range checks that the types alone cannot express."""
    for key in [
        "data.image_size",
        "partition.num_clients",
        "partition.shards_per_client",
        "model.width",
        "model.proj_hidden_dim",
        "model.proj_dim",
        "model.gn_channels_per_group",
        "sfl.clients_per_round",
        "sfl.client_batch_size",
        "sfl.sample_period",
        "sfl.sync_period",
        "moco.queue_size",
        "pretrain.epochs",
        "pretrain.steps",
        "pretrain.knn_every",
        "pretrain.knn_bank_size",
        "pretrain.knn_query_size",
        "pretrain.checkpoint_every",
        "pretrain.keep_checkpoints",
        "pretrain.num_threads",
        "evaluate.knn_k",
        "evaluate.linear_epochs",
        "evaluate.linear_batch_size",
        "evaluate.batch_size",
        "bench.steps",
        "distributed.client_host_threads",
        "data.train_limit",
        "data.test_limit",
        "data.val_size",
        "tune.n_trials",
        "tune.steps",
        "tune.knn_every",
        "tune.sync_period_min",
        "tune.sync_period_max",
        "tune.queue_size_min",
        "tune.queue_size_max",
        "tune.heartbeat_s",
        "tune.pool_runs",
    ]:
        _positive(key, get_dotted(cfg, key))
    for key in ["attack.seeds", "attack.victims", "attack.decoder_width", "attack.epochs"]:
        _positive(key, get_dotted(cfg, key))
    _positive("attack.batch_size", cfg.attack.batch_size, 2)  # batch norm needs two images
    _positive("attack.decoder_blocks", cfg.attack.decoder_blocks, 0)
    if not 0 < cfg.attack.aux_fraction <= 1:
        raise ConfigError(f"attack.aux_fraction={cfg.attack.aux_fraction!r} is invalid: must be in (0, 1]")
    if not 0 < cfg.attack.val_fraction < 1:
        raise ConfigError(f"attack.val_fraction={cfg.attack.val_fraction!r} is invalid: must be in (0, 1)")
    if not cfg.attack.lr > 0:
        raise ConfigError(f"attack.lr={cfg.attack.lr!r} is invalid: must be > 0")
    _validate_taressfl(cfg.taressfl)
    _validate_tracking(cfg.tracking)
    _positive("bench.warmup", cfg.bench.warmup, 0)
    _positive("tune.max_retries", cfg.tune.max_retries, 0)
    _positive("distributed.client_hosts", cfg.distributed.client_hosts, 0)
    if cfg.taressfl.enabled and cfg.distributed.client_hosts:
        raise ConfigError("taressfl.enabled=true is not supported with distributed.client_hosts > 0 (in process only)")
    _positive("distributed.max_restarts", cfg.distributed.max_restarts, 0)
    for key in [
        "partition.dirichlet_alpha",
        "moco.temperature",
        "pretrain.lr",
        "distributed.timeout_s",
        "evaluate.knn_temperature",
        "evaluate.linear_lr",
    ]:
        if not get_dotted(cfg, key) > 0:
            raise ConfigError(f"{key}={get_dotted(cfg, key)!r} is invalid: must be > 0")
    if not 0 <= cfg.moco.ema < 1:
        raise ConfigError(f"moco.ema={cfg.moco.ema!r} is invalid: must be in [0, 1)")
    if not 0 <= cfg.pretrain.momentum < 1:
        raise ConfigError(f"pretrain.momentum={cfg.pretrain.momentum!r} is invalid: must be in [0, 1)")
    if cfg.pretrain.weight_decay < 0:
        raise ConfigError(f"pretrain.weight_decay={cfg.pretrain.weight_decay!r} is invalid: must be >= 0")
    d = cfg.data
    if d.train_limit is not None and d.val_size >= d.train_limit:
        raise ConfigError(
            f"data.val_size={d.val_size!r} is invalid: must be < data.train_limit ({d.train_limit}), "
            "or no training images are left"
        )
    _validate_model_augment(cfg)
    t = cfg.tune
    if t.sync_period_min > t.sync_period_max or t.queue_size_min > t.queue_size_max:
        raise ConfigError("tune: each *_min must be <= its *_max")
    return cfg


def _validate_taressfl(t: TaressflConfig) -> None:
    for key in ["steps", "decoder_width"]:
        _positive(f"taressfl.{key}", getattr(t, key))
    _positive("taressfl.batch_size", t.batch_size, 2)  # the simulated decoder's batch norm needs two images
    _positive("taressfl.decoder_blocks", t.decoder_blocks, 0)
    if not 0 <= t.target_fraction < 1:
        raise ConfigError(f"taressfl.target_fraction={t.target_fraction!r} is invalid: must be in [0, 1)")
    if t.alpha < 0:
        raise ConfigError(f"taressfl.alpha={t.alpha!r} is invalid: must be >= 0 (0 = no regulariser)")
    if not 0 <= t.target_ssim < 1:
        raise ConfigError(f"taressfl.target_ssim={t.target_ssim!r} is invalid: must be in [0, 1)")
    if not t.decoder_lr > 0:
        raise ConfigError(f"taressfl.decoder_lr={t.decoder_lr!r} is invalid: must be > 0")


# The Model Registry's rules (MLflow's, checked here so a bad name fails at load, not after training): a model
# name without '/' or ':'; an alias of letters, digits, '_' and '-', neither 'latest' nor a version ('v3').
_ALIAS = re.compile(r"[\w-]{1,255}")
_VERSION_ALIAS = re.compile(r"[vV]\d+")


def _validate_tracking(t: TrackingConfig) -> None:
    name = t.registered_model
    if name and (not name.strip() or any(c in name for c in "/:") or name == "." or name.startswith("..")):
        raise ConfigError(
            f"tracking.registered_model={name!r} is invalid: a Model Registry name has no '/' or ':' and does not "
            "start with '..' (\"\" = do not register the encoder)"
        )
    a = t.model_alias
    if not _ALIAS.fullmatch(a) or a.lower() == "latest" or _VERSION_ALIAS.fullmatch(a):
        raise ConfigError(
            f"tracking.model_alias={a!r} is invalid: letters, digits, '_' and '-', and neither 'latest' nor "
            "a version like 'v3' (MLflow reserves those)"
        )


def _validate_model_augment(cfg: Config) -> None:
    m, a = cfg.model, cfg.augment
    if m.width % m.gn_channels_per_group:
        raise ConfigError(
            f"model.gn_channels_per_group={m.gn_channels_per_group!r} is invalid: must divide model.width={m.width}"
        )
    try:
        squeeze = parse_bottleneck(m.bottleneck)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if squeeze is not None and (cfg.data.image_size % squeeze[1] or squeeze[1] & (squeeze[1] - 1)):
        raise ConfigError(
            f"model.bottleneck={m.bottleneck!r} is invalid: stride {squeeze[1]} must be a power of two that "
            f"divides data.image_size={cfg.data.image_size} (the attack's decoder doubles the resolution per step)"
        )
    lo, hi = a.crop_scale
    if not 0 < lo <= hi <= 1:
        raise ConfigError(f"augment.crop_scale={list(a.crop_scale)!r} is invalid: need 0 < low <= high <= 1")
    lo, hi = a.blur_sigma
    if not 0 < lo <= hi:
        raise ConfigError(f"augment.blur_sigma={list(a.blur_sigma)!r} is invalid: need 0 < low <= high")


def from_dict(raw: dict[str, Any]) -> Config:
    return validate(_build(Config, raw, ""))


def portable(cfg: Config, root: str | Path) -> dict[str, Any]:
    """``cfg`` as a dict for another host, whose checkout may live elsewhere (``from_portable`` turns it back):
    a path inside the checkout ``root`` or beside it (``../shared/...``) becomes relative to ``root``; any other
    path stays absolute, so it must mean the same on every host."""
    raw = cfg.to_dict()
    base = Path(root).resolve()
    for key in PATH_FIELDS:
        value = get_dotted(raw, key)
        if isinstance(value, str) and "://" not in value and Path(value).is_absolute():
            if Path(value).is_relative_to(base.parent):
                _set_dotted(raw, key, os.path.relpath(value, base))
    return raw


def from_portable(raw: dict[str, Any], root: str | Path) -> Config:
    """The config ``portable`` made, its relative paths resolved against this host's checkout ``root``."""
    raw = copy.deepcopy(raw)
    for key in PATH_FIELDS:
        value = get_dotted(raw, key)
        if isinstance(value, str) and "://" not in value and not Path(value).expanduser().is_absolute():
            _set_dotted(raw, key, os.path.normpath(Path(root).resolve() / value))
    return from_dict(raw)


# ----------------------------------------------------------------------------- loading


def get_dotted(obj: Any, key: str) -> Any:
    for part in key.split("."):
        obj = obj[part] if isinstance(obj, dict) else getattr(obj, part)
    return obj


def _set_dotted(raw: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = raw
    for i, part in enumerate(parts[:-1]):
        if part not in node or not isinstance(node[part], dict):
            raise ConfigError(f"unknown config key '{'.'.join(parts[: i + 1])}' in override '{key}'")
        node = node[part]
    if parts[-1] not in node:
        raise ConfigError(f"unknown config key '{key}'")
    node[parts[-1]] = value


def _merge(base: dict[str, Any], over: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in over.items():
        if key not in out:
            raise ConfigError(f"unknown config key '{prefix}{key}'")
        if isinstance(value, dict) and isinstance(out[key], dict):
            out[key] = _merge(out[key], value, f"{prefix}{key}.")
        else:
            out[key] = value
    return out


def parse_override(text: str) -> tuple[str, Any]:
    """``"sfl.sync_period=10"`` -> ``("sfl.sync_period", 10)`` (value parsed as YAML)."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like KEY=VALUE")
    key, _, value = text.partition("=")
    try:
        parsed = yaml.safe_load(value) if value.strip() else None
    except yaml.YAMLError:
        parsed = value
    return key.strip(), parsed


def load_config(
    params: str | Path = "params.yaml",
    profile: str | None = None,
    overrides: list[str] | None = None,
) -> Config:
    """Read ``params``, apply a profile and ``KEY=VALUE`` overrides, validate.

    Relative paths in the result are resolved against the params file's folder.
    """
    path = Path(params)
    if not path.is_file():
        raise ConfigError(f"params file not found: {path}")
    try:
        doc = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {e}".splitlines()[0]) from None
    if not isinstance(doc, dict):
        raise ConfigError(f"{path} must hold a mapping")
    profiles = doc.pop("profiles", {}) or {}
    chosen = profile or doc.get("profile") or "default"
    base = Config().to_dict()
    raw = _merge(base, doc)
    if chosen != "default":
        if chosen not in profiles:
            raise ConfigError(f"unknown profile '{chosen}' (known: {', '.join(sorted(profiles))})")
        raw = _merge(raw, profiles[chosen] or {})
    raw["profile"] = chosen
    for text in overrides or []:
        key, value = parse_override(text)
        _set_dotted(raw, key, value)
    root = path.resolve().parent
    for key in PATH_FIELDS:
        value = get_dotted(raw, key)
        if isinstance(value, str) and "://" not in value and not Path(value).expanduser().is_absolute():
            _set_dotted(raw, key, _resolve_relative(root, value, shared=key in SHARED_STORES))
    return from_dict(raw)


# Stores every run of the project writes to, experiments included: in a DVC experiment's copy they
# are the workspace's, so `dvc exp run` logs to the same MLflow store and Optuna study.
SHARED_STORES = {"tracking.db", "tune.storage"}
_EXPS = f"{os.sep}.dvc{os.sep}tmp{os.sep}exps{os.sep}"


def _resolve_relative(root: Path, value: str, shared: bool = False) -> str:
    """The absolute path of ``value``, relative to ``root`` (params.yaml's folder).

    `dvc exp run --temp/--queue` runs the stages in a copy of the repository's files at
    <repo>/.dvc/tmp/exps/[standalone/]<tmpdir>/, where the workspace's siblings (data.source's
    ../shared/...) do not exist: a path that leaves that copy names what it names from <repo>, and a
    ``shared`` store is always <repo>'s.
    """
    workspace, marker, inside = str(root).partition(_EXPS)
    if marker:
        parts = Path(inside).parts
        depth = 2 if parts[0] == "standalone" else 1
        copy = Path(workspace + marker, *parts[:depth])
        if shared or not Path(os.path.normpath(root / value)).is_relative_to(copy):
            root = Path(workspace, *parts[depth:])
    return str((root / value).resolve())


def config_hash(cfg: Config, sections: tuple[str, ...], extra: str = "") -> str:
    """Short stable hash of the given sections, leaving out location-only keys."""
    raw = cfg.to_dict()
    picked: dict[str, Any] = {}
    for section in sections:
        value = raw[section]
        if isinstance(value, dict):
            value = {k: v for k, v in value.items() if f"{section}.{k}" not in PATH_KEYS}
        picked[section] = value
    blob = json.dumps(picked, sort_keys=True) + extra
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def to_yaml(cfg: Config) -> str:
    from mocosfl.tracking import redact

    return yaml.safe_dump(redact(cfg.to_dict()), sort_keys=False)  # URL passwords as ***
