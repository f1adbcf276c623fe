"""`mocosfl <stage>`: the one command-line entry point (DVC stages and Prefect tasks call it too).

Errors that users can fix print one line on stderr and exit 2; nothing else is caught.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

EPILOG = "KEY is a dotted path into params.yaml, e.g. --set sfl.sync_period=10 --set model.width=16"


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--profile", help="named profile from params.yaml (default: its top-level `profile:`)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one config value (repeatable)",
    )
    p.add_argument(
        "--params",
        default=os.environ.get("MOCOSFL_PARAMS", "params.yaml"),
        help="path to params.yaml (default: ./params.yaml or $MOCOSFL_PARAMS)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mocosfl", description="MocoSFL: split federated learning + MoCo v2.")
    sub = parser.add_subparsers(dest="command", required=True)
    helps = {
        "prepare": "decode the dataset once into uint8 arrays",
        "partition": "split the training set into client shards",
        "pretrain": "MocoSFL self-supervised pretraining (resumes its own run)",
        "evaluate": "kNN and linear probe of the trained encoder",
        "bench": "time the simulation against centralized MoCo (last line: JSON)",
        "config": "print the resolved configuration",
        "embed": "write encoder features of an ImageFolder to .npz",
        "tune": "Optuna study over sync period and queue size (writes metrics/tune.json)",
        "report": "write reports/report.md (+ .html, PNG plots) for this config's run",
        "results": "run a suite of MocoSFL runs, baselines and ablations; write reports/results-*.md/.csv",
    }
    for name, text in helps.items():
        p = sub.add_parser(name, help=text, description=text, epilog=EPILOG)
        _common(p)
        if name == "bench":
            p.add_argument("--clients", help="comma-separated client counts (default: partition.num_clients)")
        if name == "embed":
            p.add_argument("--input", required=True, help="ImageFolder dir or .tar.gz with train/ and test/")
            p.add_argument("--output", required=True, help="output .npz")
            p.add_argument("--encoder", help="encoder.pt or run dir (default: this config's pretrain run)")
        if name == "results":
            p.add_argument("--suite", help="main | full | paper (default: paper on the paper profile, else main)")
    return parser


def _progress_bar(total: int, desc: str) -> Any:
    from tqdm import tqdm

    return tqdm(
        total=total,
        desc=desc,
        unit="step",
        dynamic_ncols=True,
        file=sys.stderr,
        disable=os.environ.get("MOCOSFL_NO_PROGRESS") == "1",
    )


def cmd_prepare(cfg: Any, args: argparse.Namespace) -> dict[str, Any]:
    from tqdm import tqdm

    from mocosfl import workflow

    bar = tqdm(desc="decoding", unit="img", file=sys.stderr, disable=os.environ.get("MOCOSFL_NO_PROGRESS") == "1")

    def progress(done: int, total: int) -> None:
        bar.total = total
        bar.n = done
        bar.refresh()

    path = workflow.prepare(cfg, progress)
    bar.close()
    return {"prepared": str(path)}


def _tracking(cfg: Any) -> Any:
    """The MLflow edge (pipelines.tracking) when tracking is on and installed, else None."""
    if not cfg.tracking.enabled or os.environ.get("MOCOSFL_TRACKING", "1") == "0":
        return None
    try:
        from pipelines import tracking
    except ImportError as e:
        print(
            f"warning: MLflow tracking is on but unavailable ({e}); set tracking.enabled=false or run `make setup`",
            file=sys.stderr,
        )
        return None
    return tracking


def cmd_pretrain(cfg: Any, args: argparse.Namespace) -> dict[str, Any]:
    from contextlib import ExitStack

    from mocosfl import workflow

    state: dict[str, Any] = {}
    tracking = _tracking(cfg)

    def on_start(trainer: Any, directory: Path) -> None:
        plan = trainer.plan
        print(
            f"run {directory} : N={plan.num_clients} M={plan.clients_per_round} b={plan.client_batch_size} "
            f"B={plan.batch_size} steps={plan.total_steps} sync every {plan.sync_period}"
            + (f" (resuming at step {trainer.step})" if trainer.step else ""),
            file=sys.stderr,
        )
        if tracking:
            # A resumed run continues its MLflow run (id kept next to its checkpoints).
            run = stack.enter_context(
                tracking.mlflow_run(
                    cfg,
                    f"pretrain-{directory.name}",
                    run_id=tracking.read_run_id(directory),
                    tags={"stage": "pretrain", "run_hash": directory.name},
                )
            )
            tracking.write_run_id(directory, run.info.run_id)
            state["run_id"] = run.info.run_id
        state["bar"] = _progress_bar(plan.total_steps, "pretrain")
        state["bar"].update(trainer.step)

    def on_step(row: dict[str, float]) -> None:
        bar = state["bar"]
        bar.update(1)
        post = {"loss": f"{row['loss']:.3f}"}
        if "knn_top1" in row:
            state["knn"] = row["knn_top1"]
        if "knn" in state:
            post["knn"] = f"{state['knn']:.1f}"
        bar.set_postfix(post, refresh=False)
        if tracking and "epoch" in row:
            tracking.log_row(row)

    with ExitStack() as stack:
        result = workflow.pretrain(cfg, on_step=on_step, on_start=on_start)
        if "bar" in state:
            state["bar"].close()
        else:
            print(f"run {result['run_dir']} already finished; nothing to do", file=sys.stderr)
        if tracking and "run_id" in state:
            tracking.log_pretrain_result(cfg, result)
    if tracking:
        result["mlflow_run_id"] = tracking.read_run_id(result["run_dir"])
    return {k: v for k, v in result.items() if k != "history"}


def cmd_evaluate(cfg: Any, args: argparse.Namespace) -> dict[str, Any]:
    from mocosfl import workflow

    result = workflow.evaluate(cfg, log=lambda s: print(s, file=sys.stderr))
    tracking = _tracking(cfg)
    if tracking:
        result["mlflow_run_id"] = tracking.log_evaluation(cfg, result)
    return result


def cmd_bench(cfg: Any, args: argparse.Namespace) -> dict[str, Any]:
    from mocosfl import bench, workflow

    clients = [int(c) for c in args.clients.split(",")] if args.clients else [cfg.partition.num_clients]
    result = bench.bench(cfg, clients, log=lambda s: print(s, file=sys.stderr))
    plot = Path(cfg.metrics_dir) / "bench.png"
    bench.plot_bench(result["results"], plot)
    workflow.write_json(Path(cfg.metrics_dir) / "bench.json", result)
    print(f"plot: {plot}", file=sys.stderr)
    return result


def cmd_embed(cfg: Any, args: argparse.Namespace) -> dict[str, Any]:
    from mocosfl import workflow

    encoder = args.encoder
    if encoder is None:
        ds = workflow.Dataset(cfg)
        encoder = workflow.run_dir(cfg, ds, workflow.shards_path(cfg))
    return workflow.embed(encoder, args.input, args.output, batch_size=cfg.evaluate.batch_size, device=cfg.device)


def cmd_tune(cfg: Any, args: argparse.Namespace) -> dict[str, Any]:
    from pipelines.tune import run_study

    return run_study(cfg, log=lambda s: print(s, file=sys.stderr))


def cmd_report(cfg: Any, args: argparse.Namespace) -> dict[str, Any]:
    from pipelines.report import make_report

    return make_report(cfg)


def cmd_results(cfg: Any, args: argparse.Namespace) -> dict[str, Any]:
    from pipelines.results import default_suite, run_suite

    return run_suite(cfg, args.suite or default_suite(cfg.profile), log=lambda s: print(s, file=sys.stderr, flush=True))


def run(argv: list[str]) -> dict[str, Any]:
    """Run one command and return its result; user errors propagate (see ``main``)."""
    args = build_parser().parse_args(argv)
    from mocosfl.config import load_config, to_yaml

    cfg = load_config(args.params, args.profile, args.overrides)
    if args.command == "config":
        return {"config": to_yaml(cfg)}
    from mocosfl import runtime, workflow

    runtime.configure(cfg.pretrain.num_threads)

    commands: dict[str, Callable[[Any, argparse.Namespace], dict[str, Any]]] = {
        "prepare": cmd_prepare,
        "partition": lambda c, a: workflow.partition(c),
        "pretrain": cmd_pretrain,
        "evaluate": cmd_evaluate,
        "bench": cmd_bench,
        "embed": cmd_embed,
        "tune": cmd_tune,
        "report": cmd_report,
        "results": cmd_results,
    }
    return commands[args.command](cfg, args)


def user_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean bad input, not a bug: printed as one line, exit code 2."""
    from mocosfl.config import ConfigError
    from mocosfl.data.partition import PartitionError
    from mocosfl.data.prepare import DataError
    from mocosfl.sfl.trainer import TrainingDiverged

    return (ConfigError, DataError, PartitionError, FileNotFoundError, TrainingDiverged)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = build_parser().parse_args(argv).command
    try:
        result = run(argv)
    except user_errors() as e:
        print(f"mocosfl {command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"mocosfl {command}: interrupted; the last checkpoint is kept", file=sys.stderr)
        return 130
    if command == "config":
        print(result["config"], end="")
    else:
        print(json.dumps(result, sort_keys=True, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
