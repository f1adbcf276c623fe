"""The stages (prepare, partition, pretrain, evaluate, embed) as functions of a Config.

This is where the library meets files: it decides where things live, writes metrics JSON and
checkpoints, reports to the ``Tracker`` its caller passes in, and returns plain dicts. The CLI, DVC and
Prefect call it; it calls none of them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mocosfl import identity
from mocosfl.checkpoints import load_latest_checkpoint, save_checkpoint
from mocosfl.config import Config, ConfigError, ModelConfig, config_hash
from mocosfl.costs import peak_rss_mb
from mocosfl.data.partition import (
    PartitionError,
    class_counts,
    load_shards,
    partition_indices,
    partition_summary,
    plot_class_heatmap,
    save_shards,
)
from mocosfl.data.prepare import (
    DataError,
    Normalization,
    PreparedData,
    load_prepared,
    normalization,
    prepare_dataset,
    prepared_path,
)
from mocosfl.eval.knn import extract_features, knn_top1
from mocosfl.eval.linear import linear_probe
from mocosfl.io import atomic_path, write_json, write_text
from mocosfl.models.resnet import Encoder, split_model
from mocosfl.plotdata import write_plot_data
from mocosfl.precision import resolve_precision
from mocosfl.privacy.decoder import InversionDecoder
from mocosfl.privacy.taressfl import collapse_reason
from mocosfl.seeding import Stream, rng
from mocosfl.sfl.trainer import KnnData, MocoSFLTrainer, TrainLoop, resolve_device
from mocosfl.tracking import DatasetInput, NullTracker, Tracker, flatten, redact

__all__ = ["load_latest_checkpoint", "save_checkpoint", "write_json"]  # re-exported for older callers

_log = logging.getLogger(__name__)

PRETRAIN_SECTIONS = ("seed", "data", "partition", "model", "augment", "sfl", "moco", "pretrain", "distributed")
# What pretrain can train: MocoSFL and the baselines at the same plan (mocosfl/baselines/).
METHODS = ("mocosfl", "central", "flmoco")
ENCODER_FORMAT = "mocosfl-encoder-v1"
# History rows' per-epoch metrics that go to the tracker (see TrainLoop.run).
HISTORY_METRICS = ("loss_mean", "lr", "steps_per_s", "bytes_per_client", "knn_top1", "epoch")
# The tracker's run id, kept next to the checkpoints so a resumed run continues its tracked run.
RUN_ID_FILE = "tracking_run_id.txt"
LEGACY_RUN_ID_FILE = "mlflow_run_id.txt"  # name before the tracker interface; still read


def metrics_path(cfg: Config, name: str) -> Path:
    return Path(cfg.metrics_dir) / name


# ----------------------------------------------------------------------------- data


def prepare(cfg: Config, progress: Callable[[int, int], None] | None = None) -> Path:
    return prepare_dataset(cfg.data.source, cfg.data.prepared_dir, cfg.data.image_size, progress=progress)


def _subset(n: int, limit: int | None, seed: int, stream: Stream) -> np.ndarray:
    if limit is None or limit >= n:
        return np.arange(n)
    return np.sort(rng(seed, stream).choice(n, limit, replace=False))


def split_validation(pool: np.ndarray, val_size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split training-image indices ``pool`` into (training, validation), both sorted like ``pool``.

    The ``val_size`` validation images are a seeded draw of their own stream (``Stream.VAL_SPLIT``).
    Shape: pool [n] -> [n - val_size], [val_size].
    """
    n = len(pool)
    if not 1 <= val_size < n:
        raise DataError(
            f"data.val_size={val_size} is invalid: the training set has {n} images (after data.train_limit), "
            f"so it must be in [1, {n - 1}]"
        )
    is_val = np.zeros(n, dtype=bool)
    is_val[rng(seed, Stream.VAL_SPLIT).choice(n, val_size, replace=False)] = True
    return pool[~is_val], pool[is_val]


class Dataset:
    """The prepared arrays as three disjoint sets of images: training, validation and test.

    ``train_*``: ``data.train_limit``'s slice of the training set less the validation images, the only
    images any client or baseline trains on (shards index into them). ``val_*``: ``data.val_size`` images
    carved from that slice, for every selection (kNN monitor, Optuna, the probe's epoch). ``test_*``:
    ``data.test_limit``'s slice of the test set, for the final numbers only.
    """

    def __init__(self, cfg: Config):
        self.prepared: PreparedData = load_prepared(cfg.data.source, cfg.data.prepared_dir, cfg.data.image_size)
        p = self.prepared
        pool = _subset(len(p.train_y), cfg.data.train_limit, cfg.seed, Stream.TRAIN_SUBSET)
        self.train_idx, self.val_idx = split_validation(pool, cfg.data.val_size, cfg.seed)
        self.test_idx = _subset(len(p.test_y), cfg.data.test_limit, cfg.seed, Stream.TEST_SUBSET)
        self.train_y = np.asarray(p.train_y)[self.train_idx]
        self.val_y = np.asarray(p.train_y)[self.val_idx]
        self.test_y = np.asarray(p.test_y)[self.test_idx]
        self.num_classes = len(p.classes)
        # The one place inputs' mean/std are chosen (data.normalization); every consumer reads this.
        self.normalization: Normalization = normalization(p, cfg.data.normalization)

    def train_x(self) -> np.ndarray:
        """Training images [n, H, W, 3] uint8 (a copy: the validation images are left out)."""
        return np.asarray(self.prepared.train_x[self.train_idx])

    def val_x(self) -> np.ndarray:
        return np.asarray(self.prepared.train_x[self.val_idx])

    def test_x(self) -> np.ndarray:
        return np.asarray(self.prepared.test_x[self.test_idx])

    def val_record(self) -> dict[str, Any]:
        """The validation split as a shard file records it (its shards must leave these images out)."""
        return {"size": len(self.val_idx), "sha256": hashlib.sha256(self.val_idx.tobytes()).hexdigest()[:16]}

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        h.update(np.ascontiguousarray(self.train_idx).tobytes())  # indices too: the split moves images
        h.update(np.ascontiguousarray(self.val_idx).tobytes())
        h.update(np.ascontiguousarray(self.train_y).tobytes())
        h.update(np.ascontiguousarray(self.test_y).tobytes())
        h.update(json.dumps([self.prepared.classes, list(self.prepared.train_x.shape)]).encode())
        h.update(self.prepared.content_hash.encode())  # the pixels too: a changed source is other data
        return h.hexdigest()[:16]


def shards_path(cfg: Config) -> Path:
    key = prepared_path(cfg.data.source, cfg.data.prepared_dir, cfg.data.image_size).name
    h = config_hash(cfg, ("seed", "data", "partition"))
    return Path(cfg.partition.out_dir) / f"{key}-{cfg.partition.method}-{cfg.partition.num_clients}-{h}.npz"


def partition(cfg: Config) -> dict[str, Any]:
    """Split the training images (not the validation ones) into client shards; write index, summary, heat map."""
    ds = Dataset(cfg)
    pc = cfg.partition
    shards = partition_indices(
        ds.train_y,
        pc.method,
        pc.num_clients,
        cfg.seed,
        shards_per_client=pc.shards_per_client,
        alpha=pc.dirichlet_alpha,
    )
    summary = partition_summary(ds.train_y, shards, ds.num_classes)
    summary.update(method=pc.method, seed=cfg.seed, dataset=ds.prepared.path.name, val_images=len(ds.val_idx))
    path = shards_path(cfg)
    meta = {"summary": summary, "fingerprint": ds.fingerprint(), "validation": ds.val_record()}
    save_shards(shards, path, meta)
    plot_class_heatmap(
        class_counts(ds.train_y, shards, ds.num_classes),
        ds.prepared.classes,
        metrics_path(cfg, "partition_heatmap.png"),
    )
    summary["shards_file"] = str(path)
    write_json(metrics_path(cfg, "partition.json"), summary)
    return summary


def ensure_partition(cfg: Config) -> tuple[Dataset, list[np.ndarray]]:
    """Prepare and partition the data unless this config's shard file exists and is valid; the data and its shards.

    A missing, stale (other data, no validation split) or corrupt shard file is made again: shards are a
    pure function of the config and data.
    """
    prepare(cfg)
    ds = Dataset(cfg)
    try:
        return ds, load_partition(cfg, ds)
    except (DataError, PartitionError) as e:
        if shards_path(cfg).exists():
            _log.warning("%s; partitioning again", e)
    partition(cfg)
    return ds, load_partition(cfg, ds)


def load_partition(cfg: Config, ds: Dataset) -> list[np.ndarray]:
    """The client shards of this config, after checking they were made from exactly these training images."""
    path = shards_path(cfg)
    if not path.exists():
        raise DataError(f"no client shards at {path}: run `mocosfl partition` with the same settings first")
    shards, meta = load_shards(path)
    if "validation" not in meta:
        raise DataError(
            f"{path} was made without a validation split (its shards may hold validation images): "
            "run `mocosfl partition` again"
        )
    if meta.get("fingerprint") != ds.fingerprint() or meta["validation"] != ds.val_record():
        raise DataError(f"{path} was made from other data: run `mocosfl partition` again")
    return shards


# ----------------------------------------------------------------------------- pretrain


def shards_digest(shards_file: Path) -> str:
    return hashlib.sha256(shards_file.read_bytes()).hexdigest()[:16]


def data_hash(ds: Dataset, shards_file: Path) -> str:
    """Identity of the data a run trains on: the prepared labels/shape plus the shard index."""
    return ds.fingerprint() + shards_digest(shards_file)


def data_input(cfg: Config, ds: Dataset, context: str) -> DatasetInput:
    """The images of this config (the prepared arrays, their split) as a tracker input: digest
    ``ds.fingerprint()`` (the first half of ``data_hash``), from the hashes already recorded, no image re-read."""
    p = ds.prepared
    d = cfg.data
    return DatasetInput(
        name=p.path.name.rsplit("-", 1)[0],  # without the hash of the source's path: the same on every host
        digest=ds.fingerprint(),
        source=d.source,
        context=context,
        profile={
            "prepared": str(p.path),
            "content_hash": p.content_hash,
            "image_size": d.image_size,
            "classes": ds.num_classes,
            "train_images": len(ds.train_idx),
            "val_images": len(ds.val_idx),
            "test_images": len(ds.test_idx),
            "train_limit": d.train_limit,
            "test_limit": d.test_limit,
            "val_size": d.val_size,
            "seed": cfg.seed,
        },
    )


def partition_input(cfg: Config, shards_file: Path) -> DatasetInput:
    """Which client holds which training images, as a tracker input: digest ``shards_digest`` (the second
    half of ``data_hash``); profile: the partition's knobs."""
    knobs = {k: v for k, v in dataclasses.asdict(cfg.partition).items() if k != "out_dir"}
    return DatasetInput(
        name=shards_file.stem,
        digest=shards_digest(shards_file),
        source=str(shards_file),
        context="partition",
        profile={**knobs, "seed": cfg.seed},
    )


def run_dir(cfg: Config, ds: Dataset, shards_file: Path, method: str = "mocosfl") -> Path:
    """``runs/<hash>`` for MocoSFL, ``runs/<method>-<hash>`` for a baseline on the same config.

    The hash covers the run's config sections, its data (``data_hash``) and the training code
    (``identity.code_hash``): an edit that can change the numbers gives a new run, trained anew.
    """
    precision = resolve_precision(cfg.pretrain.precision, resolve_device(cfg.device), method)
    sections = PRETRAIN_SECTIONS + (("taressfl",) if cfg.taressfl.enabled else ())  # else its knobs do nothing
    h = config_hash(cfg, sections, f"{data_hash(ds, shards_file)}:{identity.code_hash()}:{precision}")
    return Path(cfg.pretrain.runs_dir) / (h if method == "mocosfl" else f"{method}-{h}")


def read_run_id(directory: str | Path) -> str | None:
    """The tracker's run id recorded in a run directory (None when it was trained untracked)."""
    for name in (RUN_ID_FILE, LEGACY_RUN_ID_FILE):
        path = Path(directory) / name
        if path.exists():
            return path.read_text().strip() or None
    return None


def write_run_id(directory: str | Path, run_id: str) -> None:
    write_text(Path(directory) / RUN_ID_FILE, run_id + "\n")


def provenance(ds: Dataset, shards_file: Path, directory: Path, method: str) -> dict[str, str]:
    """Tags that describe exactly this run's inputs: its hash, code, data and (when known) git commit."""
    tags = {
        "method": method,
        "run_hash": directory.name,
        "code_hash": identity.code_hash(),
        "data_hash": data_hash(ds, shards_file),
    }
    commit = identity.git_commit()
    if commit:
        tags["git_commit"] = commit
    return tags


def knn_bank(cfg: Config, shards: list[np.ndarray]) -> np.ndarray:
    """The kNN monitor's memory bank: ``pretrain.knn_bank_size`` training images (indices) that clients hold
    (all but those a partition leaves unassigned: a distributed run's server gets the bank from its clients)."""
    held = np.sort(np.concatenate(shards))
    return held[_subset(len(held), cfg.pretrain.knn_bank_size, cfg.seed, Stream.KNN_BANK)]


def knn_data(cfg: Config, ds: Dataset, shards: list[np.ndarray], bank_pixels: bool = True) -> KnnData:
    """The kNN monitor's fixed sets: a memory bank of training images some client holds, queries from the
    validation images. Never test images: the monitor is what Optuna maximises and what picks between runs.

    ``bank_pixels=False``: without the bank's images (a distributed run's server, which has none).
    """
    pc = cfg.pretrain
    bank = knn_bank(cfg, shards)
    queries = _subset(len(ds.val_idx), pc.knn_query_size, cfg.seed, Stream.KNN_QUERIES)
    p = ds.prepared
    return KnnData(
        bank_x=np.asarray(p.train_x[ds.train_idx[bank]]) if bank_pixels else None,
        bank_y=torch.from_numpy(ds.train_y[bank]).long(),
        query_x=np.asarray(p.train_x[ds.val_idx[queries]]),
        query_y=torch.from_numpy(ds.val_y[queries]).long(),
        num_classes=ds.num_classes,
        bank_rows=bank,
    )


def make_trainer(
    method: str,
    cfg: Config,
    train_x: np.ndarray,
    shards: list[np.ndarray],
    mean: tuple[float, float, float],
    std: tuple[float, float, float],
    knn: KnnData | None,
    device: torch.device,
) -> TrainLoop:
    """The trainer of ``method`` (one of METHODS); all take the same inputs and plan."""
    from mocosfl.baselines.central import CentralTrainer
    from mocosfl.baselines.flmoco import FLMocoTrainer

    classes: dict[str, type[MocoSFLTrainer] | type[CentralTrainer] | type[FLMocoTrainer]] = {
        "mocosfl": MocoSFLTrainer,
        "central": CentralTrainer,
        "flmoco": FLMocoTrainer,
    }
    if method not in classes:
        raise ValueError(f"unknown method {method!r} (known: {', '.join(METHODS)})")
    return classes[method](cfg, train_x, shards, mean, std, knn, device)


def encoder_payload(trainer: TrainLoop) -> dict[str, Any]:
    enc = trainer.encoder()
    m = trainer.cfg.model
    return {
        "format": ENCODER_FORMAT,
        "model": {
            "width": m.width,
            "cut_layers": m.cut_layers,
            "gn_channels_per_group": m.gn_channels_per_group,
            "proj_hidden_dim": m.proj_hidden_dim,
            "proj_dim": m.proj_dim,
            "bottleneck": m.bottleneck,
        },
        "client": enc.client.state_dict(),
        "backbone": enc.backbone.state_dict(),
        "image_size": trainer.cfg.data.image_size,
        "mean": list(trainer.mean),
        "std": list(trainer.std),
    }


def finished_run(cfg: Config, method: str = "mocosfl", directory: Path | None = None) -> Path | None:
    """The run directory of this config's ``method`` run when it finished (metrics and encoder written)."""
    if directory is None:
        ds = Dataset(cfg)
        directory = run_dir(cfg, ds, shards_path(cfg), method)
    finished = (directory / "pretrain.json").exists() and (directory / "encoder.pt").exists()
    return directory if finished else None


def pretrain(
    cfg: Config,
    on_step: Callable[[dict[str, float]], None] | None = None,
    on_start: Callable[[TrainLoop, Path], None] | None = None,
    method: str = "mocosfl",
    tracker: Tracker | None = None,
) -> dict[str, Any]:
    """Train (or resume, or skip when finished) the run of ``method`` keyed by this config, data and code.

    ``tracker`` gets one run per training (continued on resume): the config as params, per-epoch
    history metrics, final metrics, provenance tags, the metrics files and the encoder. With
    ``taressfl.enabled``, the expert (phase 1, ``ensure_expert``) is trained first and the run starts from it.
    """
    tracker = tracker or NullTracker()
    ds = Dataset(cfg)
    shards = load_partition(cfg, ds)
    shards_file = shards_path(cfg)
    directory = run_dir(cfg, ds, shards_file, method)
    done = directory / "pretrain.json"
    if finished_run(cfg, method, directory):
        _log.info("run %s already finished; nothing to do", directory)
        result = json.loads(done.read_text())
        result["resumed_from_step"] = result["steps"]
        write_json(metrics_path(cfg, "pretrain.json"), result)
        write_plot_data(cfg.metrics_dir, result["history"])  # DVC deleted the plot files before this re-run
        return result  # type: ignore[no-any-return]
    if cfg.taressfl.enabled and method != "mocosfl":
        raise ConfigError(f"taressfl.enabled=true applies to MocoSFL only, not to method '{method}'")

    distributed = cfg.distributed.client_hosts > 0
    if distributed and not torch.distributed.is_initialized():  # this process launches the ranks
        from mocosfl.distributed.launch import launch

        return launch(cfg, method, directory)
    device = resolve_device(cfg.device)
    norm = ds.normalization
    expert: dict[str, Any] | None = None
    if distributed:  # rank 0 of a distributed run: the server, without the training images
        from mocosfl.distributed.roles import ServerTrainer

        no_images = np.zeros((len(ds.train_idx), 0, 0, 3), dtype=np.uint8)
        knn = knn_data(cfg, ds, shards, bank_pixels=False)
        trainer: TrainLoop = ServerTrainer(cfg, no_images, shards, norm.mean, norm.std, knn, device)
    else:
        knn = knn_data(cfg, ds, shards)
        trainer = make_trainer(method, cfg, ds.train_x(), shards, norm.mean, norm.std, knn, device)
        if cfg.taressfl.enabled:  # after the trainer: a phase-2 config error comes before phase 1 trains
            expert = ensure_expert(cfg, ds, shards, knn, device, on_step, on_start)
    # After the trainer, whose plan may reject the config: a bad input stays a one-line error.
    _log.info("normalization: %s (mean %s, std %s)", norm.source, norm.mean, norm.std)
    if distributed:  # every rank resumes from the newest step all of them checkpointed
        from mocosfl.distributed.roles import load_agreed_checkpoint

        load_agreed_checkpoint(trainer, directory)
    else:
        state = load_latest_checkpoint(directory)
        if state is not None:
            trainer.load_state_dict(state)
        elif expert is not None:
            assert isinstance(trainer, MocoSFLTrainer)
            trainer.load_expert(expert)
    tags = provenance(ds, shards_file, directory, method) | {
        "precision": trainer.precision,
        "normalization": norm.source,
    }
    if expert is not None:
        tags["taressfl_expert_dir"] = expert["run_dir"]

    def finish(result: dict[str, Any]) -> None:
        result.update(profile=cfg.profile, method=method, val_images=len(ds.val_idx))
        if expert is not None:
            result["taressfl_expert"] = expert["summary"]
        write_json(metrics_path(cfg, "pretrain.json"), result)
        write_plot_data(cfg.metrics_dir, trainer.history)  # one CSV per curve, for `dvc plots`
        _report_pretrain(tracker, cfg, result)
        write_json(done, result)  # last: a tracker that failed above leaves the run to be finished again

    inputs = (data_input(cfg, ds, "training"), partition_input(cfg, shards_file))
    return train_run(cfg, trainer, directory, tags, tracker, finish, on_step, on_start, inputs)


def train_run(
    cfg: Config,
    trainer: TrainLoop,
    directory: Path,
    tags: dict[str, str],
    tracker: Tracker,
    finish: Callable[[dict[str, Any]], None],
    on_step: Callable[[dict[str, float]], None] | None = None,
    on_start: Callable[[TrainLoop, Path], None] | None = None,
    inputs: Sequence[DatasetInput] = (),
) -> dict[str, Any]:
    """Run ``trainer`` to its last step in ``directory`` (checkpoints, ``encoder.pt``), tracked as one run with
    ``inputs`` as its datasets; returns its summary. ``finish`` gets the summary inside the tracked run: it
    writes ``pretrain.json`` (the run counts as finished from then on) and reports to the tracker."""
    start_step = trainer.step
    directory.mkdir(parents=True, exist_ok=True)
    write_json(directory / "config.json", redact(cfg.to_dict()))

    def step_hook(row: dict[str, float]) -> None:
        if "epoch" in row:
            tracker.log_metrics({k: row[k] for k in HISTORY_METRICS if k in row}, step=int(row["step"]))
        if on_step:
            on_step(row)

    def checkpoint(t: TrainLoop) -> None:
        save_checkpoint(directory, t.state_dict(), cfg.pretrain.keep_checkpoints)

    with tracker.run(
        f"{tags.get('stage', 'pretrain')}-{directory.name}",
        resume_id=read_run_id(directory),
        tags={"stage": "pretrain", **tags},
        params=flatten(cfg.to_dict()),
    ) as tracking_id:
        if tracking_id:
            write_run_id(directory, tracking_id)
        for dataset in inputs:
            tracker.log_dataset(dataset)
        if on_start:
            on_start(trainer, directory)
        wall0 = time.perf_counter()
        trainer.run(on_step=step_hook, on_checkpoint=checkpoint)
        with atomic_path(directory / "encoder.pt") as tmp:
            torch.save(encoder_payload(trainer), tmp)

        result = trainer.summary()
        knn_rows = [r for r in trainer.history if "knn_top1" in r]
        final_loss = trainer.history[-1]["loss_mean"] if trainer.history else None
        knn = knn_rows[-1]["knn_top1"] if knn_rows else None  # on validation images, like the history's
        num_classes = trainer.knn.num_classes if trainer.knn else None
        collapsed = (
            collapse_reason(knn, final_loss, num_classes, cfg.moco.queue_size, cfg.moco.symmetric)
            if num_classes
            else None
        )
        if collapsed:
            _log.warning("run %s collapsed: %s; its numbers describe a collapsed encoder", directory.name, collapsed)
        result.update(
            run_dir=str(directory),
            run_id=directory.name,
            **{k: v for k, v in tags.items() if k not in ("method", "run_hash", "stage")},
            tracking_run_id=tracking_id,
            resumed_from_step=start_step,
            wall_seconds_this_session=time.perf_counter() - wall0,
            peak_rss_mb_this_session=peak_rss_mb(),
            final_loss=final_loss,
            knn_top1=knn,
            knn_queries="val",
            collapsed=collapsed,
            history=trainer.history,
        )
        finish(result)
    return result


def expert_data(cfg: Config, ds: Dataset, shards: list[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
    """A TAResSFL expert's images and their sources: ``taressfl.aux_source``'s training images (else the
    training-set images outside this run's ``data.train_limit`` slice), then ``taressfl.target_fraction`` of
    the images the clients hold. Shape: images [n_aux + n_target, H, W, 3]; sources [aux rows(, target rows)]."""
    t = cfg.taressfl
    if t.aux_source:
        prepare_dataset(t.aux_source, cfg.data.prepared_dir, cfg.data.image_size)
        aux_x = np.asarray(load_prepared(t.aux_source, cfg.data.prepared_dir, cfg.data.image_size).train_x)
    else:
        used = np.zeros(len(ds.prepared.train_y), dtype=bool)
        used[ds.train_idx] = used[ds.val_idx] = True
        if used.all():
            raise ConfigError(
                "taressfl: the expert needs images no client holds: set taressfl.aux_source to an ImageFolder, "
                "or data.train_limit below the training set's size so the images it leaves out are the expert's"
            )
        aux_x = np.asarray(ds.prepared.train_x[np.flatnonzero(~used)])
    held = np.sort(np.concatenate(shards))
    n_target = round(t.target_fraction * len(held))
    if t.target_fraction > 0 and n_target < t.batch_size:
        raise ConfigError(
            f"taressfl.target_fraction={t.target_fraction!r} gives {n_target} of the clients' images, "
            f"fewer than taressfl.batch_size={t.batch_size}"
        )
    if len(aux_x) < t.batch_size:
        raise ConfigError(f"taressfl: {len(aux_x)} auxiliary images, fewer than taressfl.batch_size={t.batch_size}")
    target = np.sort(rng(cfg.seed, Stream.EXPERT_TARGET).choice(held, n_target, replace=False))
    target_x = np.asarray(ds.prepared.train_x[ds.train_idx[target]])
    n_aux = len(aux_x)
    sources = [np.arange(n_aux)] + ([n_aux + np.arange(n_target)] if n_target else [])
    return np.concatenate([aux_x, target_x]), sources


def expert_config(cfg: Config, sources: list[np.ndarray]) -> Config:
    """The expert's config: one "client" per image source, each giving ``taressfl.batch_size`` images a step,
    for ``taressfl.steps`` steps; phase-2-only knobs reset, so they share one expert."""
    n = len(sources)
    return cfg.replace(
        **{
            "partition.num_clients": n,
            "sfl.clients_per_round": n,
            "sfl.client_batch_size": cfg.taressfl.batch_size,
            "sfl.sample_period": "auto",
            "sfl.sync_period": "never",
            "sfl.stateful_clients": False,
            "sfl.sync_targets": True,
            "pretrain.steps": cfg.taressfl.steps,
            "taressfl.freeze_clients": True,
        }
    )


def ensure_expert(
    cfg: Config,
    ds: Dataset,
    shards: list[np.ndarray],
    knn: KnnData,
    device: torch.device,
    on_step: Callable[[dict[str, float]], None] | None = None,
    on_start: Callable[[TrainLoop, Path], None] | None = None,
) -> dict[str, Any]:
    """TAResSFL phase 1: train (or resume, or reuse) this config's expert in ``runs/expert-<hash>``.

    Returns the expert's weights (``ExpertTrainer.expert_payload``), its run directory and its summary.
    The kNN monitor is the run's (an evaluator's view, used only to report the expert and spot a collapse).
    """
    from mocosfl.privacy.taressfl import ExpertTrainer

    train_x, sources = expert_data(cfg, ds, shards)
    ecfg = expert_config(cfg, sources)
    directory = run_dir(ecfg, ds, shards_path(cfg), "expert")
    weights = directory / "expert.pt"
    done = directory / "pretrain.json"
    if not (done.exists() and weights.exists()):
        norm = ds.normalization
        trainer = ExpertTrainer(ecfg, train_x, sources, norm.mean, norm.std, knn, device)
        state = load_latest_checkpoint(directory)
        if state is not None:
            trainer.load_state_dict(state)
        _log.info(
            "TAResSFL phase 1: expert %s on %d auxiliary + %d target images, %d steps (alpha %g, tau %g)",
            directory.name,
            len(sources[0]),
            len(sources[1]) if len(sources) > 1 else 0,
            trainer.plan.total_steps,
            cfg.taressfl.alpha,
            cfg.taressfl.target_ssim,
        )
        tags = provenance(ds, shards_path(cfg), directory, "expert") | {"stage": "taressfl-expert"}

        def finish(result: dict[str, Any]) -> None:
            result.update(profile=cfg.profile, method="expert")
            with atomic_path(weights) as tmp:
                torch.save(trainer.expert_payload(), tmp)
            write_json(done, result)

        def expert_step(row: dict[str, float]) -> None:  # marked, so a caller can tell phase 1 from phase 2
            if on_step:
                on_step({**row, "expert": 1.0})

        train_run(ecfg, trainer, directory, tags, NullTracker(), finish, expert_step, on_start)
    summary = json.loads(done.read_text())
    summary.pop("history", None)
    payload = torch.load(weights, map_location="cpu", weights_only=True)
    return payload | {"run_dir": str(directory), "summary": summary}


def _report_pretrain(tracker: Tracker, cfg: Config, result: dict[str, Any]) -> None:
    """Final metrics, the partition summary, heat map and metrics JSON, and the encoder."""
    keys = (
        "knn_top1",
        "final_loss",
        "train_seconds",
        "knn_seconds",
        "steps_per_s",
        "images_seen",
        "bytes_per_client",
        "bytes_up_total",
        "bytes_down_total",
        "client_params",
        "server_params",
        "world_size",  # a distributed run's: its processes and the bytes its server exchanged with them
        "dist_sent_bytes_this_session",
        "dist_received_bytes_this_session",
    )
    tracker.log_metrics({f"final.{k}": float(result[k]) for k in keys if result.get(k) is not None})
    for kind, sent in (result.get("dist_sent_bytes_by_kind_this_session") or {}).items():
        tracker.log_metrics({f"final.dist_sent_bytes.{kind.replace(' ', '_')}": float(sent)})
    for name in ("partition.json", "partition_heatmap.png", "pretrain.json"):
        tracker.log_artifact(metrics_path(cfg, name), "metrics")
    tracker.log_encoder(Path(result["run_dir"]), cfg.data.image_size, result.get("collapsed"))


# ----------------------------------------------------------------------------- evaluate


def load_encoder(path: str | Path, device: str | torch.device = "cpu") -> Encoder:
    """The trained encoder (client model + server backbone) as one frozen module in eval mode.

    ``path`` is an ``encoder.pt`` or a run directory holding one.
    """
    path = Path(path)
    if path.is_dir():
        path = path / "encoder.pt"
    if not path.exists():
        raise FileNotFoundError(f"no encoder at {path}: run `mocosfl pretrain` first")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch.load of a foreign file raises many types (IndexError, ...)
        # torch's own messages for a foreign file are cryptic ("101"): name the reader and the error type.
        raise DataError(f"{path} is not a mocosfl encoder file (torch.load failed: {type(e).__name__})") from None
    if not isinstance(payload, dict) or payload.get("format") != ENCODER_FORMAT:
        raise DataError(f"{path} is not a mocosfl encoder file (no '{ENCODER_FORMAT}' payload)")
    m = payload["model"]
    if "gn_channels_per_group" not in m:  # saved before GroupNorm used the reference's 4 channels per group
        raise DataError(f"{path} has the old GroupNorm layout (model.gn_groups); pretrain it again with this version")
    client, server = split_model(ModelConfig(**m))  # saved before the bottleneck option: "none"
    enc = Encoder(client, server.backbone)
    enc.client.load_state_dict(payload["client"])
    enc.backbone.load_state_dict(payload["backbone"])
    enc.preprocess = {k: payload[k] for k in ("image_size", "mean", "std")}
    return enc.to(device).eval().requires_grad_(False)


def evaluate(
    cfg: Config,
    log: Callable[[str], None] | None = None,
    method: str = "mocosfl",
    tracker: Tracker | None = None,
) -> dict[str, Any]:
    """kNN and linear probe of the encoder ``method`` trained with this config (or of a random one).

    ``log`` receives progress lines (default: this module's logger). ``tracker`` gets one run linked to
    the pretrain run it evaluated, and the numbers are also added to that pretrain run.
    """
    say = log or _log.info
    tracker = tracker or NullTracker()
    ds = Dataset(cfg)
    device = resolve_device(cfg.device)
    torch.set_flush_denormal(True)  # subnormals slow CPU convolutions ~10x
    if cfg.evaluate.encoder == "random":
        torch.manual_seed(cfg.seed)
        m = cfg.model
        client, server = split_model(m)
        enc = Encoder(client, server.backbone).to(device).eval().requires_grad_(False)
        source = "random init"
    else:
        directory = run_dir(cfg, ds, shards_path(cfg), method) if shards_path(cfg).exists() else None
        if directory is None or not (directory / "encoder.pt").exists():
            raise FileNotFoundError("no finished pretrain run for this config: run `mocosfl pretrain` first")
        enc = load_encoder(directory, device)
        source = str(directory)
    e = cfg.evaluate
    kw: dict[str, Any] = dict(
        mean=ds.normalization.mean,
        std=ds.normalization.std,
        image_size=cfg.data.image_size,
        batch_size=e.batch_size,
        device=device,
    )
    t0 = time.perf_counter()
    n_train, n_val, n_test = len(ds.train_idx), len(ds.val_idx), len(ds.test_idx)
    say(f"extracting features of {n_train} train + {n_val} validation + {n_test} test images ...")
    train_f = extract_features(enc, ds.train_x(), **kw)
    val_f = extract_features(enc, ds.val_x(), **kw)
    test_f = extract_features(enc, ds.test_x(), **kw)
    train_y = torch.from_numpy(ds.train_y).long()
    val_y = torch.from_numpy(ds.val_y).long()
    test_y = torch.from_numpy(ds.test_y).long()
    # The reported numbers are on test; the probe's epoch is chosen on validation (nothing is chosen on test).
    knn = knn_top1(train_f, train_y, test_f, test_y, ds.num_classes, e.knn_k, e.knn_temperature)
    say(f"kNN top-1 {knn:.2f}% (test); training linear probe for {e.linear_epochs} epochs ...")
    probe = linear_probe(
        train_f,
        train_y,
        val_f,
        val_y,
        test_f,
        test_y,
        ds.num_classes,
        e.linear_epochs,
        e.linear_lr,
        e.linear_batch_size,
        cfg.seed,
    )
    result: dict[str, Any] = {
        "encoder": source,
        "knn_top1": knn,
        "linear_probe_top1": probe.test_top1,
        "linear_probe_top1_final_epoch": probe.test_top1_final,
        "linear_probe_val_top1": probe.val_top1,
        "linear_probe_best_epoch": probe.best_epoch,
        "feature_dim": int(train_f.shape[1]),
        "train_images": n_train,
        "val_images": n_val,
        "test_images": n_test,
        "seconds": time.perf_counter() - t0,
        "dataset": ds.prepared.path.name,
    }
    name = "eval.json" if cfg.evaluate.encoder == "trained" else "eval_random.json"
    write_json(metrics_path(cfg, name), result)

    pretrain_run = read_run_id(source) if cfg.evaluate.encoder == "trained" else None
    tags = {"stage": "evaluate", "encoder": cfg.evaluate.encoder, "code_hash": identity.code_hash()}
    if pretrain_run:
        tags["pretrain_run_id"] = pretrain_run
    numbers = {k: float(v) for k, v in result.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    with tracker.run(f"evaluate-{cfg.evaluate.encoder}", tags=tags, params=flatten(cfg.to_dict())) as run_id:
        tracker.log_dataset(data_input(cfg, ds, "evaluation"))
        tracker.log_metrics(numbers)
        tracker.log_artifact(metrics_path(cfg, name), "metrics")
    if pretrain_run:
        keys = ("knn_top1", "linear_probe_top1", "linear_probe_top1_final_epoch")
        tracker.add_to_run(pretrain_run, {f"eval.{k}": float(numbers[k]) for k in keys})
    if run_id:
        result["tracking_run_id"] = run_id
    return result


def attack(cfg: Config, log: Callable[[str], None] | None = None, tracker: Tracker | None = None) -> dict[str, Any]:
    """The honest-but-curious server's model-inversion attack on this config's trained client model.

    Auxiliary images: ``attack.aux_fraction`` of the training images (or of ``attack.aux_source``'s);
    victims: ``attack.victims`` fixed test images, never seen by the attacker. Floors beside it: the
    auxiliary mean image, and the same attack on a random-init client model. Writes ``attack.json`` and
    ``attack_grid.png`` to the metrics folder; ``tracker`` gets one run linked to the pretrain run.
    """
    from mocosfl.privacy.attack import METRICS, AttackSettings, mean_image_floor, plot_grid, smash
    from mocosfl.privacy.attack import attack as invert

    say = log or _log.info
    tracker = tracker or NullTracker()
    a = cfg.attack
    ds = Dataset(cfg)
    device = resolve_device(cfg.device)
    torch.set_flush_denormal(True)
    directory = run_dir(cfg, ds, shards_path(cfg)) if shards_path(cfg).exists() else None
    if directory is None or not (directory / "encoder.pt").exists():
        raise FileNotFoundError("no finished pretrain run for this config: run `mocosfl pretrain` first")
    client = load_encoder(directory, device).client
    if a.aux_source:
        prepare_dataset(a.aux_source, cfg.data.prepared_dir, cfg.data.image_size)
        pool = load_prepared(a.aux_source, cfg.data.prepared_dir, cfg.data.image_size).train_x
        pool_idx = np.arange(len(pool))
    else:
        pool, pool_idx = ds.prepared.train_x, ds.train_idx
    n_aux = max(2, round(a.aux_fraction * len(pool_idx)))
    gen = rng(cfg.seed, Stream.ATTACK_IMAGES)
    aux_x = np.asarray(pool[np.sort(gen.choice(pool_idx, n_aux, replace=False))])
    victims_x = np.asarray(
        ds.prepared.test_x[np.sort(gen.choice(ds.test_idx, min(a.victims, len(ds.test_idx)), replace=False))]
    )
    norm = ds.normalization
    s = AttackSettings(
        a.decoder_width, a.decoder_blocks, a.epochs, a.batch_size, a.lr, a.val_fraction, cfg.evaluate.batch_size
    )

    def pairs(model: torch.nn.Module, images: np.ndarray) -> Any:
        return smash(model, images, norm.mean, norm.std, cfg.data.image_size, s.batch, device)

    t0 = time.perf_counter()
    aux, victims = pairs(client, aux_x), pairs(client, victims_x)
    smashed = list(aux.h.shape[1:])
    say(f"attacking {directory.name}'s client model: smashed {smashed}, {n_aux} aux images, {len(victims_x)} victims")
    trained = invert(aux, victims, s, a.seeds, cfg.seed, device, say)
    say("the same attack on a random-init client model (the floor) ...")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        m = cfg.model
        random_client, _ = split_model(m)
    rand_aux, rand_victims = pairs(random_client.to(device), aux_x), pairs(random_client.to(device), victims_x)
    rand = invert(rand_aux, rand_victims, s, a.seeds, cfg.seed, device, say)
    result: dict[str, Any] = {m: trained[m] for m in METRICS}
    result["floors"] = {
        "mean_image": mean_image_floor(aux, victims),
        "random_init": {m: rand[m]["mean"] for m in METRICS},
        "random_init_std": {m: rand[m]["std"] for m in METRICS},
    }
    result.update(
        per_seed=trained["per_seed"],
        random_init_per_seed=rand["per_seed"],
        run_dir=str(directory),
        smashed_shape=smashed,
        bytes_per_image=int(np.prod(smashed)) * 4,
        aux_images=n_aux,
        aux_source=a.aux_source or "training images",
        victims=len(victims_x),
        seeds=a.seeds,
        decoder=a.decoder,
        decoder_params=sum(
            p.numel()
            for p in InversionDecoder(
                smashed[0], smashed[-1], cfg.data.image_size, a.decoder_width, a.decoder_blocks
            ).parameters()
        ),
        seconds=time.perf_counter() - t0,
    )
    write_json(metrics_path(cfg, "attack.json"), result)
    grid = metrics_path(cfg, "attack_grid.png")
    plot_grid({"victims": victims.x, "trained f_c": trained["recon"], "random f_c": rand["recon"]}, grid)
    say(
        f"attack SSIM {result['ssim']['mean']:.3f} +- {result['ssim']['std']:.3f} (mean-image floor "
        f"{result['floors']['mean_image']['ssim']:.3f}, random init {result['floors']['random_init']['ssim']:.3f})"
    )
    pretrain_run = read_run_id(directory)
    tags = {"stage": "attack", "code_hash": identity.code_hash()} | (
        {"pretrain_run_id": pretrain_run} if pretrain_run else {}
    )
    numbers = {f"attack.{m}": result[m]["mean"] for m in METRICS} | {
        f"attack.{m}_std": result[m]["std"] for m in METRICS
    }
    for floor in ("mean_image", "random_init"):
        numbers |= {f"floor.{floor}.{m}": float(result["floors"][floor][m]) for m in METRICS}
    with tracker.run("attack", tags=tags, params=flatten(cfg.to_dict())) as run_id:
        tracker.log_metrics(numbers)
        tracker.log_artifact(metrics_path(cfg, "attack.json"), "metrics")
        tracker.log_artifact(grid, "metrics")
    if pretrain_run:
        tracker.add_to_run(pretrain_run, {k: v for k, v in numbers.items() if k.startswith("attack.")})
    if run_id:
        result["tracking_run_id"] = run_id
    return result


def embed(
    encoder_path: str | Path,
    source: str | Path,
    output: str | Path,
    image_size: int | None = None,
    batch_size: int = 500,
    device: str = "auto",
) -> dict[str, Any]:
    """Features of every image of an ImageFolder (train/ and test/ splits) into one .npz."""
    import tempfile

    dev = resolve_device(device)
    enc = load_encoder(encoder_path, dev)
    pre = enc.preprocess
    size = int(image_size or pre["image_size"])
    with tempfile.TemporaryDirectory() as tmp:
        folder = prepare_dataset(source, tmp, size)
        data = load_prepared(source, tmp, size)
        kw: dict[str, Any] = dict(
            mean=tuple(pre["mean"]),
            std=tuple(pre["std"]),
            image_size=pre["image_size"],
            batch_size=batch_size,
            device=dev,
        )
        arrays = {
            "train_features": extract_features(enc, np.asarray(data.train_x), **kw).numpy(),
            "train_labels": np.asarray(data.train_y),
            "test_features": extract_features(enc, np.asarray(data.test_x), **kw).numpy(),
            "test_labels": np.asarray(data.test_y),
            "classes": np.array(data.classes),
        }
        del folder
    out = Path(output)
    with atomic_path(out, suffix=".npz") as tmp_out:  # np.savez appends .npz to other names
        np.savez(tmp_out, **arrays)  # type: ignore[arg-type]
    return {
        "output": str(out),
        "train": len(arrays["train_labels"]),
        "test": len(arrays["test_labels"]),
        "feature_dim": int(arrays["train_features"].shape[1]),
    }
