#!/usr/bin/env bash
# `make deploy` / `make worker`: the Prefect work pool `mocosfl` (process workers) and its deployments.
#   scripts/pool.sh deploy   register prefect.yaml's deployments with the server in PREFECT_API_URL
#   scripts/pool.sh worker   run a worker in the foreground (Ctrl-C stops it): LIMIT flow runs at a time
#                            (default 1), each with THREADS torch threads (default: all cores)
# Without PREFECT_API_URL in the environment, $SERVICES_DIR/env (.services/env: `make services` writes it) is read.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
services_env=${SERVICES_DIR:-.services}/env
if [[ -z "${PREFECT_API_URL:-}" && -f "$services_env" ]]; then
  # shellcheck disable=SC1091
  source "$services_env"
fi
if [[ -z "${PREFECT_API_URL:-}" ]]; then
  echo "error: PREFECT_API_URL is not set: start the services (make services) or export the server's URL" >&2
  exit 2
fi
export PREFECT_HOME=${PREFECT_HOME:-$PWD/.prefect} PREFECT_SERVER_ANALYTICS_ENABLED=false DVC_NO_ANALYTICS=1
export PREFECT_LOGGING_EXTRA_LOGGERS=mocosfl
PREFECT="$VENV/bin/prefect"
POOL=mocosfl

case "${1:-}" in
  deploy)
    export MOCOSFL_TUNE_STORAGE=${MOCOSFL_TUNE_STORAGE:-optuna.db}
    if [[ "$MOCOSFL_TUNE_STORAGE" =~ ://[^/@]*:[^/@]*@ ]]; then
      echo "error: MOCOSFL_TUNE_STORAGE holds a password, which the deployment would store: use PGPASSWORD" >&2
      exit 2
    fi
    "$PREFECT" work-pool inspect "$POOL" >/dev/null 2>&1 || "$PREFECT" work-pool create "$POOL" --type process
    "$PREFECT" --no-prompt deploy --all
    echo "deployments registered at $PREFECT_API_URL (tune.storage for mocosfl/tune: $MOCOSFL_TUNE_STORAGE)"
    ;;
  worker)
    export MOCOSFL_ROOT=$PWD
    if [[ -n "${THREADS:-}" ]]; then
      export OMP_NUM_THREADS=$THREADS MKL_NUM_THREADS=$THREADS
    fi
    name=${WORKER_NAME:-$(hostname)-$$}
    echo "worker $name on pool $POOL at $PREFECT_API_URL: ${LIMIT:-1} flow run(s) at a time, threads ${THREADS:-all cores}"
    exec "$PREFECT" worker start --pool "$POOL" --type process --limit "${LIMIT:-1}" --name "$name"
    ;;
  *)
    echo "usage: $0 deploy|worker" >&2
    exit 2
    ;;
esac
