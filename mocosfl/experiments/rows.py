"""What a suite row means: its resolved config, plan and cache key, how it runs, and what it will cost.

``resolve`` applies a row's overrides and the suite rules (never sync, FL-MoCo's participants, random
init) for one of its seeds; ``run_row`` pretrains and evaluates it into one table entry; ``estimate``
times a few steps first.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mocosfl import identity, workflow
from mocosfl.config import Config, ConfigError, config_hash
from mocosfl.costs import client_cost
from mocosfl.eval.knn import extract_features
from mocosfl.eval.linear import linear_probe
from mocosfl.experiments.suites import NEVER, ONE_SEED_PROFILES, Row
from mocosfl.models.resnet import Encoder, feature_dim, split_model
from mocosfl.sfl.server import local_queue_size
from mocosfl.sfl.trainer import Plan, resolve_device, resolve_plan

# The config sections a row's result depends on (its cache key); paths and tracking are left out.
ROW_SECTIONS = ("seed", "data", "partition", "model", "augment", "sfl", "moco", "pretrain", "evaluate")


@dataclass
class Resolved:
    """A row made concrete: its config, plan (None for random init) and cache key."""

    row: Row
    cfg: Config
    plan: Plan | None
    key: str


def default_suite(profile: str) -> str:
    """The suite a profile runs when none is named: ``paper`` for the paper profile, ``main`` otherwise."""
    return "paper" if profile == "paper" else "main"


def results_dir(cfg: Config) -> Path:
    """Where finished rows are cached (``<key>.json``) and each row's metrics folder lives."""
    return Path(cfg.pretrain.runs_dir) / "results"


def cache_key(cfg: Config, method: str, data: str, attack: bool = False) -> str:
    """A row's identity: its method, resolved config, data and the training code's hash.

    The code hash makes an edit to training or evaluation code re-run the rows instead of reading
    numbers that code no longer produces. The attack and TAResSFL sections count only where they act.
    """
    sections = ROW_SECTIONS + (("attack",) if attack else ()) + (("taressfl",) if cfg.taressfl.enabled else ())
    return config_hash(cfg, sections, f"{method}:{data}:{identity.code_hash()}")


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def seed_count(row: Row, profile: str, override: int | None = None) -> int:
    """How many seeds a row runs: ``override`` (``--seeds``) if given, one on quick-check profiles, else the row's."""
    if override is not None:
        return override
    return 1 if profile in ONE_SEED_PROFILES else row.seeds


def resolve(base: Config, row: Row, suite: str, seed_offset: int = 0) -> Resolved:
    """Apply a row's overrides at seed ``base.seed + seed_offset``, partition its data if needed, fix its plan.

    The seed is part of the resolved config, so each seed has its own partition, run and cache key.
    A sync period at or beyond the run's last step means only the FedAvg after the last step, which is
    what "never" does, so it is set to "never": "never", 500 and 50 at 8 steps are then one run, computed once.
    """
    over = row.profile_overrides.get(base.profile, {}) | row.overrides
    over["seed"] = base.seed + seed_offset
    over["metrics_dir"] = str(results_dir(base) / suite / _slug(row.label) / f"seed-{base.seed + seed_offset}")
    if row.method == "random":
        over["evaluate.encoder"] = "random"
    cfg = base.replace(**over)
    if row.method == "random":
        workflow.prepare(cfg)
        ds = workflow.Dataset(cfg)
        return Resolved(row, cfg, None, cache_key(cfg, row.method, ds.fingerprint(), row.attack))
    ds, shards = workflow.ensure_partition(cfg)
    sizes = np.array([len(s) for s in shards])
    plan = resolve_plan(cfg, sizes)
    if row.fl_clients is not None:
        if plan.batch_size % row.fl_clients:
            raise ConfigError(
                f"row '{row.label}': batch B={plan.batch_size} is not divisible by "
                f"{row.fl_clients} FL-MoCo clients per round"
            )
        cfg = cfg.replace(
            **{"sfl.clients_per_round": row.fl_clients, "sfl.client_batch_size": plan.batch_size // row.fl_clients}
        )
        plan = resolve_plan(cfg, sizes)
    if plan.sync_period is not None and plan.sync_period >= plan.total_steps:
        cfg = cfg.replace(**{"sfl.sync_period": NEVER})
    plan = resolve_plan(cfg, sizes)  # the rules above change only sfl.*, not the data
    data = workflow.data_hash(ds, workflow.shards_path(cfg))
    return Resolved(row, cfg, plan, cache_key(cfg, row.method, data, row.attack))


def queue_text(method: str, cfg: Config, plan: Plan | None) -> str:
    """The negatives a method's loss sees: one shared queue, K/M per client, or none (random init)."""
    if plan is None:
        return ""
    k = cfg.moco.queue_size
    if method == "flmoco":
        return f"{local_queue_size(k, plan.clients_per_round)} per client (local)"
    if method == "mocosfl" and not cfg.moco.feature_sharing:
        return f"{local_queue_size(k, plan.clients_per_round)} per client"
    return f"{k} shared" if method == "mocosfl" else str(k)


# ----------------------------------------------------------------------------- running one row


def run_row(
    r: Resolved,
    log: Callable[[str], None],
    on_row: Callable[[dict[str, float]], None] | None = None,
) -> dict[str, Any]:
    """Pretrain (unless random init) and evaluate one row; returns its table entry.

    ``on_row`` receives each epoch's history row (for a tracker); progress lines go to ``log``.
    """
    cfg, row, plan = r.cfg, r.row, r.plan
    pre: dict[str, Any] = {}
    if row.method != "random":
        assert plan is not None

        def on_step(step_row: dict[str, float]) -> None:
            if "expert" in step_row:  # TAResSFL phase 1: its own progress, not the row's curve
                if "knn_top1" in step_row:
                    step, loss, knn = int(step_row["step"]), step_row["loss_mean"], step_row["knn_top1"]
                    log(f"  expert step {step}: loss {loss:.3f}, kNN {knn:.1f}%")
                return
            if "knn_top1" in step_row:
                log(
                    f"  step {int(step_row['step'])}/{plan.total_steps}: loss {step_row['loss_mean']:.3f}, "
                    f"kNN {step_row['knn_top1']:.1f}%"
                )
            if on_row and "epoch" in step_row:
                on_row(step_row)

        pre = workflow.pretrain(cfg, on_step=on_step, method=row.method)
    ev = workflow.evaluate(cfg, log=lambda s: log("  " + s), method="mocosfl" if row.method == "random" else row.method)
    params, flops = client_cost(row.method, cfg, plan)
    train_s = float(pre.get("train_seconds", 0.0)) + float(pre.get("knn_seconds", 0.0))
    has_clients = plan is not None and row.method != "central"
    privacy = attack_fields(cfg, log) if row.attack else {}
    expert = _expert_fields(pre.get("taressfl_expert"))
    expert_s = float(expert["seconds"]) if expert else 0.0  # phase 1 is part of a TAResSFL row's cost
    return privacy | {
        "label": row.label,
        "group": row.group,
        "method": row.method,
        "key": r.key,
        "code_hash": identity.code_hash(),
        "seed": cfg.seed,
        "num_clients": plan.num_clients if plan and has_clients else None,
        "partition": cfg.partition.method if has_clients else None,
        "cut_layers": cfg.model.cut_layers if row.method == "mocosfl" else None,
        "sync_period": plan.sync_period if plan and row.method in ("mocosfl", "flmoco") else None,
        "never_sync": bool(plan and row.method in ("mocosfl", "flmoco") and plan.sync_period is None),
        "clients_per_round": plan.clients_per_round if plan else None,
        "client_batch_size": plan.client_batch_size if plan else None,
        "batch_size": plan.batch_size if plan else None,
        "queue": queue_text(row.method, cfg, plan),
        "width": cfg.model.width,
        "steps": int(pre.get("steps", 0)),
        "images_seen": int(pre.get("images_seen", 0)),
        # What the run actually trained on, as its trainer counted it (none for random init).
        "distinct_clients": pre.get("distinct_clients"),
        "distinct_images": pre.get("distinct_images"),
        "knn_top1": ev["knn_top1"],
        "linear_probe_top1": ev["linear_probe_top1"],
        "linear_probe_top1_final_epoch": ev["linear_probe_top1_final_epoch"],
        "client_params": params,
        "bytes_per_client": pre.get("bytes_per_client"),
        "client_flops_per_image": flops,
        "train_seconds": train_s,
        "eval_seconds": float(ev["seconds"]),
        "wall_seconds": train_s + float(ev["seconds"]) + float(privacy.get("attack_seconds", 0.0)) + expert_s,
        "knn_history": [
            {"step": h["step"], "knn_top1": h["knn_top1"]} for h in pre.get("history", []) if "knn_top1" in h
        ],
        "run_dir": pre.get("run_dir"),
        "collapsed": pre.get("collapsed"),
        "bottleneck": cfg.model.bottleneck,
        "taressfl_alpha": cfg.taressfl.alpha if cfg.taressfl.enabled else None,
        "expert": expert,
    }


def _expert_fields(expert: dict[str, Any] | None) -> dict[str, Any] | None:
    """What the table says of a TAResSFL row's expert (phase 1): its kNN, collapse, simulated attacker."""
    if not expert:
        return None
    keys = ("knn_top1", "collapsed", "simulator_ssim_final", "hinge_active_fraction", "aux_images", "target_images")
    seconds = float(expert.get("train_seconds", 0.0)) + float(expert.get("knn_seconds", 0.0))
    return {k: expert.get(k) for k in keys} | {"steps": expert.get("steps"), "seconds": seconds}


def attack_fields(cfg: Config, log: Callable[[str], None]) -> dict[str, Any]:
    """The model-inversion attack on a finished row's client model, as table fields (``attack_*``)."""
    t0 = time.perf_counter()
    result = workflow.attack(cfg, log=lambda s: log("  " + s))
    out: dict[str, Any] = {
        "attack_bytes_per_image": result["bytes_per_image"],
        "attack_smashed_shape": result["smashed_shape"],
        "attack_seconds": time.perf_counter() - t0,
        "attack_floor_mean_image_ssim": result["floors"]["mean_image"]["ssim"],
        "attack_floor_random_init_ssim": result["floors"]["random_init"]["ssim"],
        "attack_setup": (
            f"res_normN{cfg.attack.decoder_blocks}C{cfg.attack.decoder_width}, {cfg.attack.epochs} epochs on "
            f"{result['aux_images']} auxiliary images, {result['victims']} victims, {cfg.attack.seeds} attack seeds"
        ),
    }
    for m in ("ssim", "psnr", "mse"):  # one attack seed: its noise is unknown (std None), not zero
        out[f"attack_{m}"] = result[m]["mean"]
        out[f"attack_{m}_std"] = result[m]["std"] if cfg.attack.seeds > 1 else None
    return out


# ----------------------------------------------------------------------------- time estimate


def _seconds_per_step(r: Resolved, ds: workflow.Dataset) -> float:
    """A quick probe: one warm-up step, then the mean of two timed steps of a fresh trainer."""
    assert r.plan is not None
    p = ds.normalization
    shards = workflow.load_partition(r.cfg, ds)
    trainer = workflow.make_trainer(
        r.row.method, r.cfg, ds.train_x(), shards, p.mean, p.std, None, resolve_device(r.cfg.device)
    )
    trainer.advance()
    t0 = time.perf_counter()
    for _ in range(2):
        trainer.advance()
    return (time.perf_counter() - t0) / 2


def _seconds_per_image(cfg: Config, ds: workflow.Dataset) -> float:
    """Feature extraction time per image of a fresh encoder of this width and cut."""
    m = cfg.model
    client, server = split_model(m)
    enc = Encoder(client, server.backbone).eval()
    images = ds.train_x()[: cfg.evaluate.batch_size]
    kw: dict[str, Any] = dict(
        mean=ds.normalization.mean,
        std=ds.normalization.std,
        image_size=cfg.data.image_size,
        batch_size=cfg.evaluate.batch_size,
    )
    extract_features(enc, images, **kw)
    t0 = time.perf_counter()
    extract_features(enc, images, **kw)
    return (time.perf_counter() - t0) / len(images)


def _probe_seconds(cfg: Config, n_train: int, n_test: int, num_classes: int) -> float:
    """Linear-probe time: one epoch on random features of the right shape, times the epoch count."""
    e, dim = cfg.evaluate, feature_dim(cfg.model.width)
    t0 = time.perf_counter()
    linear_probe(
        torch.randn(n_train, dim),
        torch.randint(0, num_classes, (n_train,)),
        torch.randn(n_test, dim),  # validation features: test-sized stand-ins are close enough for a time estimate
        torch.randint(0, num_classes, (n_test,)),
        torch.randn(n_test, dim),
        torch.randint(0, num_classes, (n_test,)),
        num_classes,
        1,
        e.linear_lr,
        e.linear_batch_size,
        cfg.seed,
    )
    return (time.perf_counter() - t0) * e.linear_epochs


def estimate(todo: list[Resolved], log: Callable[[str], None]) -> float:
    """Estimated seconds for the rows still to run, from a few timed steps of each; one line per row to ``log``."""
    total = 0.0
    for r in todo:
        cfg = r.cfg
        ds = workflow.Dataset(cfg)
        per_image = _seconds_per_image(cfg, ds)
        n_train, n_test = len(ds.train_idx), len(ds.test_idx)
        n_val = len(ds.val_idx)
        seconds = per_image * (n_train + n_val + n_test) + _probe_seconds(cfg, n_train, n_test, ds.num_classes)
        text = "evaluation only"
        if r.plan is not None:
            pc, steps = cfg.pretrain, r.plan.total_steps
            step_s = _seconds_per_step(r, ds)
            monitors = steps // pc.knn_every + (1 if steps % pc.knn_every else 0)
            monitor_images = min(pc.knn_bank_size, n_train) + min(pc.knn_query_size, n_val)
            seconds += step_s * steps + monitors * monitor_images * per_image
            text = f"{step_s:.2f} s/step x {steps} steps + {monitors} kNN monitors + evaluation"
            if cfg.taressfl.enabled or r.row.attack:
                text += " (not counted: the TAResSFL expert, the attack)"
        log(f"  {r.row.label}, seed {cfg.seed}: ~{seconds / 60:.1f} min ({text})")
        total += seconds
    return total
