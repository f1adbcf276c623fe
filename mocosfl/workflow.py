"""The stages (prepare, partition, pretrain, evaluate, embed) as functions of a Config.

This is the edge where the library meets files: it decides where things live,
writes metrics JSON and checkpoints, and returns plain dicts. CLI, DVC and Prefect call it.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mocosfl.config import Config, config_hash
from mocosfl.costs import peak_rss_mb
from mocosfl.data.partition import (
    class_counts,
    load_shards,
    partition_indices,
    partition_summary,
    plot_class_heatmap,
    save_shards,
)
from mocosfl.data.prepare import DataError, PreparedData, load_prepared, prepare_dataset, prepared_path
from mocosfl.eval.knn import extract_features, knn_top1
from mocosfl.eval.linear import linear_probe
from mocosfl.models.resnet import Encoder, build_split_model
from mocosfl.sfl import clients as C
from mocosfl.sfl.trainer import KnnData, MocoSFLTrainer, TrainLoop, resolve_device

PRETRAIN_SECTIONS = ("seed", "data", "partition", "model", "sfl", "moco", "pretrain")
# What pretrain can train: MocoSFL and the baselines at the same plan (mocosfl/baselines/).
METHODS = ("mocosfl", "central", "flmoco")
ENCODER_FORMAT = "mocosfl-encoder-v1"


def write_json(path: Path, obj: Any) -> None:
    """Atomic JSON write (temp file + rename) so readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def metrics_path(cfg: Config, name: str) -> Path:
    return Path(cfg.metrics_dir) / name


# ----------------------------------------------------------------------------- data


def prepare(cfg: Config, progress: Callable[[int, int], None] | None = None) -> Path:
    return prepare_dataset(cfg.data.source, cfg.data.prepared_dir, cfg.data.image_size, progress=progress)


def _subset(n: int, limit: int | None, seed: int, stream: int) -> np.ndarray:
    if limit is None or limit >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng([seed, stream]).choice(n, limit, replace=False))


class Dataset:
    """The prepared arrays restricted to ``data.train_limit`` / ``data.test_limit``."""

    def __init__(self, cfg: Config):
        self.prepared: PreparedData = load_prepared(cfg.data.source, cfg.data.prepared_dir, cfg.data.image_size)
        p = self.prepared
        self.train_idx = _subset(len(p.train_y), cfg.data.train_limit, cfg.seed, 11)
        self.test_idx = _subset(len(p.test_y), cfg.data.test_limit, cfg.seed, 12)
        self.train_y = np.asarray(p.train_y)[self.train_idx]
        self.test_y = np.asarray(p.test_y)[self.test_idx]
        self.num_classes = len(p.classes)

    def train_x(self) -> np.ndarray:
        """Training images [n, H, W, 3] uint8; the read-only memmap itself when no subset is taken."""
        x = self.prepared.train_x
        if len(self.train_idx) == len(x) and np.array_equal(self.train_idx, np.arange(len(x))):
            return x
        return np.asarray(x[self.train_idx])

    def test_x(self) -> np.ndarray:
        return np.asarray(self.prepared.test_x[self.test_idx])

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        h.update(np.ascontiguousarray(self.train_y).tobytes())
        h.update(np.ascontiguousarray(self.test_y).tobytes())
        h.update(json.dumps([self.prepared.classes, list(self.prepared.train_x.shape)]).encode())
        return h.hexdigest()[:16]


def shards_path(cfg: Config) -> Path:
    key = prepared_path(cfg.data.source, cfg.data.prepared_dir, cfg.data.image_size).name
    h = config_hash(cfg, ("seed", "data", "partition"))
    return Path(cfg.partition.out_dir) / f"{key}-{cfg.partition.method}-{cfg.partition.num_clients}-{h}.npz"


def partition(cfg: Config) -> dict[str, Any]:
    """Split the training set into client shards; writes the index, summary and heat map."""
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
    summary.update(method=pc.method, seed=cfg.seed, dataset=ds.prepared.path.name)
    path = shards_path(cfg)
    save_shards(shards, path, {"summary": summary, "fingerprint": ds.fingerprint()})
    plot_class_heatmap(
        class_counts(ds.train_y, shards, ds.num_classes),
        ds.prepared.classes,
        metrics_path(cfg, "partition_heatmap.png"),
    )
    summary["shards_file"] = str(path)
    write_json(metrics_path(cfg, "partition.json"), summary)
    return summary


def load_partition(cfg: Config, ds: Dataset) -> list[np.ndarray]:
    path = shards_path(cfg)
    if not path.exists():
        raise DataError(f"no client shards at {path}: run `mocosfl partition` with the same settings first")
    shards, meta = load_shards(path)
    if meta.get("fingerprint") != ds.fingerprint():
        raise DataError(f"{path} was made from other data: run `mocosfl partition` again")
    return shards


# ----------------------------------------------------------------------------- pretrain


def data_hash(ds: Dataset, shards_file: Path) -> str:
    """Identity of the data a run trains on: the prepared labels/shape plus the shard index."""
    return ds.fingerprint() + hashlib.sha256(shards_file.read_bytes()).hexdigest()[:16]


def run_dir(cfg: Config, ds: Dataset, shards_file: Path, method: str = "mocosfl") -> Path:
    """``runs/<hash>`` for MocoSFL, ``runs/<method>-<hash>`` for a baseline on the same config."""
    h = config_hash(cfg, PRETRAIN_SECTIONS, data_hash(ds, shards_file))
    return Path(cfg.pretrain.runs_dir) / (h if method == "mocosfl" else f"{method}-{h}")


# Checkpoints. A trainer's state is one dict; entries named ``*_bank`` are O(N) per-client banks
# (stateful momentum, unsynced targets: 6 GB at N=10,000, cut 5, width 64). They are streamed to their
# own ``ckpt-<step>.<name>.npy`` files next to the small ``ckpt-<step>.pt`` and read back straight into
# the trainer's bank, so neither saving nor resuming holds a second copy. The .pt file is written last
# and is what makes a checkpoint exist; when its banks reach LARGE_CHECKPOINT_BYTES only the newest
# checkpoint is kept, so the disk holds at most two while a new one is written.
LARGE_CHECKPOINT_BYTES = 1 << 30
BANK_SUFFIX = "_bank"


def _checkpoints(directory: Path) -> list[Path]:
    return sorted(directory.glob("ckpt-*.pt"))


def _bank_files(ckpt: Path) -> list[Path]:
    return sorted(ckpt.parent.glob(f"{ckpt.stem}.*.npy"))


def _remove_checkpoint(ckpt: Path) -> None:
    ckpt.unlink(missing_ok=True)  # first, so a half-removed checkpoint is never picked up
    for f in _bank_files(ckpt):
        f.unlink(missing_ok=True)


def save_checkpoint(directory: Path, state: dict[str, Any], keep: int) -> Path:
    """Write ``state`` atomically as ``ckpt-<step>.pt`` (+ one .npy per bank); keep the newest ``keep``."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"ckpt-{state['step']:09d}.pt"
    small = dict(state)
    bank_bytes = 0
    for name, value in state.items():
        if name.endswith(BANK_SUFFIX) and isinstance(value, C.ClientStateBank):
            bank = directory / f"{path.stem}.{name}.npy"
            tmp = directory / f".{bank.name}.tmp-{os.getpid()}"
            value.save(tmp)
            os.replace(tmp, bank)
            small[name] = {"npy": bank.name, "shape": list(value.flat.shape)}
            bank_bytes += value.nbytes
    tmp = directory / f".{path.name}.tmp-{os.getpid()}"
    torch.save(small, tmp)
    os.replace(tmp, path)
    if bank_bytes >= LARGE_CHECKPOINT_BYTES:
        keep = 1
    for old in _checkpoints(directory)[:-keep]:
        _remove_checkpoint(old)
    kept = {f.stem for f in _checkpoints(directory)}
    for orphan in directory.glob("ckpt-*.*.npy"):  # banks of a save that was killed before its .pt
        if orphan.name.split(".")[0] not in kept:
            orphan.unlink(missing_ok=True)
    return path


def load_latest_checkpoint(directory: Path) -> dict[str, Any] | None:
    """Newest readable checkpoint; an unreadable one is skipped with a warning, never deleted.

    Bank entries come back as the Path of their .npy file, for ``ClientStateBank.load_``.
    """
    for path in reversed(_checkpoints(directory)):
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
            for name, value in state.items():
                if name.endswith(BANK_SUFFIX) and isinstance(value, dict):
                    bank = directory / value["npy"]
                    C.check_npy(bank, tuple(value["shape"]))  # present and complete
                    state[name] = bank
            return state
        except Exception as e:  # noqa: BLE001 - any unreadable file: fall back to the previous one
            print(f"warning: skipping unreadable checkpoint {path}: {type(e).__name__}")
    return None


def knn_data(cfg: Config, ds: Dataset) -> KnnData:
    pc = cfg.pretrain
    bank = _subset(len(ds.train_idx), pc.knn_bank_size, cfg.seed, 13)
    test = _subset(len(ds.test_idx), pc.knn_test_size, cfg.seed, 14)
    p = ds.prepared
    return KnnData(
        bank_x=np.asarray(p.train_x[ds.train_idx[bank]]),
        bank_y=torch.from_numpy(ds.train_y[bank]).long(),
        test_x=np.asarray(p.test_x[ds.test_idx[test]]),
        test_y=torch.from_numpy(ds.test_y[test]).long(),
        num_classes=ds.num_classes,
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
            "gn_groups": m.gn_groups,
            "proj_hidden_dim": m.proj_hidden_dim,
            "proj_dim": m.proj_dim,
        },
        "client": enc.client.state_dict(),
        "backbone": enc.backbone.state_dict(),
        "image_size": trainer.cfg.data.image_size,
        "mean": list(trainer.mean),
        "std": list(trainer.std),
    }


def pretrain(
    cfg: Config,
    on_step: Callable[[dict[str, float]], None] | None = None,
    on_start: Callable[[TrainLoop, Path], None] | None = None,
    method: str = "mocosfl",
) -> dict[str, Any]:
    """Train (or resume, or skip when finished) the run of ``method`` keyed by this config and data."""
    ds = Dataset(cfg)
    shards = load_partition(cfg, ds)
    directory = run_dir(cfg, ds, shards_path(cfg), method)
    done = directory / "pretrain.json"
    if done.exists() and (directory / "encoder.pt").exists():
        result = json.loads(done.read_text())
        result["resumed_from_step"] = result["steps"]
        write_json(metrics_path(cfg, "pretrain.json"), result)
        return result

    device = resolve_device(cfg.device)
    p = ds.prepared
    trainer = make_trainer(method, cfg, ds.train_x(), shards, p.mean, p.std, knn_data(cfg, ds), device)
    state = load_latest_checkpoint(directory)
    if state is not None:
        trainer.load_state_dict(state)
    start_step = trainer.step
    directory.mkdir(parents=True, exist_ok=True)
    write_json(directory / "config.json", cfg.to_dict())
    if on_start:
        on_start(trainer, directory)
    wall0 = time.perf_counter()

    def checkpoint(t: TrainLoop) -> None:
        save_checkpoint(directory, t.state_dict(), cfg.pretrain.keep_checkpoints)

    trainer.run(on_step=on_step, on_checkpoint=checkpoint)
    torch.save(encoder_payload(trainer), directory / ".encoder.pt.tmp")
    os.replace(directory / ".encoder.pt.tmp", directory / "encoder.pt")

    result = trainer.summary()
    knn_rows = [r for r in trainer.history if "knn_top1" in r]
    result.update(
        run_dir=str(directory),
        run_id=directory.name,
        data_hash=data_hash(ds, shards_path(cfg)),
        resumed_from_step=start_step,
        wall_seconds_this_session=time.perf_counter() - wall0,
        peak_rss_mb_this_session=peak_rss_mb(),
        final_loss=trainer.history[-1]["loss_mean"] if trainer.history else None,
        knn_top1=knn_rows[-1]["knn_top1"] if knn_rows else None,
        history=trainer.history,
        profile=cfg.profile,
        method=method,
    )
    write_json(done, result)
    write_json(metrics_path(cfg, "pretrain.json"), result)
    return result


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
    payload = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(payload, dict) or payload.get("format") != ENCODER_FORMAT:
        raise ValueError(f"{path} is not a mocosfl encoder file")
    m = payload["model"]
    client, server = build_split_model(m["width"], m["cut_layers"], m["proj_hidden_dim"], m["proj_dim"], m["gn_groups"])
    enc = Encoder(client, server.backbone)
    enc.client.load_state_dict(payload["client"])
    enc.backbone.load_state_dict(payload["backbone"])
    enc.preprocess = {k: payload[k] for k in ("image_size", "mean", "std")}
    return enc.to(device).eval().requires_grad_(False)


def evaluate(cfg: Config, log: Callable[[str], None] = print, method: str = "mocosfl") -> dict[str, Any]:
    """kNN and linear probe of the encoder ``method`` trained with this config (or of a random one)."""
    ds = Dataset(cfg)
    device = resolve_device(cfg.device)
    torch.set_flush_denormal(True)  # subnormals slow CPU convolutions ~10x
    if cfg.evaluate.encoder == "random":
        torch.manual_seed(cfg.seed)
        m = cfg.model
        client, server = build_split_model(m.width, m.cut_layers, m.proj_hidden_dim, m.proj_dim, m.gn_groups)
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
        mean=ds.prepared.mean,
        std=ds.prepared.std,
        image_size=cfg.data.image_size,
        batch_size=e.batch_size,
        device=device,
    )
    t0 = time.perf_counter()
    log(f"extracting features of {len(ds.train_idx)} train + {len(ds.test_idx)} test images ...")
    train_f = extract_features(enc, ds.train_x(), **kw)
    test_f = extract_features(enc, ds.test_x(), **kw)
    train_y = torch.from_numpy(ds.train_y).long()
    test_y = torch.from_numpy(ds.test_y).long()
    knn = knn_top1(train_f, train_y, test_f, test_y, ds.num_classes, e.knn_k, e.knn_temperature)
    log(f"kNN top-1 {knn:.2f}%; training linear probe for {e.linear_epochs} epochs ...")
    probe = linear_probe(
        train_f,
        train_y,
        test_f,
        test_y,
        ds.num_classes,
        e.linear_epochs,
        e.linear_lr,
        e.linear_batch_size,
        e.val_fraction,
        cfg.seed,
    )
    result = {
        "encoder": source,
        "knn_top1": knn,
        "linear_probe_top1": probe.test_top1,
        "linear_probe_top1_final_epoch": probe.test_top1_final,
        "linear_probe_val_top1": probe.val_top1,
        "linear_probe_best_epoch": probe.best_epoch,
        "feature_dim": int(train_f.shape[1]),
        "train_images": len(ds.train_idx),
        "test_images": len(ds.test_idx),
        "seconds": time.perf_counter() - t0,
        "dataset": ds.prepared.path.name,
    }
    name = "eval.json" if cfg.evaluate.encoder == "trained" else "eval_random.json"
    write_json(metrics_path(cfg, name), result)
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
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = out.with_name(f".{out.name}.tmp-{os.getpid()}.npz")
    np.savez(tmp_out, **arrays)  # type: ignore[arg-type]
    os.replace(tmp_out, out)
    return {
        "output": str(out),
        "train": len(arrays["train_labels"]),
        "test": len(arrays["test_labels"]),
        "feature_dim": int(arrays["train_features"].shape[1]),
    }
