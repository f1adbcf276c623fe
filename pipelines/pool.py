"""Work fanned out as flow runs over the Prefect work pool ``mocosfl`` (``make worker`` runs its workers).

The deployments the pool runs are declared in ``prefect.yaml`` (``make deploy`` registers them). A caller
submits flow runs of a deployment, does its own share of the work meanwhile, then calls ``finish``: flow
runs that never started (no free worker) are cancelled, running ones are waited for, and a failed one is
an error naming it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any
from uuid import UUID

POOL = "mocosfl"
TUNE_TRIALS = "mocosfl-tune-trials/tune-trials"
RESULTS_RUN = "mocosfl-results-run/results-run"
SETUP = "start the services and a worker: `make services`, `source .services/env`, `make deploy`, `make worker`"


class PoolError(RuntimeError):
    """The pool could not be used (no Prefect server, no deployment) or a flow run on it failed."""


def api_url() -> str:
    """The Prefect server flow runs are submitted to; a PoolError when none is configured."""
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    if not url:
        raise PoolError(f"the work pool needs a Prefect server and PREFECT_API_URL is not set: {SETUP}")
    return str(url)


def submit(deployment: str, parameters: dict[str, Any], count: int, name: str) -> list[UUID]:
    """``count`` flow runs of ``deployment`` (``flow/deployment``), named ``name-1``, ``name-2``, …"""
    from prefect.deployments import run_deployment
    from prefect.exceptions import ObjectNotFound

    url = api_url()
    ids = []
    for i in range(count):
        try:
            run = run_deployment(
                deployment, parameters=parameters, timeout=0, flow_run_name=f"{name}-{i + 1}", as_subflow=False
            )
        except ObjectNotFound:
            raise PoolError(f"deployment {deployment} is not registered at {url}: run `make deploy`") from None
        ids.append(run.id)  # type: ignore[union-attr]  # sync context: a FlowRun, not a coroutine
    return ids


def finish(
    ids: list[UUID], log: Callable[[str], None], cancel_unstarted: bool = True, poll_s: float = 2.0
) -> dict[str, int]:
    """Wait for the flow runs of ``ids`` to end, first cancelling those no worker has taken yet when
    ``cancel_unstarted`` (their work is done: trials of a full study); counts by outcome.

    Raises PoolError when one ended in any state but completed or cancelled."""
    from prefect import get_client
    from prefect.client.schemas.objects import StateType
    from prefect.states import Cancelled

    counts = {"completed": 0, "cancelled": 0}
    failed: list[str] = []
    if not ids:
        return counts
    with get_client(sync_client=True) as client:
        for flow_run_id in ids if cancel_unstarted else []:
            run = client.read_flow_run(flow_run_id)
            # Only runs no worker has taken: one a worker is starting finds the study full and ends at once.
            if run.state is not None and run.state.type == StateType.SCHEDULED:
                client.set_flow_run_state(flow_run_id, Cancelled(message="the study was complete before it started"))
        pending = set(ids)
        waited = False
        while pending:
            for flow_run_id in sorted(pending):
                run = client.read_flow_run(flow_run_id)
                state = run.state
                if state is None or not state.is_final():
                    continue
                pending.discard(flow_run_id)
                if state.type == StateType.COMPLETED:
                    counts["completed"] += 1
                elif state.type == StateType.CANCELLED:
                    counts["cancelled"] += 1
                else:
                    failed.append(f"{run.name} ({state.type.value}: {state.message or 'no message'})")
            if pending:
                if not waited:
                    log(f"waiting for {len(pending)} flow run(s) on the work pool {POOL}")
                    waited = True
                time.sleep(poll_s)
    if failed:
        raise PoolError(f"flow runs failed on the work pool: {'; '.join(failed)}")
    return counts
