#!/usr/bin/env bash
# Local dev stack for nightshift: PostgreSQL, Redis, RabbitMQ and Garage (S3).
#
#   deploy/dev/infra.sh up       start what is down, create databases, install/start/bootstrap Garage
#   deploy/dev/infra.sh down     stop Garage and every service that THIS script started
#   deploy/dev/infra.sh status   one line per component (exit 1 if any is down)
#   deploy/dev/infra.sh env      `export` lines for the nightshift config (eval "$(infra.sh env)")
#
# PostgreSQL, Redis and RabbitMQ normally run before a session starts; `up` only starts the ones
# that are down (with the machine's own start commands) and records that in $DEV_DIR/started/<name>,
# so that `down` stops only what `up` started. Garage always belongs to this script.
#
# Environment:
#   NIGHTSHIFT_DEV_DIR            state dir (default: <repo>/.dev, git-ignored)
#   NIGHTSHIFT_DEV_S3_KEY_ID      Garage key id (GK + 24 hex)   default GK1d224b85150aaabc7eadd95e
#   NIGHTSHIFT_DEV_S3_SECRET      Garage secret (64 hex)        default fixed dev secret
#   NIGHTSHIFT_DEV_S3_BUCKET      bucket                        default nightshift
#   NIGHTSHIFT_DEV_TIMEOUT        seconds to wait for a service to answer (default 60; RabbitMQ x2)
#   NIGHTSHIFT_DEV_INSTALL_TIMEOUT  seconds allowed for `cargo install garage` (default 3600)
#   GARAGE_BIN                    garage binary to use instead of PATH / ~/.cargo/bin
#   NIGHTSHIFT_PG_VERSION         PostgreSQL cluster version (default: the one in /etc/postgresql)
set -euo pipefail

SCRIPT_DIR="$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd -P)"
REPO_ROOT="$(cd -- "$SCRIPT_DIR/../.." && pwd -P)"
DEV_DIR="${NIGHTSHIFT_DEV_DIR:-$REPO_ROOT/.dev}"
# Its real path: a worktree whose .dev links to another checkout's then writes the same Garage
# configuration as that checkout, not one that differs only in the path (which restarts Garage).
if [[ -d "$DEV_DIR" ]]; then DEV_DIR="$(cd -- "$DEV_DIR" && pwd -P)"; fi

# --- fixed dev settings --------------------------------------------------------------------------
PG_HOST=127.0.0.1
PG_PORT=5432
PG_USER=postgres
PG_DATABASES=(nightshift nightshift_test)
REDIS_PORT=6379
RABBIT_PORT=5672

GARAGE_VERSION=2.5.0
S3_HOST=127.0.0.1
S3_PORT=3900
RPC_PORT=3901
ADMIN_PORT=3903
S3_REGION=us-east-1
S3_KEY_NAME=nightshift-dev
S3_KEY_ID="${NIGHTSHIFT_DEV_S3_KEY_ID:-GK1d224b85150aaabc7eadd95e}"
S3_SECRET="${NIGHTSHIFT_DEV_S3_SECRET:-04b99fcef4651778881fd9e7d7cab01ed1df0241b092249abb2a27e8c90516e5}"
S3_BUCKET="${NIGHTSHIFT_DEV_S3_BUCKET:-nightshift}"
# Dev-only secrets of a single-node cluster that listens on loopback only.
GARAGE_RPC_SECRET=6e6967687473686966742d6465762d7270632d7365637265742d303030303031
GARAGE_ADMIN_TOKEN=nightshift-dev-admin-token

TIMEOUT="${NIGHTSHIFT_DEV_TIMEOUT:-60}"
INSTALL_TIMEOUT="${NIGHTSHIFT_DEV_INSTALL_TIMEOUT:-3600}"
POLL=0.5

STARTED_DIR="$DEV_DIR/started"
LOG_DIR="$DEV_DIR/logs"
GARAGE_DIR="$DEV_DIR/garage"
GARAGE_CONF="$GARAGE_DIR/garage.toml"
GARAGE_PID="$DEV_DIR/garage.pid"
GARAGE_LOG="$LOG_DIR/garage.log"
GARAGE_INSTALL_LOG="$LOG_DIR/garage-install.log"

PG_LOG=/var/log/postgresql # + postgresql-<ver>-main.log
REDIS_LOG=/var/log/redis/ci.log
RABBIT_LOG=/var/log/rabbitmq/rabbit@localhost.log

# --- helpers ---------------------------------------------------------------------------------------
log() { printf '[infra] %s\n' "$*" >&2; }
die() {
    printf '[infra] ERROR: %s\n' "$*" >&2
    exit 1
}

# Print the last lines of a log file (if readable) to stderr, for timeout/failure messages.
show_tail() {
    local file=$1
    if [[ -r $file ]]; then
        printf '[infra] --- last lines of %s ---\n' "$file" >&2
        tail -n 30 -- "$file" >&2 || true
        printf '[infra] --- end of %s ---\n' "$file" >&2
    else
        printf '[infra] (no readable log at %s)\n' "$file" >&2
    fi
}

# tcp_open HOST PORT: true when something accepts a TCP connection there (bounded to 2 s).
tcp_open() {
    # shellcheck disable=SC2016 # $1/$2 are expanded by the inner bash, on purpose
    timeout 2 bash -c 'exec 3<>"/dev/tcp/$1/$2"' _ "$1" "$2" 2>/dev/null
}

not() { ! "$@"; }

# wait_for DESCRIPTION TIMEOUT LOGFILE CMD...: poll CMD until it succeeds or the deadline passes.
wait_for() {
    local what=$1 limit=$2 logfile=$3
    shift 3
    local deadline=$((SECONDS + limit))
    until "$@" >/dev/null 2>&1; do
        if ((SECONDS >= deadline)); then
            show_tail "$logfile"
            die "timed out after ${limit}s waiting for $what"
        fi
        sleep "$POLL"
    done
}

mark_started() { mkdir -p "$STARTED_DIR" && : >"$STARTED_DIR/$1"; }
started_by_us() { [[ -e $STARTED_DIR/$1 ]]; }
forget_started() { rm -f -- "$STARTED_DIR/$1"; }

# Serialise `up`/`down` runs so two shells (or CI steps) never race each other. The lock is on
# fd 9; every daemon we start gets `9>&-`, or it would inherit the lock and hold it forever.
take_lock() {
    mkdir -p "$DEV_DIR"
    exec 9>"$DEV_DIR/infra.lock"
    if ! flock -n 9; then
        log "another infra.sh run holds $DEV_DIR/infra.lock; waiting for it"
        flock -w "$((INSTALL_TIMEOUT + 300))" 9 || die "could not take $DEV_DIR/infra.lock"
    fi
}

# --- PostgreSQL --------------------------------------------------------------------------------------
pg_version() {
    if [[ -n ${NIGHTSHIFT_PG_VERSION:-} ]]; then
        printf '%s\n' "$NIGHTSHIFT_PG_VERSION"
        return
    fi
    local v
    v="$(find /etc/postgresql -mindepth 1 -maxdepth 1 -printf '%f\n' 2>/dev/null | sort -V | tail -n 1)"
    [[ -n $v ]] || die "no PostgreSQL cluster under /etc/postgresql"
    printf '%s\n' "$v"
}
pg_up() { pg_isready -q -h "$PG_HOST" -p "$PG_PORT"; }
psql_q() { psql -X -q -v ON_ERROR_STOP=1 -h "$PG_HOST" -p "$PG_PORT" -U "$PG_USER" -d postgres -tA "$@" </dev/null; }

ensure_postgres() {
    if pg_up; then
        log "postgres: already running"
    else
        local ver
        ver="$(pg_version)"
        log "postgres: down, starting cluster $ver/main"
        pg_ctlcluster --skip-systemctl-redirect "$ver" main start </dev/null 9>&- ||
            { show_tail "$PG_LOG/postgresql-$ver-main.log"; die "pg_ctlcluster $ver main start failed"; }
        mark_started postgres
        wait_for "PostgreSQL on $PG_HOST:$PG_PORT" "$TIMEOUT" "$PG_LOG/postgresql-$ver-main.log" pg_up
        log "postgres: started"
    fi
    local db
    for db in "${PG_DATABASES[@]}"; do
        if [[ "$(psql_q -c "SELECT 1 FROM pg_database WHERE datname = '$db'")" == 1 ]]; then
            continue
        fi
        log "postgres: creating database $db"
        psql_q -c "CREATE DATABASE \"$db\""
    done
}

stop_postgres() {
    if ! started_by_us postgres; then
        log "postgres: not started by infra.sh, leaving it alone"
        return
    fi
    if pg_up; then
        local ver
        ver="$(pg_version)"
        log "postgres: stopping cluster $ver/main"
        pg_ctlcluster --skip-systemctl-redirect "$ver" main stop </dev/null
    fi
    forget_started postgres
}

# --- Redis --------------------------------------------------------------------------------------------
redis_up() { [[ "$(timeout 5 redis-cli -h 127.0.0.1 -p "$REDIS_PORT" ping 2>/dev/null)" == PONG ]]; }

ensure_redis() {
    if redis_up; then
        log "redis: already running"
        return
    fi
    log "redis: down, starting it"
    redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no \
        --dir /var/lib/redis --logfile /var/log/redis/ci.log </dev/null >/dev/null 9>&- ||
        { show_tail "$REDIS_LOG"; die "redis-server failed to start"; }
    mark_started redis
    wait_for "Redis on 127.0.0.1:$REDIS_PORT" "$TIMEOUT" "$REDIS_LOG" redis_up
    log "redis: started"
}

stop_redis() {
    if ! started_by_us redis; then
        log "redis: not started by infra.sh, leaving it alone"
        return
    fi
    if redis_up; then
        log "redis: stopping"
        redis-cli -h 127.0.0.1 -p "$REDIS_PORT" shutdown nosave >/dev/null 2>&1 || true
        wait_for "Redis to stop" "$TIMEOUT" "$REDIS_LOG" not redis_up
    fi
    forget_started redis
}

# --- RabbitMQ -----------------------------------------------------------------------------------------
rabbit_port_open() { tcp_open 127.0.0.1 "$RABBIT_PORT"; }

ensure_rabbitmq() {
    if rabbit_port_open; then
        log "rabbitmq: already running"
        return
    fi
    mkdir -p "$LOG_DIR"
    log "rabbitmq: down, starting it (can take ~20 s)"
    # -detached forks the node; our redirection keeps its stdout away from the caller's pipes.
    rabbitmq-server -detached </dev/null >>"$LOG_DIR/rabbitmq-start.log" 2>&1 9>&- ||
        { show_tail "$LOG_DIR/rabbitmq-start.log"; die "rabbitmq-server -detached failed"; }
    mark_started rabbitmq
    local limit=$((TIMEOUT * 2))
    wait_for "RabbitMQ AMQP port 127.0.0.1:$RABBIT_PORT" "$limit" "$RABBIT_LOG" rabbit_port_open
    # The listener opens late in boot; await_startup confirms that every boot step finished.
    timeout "$limit" rabbitmqctl -q await_startup --timeout "$limit" </dev/null >/dev/null 2>&1 ||
        { show_tail "$RABBIT_LOG"; die "rabbitmqctl await_startup failed"; }
    log "rabbitmq: started"
}

stop_rabbitmq() {
    if ! started_by_us rabbitmq; then
        log "rabbitmq: not started by infra.sh, leaving it alone"
        return
    fi
    if rabbit_port_open; then
        log "rabbitmq: stopping"
        timeout 120 rabbitmqctl -q stop </dev/null >/dev/null 2>&1 ||
            { show_tail "$RABBIT_LOG"; die "rabbitmqctl stop failed"; }
        wait_for "RabbitMQ to stop" "$TIMEOUT" "$RABBIT_LOG" not rabbit_port_open
    fi
    forget_started rabbitmq
}

# --- Garage -------------------------------------------------------------------------------------------
find_garage() {
    if [[ -n ${GARAGE_BIN:-} ]]; then
        [[ -x $GARAGE_BIN ]] || die "GARAGE_BIN=$GARAGE_BIN is not executable"
        printf '%s\n' "$GARAGE_BIN"
        return 0
    fi
    local cargo_bin="${CARGO_HOME:-$HOME/.cargo}/bin/garage"
    if command -v garage >/dev/null 2>&1; then
        command -v garage
    elif [[ -x $cargo_bin ]]; then
        printf '%s\n' "$cargo_bin"
    else
        return 1
    fi
}

# A `cargo install garage` that someone else started (another shell, a setup step) and still runs.
foreign_garage_install() { pgrep -f 'cargo install .*garage' >/dev/null 2>&1; }

ensure_garage_installed() {
    GARAGE="$(find_garage)" && return 0
    if foreign_garage_install; then
        log "garage: a 'cargo install garage' is already running; waiting for it (up to ${INSTALL_TIMEOUT}s)"
        local deadline=$((SECONDS + INSTALL_TIMEOUT))
        while foreign_garage_install && ((SECONDS < deadline)); do sleep 5; done
        GARAGE="$(find_garage)" && return 0
        foreign_garage_install && die "timed out waiting for the running 'cargo install garage'"
        log "garage: that install ended without a binary; installing it ourselves"
    fi
    command -v cargo >/dev/null 2>&1 || die "garage is not installed and cargo is not on PATH"
    mkdir -p "$LOG_DIR"
    log "garage: installing garage@$GARAGE_VERSION with cargo (7 to 25 min on 2 cores); log: $GARAGE_INSTALL_LOG"
    if ! timeout "$INSTALL_TIMEOUT" cargo install "garage@$GARAGE_VERSION" --locked \
        </dev/null >"$GARAGE_INSTALL_LOG" 2>&1; then
        show_tail "$GARAGE_INSTALL_LOG"
        die "cargo install garage@$GARAGE_VERSION failed (or exceeded ${INSTALL_TIMEOUT}s)"
    fi
    GARAGE="$(find_garage)" || die "cargo install finished but no garage binary was found"
    log "garage: installed at $GARAGE"
}

garage_config() {
    cat <<EOF
# Written by deploy/dev/infra.sh -- single-node dev cluster on loopback. Edits are overwritten.
metadata_dir = "$GARAGE_DIR/meta"
data_dir = "$GARAGE_DIR/data"
db_engine = "sqlite"
replication_factor = 1
# No zstd on data blocks: this cluster shares the machine's cores with nightshift, and
# compressing every part and result file cost more CPU than nightshift itself in the
# zero-latency benchmark (docs/performance.md). S3 services do not charge it to the client.
compression_level = "none"

rpc_bind_addr = "127.0.0.1:$RPC_PORT"
rpc_public_addr = "127.0.0.1:$RPC_PORT"
rpc_secret = "$GARAGE_RPC_SECRET"

[s3_api]
s3_region = "$S3_REGION"
api_bind_addr = "$S3_HOST:$S3_PORT"
root_domain = ".s3.garage.localhost"

[admin]
api_bind_addr = "127.0.0.1:$ADMIN_PORT"
admin_token = "$GARAGE_ADMIN_TOKEN"
EOF
}

# Write garage.toml only when its content changes; returns 0 when it was (re)written.
write_garage_config() {
    mkdir -p "$GARAGE_DIR/meta" "$GARAGE_DIR/data"
    local want
    want="$(garage_config)"
    if [[ -f $GARAGE_CONF ]] && [[ "$(cat -- "$GARAGE_CONF")" == "$want" ]]; then
        return 1
    fi
    printf '%s\n' "$want" >"$GARAGE_CONF.tmp"
    chmod 600 "$GARAGE_CONF.tmp"
    mv -f -- "$GARAGE_CONF.tmp" "$GARAGE_CONF"
    log "garage: wrote $GARAGE_CONF"
}

# Every CLI call is bounded: a wedged daemon must not hang `up` forever.
garage_cli() { timeout 60 "$GARAGE" -c "$GARAGE_CONF" "$@" </dev/null; }

# The pid from our pid file, if that process is alive and is a garage server.
garage_pid() {
    [[ -f $GARAGE_PID ]] || return 1
    local pid
    pid="$(cat -- "$GARAGE_PID" 2>/dev/null)" || return 1
    [[ $pid =~ ^[0-9]+$ ]] || return 1
    kill -0 "$pid" 2>/dev/null || return 1
    tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q 'garage.* server' || return 1
    printf '%s\n' "$pid"
}

s3_port_open() { tcp_open "$S3_HOST" "$S3_PORT"; }
# The daemon answers RPC (the CLI reaches it with our rpc_secret).
garage_rpc_ok() { timeout 10 "$GARAGE" -c "$GARAGE_CONF" status </dev/null >/dev/null 2>&1; }

start_garage() {
    mkdir -p "$LOG_DIR"
    log "garage: starting server (log: $GARAGE_LOG)"
    # setsid: own session, so the server outlives this shell and its process group (CI steps).
    # NO_COLOR keeps ANSI colour codes out of the log file.
    printf '\n=== %s infra.sh starting garage ===\n' "$(date -Is)" >>"$GARAGE_LOG"
    NO_COLOR=1 setsid "$GARAGE" -c "$GARAGE_CONF" server </dev/null >>"$GARAGE_LOG" 2>&1 9>&- &
    local pid=$!
    printf '%s\n' "$pid" >"$GARAGE_PID"
    local deadline=$((SECONDS + TIMEOUT))
    until s3_port_open && garage_rpc_ok; do
        if ! kill -0 "$pid" 2>/dev/null; then
            rm -f -- "$GARAGE_PID"
            show_tail "$GARAGE_LOG"
            die "garage server exited during startup"
        fi
        if ((SECONDS >= deadline)); then
            kill -TERM "$pid" 2>/dev/null || true # do not leave a half-started server behind
            rm -f -- "$GARAGE_PID"
            show_tail "$GARAGE_LOG"
            die "timed out after ${TIMEOUT}s waiting for garage (S3 on $S3_HOST:$S3_PORT, RPC)"
        fi
        sleep "$POLL"
    done
    log "garage: server running (pid $pid)"
}

stop_garage() {
    local pid
    if ! pid="$(garage_pid)"; then
        rm -f -- "$GARAGE_PID"
        log "garage: not running (no live pid in $GARAGE_PID)"
        return
    fi
    log "garage: stopping pid $pid"
    kill -TERM "$pid" 2>/dev/null || true
    local deadline=$((SECONDS + 30))
    while kill -0 "$pid" 2>/dev/null; do
        if ((SECONDS >= deadline)); then
            log "garage: still alive after 30 s, sending SIGKILL"
            kill -KILL "$pid" 2>/dev/null || true
            break
        fi
        sleep "$POLL"
    done
    rm -f -- "$GARAGE_PID"
}

ensure_garage_running() {
    local config_changed=0
    write_garage_config && config_changed=1
    local pid
    if pid="$(garage_pid)"; then
        if ((config_changed)); then
            log "garage: configuration changed, restarting"
            stop_garage
            start_garage
            return
        fi
        wait_for "garage (pid $pid) on $S3_HOST:$S3_PORT" "$TIMEOUT" "$GARAGE_LOG" s3_port_open
        wait_for "garage RPC" "$TIMEOUT" "$GARAGE_LOG" garage_rpc_ok
        log "garage: already running (pid $pid)"
        return
    fi
    rm -f -- "$GARAGE_PID"
    if s3_port_open; then
        # Something else holds :3900; never start a second one. Use it when it is a garage
        # that shares our RPC secret (started by hand with this config), or an S3 service
        # that already stores and returns objects in our bucket with our key (e.g. the dev
        # garage of another checkout on this machine) -- then there is nothing to bootstrap.
        if garage_rpc_ok; then
            log "garage: a garage not started by infra.sh already answers with our config; using it"
        elif s3_roundtrip; then
            log "garage: the S3 service already on $S3_HOST:$S3_PORT accepts our key and bucket; using it"
            FOREIGN_S3=1
        else
            die "port $S3_PORT is in use by a process that is not our garage; stop it first"
        fi
        return
    fi
    start_garage
}

# Idempotent cluster bootstrap: layout, key, bucket, permissions.
bootstrap_garage() {
    local layout
    layout="$(garage_cli layout show 2>&1)" || { printf '%s\n' "$layout" >&2; die "garage layout show failed"; }
    if grep -Eq 'Current cluster layout version: 0\b' <<<"$layout"; then
        local node
        node="$(garage_cli node id -q 2>/dev/null)" || die "garage node id failed"
        node="${node%%@*}"
        log "garage: no layout yet, assigning node ${node:0:16} (zone dc1, 1G) and applying"
        garage_cli layout assign -z dc1 -c 1G "$node" >/dev/null
        garage_cli layout apply --version 1 >/dev/null
    fi

    if garage_cli key info "$S3_KEY_ID" >/dev/null 2>&1; then
        local secret
        secret="$(garage_cli key info --show-secret "$S3_KEY_ID" 2>/dev/null |
            sed -n 's/^Secret key:[[:space:]]*//p')"
        [[ -z $secret || $secret == "$S3_SECRET" ]] ||
            die "garage key $S3_KEY_ID exists with a different secret (run 'down', remove $GARAGE_DIR, 'up')"
    else
        log "garage: importing key $S3_KEY_ID ($S3_KEY_NAME)"
        garage_cli key import --yes -n "$S3_KEY_NAME" "$S3_KEY_ID" "$S3_SECRET" >/dev/null
    fi

    if ! garage_cli bucket info "$S3_BUCKET" >/dev/null 2>&1; then
        log "garage: creating bucket $S3_BUCKET"
        garage_cli bucket create "$S3_BUCKET" >/dev/null
    fi
    # Grant only what is missing (re-granting would be harmless too; this keeps reruns no-ops).
    # `bucket info` lists "RWO  <key id>  <key name>" under KEYS FOR THIS BUCKET.
    if ! garage_cli bucket info "$S3_BUCKET" 2>/dev/null | grep -Eq "^RWO[[:space:]]+$S3_KEY_ID\b"; then
        log "garage: granting read/write/owner on $S3_BUCKET to $S3_KEY_ID"
        garage_cli bucket allow --read --write --owner "$S3_BUCKET" --key "$S3_KEY_ID" >/dev/null
    fi
    if ! garage_cli key info "$S3_KEY_ID" 2>/dev/null | grep -Eq '^Can create buckets:[[:space:]]+true'; then
        log "garage: allowing $S3_KEY_ID to create buckets"
        garage_cli key allow --create-bucket "$S3_KEY_ID" >/dev/null
    fi
}

# Prove that the S3 API works end to end with the dev credentials: a SigV4-signed PUT, GET and
# DELETE of a small object in the bucket, done by curl's built-in signer (--aws-sigv4, curl >= 7.75).
# This checks what the services rely on -- signature verification, the key's grants on the bucket,
# and a layout that can store data -- not just that the port is open. An anonymous request must
# be refused with an S3 XML error, which shows signatures are really enforced.
s3_curl() {
    curl -sS --max-time 10 --aws-sigv4 "aws:amz:$S3_REGION:s3" --user "$S3_KEY_ID:$S3_SECRET" \
        -H "x-amz-content-sha256: UNSIGNED-PAYLOAD" "$@"
}

s3_roundtrip() {
    local key=".infra-check/$$-$RANDOM" body="nightshift infra check $$"
    local url="http://$S3_HOST:$S3_PORT/$S3_BUCKET/$key"
    local code
    code="$(s3_curl -o /dev/null -w '%{http_code}' -X PUT --data-binary "$body" "$url")" || return 1
    [[ $code == 200 ]] || { S3_CHECK_ERR="PUT $url -> HTTP $code"; return 1; }
    local got
    got="$(s3_curl -f "$url")" || { S3_CHECK_ERR="GET $url failed"; return 1; }
    [[ $got == "$body" ]] || { S3_CHECK_ERR="GET $url returned other content"; return 1; }
    code="$(s3_curl -o /dev/null -w '%{http_code}' -X DELETE "$url")" || return 1
    [[ $code == 204 ]] || { S3_CHECK_ERR="DELETE $url -> HTTP $code"; return 1; }
}

verify_s3() {
    local anon
    anon="$(curl -sS --max-time 10 "http://$S3_HOST:$S3_PORT/$S3_BUCKET/" 2>&1)" || true
    if ! grep -q '<Error>' <<<"$anon" || ! grep -Eq '<Code>(AccessDenied|InvalidRequest|InvalidAccessKeyId)' <<<"$anon"; then
        log "anonymous answer: $anon"
        die "S3 API at $S3_HOST:$S3_PORT did not refuse an anonymous request"
    fi
    # Right after a fresh layout apply the node can need a moment before it accepts writes.
    S3_CHECK_ERR="no answer"
    local deadline=$((SECONDS + TIMEOUT))
    until s3_roundtrip; do
        if ((SECONDS >= deadline)); then
            show_tail "$GARAGE_LOG"
            die "S3 check with key $S3_KEY_ID failed: $S3_CHECK_ERR"
        fi
        sleep 1
    done
}

# --- subcommands --------------------------------------------------------------------------------------
validate_settings() {
    [[ $S3_KEY_ID =~ ^GK[0-9a-f]{24}$ ]] || die "S3 key id must be GK followed by 24 hex digits: $S3_KEY_ID"
    [[ $S3_SECRET =~ ^[0-9a-f]{64}$ ]] || die "S3 secret must be 64 hex digits"
    [[ $S3_BUCKET =~ ^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$ ]] || die "invalid bucket name: $S3_BUCKET"
}

cmd_up() {
    validate_settings
    take_lock
    ensure_postgres
    ensure_redis
    ensure_rabbitmq
    ensure_garage_installed
    FOREIGN_S3=0
    ensure_garage_running
    [[ $FOREIGN_S3 == 1 ]] || bootstrap_garage
    verify_s3
    cat <<EOF
nightshift dev stack is up
  postgres   postgres://$PG_USER@$PG_HOST:$PG_PORT/{$(IFS=,; echo "${PG_DATABASES[*]}")}
  redis      redis://127.0.0.1:$REDIS_PORT
  rabbitmq   amqp://guest:guest@127.0.0.1:$RABBIT_PORT
  s3         http://$S3_HOST:$S3_PORT  region $S3_REGION  bucket $S3_BUCKET  key id $S3_KEY_ID
  state      $DEV_DIR   (eval "\$($0 env)" for the nightshift settings)
EOF
}

cmd_down() {
    take_lock
    stop_garage
    stop_rabbitmq
    stop_redis
    stop_postgres
    log "down: done"
}

cmd_status() {
    local ok=0 who
    owner() { if started_by_us "$1"; then echo "started by infra.sh"; else echo "pre-existing"; fi; }
    if pg_up; then
        echo "postgres  up    $PG_HOST:$PG_PORT ($(owner postgres))"
    else
        echo "postgres  down  $PG_HOST:$PG_PORT"
        ok=1
    fi
    if redis_up; then
        echo "redis     up    127.0.0.1:$REDIS_PORT ($(owner redis))"
    else
        echo "redis     down  127.0.0.1:$REDIS_PORT"
        ok=1
    fi
    if rabbit_port_open; then
        echo "rabbitmq  up    127.0.0.1:$RABBIT_PORT ($(owner rabbitmq))"
    else
        echo "rabbitmq  down  127.0.0.1:$RABBIT_PORT"
        ok=1
    fi
    local pid
    if pid="$(garage_pid)" && s3_port_open; then
        who="pid $pid"
    elif s3_port_open; then
        who="not started by infra.sh"
    else
        who=""
    fi
    if [[ -n $who ]]; then
        echo "garage    up    http://$S3_HOST:$S3_PORT bucket $S3_BUCKET ($who)"
    elif GARAGE="$(find_garage)"; then
        echo "garage    down  (installed: $GARAGE)"
        ok=1
    else
        echo "garage    down  (not installed)"
        ok=1
    fi
    return "$ok"
}

cmd_env() {
    printf 'export %s=%q\n' \
        NIGHTSHIFT_STORAGE__ENDPOINT "http://$S3_HOST:$S3_PORT" \
        NIGHTSHIFT_STORAGE__REGION "$S3_REGION" \
        NIGHTSHIFT_STORAGE__BUCKET "$S3_BUCKET" \
        NIGHTSHIFT_STORAGE__ACCESS_KEY_ID "$S3_KEY_ID" \
        NIGHTSHIFT_STORAGE__SECRET_ACCESS_KEY "$S3_SECRET" \
        NIGHTSHIFT_METADATA__URL "postgres://$PG_USER@$PG_HOST:$PG_PORT/nightshift"
}

usage() {
    sed -n '2,7p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
}

main() {
    case "${1:-}" in
    up) cmd_up ;;
    down) cmd_down ;;
    status) cmd_status ;;
    env) cmd_env ;;
    -h | --help | help) usage ;;
    *)
        usage >&2
        exit 2
        ;;
    esac
}

main "$@"
