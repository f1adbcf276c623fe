"""One rank of a distributed run: ``torchrun ... -m mocosfl.distributed.worker [--role ROLE] [--config FILE.json |
--profile NAME --set KEY=VALUE ...]`` (``mocosfl pretrain`` passes ``--config``; on several hosts each host
gives its ``--role`` and the same options as ``mocosfl pretrain``).

Rank 0 runs ``workflow.pretrain`` as the server (metrics, checkpoint, encoder, tracking as in process);
rank h + 1 runs client host h on its own clients' images only.
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import logging
import os
import signal
import sys
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch.distributed as dist

from mocosfl.config import Config, ConfigError, from_dict
from mocosfl.distributed.roles import SERVER, DistributedError, rank_name, role_rank

log = logging.getLogger("mocosfl.distributed")

COLLECTIVE_TIMEOUT = timedelta(minutes=30)  # c10d's default; a rank that dies is noticed at once anyway


def run_client_host(cfg: Config, host: int) -> None:
    """Client host ``host``: load only its clients' shards' images, then follow the server step by step."""
    from mocosfl import workflow
    from mocosfl.distributed.roles import client_host_trainer, load_agreed_checkpoint
    from mocosfl.sfl.loop import resolve_device

    ds = workflow.Dataset(cfg)
    shards = workflow.load_partition(cfg, ds)
    norm = ds.normalization

    def pixels(idx: np.ndarray) -> np.ndarray:
        return np.asarray(ds.prepared.train_x[ds.train_idx[idx]])

    bank = workflow.knn_bank(cfg, shards)
    device = resolve_device(cfg.device)
    trainer = client_host_trainer(cfg, host, pixels, len(ds.train_idx), shards, norm, device, bank_rows=bank)
    checkpoints = workflow.run_dir(cfg, ds, workflow.shards_path(cfg)) / f"client-host-{host}"
    load_agreed_checkpoint(trainer, checkpoints)
    resumed = f", resuming at step {trainer.step}" if trainer.step else ""
    log.info("client host %d: %d clients, %d images%s", host, trainer.num_own_clients, trainer.num_own_images, resumed)
    trainer.run_host(checkpoints)


def run_server(cfg: Config) -> None:
    from mocosfl import workflow
    from mocosfl.tracking import load_tracker

    def on_step(row: dict[str, float]) -> None:
        if "epoch" in row:
            knn = f", kNN {row['knn_top1']:.1f}%" if "knn_top1" in row else ""
            log.info("step %d: loss %.3f%s", int(row["step"]), row["loss_mean"], knn)

    workflow.pretrain(cfg, on_step=on_step, tracker=load_tracker(cfg))


def init_process_group(rank: int, timeout: timedelta) -> None:
    """gloo over torchrun's store, under a prefix of its own per restart: the store outlives a failed
    attempt, and without the prefix a restarted rank read the dead ranks' addresses and never connected."""
    world = int(os.environ["WORLD_SIZE"])
    agent_hosts_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    try:
        store = dist.TCPStore(
            os.environ["MASTER_ADDR"],
            int(os.environ["MASTER_PORT"]),
            world,
            # torchrun's rank 0 hosts the store when its agent does not: not always the server on several hosts
            is_master=os.environ["RANK"] == "0" and not agent_hosts_store,
            timeout=timeout,
        )
        prefixed = dist.PrefixStore(f"mocosfl/attempt-{attempt}", store)
        if prefixed.add(f"role-{rank}", 1) != 1:  # before gloo, which would wait for the missing rank
            raise DistributedError(f"two hosts were started as {rank_name(rank)}: give each host its own --role")
        # Joining waits distributed.timeout_s (the store's timeout); a step, a FedAvg or a checkpoint may
        # keep the other ranks waiting far longer (the server's kNN monitor, a bank written to disk).
        dist.init_process_group(
            "gloo", store=prefixed, rank=rank, world_size=world, timeout=max(timeout, COLLECTIVE_TIMEOUT)
        )
    except RuntimeError as e:  # c10d's own message is pages long (DistStoreError is one)
        raise DistributedError(
            f"not every rank of {world} joined within distributed.timeout_s={timeout.total_seconds():g} s "
            f"({type(e).__name__}); check that each client host runs and reaches the server"
        ) from None


def finished_elsewhere(cfg: Config, rank: int) -> bool:
    """Whether the server holds this run finished (a collective: every rank calls it once, after joining).
    The server then only reports it; the client hosts, whose disks do not say, stop at once."""
    import torch

    from mocosfl import workflow

    done = torch.zeros(1, dtype=torch.long)
    if rank == SERVER:
        done[0] = int(workflow.finished_run(cfg) is not None)
    dist.broadcast(done, src=SERVER)
    return bool(done.item())


def parse_args(argv: list[str]) -> argparse.Namespace:
    from mocosfl.cli import Parser, add_config_arguments

    p = Parser(
        prog="python -m mocosfl.distributed.worker",
        description="one rank of a distributed MocoSFL run, started by torchrun (see README: Distributed training)",
    )
    p.add_argument("--config", help="the resolved config as JSON (written by `mocosfl pretrain` on one host)")
    p.add_argument("--role", help="`server` or a client host's number (0-based); default: torchrun's rank")
    p.add_argument("--bench", metavar="DIR", help="time steps for `mocosfl bench` and write rank-<r>.json to DIR")
    add_config_arguments(p)
    return p.parse_args(argv)


def main(argv: list[str]) -> int:
    from mocosfl import runtime
    from mocosfl.cli import configure_logging, load, user_errors

    configure_logging()
    # A rank torchrun stops (another rank failed) prints where it was: a hang is never silent.
    faulthandler.register(signal.SIGTERM, chain=True)
    args = parse_args(argv)
    rank = -1
    try:
        if args.config and (args.profile or args.overrides):
            raise ConfigError("give either --config or --profile/--set, not both")
        cfg = from_dict(json.loads(Path(args.config).read_text())) if args.config else load(args)
        hosts = cfg.distributed.client_hosts
        if hosts < 1 or "WORLD_SIZE" not in os.environ:
            raise ConfigError(
                "the worker is one rank of a distributed run: start it with torchrun and "
                "distributed.client_hosts >= 1 (README: Distributed training)"
            )
        rank = role_rank(args.role, hosts)
        world = int(os.environ["WORLD_SIZE"])
        if world != hosts + 1:
            raise ConfigError(
                f"torchrun started {world} processes in all but distributed.client_hosts={hosts} needs "
                f"{hosts + 1} (the server and one per client host)"
            )
        # torchrun sets OMP_NUM_THREADS=1 for every rank; the server keeps the host's cores unless told.
        threads = (cfg.pretrain.num_threads or len(os.sched_getaffinity(0))) if rank == SERVER else None
        runtime.configure(threads or cfg.distributed.client_host_threads)
        init_process_group(rank, timedelta(seconds=cfg.distributed.timeout_s))
        if args.bench is None and finished_elsewhere(cfg, rank) and rank != SERVER:
            log.info("%s: the server holds this run finished; nothing to do", rank_name(rank))
        elif args.bench is not None:
            from mocosfl.distributed.bench import run_rank

            run_rank(cfg, Path(args.bench))
        elif rank == SERVER:
            run_server(cfg)
        else:
            run_client_host(cfg, rank - 1)
    except user_errors() as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        who = "" if rank < 0 else f", {rank_name(rank)}"
        print(f"mocosfl pretrain{who}: error: {first}", file=sys.stderr)
        return 2
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
