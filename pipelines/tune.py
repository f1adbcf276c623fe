"""Optuna study over the sync period and the shared-queue size, each trial a short pretrain scored by kNN top-1.

The score is the pretrain kNN monitor's: training images as memory bank, the validation images
(``data.val_size``, carved from the training set) as queries. No test image is read, so the chosen
settings are not fitted to the test set that ``mocosfl evaluate`` reports on.

The study lives in a database (``tune.storage``: a SQLite file by default, or a PostgreSQL URL shared by hosts)
so it can be resumed, extended (raise ``tune.n_trials`` and run again) or shared by several ``mocosfl tune``
processes. Running trials beat every ``tune.heartbeat_s``; a trial silent for 3 beats (its process died) is
marked failed by the next trial to start, its MLflow runs are ended, and it is run again (``tune.max_retries``).
Results: ``<metrics_dir>/tune.json``, plots in
``tune.out_dir`` and ``<tune.out_dir>/best_params.json``, whose ``"overrides"`` list is what
``mocosfl pretrain --set …`` and the Prefect flow's ``overrides`` parameter take, e.g.
``mocosfl pretrain $(jq -r '.overrides[] | "--set " + .' tune/best_params.json)``.
"""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from mocosfl import workflow
from mocosfl.config import Config, portable
from mocosfl.io import write_json
from mocosfl.sfl.trainer import TrainingDiverged
from pipelines import lock, pool, tracking

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)


def storage_url(cfg: Config) -> str:
    """``tune.storage`` as a database URL: a URL as given, a path as a SQLite file."""
    store = cfg.tune.storage
    return store if "://" in store else f"sqlite:///{Path(store).resolve()}"


def shown_url(url: str) -> str:
    """A storage URL fit for logs and result files: any password replaced by ``***``."""
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


def _engine_kwargs(url: str) -> dict[str, Any]:
    if url.startswith("sqlite"):
        # Several processes share the file: wait for SQLite's lock instead of failing at once.
        return {"connect_args": {"timeout": 60}}
    # A server that went away fails a call within seconds instead of hanging; dead pooled connections are
    # replaced before use.
    return {"pool_pre_ping": True, "connect_args": {"connect_timeout": 10}}


def _close_mlflow_runs(cfg: Config, trial: FrozenTrial) -> None:
    """End the MLflow runs a dead worker left RUNNING: its trial's run and the study run of its process.
    Best effort: a tracker that cannot be reached leaves them, with a warning, and the study goes on."""
    if not tracking.enabled(cfg):
        return
    import mlflow

    try:
        client = mlflow.MlflowClient()
        for key in ("mlflow_run_id", "mlflow_parent_run_id"):
            run_id = trial.user_attrs.get(key)
            if run_id and client.get_run(run_id).info.status == "RUNNING":
                client.set_terminated(run_id, status="FAILED")
    except Exception as e:  # noqa: BLE001 - never lose the retry over a tracking error
        logging.getLogger(__name__).warning("trial %d: its MLflow runs were not ended (%s)", trial.number, e)


def _on_stale_trial(cfg: Config) -> Callable[[optuna.Study, FrozenTrial], None]:
    """Optuna's callback for a trial whose worker stopped beating: close its MLflow runs, enqueue a retry."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        retry = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=cfg.tune.max_retries)

    def callback(study: optuna.Study, trial: FrozenTrial) -> None:
        retry(study, trial)  # first: the retry must not depend on MLflow being reachable
        _close_mlflow_runs(cfg, trial)

    return callback


def make_pruner(cfg: Config) -> optuna.pruners.BasePruner:
    t = cfg.tune
    if t.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=0)
    if t.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=t.knn_every, max_resource=t.steps)
    if t.pruner == "threshold":
        return optuna.pruners.ThresholdPruner(lower=t.threshold_knn)
    return optuna.pruners.NopPruner()


class _Storage(optuna.storages.RDBStorage):
    """RDBStorage whose heartbeat survives a database hiccup: Optuna's heartbeat thread stops for good at the
    first error, after which other workers would take a live trial for a dead one and run it twice."""

    def record_heartbeat(self, trial_id: int) -> None:
        try:
            super().record_heartbeat(trial_id)
        except Exception as e:  # noqa: BLE001 - the next beat tries again
            logging.getLogger(__name__).warning("heartbeat of trial %d not recorded (%s)", trial_id, e)


def load_study(cfg: Config, create: bool = True) -> optuna.Study:
    """Create the study (or load it) in its store (``tune.storage``), with heartbeats for its running trials.

    ``create=False`` (a pool's flow run joining a study): a study missing from the store is an error, not a new
    private study (a worker whose ``tune.storage`` names another database, or a SQLite file of its own host)."""
    url, t = storage_url(cfg), cfg.tune
    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # heartbeats, since Optuna 2.x
        storage = _Storage(
            url,
            engine_kwargs=_engine_kwargs(url),
            heartbeat_interval=t.heartbeat_s,
            grace_period=3 * t.heartbeat_s,
            heartbeat_stale_trial_callback=_on_stale_trial(cfg),
        )
    if not create and cfg.tune.study_name not in optuna.get_all_study_names(storage):
        raise pool.PoolError(
            f"study {cfg.tune.study_name} is not in {shown_url(url)} as seen from {socket.gethostname()}: this worker "
            "does not share the study's database (a SQLite tune.storage is one host's; use a PostgreSQL URL)"
        )
    study = optuna.create_study(
        study_name=cfg.tune.study_name,
        storage=storage,
        direction="maximize",
        load_if_exists=True,
        pruner=make_pruner(cfg),
    )
    # Seeded per invocation with the trials already stored, so extending a study samples new points
    # instead of replaying the first process's random start-up sequence.
    # constant_liar: a running trial counts as a poor result, so parallel workers do not all sample one point.
    # A database server means parallel workers, which may start together with the same trial count: their
    # seeds also differ by host and process, or TPE's random start-up trials would repeat across them.
    seed = cfg.seed + len(study.trials)
    if not url.startswith("sqlite"):
        seed += int(hashlib.sha256(f"{socket.gethostname()}:{os.getpid()}".encode()).hexdigest()[:6], 16)
    study.sampler = optuna.samplers.TPESampler(seed=seed, constant_liar=True)
    return study


def trial_config(cfg: Config, trial: optuna.Trial) -> Config:
    t = cfg.tune
    sync_period = trial.suggest_int("sync_period", t.sync_period_min, t.sync_period_max, log=True)
    queue_size = trial.suggest_int("queue_size", t.queue_size_min, t.queue_size_max, log=True)
    return cfg.replace(
        **{
            "sfl.sync_period": sync_period,
            "moco.queue_size": queue_size,
            "pretrain.steps": t.steps,
            "pretrain.knn_every": t.knn_every,
            "pretrain.checkpoint_every": t.steps,
            # Trials write their pretrain.json here, not over the pretrain stage's metrics/pretrain.json.
            "metrics_dir": str(Path(t.out_dir) / "trials" / f"trial-{trial.number}"),
        }
    )


def _train(trial: optuna.Trial, trial_cfg: Config, track: bool) -> float:
    """Pretrain one trial, reporting each (validation) kNN to the pruner (raises TrialPruned)."""
    reported: set[int] = set()

    def report(row: dict[str, Any]) -> None:
        step = int(row["step"])
        if "knn_top1" not in row or step in reported:
            return
        reported.add(step)
        trial.report(float(row["knn_top1"]), step=step)
        if trial.should_prune():
            raise optuna.TrialPruned(f"kNN top-1 {row['knn_top1']:.2f} at step {step}")

    def on_step(row: dict[str, float]) -> None:
        if track and "epoch" in row:
            tracking.log_row(row)  # loss and kNN at this step, one batched call
        report(row)

    result = workflow.pretrain(trial_cfg, on_step=on_step)
    # A run finished earlier (same config) is returned without training: replay its kNN history so
    # the pruner and the intermediate values see it like a fresh run.
    for row in result.get("history", []):
        if "knn_top1" in row and int(row["step"]) not in reported:
            if track:
                tracking.log_row(row)
            report(row)
    if result.get("knn_top1") is None:
        raise RuntimeError(f"run {result.get('run_dir')} has no kNN result")
    if track:
        import mlflow

        mlflow.set_tag("run_hash", str(result.get("run_id", "")))
        mlflow.log_metric("objective_val_knn_top1", float(result["knn_top1"]))
    return float(result["knn_top1"])


def make_objective(cfg: Config, parent_run_id: str | None = None) -> Callable[[optuna.Trial], float]:
    """The study's objective; with tracking, each trial an MLflow run nested under this process's active run
    or, given ``parent_run_id``, under that run of another process (the study's, for a pool's flow runs)."""
    track = tracking.enabled(cfg)

    def objective(trial: optuna.Trial) -> float:
        trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")  # which process ran it
        trial_cfg = trial_config(cfg, trial)
        if not track:
            return _train(trial, trial_cfg, track=False)
        import mlflow

        n = trial.number
        pruned: optuna.TrialPruned | None = None
        parent = mlflow.active_run()
        with tracking.mlflow_run(
            trial_cfg,
            f"trial-{n}",
            nested=parent is not None,
            parent_run_id=None if parent is not None else parent_run_id,
            tags={"stage": "tune-trial", "trial": str(n), "study_name": cfg.tune.study_name},
        ) as run:
            # Whoever finds this trial's worker dead ends these runs (_close_mlflow_runs): the trial's, and the
            # parent when it belongs to the same process (a pool's flow run leaves the study's run alone).
            trial.set_user_attr("mlflow_run_id", run.info.run_id)
            if parent is not None:
                trial.set_user_attr("mlflow_parent_run_id", parent.info.run_id)
            mlflow.log_params(
                {
                    "sync_period": trial.params["sync_period"],
                    "queue_size": trial.params["queue_size"],
                    "trial_number": n,
                }
            )
            try:
                value = _train(trial, trial_cfg, track=True)
            except optuna.TrialPruned as e:
                # Caught inside the run: an exception leaving it would mark it FAILED.
                mlflow.set_tag("trial_state", "PRUNED")
                pruned = e
            else:
                mlflow.set_tag("trial_state", "COMPLETE")
        if pruned is not None:
            mlflow.MlflowClient().set_terminated(run.info.run_id, status="KILLED")
            raise pruned
        return value

    return objective


def _log_trial(log: Callable[[str], None], target: int) -> Callable[[optuna.Study, FrozenTrial], None]:
    def callback(study: optuna.Study, t: FrozenTrial) -> None:
        done = sum(1 for s in study.get_trials(deepcopy=False) if s.state in FINISHED)
        params = " ".join(f"{k}={v}" for k, v in t.params.items())
        if t.state == TrialState.COMPLETE:
            outcome = f"val kNN top-1 {t.value:.2f}"
        elif t.state == TrialState.PRUNED:
            last = t.last_step
            outcome = f"pruned at step {last}" if last is not None else "pruned"
        else:
            outcome = t.state.name.lower()
        secs = t.duration.total_seconds() if t.duration else 0.0
        log(f"trial {t.number} [{done}/{target}] {params}: {outcome} ({secs:.1f} s)")

    return callback


def _importances(study: optuna.Study) -> Any:
    from optuna.visualization import matplotlib as ovm

    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if len(complete) < 2 or all(t.params == complete[0].params for t in complete):
        raise ValueError(f"needs >= 2 complete trials with different params (have {len(complete)} complete)")
    return ovm.plot_param_importances(study)


def _save_plots(study: optuna.Study, out_dir: Path, log: Callable[[str], None]) -> list[Path]:
    """Optimization history and parameter importances as PNGs; a PNG saying why when one can't be drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as ovm

    paths = []
    plots: dict[str, Callable[[optuna.Study], Any]] = {
        "optimization_history.png": ovm.plot_optimization_history,
        "param_importances.png": _importances,
    }
    for name, plot in plots.items():
        path = out_dir / name
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            warnings.simplefilter("ignore", UserWarning)  # matplotlib: empty legends while the study is young
            try:
                fig = plot(study).figure
            except Exception as e:  # a plot is a by-product: never fail the study over it
                log(f"{name}: not drawn ({e}); writing a placeholder")
                fig, ax = plt.subplots(figsize=(6, 2))
                ax.axis("off")
                ax.text(
                    0.5,
                    0.5,
                    f"{name.removesuffix('.png')}: not available\n{e}"[:300],
                    ha="center",
                    va="center",
                    wrap=True,
                )
            fig.tight_layout()
        fig.savefig(path, dpi=100, bbox_inches="tight")
        plt.close(fig)
        paths.append(path)
    return paths


def summarize(cfg: Config, study: optuna.Study) -> dict[str, Any]:
    trials = study.get_trials(deepcopy=False)
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    best = max(complete, key=lambda t: float(t.value or 0.0)) if complete else None
    return {
        "study_name": cfg.tune.study_name,
        "storage": shown_url(storage_url(cfg)),
        "n_trials": sum(1 for t in trials if t.state in FINISHED),
        "n_complete": len(complete),
        "n_pruned": sum(1 for t in trials if t.state == TrialState.PRUNED),
        "n_failed": sum(1 for t in trials if t.state == TrialState.FAIL),
        "best_value": best.value if best else None,
        "best_params": dict(best.params) if best else {},
        "best_trial": best.number if best else None,
        "trials": [
            {
                "number": t.number,
                "state": t.state.name,
                "params": dict(t.params),
                "value": t.value,
                "last_step": t.last_step,
                "seconds": t.duration.total_seconds() if t.duration else None,
                "worker": t.user_attrs.get("worker"),
            }
            for t in trials
        ],
    }


def _prepare(cfg: Config, log: Callable[[str], None]) -> None:
    """Data and shards for the trials, made under the checkout's pipeline lock (another process sharing the
    study on this host may be making them too)."""
    with lock.exclusive("tune: prepare and partition", log=log):
        workflow.ensure_partition(cfg)


# After its own last trial the study's starter waits this long at least for the pool's flow runs to end their
# trial in progress (3 times its longest trial when that is more); a run still going after that (its worker's
# host died: Prefect leaves its run RUNNING) is left, with a warning.
POOL_WAIT_MIN_S = 600.0


def run_study(cfg: Config, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run trials until the study holds ``tune.n_trials`` finished (complete or pruned) ones; write results.

    ``tune.executor=pool``: flow runs on the work pool run trials of the same study beside this process."""
    _prepare(cfg, log)
    if cfg.tune.executor == "pool":
        _check_pool_config(cfg)
    out_dir = Path(cfg.tune.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    optuna_logger = logging.getLogger("optuna")
    old_level = optuna_logger.level
    optuna_logger.setLevel(logging.WARNING)  # one line per trial comes from _log_trial instead
    try:
        study = load_study(cfg)
        target = cfg.tune.n_trials
        done = sum(1 for t in study.get_trials(deepcopy=False) if t.state in FINISHED)
        log(
            f"study {cfg.tune.study_name} at {shown_url(storage_url(cfg))}: {done}/{target} trials finished, "
            f"pruner {cfg.tune.pruner}"
        )
        track = tracking.enabled(cfg)
        t0 = time.perf_counter()
        if track:
            import mlflow

            with tracking.mlflow_run(
                cfg, f"tune-{cfg.tune.study_name}", tags={"stage": "tune", "study_name": cfg.tune.study_name}
            ) as parent:
                _work(cfg, study, target - done, log, parent.info.run_id)
                result = _write_results(cfg, study, out_dir, log, {"mlflow_run_id": parent.info.run_id})
                mlflow.log_metrics({k: float(result[k]) for k in ("n_trials", "n_complete", "n_pruned")})
                if result["best_value"] is not None:
                    mlflow.log_metric("best_val_knn_top1", float(result["best_value"]))
                    mlflow.log_params({f"best.{k}": v for k, v in result["best_params"].items()})
                files = [str(Path(cfg.metrics_dir) / "tune.json"), result["best_params_file"], *result["plots"]]
                for path in files:
                    if Path(path).exists():
                        mlflow.log_artifact(path, artifact_path="tune")
        else:
            _work(cfg, study, target - done, log, None)
            result = _write_results(cfg, study, out_dir, log)
        log(
            f"study {cfg.tune.study_name}: {result['n_trials']} finished ({result['n_pruned']} pruned), "
            f"best {result['best_value']} {result['best_params']} in {time.perf_counter() - t0:.1f} s"
        )
        return result
    finally:
        optuna_logger.setLevel(old_level)


def _check_pool_config(cfg: Config) -> None:
    """Before any training: the config can travel as flow-run parameters, and a Prefect server is set."""
    pool.check_no_password(cfg.to_dict())
    pool.api_url()


def _work(
    cfg: Config, study: optuna.Study, remaining: int, log: Callable[[str], None], parent_run_id: str | None
) -> None:
    """Run the remaining trials here, and with ``tune.executor=pool`` also in flow runs on the work pool."""
    if remaining <= 0:
        return
    if cfg.tune.executor == "local" or cfg.tune.pool_runs < 2:
        _optimize(cfg, study, remaining, log)
        return
    online = pool.online_workers()
    if not online:
        log(f"no worker is online on work pool {pool.POOL}: running every trial here (start some with `make worker`)")
        _optimize(cfg, study, remaining, log)
        return
    helpers = min(cfg.tune.pool_runs - 1, remaining)
    config = portable(cfg.replace(**{"tune.executor": "local"}), lock.ROOT)
    ids = pool.submit(
        pool.TUNE_TRIALS,
        {"config": config, "parent_run_id": parent_run_id},
        helpers,
        name=f"trials-{cfg.tune.study_name}",
    )
    log(
        f"submitted {helpers} flow run(s) of {pool.TUNE_TRIALS} to work pool {pool.POOL} "
        f"({len(online)} worker(s) online); running trials here too"
    )
    try:
        mine = _optimize(cfg, study, remaining, log)
    except BaseException:
        pool.cancel_unstarted(ids)  # the flow runs already going finish the study on their own
        raise
    longest = max((t.duration.total_seconds() for t in mine if t.duration), default=0.0)
    try:
        counts = pool.finish(ids, log, timeout_s=max(POOL_WAIT_MIN_S, 3 * longest))
    except pool.PoolError as e:  # the study is complete in its database whatever became of a helper
        log(f"warning: {e}")
        return
    log(
        f"work pool: {counts['completed']} flow run(s) completed, {counts['cancelled']} cancelled (never started)"
        + (f", {counts['abandoned']} left running" if counts["abandoned"] else "")
    )


def run_trials(cfg: Config, parent_run_id: str | None = None, log: Callable[[str], None] = print) -> dict[str, Any]:
    """One participant of a shared study (a pool's flow run): trials until the study holds ``tune.n_trials``
    finished ones, each nested under the study's MLflow run ``parent_run_id``. Writes no result files: the
    process that started the study does, once every participant has ended. Returns counts of this process's
    trials."""
    tracking.require_run(cfg, parent_run_id)
    _prepare(cfg, log)
    optuna_logger = logging.getLogger("optuna")
    old_level = optuna_logger.level
    optuna_logger.setLevel(logging.WARNING)
    try:
        study = load_study(cfg, create=False)
        done = sum(1 for t in study.get_trials(deepcopy=False) if t.state in FINISHED)
        log(f"study {cfg.tune.study_name} at {shown_url(storage_url(cfg))}: {done}/{cfg.tune.n_trials} finished")
        mine = _optimize(cfg, study, cfg.tune.n_trials - done, log, parent_run_id)
    finally:
        optuna_logger.setLevel(old_level)
    return {
        "study_name": cfg.tune.study_name,
        "host": socket.gethostname(),
        "trials": [t.number for t in mine],
        "states": {s.name: n for s in TrialState if (n := sum(1 for t in mine if t.state == s))},
    }


def _optimize(
    cfg: Config, study: optuna.Study, remaining: int, log: Callable[[str], None], parent_run_id: str | None = None
) -> list[FrozenTrial]:
    """Run trials in this process until the study holds ``tune.n_trials`` finished ones; the trials it ran.

    Processes sharing the study each stop at that count, so together they may finish a few more (a trial
    started while the last ones were still running)."""
    mine: list[FrozenTrial] = []
    if remaining <= 0:
        return mine
    # n_trials caps this process's attempts (failed trials included); the callback stops it as soon as
    # the study, counting other processes' trials, holds n_trials finished ones.
    stop = optuna.study.MaxTrialsCallback(cfg.tune.n_trials, states=FINISHED)
    study.optimize(
        make_objective(cfg, parent_run_id),
        n_trials=remaining,
        callbacks=[stop, _log_trial(log, cfg.tune.n_trials), lambda _, t: mine.append(t)],
        catch=(TrainingDiverged,),
        gc_after_trial=False,
    )
    return mine


def _write_results(
    cfg: Config, study: optuna.Study, out_dir: Path, log: Callable[[str], None], extra: dict[str, Any] | None = None
) -> dict[str, Any]:
    result = {**summarize(cfg, study), **(extra or {})}
    best = result["best_params"]
    overrides = [f"sfl.sync_period={best['sync_period']}", f"moco.queue_size={best['queue_size']}"] if best else []
    write_json(
        out_dir / "best_params.json",
        {"overrides": overrides, "best_value": result["best_value"], "study_name": cfg.tune.study_name},
    )
    result["best_params_file"] = str(out_dir / "best_params.json")
    result["plots"] = [str(p) for p in _save_plots(study, out_dir, log)]
    write_json(Path(cfg.metrics_dir) / "tune.json", result)
    return result
