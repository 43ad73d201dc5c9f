#!/usr/bin/env bash
# The nightshift processes of the local dev stack (the infrastructure is infra.sh's).
#   services.sh up       start every service not already running; wait until each /readyz is 200
#   services.sh down     stop what is running (SIGTERM, then SIGKILL after a grace period)
#   services.sh restart  down + up (after a rebuild)
#   services.sh status   one line per service
# State: $NIGHTSHIFT_DEV_DIR (default <repo>/.dev): run/<svc>.pid, logs/<svc>.log
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
DEV_DIR="${NIGHTSHIFT_DEV_DIR:-$ROOT/.dev}"
RUN="$DEV_DIR/run"
LOGS="$DEV_DIR/logs"
BIN="${NIGHTSHIFT_BIN:-$ROOT/target/debug/nightshift}"
CONFIG="${NIGHTSHIFT_CONFIG:-$ROOT/deploy/dev/nightshift.toml}"
KEY="${NIGHTSHIFT_BOOTSTRAP_API_KEY:-ns-dev-key}"

# name|readiness URL|listen address — in start order (the gateway's and the scheduler's /readyz
# are on their ops ports, 9091 and 9094; their API and gRPC on 8080 and 50051)
SERVICES=(
  "inference-sim|http://127.0.0.1:8000/readyz|127.0.0.1:8000"
  "scheduler|http://127.0.0.1:9094/readyz|127.0.0.1:50051"
  "executor|http://127.0.0.1:9092/readyz|127.0.0.1:9092"
  "finalizer|http://127.0.0.1:9093/readyz|127.0.0.1:9093"
  "gateway|http://127.0.0.1:9091/readyz|127.0.0.1:8080"
)
SIM_BIN="${INFERENCE_SIM_BIN:-$(dirname "$BIN")/inference-sim}"

mkdir -p "$RUN" "$LOGS"

pid_of() { cat "$RUN/$1.pid" 2>/dev/null || true; }
alive() { local pid; pid="$(pid_of "$1")"; [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null; }
port_busy() { (exec 3<>"/dev/tcp/${1%:*}/${1#*:}") 2>/dev/null; }

wait_ready() { # name url
  local deadline=$((SECONDS + 90))
  until curl -fsS -o /dev/null "$2" 2>/dev/null; do
    if ! alive "$1"; then
      echo "error: $1 exited during start-up; last log lines:" >&2
      tail -n 30 "$LOGS/$1.log" >&2
      exit 1
    fi
    if ((SECONDS > deadline)); then
      echo "error: $1 not ready after 90s ($2); last log lines:" >&2
      tail -n 30 "$LOGS/$1.log" >&2
      exit 1
    fi
    sleep 0.2
  done
}

up() {
  [[ -x "$BIN" ]] || { echo "error: $BIN not built (run: make build)" >&2; exit 1; }
  for entry in "${SERVICES[@]}"; do
    IFS='|' read -r name url addr <<<"$entry"
    if alive "$name"; then
      echo "$name: already running (pid $(pid_of "$name"))"
    else
      if port_busy "$addr"; then
        echo "error: $addr is taken by another process; $name cannot start" >&2
        exit 1
      fi
      if [[ "$name" == inference-sim ]]; then
        # the simulator: a little latency per token by default, so progress is visible
        # while polling (INFERENCE_SIM_*_LATENCY_MS=0 for benchmarks)
        INFERENCE_SIM_BASE_LATENCY_MS="${INFERENCE_SIM_BASE_LATENCY_MS:-20}" \
          INFERENCE_SIM_PER_TOKEN_LATENCY_MS="${INFERENCE_SIM_PER_TOKEN_LATENCY_MS:-2}" \
          nohup "$SIM_BIN" --listen "$addr" >>"$LOGS/$name.log" 2>&1 </dev/null &
      else
        NIGHTSHIFT_SCHEDULER__BOOTSTRAP_API_KEY="$KEY" \
          nohup "$BIN" --config "$CONFIG" "$name" >>"$LOGS/$name.log" 2>&1 </dev/null &
      fi
      echo $! >"$RUN/$name.pid"
      echo "$name: started (pid $!, log $LOGS/$name.log)"
    fi
    wait_ready "$name" "$url"
  done
  cat <<TXT

nightshift is up.
  base URL: http://127.0.0.1:8080/v1
  API key:  $KEY

  from openai import OpenAI
  client = OpenAI(base_url="http://127.0.0.1:8080/v1", api_key="$KEY")
TXT
}

down() {
  local i entry name pid
  for ((i = ${#SERVICES[@]} - 1; i >= 0; i--)); do
    entry="${SERVICES[$i]}"
    name="${entry%%|*}"
    if alive "$name"; then
      pid="$(pid_of "$name")"
      kill -TERM "$pid" 2>/dev/null || true
      local deadline=$((SECONDS + 35))
      while kill -0 "$pid" 2>/dev/null && ((SECONDS < deadline)); do sleep 0.2; done
      if kill -0 "$pid" 2>/dev/null; then
        kill -KILL "$pid" 2>/dev/null || true
        echo "$name: killed (did not stop within 35s)"
      else
        echo "$name: stopped"
      fi
    fi
    rm -f "$RUN/$name.pid"
  done
}

status() {
  for entry in "${SERVICES[@]}"; do
    IFS='|' read -r name url _ <<<"$entry"
    if alive "$name"; then
      if curl -fsS -o /dev/null "$url" 2>/dev/null; then state="ready"; else state="running, not ready"; fi
      echo "$name: $state (pid $(pid_of "$name"))"
    else
      echo "$name: stopped"
    fi
  done
}

case "${1:-}" in
  up) up ;;
  down) down ;;
  restart) down; up ;;
  status) status ;;
  *) echo "usage: $0 up|down|restart|status" >&2; exit 2 ;;
esac
