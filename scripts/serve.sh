#!/usr/bin/env bash
# `make serve`: a local Prefect server (SQLite under .prefect/, analytics off) plus the served
# deployments mocosfl/{pretrain,pipeline,attack,tune}, in the foreground; Ctrl-C stops both. When a server
# already answers on the port (`make services`), the deployments are served to it and it is left running.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
HOST=${SERVICES_HOST:-127.0.0.1}
PORT=${PREFECT_PORT:-4200}
export PREFECT_HOME=${PREFECT_HOME:-$PWD/.prefect}
export PREFECT_SERVER_ANALYTICS_ENABLED=false
export PREFECT_API_URL="http://$HOST:$PORT/api"
mkdir -p "$PREFECT_HOME"

trap 'exit 130' INT TERM
if "$VENV/bin/python" -c "import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=2)" \
    "$PREFECT_API_URL/health" 2>/dev/null; then
  # `make services` (or another `make serve`) already runs a server on the port: serve the deployments to it.
  echo "Prefect server already running at http://$HOST:$PORT: serving the deployments to it"
else
  "$VENV/bin/prefect" server start --host "$HOST" --port "$PORT" > "$PREFECT_HOME/server.log" 2>&1 &
  server=$!
  trap 'kill "$server" 2>/dev/null; wait "$server" 2>/dev/null || true' EXIT
fi

"$VENV/bin/python" - "$PREFECT_API_URL/health" <<'PY'
import sys, time, urllib.request
for _ in range(180):
    try:
        urllib.request.urlopen(sys.argv[1], timeout=2)
        sys.exit(0)
    except OSError:
        time.sleep(1)
sys.exit("Prefect server did not start in 180 s; see .prefect/server.log")
PY
echo "Prefect server on http://$HOST:$PORT (log: $PREFECT_HOME/server.log). In another terminal:"
echo "  export PREFECT_API_URL=$PREFECT_API_URL"
echo "  $VENV/bin/prefect deployment run mocosfl/pretrain -p profile=smoke"
"$VENV/bin/python" -m pipelines.serve
