"""`mocosfl <stage>`: the one command-line entry point (DVC stages and Prefect tasks call it too).

The core commands (prepare, partition, pretrain, evaluate, embed, bench, config) need only the library.
Commands of the MLOps edge (tune, report, results) are plugins found through the ``mocosfl.commands``
entry-point group, so this module never imports them. Mistakes a user can fix print one line on stderr
and exit 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, NoReturn

from mocosfl import __version__
from mocosfl.tracking import TrackingError

COMMAND_GROUP = "mocosfl.commands"
EPILOG = "KEY is a dotted path into params.yaml, e.g. --set sfl.sync_period=10 --set model.width=16"
CORE_HELP = {
    "prepare": "decode the dataset once into uint8 arrays",
    "partition": "split the training set into client shards",
    "pretrain": "MocoSFL self-supervised pretraining (resumes its own run)",
    "evaluate": "kNN and linear probe of the trained encoder",
    "attack": "model-inversion attack of a curious server on the trained client model",
    "bench": "time the simulation against centralized MoCo (last line: JSON)",
    "config": "print the resolved configuration",
    "embed": "write encoder features of an ImageFolder to .npz",
    "host-data": "copy out one host's share of the data for a distributed run on several hosts",
}

log = logging.getLogger("mocosfl")


class CommandError(Exception):
    """A mistake the user can fix, raised by a command (core or plugin): one line, exit code 2."""


class Parser(argparse.ArgumentParser):
    """argparse, but a usage mistake is one line on stderr (exit 2), not the usage block."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


# ----------------------------------------------------------------------------- arguments


def client_counts(text: str) -> list[int]:
    """``"100,1000"`` -> ``[100, 1000]``; argparse turns the error into one usage line."""
    try:
        counts = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a comma-separated list of client counts, e.g. 100,1000"
        ) from None
    if any(n < 1 for n in counts):
        raise argparse.ArgumentTypeError(f"{text!r}: client counts must be >= 1")
    return counts


def _default_params() -> str:
    return os.environ.get("MOCOSFL_PARAMS", "params.yaml")


def profile_names(params: str | Path) -> list[str]:
    """The profiles params.yaml defines (empty when it cannot be read: the command reports that)."""
    import yaml

    try:
        doc = yaml.safe_load(Path(params).read_text()) or {}
        return sorted((doc.get("profiles") or {}).keys())
    except (OSError, yaml.YAMLError, AttributeError):
        return []


def add_config_arguments(p: argparse.ArgumentParser, profiles: list[str] | None = None) -> None:
    """--profile, --set, --params and --device: what every command builds its config from."""
    profiles = profile_names(_default_params()) if profiles is None else profiles
    listed = f": {', '.join(profiles)}" if profiles else ""
    p.add_argument(
        "--profile",
        metavar="NAME",
        help=f"named profile from params.yaml{listed} (default: its top-level `profile:`)",
    )
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one config value (repeatable)",
    )
    p.add_argument(
        "--params", default=_default_params(), help="path to params.yaml (default: ./params.yaml or $MOCOSFL_PARAMS)"
    )
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], help="where to compute (same as --set device=...)")


def plugins() -> dict[str, Any]:
    """Commands registered by installed packages (the `pipeline` edge registers tune, report, results).

    Each is an object with ``help``, ``add_arguments(parser)`` and ``run(cfg, args) -> dict``; loading it
    must not import heavy optional packages (it checks for them when it runs).
    """
    found = {}
    for ep in entry_points(group=COMMAND_GROUP):
        if ep.name not in CORE_HELP:
            found[ep.name] = ep
    return found


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="mocosfl", description="MocoSFL: split federated learning + MoCo v2.")
    parser.add_argument("--version", action="version", version=version_text())
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    profiles = profile_names(_default_params())
    for name, text in CORE_HELP.items():
        p = sub.add_parser(name, help=text, description=text, epilog=EPILOG)
        add_config_arguments(p, profiles)
        if name == "bench":
            p.add_argument(
                "--clients", type=client_counts, help="comma-separated client counts (default: partition.num_clients)"
            )
        if name == "embed":
            p.add_argument("--input", required=True, help="ImageFolder dir or .tar.gz with train/ and test/")
            p.add_argument("--output", required=True, help="output .npz")
            p.add_argument("--encoder", help="encoder.pt or run dir (default: this config's pretrain run)")
        if name == "host-data":
            p.add_argument("--role", required=True, help="`server` (validation images only) or a client host's number")
            p.add_argument("--out", required=True, help="folder to write the host's prepared data and shard index to")
    for name, ep in plugins().items():
        command = ep.load()
        p = sub.add_parser(name, help=command.help, description=command.help, epilog=EPILOG)
        add_config_arguments(p, profiles)
        command.add_arguments(p)
    return parser


def version_text() -> str:
    from mocosfl.identity import code_hash

    return f"mocosfl {__version__} (training code {code_hash()})"


# ----------------------------------------------------------------------------- commands


def _progress_bar(total: int, desc: str, unit: str = "step") -> Any:
    from tqdm import tqdm

    return tqdm(
        total=total,
        desc=desc,
        unit=unit,
        dynamic_ncols=True,
        file=sys.stderr,
        disable=os.environ.get("MOCOSFL_NO_PROGRESS") == "1",
    )


def cmd_prepare(cfg: Any, args: argparse.Namespace) -> dict[str, Any]:
    from mocosfl import workflow

    bar = _progress_bar(0, "decoding", unit="img")

    def progress(done: int, total: int) -> None:
        bar.total = total
        bar.n = done
        bar.refresh()

    path = workflow.prepare(cfg, progress)
    bar.close()
    return {"prepared": str(path)}


def cmd_partition(cfg: Any, args: argparse.Namespace) -> dict[str, Any]:
    from mocosfl import workflow

    return workflow.partition(cfg)


def cmd_pretrain(cfg: Any, args: argparse.Namespace) -> dict[str, Any]:
    from mocosfl import workflow
    from mocosfl.tracking import load_tracker

    state: dict[str, Any] = {}

    def on_start(trainer: Any, directory: Path) -> None:
        plan = trainer.plan
        resuming = f" (resuming at step {trainer.step})" if trainer.step else ""
        log.info(
            "run %s : N=%d M=%d b=%d B=%d steps=%d, re-sample every %d, sync %s%s",
            directory,
            plan.num_clients,
            plan.clients_per_round,
            plan.client_batch_size,
            plan.batch_size,
            plan.total_steps,
            plan.sample_period,
            "never" if plan.sync_period is None else f"every {plan.sync_period}",
            resuming,
        )
        if "bar" in state:  # TAResSFL: the expert's bar (phase 1) ends where the run's starts
            state["bar"].close()
            state.pop("knn", None)
        state["bar"] = _progress_bar(plan.total_steps, "expert" if trainer.method == "expert" else "pretrain")
        state["bar"].update(trainer.step)

    def on_step(row: dict[str, float]) -> None:
        bar = state["bar"]
        bar.update(1)
        if "knn_top1" in row:
            state["knn"] = row["knn_top1"]
        post = {"loss": f"{row['loss']:.3f}"}
        if "knn" in state:
            post["knn"] = f"{state['knn']:.1f}"
        bar.set_postfix(post, refresh=False)

    result = workflow.pretrain(cfg, on_step=on_step, on_start=on_start, tracker=load_tracker(cfg))
    if "bar" in state:
        state["bar"].close()
    return {k: v for k, v in result.items() if k != "history"}


def cmd_evaluate(cfg: Any, args: argparse.Namespace) -> dict[str, Any]:
    from mocosfl import workflow
    from mocosfl.tracking import load_tracker

    return workflow.evaluate(cfg, tracker=load_tracker(cfg))


def cmd_attack(cfg: Any, args: argparse.Namespace) -> dict[str, Any]:
    from mocosfl import workflow
    from mocosfl.tracking import load_tracker

    result = workflow.attack(cfg, tracker=load_tracker(cfg))
    return {k: v for k, v in result.items() if not k.endswith("per_seed")}


def cmd_bench(cfg: Any, args: argparse.Namespace) -> dict[str, Any]:
    from mocosfl import bench
    from mocosfl.io import write_json

    clients = args.clients or [cfg.partition.num_clients]
    if cfg.distributed.client_hosts:
        from mocosfl.distributed.bench import bench_distributed

        rows = [bench_distributed(cfg, n, log=log.info) for n in clients]
        write_json(Path(cfg.metrics_dir) / "bench-distributed.json", {"results": rows})
        return {"results": rows}
    result = bench.bench(cfg, clients, log=log.info)
    plot = Path(cfg.metrics_dir) / "bench.png"
    bench.plot_bench(result["results"], plot)
    write_json(Path(cfg.metrics_dir) / "bench.json", result)
    log.info("plot: %s", plot)
    return result


def cmd_embed(cfg: Any, args: argparse.Namespace) -> dict[str, Any]:
    from mocosfl import workflow

    encoder = args.encoder
    if encoder is None:
        ds = workflow.Dataset(cfg)
        encoder = workflow.run_dir(cfg, ds, workflow.shards_path(cfg))
    return workflow.embed(encoder, args.input, args.output, batch_size=cfg.evaluate.batch_size, device=cfg.device)


def cmd_host_data(cfg: Any, args: argparse.Namespace) -> dict[str, Any]:
    from mocosfl.distributed.hosts import export_host_data

    result = export_host_data(cfg, args.role, Path(args.out))
    log.info("on that host, add: %s", " ".join(f"--set {s}" for s in result["settings"]))
    return result


CORE_COMMANDS: dict[str, Callable[[Any, argparse.Namespace], dict[str, Any]]] = {
    "prepare": cmd_prepare,
    "partition": cmd_partition,
    "pretrain": cmd_pretrain,
    "evaluate": cmd_evaluate,
    "attack": cmd_attack,
    "bench": cmd_bench,
    "embed": cmd_embed,
    "host-data": cmd_host_data,
}


def load(args: argparse.Namespace) -> Any:
    """The config of a parsed command line: params file, profile, --device, --set, $MOCOSFL_TRACKING."""
    from mocosfl.config import load_config

    overrides = list(args.overrides)
    if args.device:
        overrides.insert(0, f"device={args.device}")
    if os.environ.get("MOCOSFL_TRACKING") == "0":
        overrides.append("tracking.enabled=false")
    return load_config(args.params, args.profile, overrides)


def run(argv: list[str]) -> dict[str, Any]:
    """Run one command and return its result; user errors propagate (see ``main``)."""
    return run_parsed(build_parser().parse_args(argv))


def run_parsed(args: argparse.Namespace) -> dict[str, Any]:
    """``run`` for a command line already parsed (``main`` parses once for the error messages too)."""
    cfg = load(args)
    if args.command == "config":
        from mocosfl.config import to_yaml

        return {"config": to_yaml(cfg)}
    from mocosfl import runtime

    runtime.configure(cfg.pretrain.num_threads)
    if args.command in CORE_COMMANDS:
        return CORE_COMMANDS[args.command](cfg, args)
    return plugins()[args.command].load().run(cfg, args)  # type: ignore[no-any-return]


def user_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean bad input, not a bug: printed as one line, exit code 2."""
    from mocosfl.config import ConfigError
    from mocosfl.data.partition import PartitionError
    from mocosfl.data.prepare import DataError
    from mocosfl.distributed.roles import DistributedError
    from mocosfl.sfl.trainer import TrainingDiverged

    return (CommandError, ConfigError, DataError, PartitionError, FileNotFoundError, TrainingDiverged, DistributedError)


class _StderrHandler(logging.Handler):
    """Writes to whatever ``sys.stderr`` is at the time (test capture, Prefect's redirection)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            prefix = "warning: " if record.levelno >= logging.WARNING else ""
            sys.stderr.write(prefix + self.format(record) + "\n")
            sys.stderr.flush()
        except Exception:  # noqa: BLE001 - logging must never break the command
            self.handleError(record)


def configure_logging(level: int = logging.INFO) -> None:
    """The library's log lines (logger ``mocosfl``) on stderr, once per process."""
    root = logging.getLogger("mocosfl")
    if not any(isinstance(h, _StderrHandler) for h in root.handlers):
        root.addHandler(_StderrHandler())
    root.setLevel(level)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    configure_logging()
    args = build_parser().parse_args(argv)
    command = args.command
    try:
        result = run_parsed(args)
    except user_errors() as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        print(f"mocosfl {command}: error: {first}", file=sys.stderr)
        return 2
    except TrackingError as e:
        print(f"mocosfl {command}: tracking failed: {(str(e).strip().splitlines() or ['?'])[0]}", file=sys.stderr)
        return 1
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
