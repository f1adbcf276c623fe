"""Work fanned out as flow runs over the Prefect work pool ``mocosfl`` (``make worker`` runs its workers).

The deployments the pool runs are declared in ``prefect.yaml`` (``make deploy`` registers them). A caller
submits flow runs of a deployment (``submit``), does its own share of the work meanwhile, then calls
``finish``: flow runs no worker has taken are cancelled (when the work is done without them), the others are
waited for, and a failed one is an error naming it. Every Prefect error becomes one ``PoolError`` line.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any
from uuid import UUID

from mocosfl.tracking import redact

POOL = "mocosfl"
TUNE_TRIALS = "mocosfl-tune-trials/tune-trials"
RESULTS_RUN = "mocosfl-results-run/results-run"
SETUP = "start the services and a worker: `make services`, `source .services/env`, `make deploy`, `make worker`"


class PoolError(RuntimeError):
    """The pool could not be used (no Prefect server, no deployment, no worker) or a flow run on it failed."""


def api_url() -> str:
    """The Prefect server flow runs are submitted to; a PoolError when none is configured."""
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    if not url:
        raise PoolError(f"the work pool needs a Prefect server and PREFECT_API_URL is not set: {SETUP}")
    return str(url)


@contextmanager
def _prefect_errors() -> Iterator[None]:
    """Connection and API errors of the Prefect client as one PoolError line."""
    import httpx
    from prefect.exceptions import PrefectException

    try:
        yield
    except (httpx.HTTPError, PrefectException, OSError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise PoolError(f"Prefect server at {api_url()} did not answer as expected ({first})") from e


def online_workers() -> list[str]:
    """Names of the pool's workers that are online now (they poll the server)."""
    from prefect import get_client
    from prefect.exceptions import ObjectNotFound

    try:
        with _prefect_errors(), get_client(sync_client=True) as client:
            workers = client.read_workers_for_work_pool(POOL)
    except PoolError as e:
        if isinstance(e.__cause__, ObjectNotFound):
            raise PoolError(f"work pool {POOL} does not exist at {api_url()}: run `make deploy`") from None
        raise
    return [w.name for w in workers if str(getattr(w.status, "value", w.status)).upper() == "ONLINE"]


def check_no_password(parameters: Any) -> None:
    """Refuse parameters (a config, as flow-run parameters) holding a URL with a password: Prefect stores them."""
    if redact(parameters) != parameters:
        raise PoolError(
            "a flow run's parameters would hold a password (a URL like scheme://user:password@host in the config), "
            "which the Prefect server stores: give it through the environment (PGPASSWORD, ~/.pgpass) instead"
        )


def submit(deployment: str, parameters: dict[str, Any], count: int, name: str) -> list[UUID]:
    """``count`` flow runs of ``deployment`` (``flow/deployment``), named ``name-1``, ``name-2``, …

    Prefect stores the parameters, so a URL with a password in them is refused."""
    from prefect.deployments import run_deployment
    from prefect.exceptions import ObjectNotFound

    check_no_password(parameters)
    url = api_url()
    ids = []
    for i in range(count):
        try:
            with _prefect_errors():
                run = run_deployment(
                    deployment, parameters=parameters, timeout=0, flow_run_name=f"{name}-{i + 1}", as_subflow=False
                )
        except PoolError as e:
            if isinstance(e.__cause__, ObjectNotFound):
                raise PoolError(f"deployment {deployment} is not registered at {url}: run `make deploy`") from None
            raise
        ids.append(run.id)  # type: ignore[union-attr]  # sync context: a FlowRun, not a coroutine
    return ids


def cancel_unstarted(ids: list[UUID]) -> int:
    """Cancel the flow runs of ``ids`` no worker has taken yet; how many were cancelled.

    A run a worker takes in the instant between the check and the cancel may start anyway; it then finds
    its work done (a full study) or is waited for by nobody."""
    from prefect import get_client
    from prefect.client.schemas.objects import StateType
    from prefect.states import Cancelled

    cancelled = 0
    with _prefect_errors(), get_client(sync_client=True) as client:
        for flow_run_id in ids:
            run = client.read_flow_run(flow_run_id)
            if run.state is not None and run.state.type == StateType.SCHEDULED:
                client.set_flow_run_state(flow_run_id, Cancelled(message="its work was done before it started"))
                cancelled += 1
    return cancelled


def finish(
    ids: list[UUID],
    log: Callable[[str], None],
    cancel_unstarted_runs: bool = True,
    timeout_s: float | None = None,
    poll_s: float = 2.0,
    progress_s: float = 60.0,
) -> dict[str, int]:
    """Wait for the flow runs of ``ids`` to end, first cancelling those no worker has taken yet when
    ``cancel_unstarted_runs`` (their work is done: trials of a full study); counts by outcome.

    Says every ``progress_s`` how many are left. With ``timeout_s``, runs still going after it are left
    (counted as ``abandoned``, with a warning: a worker whose host died leaves its run RUNNING for good).
    Raises PoolError when one ended in any state but completed or cancelled."""
    from prefect import get_client
    from prefect.client.schemas.objects import StateType

    counts = {"completed": 0, "cancelled": 0, "abandoned": 0}
    failed: list[str] = []
    if not ids:
        return counts
    if cancel_unstarted_runs:
        cancel_unstarted(ids)
    t0 = time.monotonic()
    said_at: float | None = None
    pending = set(ids)
    with _prefect_errors(), get_client(sync_client=True) as client:
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
            if not pending:
                break
            now = time.monotonic()
            if timeout_s is not None and now - t0 > timeout_s:
                names = ", ".join(client.read_flow_run(i).name for i in sorted(pending))
                log(f"warning: flow run(s) {names} still not finished after {timeout_s:.0f} s: not waiting for them")
                counts["abandoned"] = len(pending)
                break
            if said_at is None or now - said_at >= progress_s:
                done = len(ids) - len(pending)
                log(f"work pool {POOL}: {done}/{len(ids)} flow run(s) ended, waiting for {len(pending)}")
                said_at = now
            time.sleep(poll_s)
    if failed:
        raise PoolError(f"flow runs failed on the work pool: {'; '.join(failed)}")
    return counts
