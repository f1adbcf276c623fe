"""Each host's share of the data for a distributed run on several hosts (``mocosfl host-data``).

A client host gets the training images of its own clients only; the server gets the validation images
(the kNN monitor's queries) and none of the training images. Labels, the shard index and the data's
identity are the same everywhere, so every host computes the same run directory.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np

from mocosfl.config import Config, ConfigError
from mocosfl.data.prepare import export_held_rows
from mocosfl.distributed.roles import SERVER, client_hosts_of, role_rank


def export_host_data(cfg: Config, role: str, out: Path) -> dict[str, Any]:
    """Write ``role``'s prepared images under ``out/prepared`` and the shard index under ``out/partitions``;
    returns what was written and the ``--set`` values that point a host's config at them."""
    from mocosfl import workflow

    hosts = cfg.distributed.client_hosts
    if hosts < 1:
        raise ConfigError("distributed.client_hosts must be set (>= 1) to say how the clients are split over hosts")
    ds = workflow.Dataset(cfg)
    shards = workflow.load_partition(cfg, ds)
    rank = role_rank(role, hosts)
    client_hosts_of(len(shards), hosts)  # at most one host per client
    if rank == SERVER:
        rows = ds.val_idx  # the monitor's queries; never a training image
    else:
        owner = client_hosts_of(len(shards), hosts)
        rows = ds.train_idx[np.concatenate([shards[i] for i in np.flatnonzero(owner == rank - 1)])]
    prepared = export_held_rows(ds.prepared, out / "prepared", {"train": rows})
    partitions = out / "partitions"
    partitions.mkdir(parents=True, exist_ok=True)
    shards_file = workflow.shards_path(cfg)
    shutil.copyfile(shards_file, partitions / shards_file.name)
    return {
        "role": role,
        "images": int(len(rows)),
        "prepared": str(prepared),
        # data.source names the prepared folder and the shard file (by its resolved path): the same string
        # on every host, wherever its checkout is. Only a name there: the archive itself is not needed.
        "settings": [
            f"data.source={Path(cfg.data.source).expanduser().resolve()}",
            f"data.prepared_dir={out.resolve() / 'prepared'}",
            f"partition.out_dir={partitions.resolve()}",
        ],
    }
