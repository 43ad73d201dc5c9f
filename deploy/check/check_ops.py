#!/usr/bin/env python3
"""Checks the operations files without a container engine or a cluster (`make ops-check`).

- docker-compose.yml: parses; validates against the Compose Specification's JSON schema; every
  depends_on target exists (and has a healthcheck when waited on as healthy); every
  bind-mounted file, build context, Dockerfile and build target exists; every image is pinned;
  every published port is bound to 127.0.0.1; every service has a healthcheck. Prometheus's
  scrape targets are compose services; the mounted config files parse.
- deploy/Dockerfile and .dockerignore: the stages compose and the docs name exist, base images
  are pinned, the runtime user is not root, and the build context keeps every file the build
  reads (the workspace's manifests and sources).
- helm/nightshift: `helm lint --strict` and `helm template` (the real helm) with several values
  files; the files meant to break the schema must be refused. Every rendered object validates
  against the Kubernetes OpenAPI schemas (kubernetes-validate, strict: unknown fields are
  errors) for the oldest and newest Kubernetes the chart supports; the KEDA and Prometheus
  Operator objects against their own validators (validate_crds.mjs). Then what a schema cannot
  see: probes on /livez and /readyz, non-root and read-only root filesystems, selectors that
  select, references (Secrets, ConfigMaps, scale targets, ServiceMonitor ports) that resolve,
  executors' grace periods longer than their shutdown grace, the PrometheusRule and dashboards
  ConfigMap carrying exactly the committed files. Security: the internal token reaches exactly
  the scheduler and its clients (gateway, finalizer) from a Secret that holds it, and so do the
  mTLS files when internal.tls is on (the scheduler URL then https://); the gateway's and the
  scheduler's ops ports are on no non-headless Service; unless a values file turns them off, one NetworkPolicy per
  component, the scheduler's gRPC port open only to the gateway and the finalizer (and the
  configured extra clients and monitoring), every ops port only to monitoring.
- The effective configuration of every service, compose's and each rendered Deployment's
  (nightshift.toml + NIGHTSHIFT_* variables), loaded by the real binary (`--dump-config`) when
  it is built (NIGHTSHIFT_BIN or target/debug/nightshift).
- helm/nightshift/files/alerts.yaml and dashboards/*.json: structure, and every alert's runbook
  anchor exists in docs/operations.md. (Their PromQL is parsed, and every metric checked against
  a running stack, by tests/ops.rs.)

Usage: check_ops.py [--tools DIR] [--nightshift-bin PATH]. Exits 1 on the first failing section,
after printing every problem of that section.
"""

from __future__ import annotations

import argparse
import copy
import fnmatch
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path

import jsonschema
import kubernetes_validate
import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
CHART = ROOT / "helm" / "nightshift"
VALUES_DIR = DEPLOY / "check" / "values"
# The chart's kubeVersion floor and the newest schemas kubernetes-validate ships.
K8S_VERSIONS = ["1.30.0", "1.37.0"]
CRD_KINDS = {"ScaledObject", "TriggerAuthentication", "ServiceMonitor", "PrometheusRule"}
SERVICES = ["gateway", "scheduler", "executor", "finalizer"]


class Problems:
    """Collects the problems of one section; `done` prints them and stops on any."""

    def __init__(self) -> None:
        self.items: list[str] = []
        self.failed_sections: list[str] = []

    def add(self, msg: str) -> None:
        self.items.append(msg)

    def check(self, cond: bool, msg: str) -> bool:
        if not cond:
            self.add(msg)
        return cond

    def section(self, name: str, fn, *args) -> None:
        start = time.monotonic()
        before = len(self.items)
        fn(self, *args)
        new = self.items[before:]
        took = time.monotonic() - start
        if new:
            print(f"FAIL {name} ({took:.1f}s)")
            for item in new:
                print(f"  - {item}")
            self.failed_sections.append(name)
        else:
            print(f"ok   {name} ({took:.1f}s)")


def load_yaml_docs(text: str) -> list:
    return [d for d in yaml.safe_load_all(text) if d is not None]


# --- compose ------------------------------------------------------------------------------------

PINNED_TAG = re.compile(r"^[^:@]+(:[^:]*\d+\.\d+[^:]*|@sha256:[0-9a-f]{64})$")


def compose_interpolate(value: str) -> str:
    """`${VAR:-default}` / `${VAR-default}` → default; `${VAR}` → "" (compose's rules, unset env)."""
    return re.sub(r"\$\{[A-Za-z_][A-Za-z0-9_]*(?::?-([^}]*))?\}", lambda m: m.group(1) or "", value)


def check_compose(p: Problems, tools: Path) -> None:
    path = DEPLOY / "docker-compose.yml"
    doc = yaml.safe_load(path.read_text())
    schema = json.loads((tools / "compose-spec" / "compose-spec.json").read_text())
    validator = jsonschema.Draft201909Validator(schema)
    for err in sorted(validator.iter_errors(doc), key=lambda e: list(e.absolute_path)):
        where = "/".join(str(x) for x in err.absolute_path)
        p.add(f"compose schema: /{where}: {err.message[:300]}")

    services: dict = doc.get("services", {})
    volumes = set((doc.get("volumes") or {}).keys())
    dockerfile_targets = dockerfile_stages()
    for name, svc in services.items():
        where = f"compose service {name}"
        image = svc.get("image", "")
        if "build" in svc:
            build = svc["build"]
            ctx = (path.parent / build.get("context", ".")).resolve()
            p.check(ctx.is_dir(), f"{where}: build context {ctx} does not exist")
            dockerfile = ctx / build.get("dockerfile", "Dockerfile")
            p.check(dockerfile.is_file(), f"{where}: Dockerfile {dockerfile} does not exist")
            if "target" in build:
                p.check(build["target"] in dockerfile_targets,
                        f"{where}: build target {build['target']!r} is not a stage of {dockerfile}")
            p.check(":" in image and not image.endswith(":latest"),
                    f"{where}: the built image needs an explicit, non-latest tag: {image!r}")
        else:
            p.check(bool(PINNED_TAG.match(image)) and "latest" not in image,
                    f"{where}: image {image!r} is not pinned to a version")
        for port in svc.get("ports", []):
            spec = port if isinstance(port, str) else f"{port.get('host_ip', '')}:{port.get('published', '')}"
            p.check(str(spec).startswith("127.0.0.1:"), f"{where}: port {port!r} is not bound to 127.0.0.1")
        p.check("healthcheck" in svc and not svc["healthcheck"].get("disable"),
                f"{where}: no healthcheck")
        deps = svc.get("depends_on", {})
        dep_items = deps.items() if isinstance(deps, dict) else ((d, {}) for d in deps)
        for dep, how in dep_items:
            if not p.check(dep in services, f"{where}: depends_on {dep!r}, which is not a service"):
                continue
            if how.get("condition") == "service_healthy":
                p.check("healthcheck" in services[dep], f"{where}: waits for {dep} healthy, which has no healthcheck")
            # a service outside every profile must not wait for one inside a profile
            if not svc.get("profiles"):
                p.check(not services[dep].get("profiles"), f"{where}: depends on {dep}, which only runs in a profile")
        for env_file in svc.get("env_file", []) or []:
            f = env_file if isinstance(env_file, str) else env_file.get("path")
            p.check((path.parent / f).exists(), f"{where}: env_file {f} does not exist")
        for vol in svc.get("volumes", []) or []:
            src = vol.split(":")[0] if isinstance(vol, str) else vol.get("source", "")
            if src.startswith((".", "/")):
                p.check((path.parent / src).exists(), f"{where}: bind mount source {src} does not exist")
            elif src:
                p.check(src in volumes, f"{where}: volume {src!r} is not declared")
        if svc.get("profiles"):
            p.check(svc["profiles"] == ["monitoring"], f"{where}: unexpected profiles {svc['profiles']}")
    for monitoring in ("prometheus", "grafana"):
        p.check(services.get(monitoring, {}).get("profiles") == ["monitoring"],
                f"compose: {monitoring} must run under the `monitoring` profile")

    # Prometheus scrapes compose services, and loads the chart's alert rules
    prom = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    for job in prom.get("scrape_configs", []):
        hosts = [t.rsplit(":", 1)[0] for sc in job.get("static_configs", []) for t in sc["targets"]]
        hosts += [n for sd in job.get("dns_sd_configs", []) for n in sd["names"]]
        for host in hosts:
            p.check(host in services, f"prometheus.yml: job {job['job_name']} scrapes {host}, not a compose service")
        p.check(re.fullmatch(r"nightshift-(gateway|scheduler|executor|finalizer)", job["job_name"]) is not None,
                f"prometheus.yml: job {job['job_name']} is not named nightshift-<component> (the alerts match on it)")
    for f in (DEPLOY / "grafana" / "provisioning").rglob("*.yml"):
        yaml.safe_load(f.read_text())
    tomllib.loads((DEPLOY / "compose" / "garage.toml").read_text())


def dockerfile_stages() -> set[str]:
    text = (DEPLOY / "Dockerfile").read_text()
    return {m.group(1) for m in re.finditer(r"(?im)^FROM\s+\S+\s+AS\s+(\S+)", text)}


# --- Dockerfile and .dockerignore --------------------------------------------------------------

def check_dockerfile(p: Problems) -> None:
    text = (DEPLOY / "Dockerfile").read_text()
    stages = dockerfile_stages()
    for target in [*SERVICES, "inference-sim", "nightshift", "runtime", "builder"]:
        p.check(target in stages, f"Dockerfile: no stage {target!r}")
    last_from = [l for l in text.splitlines() if l.upper().startswith("FROM ")][-1]
    p.check(last_from.split()[-1] == "nightshift", "Dockerfile: the default (last) stage must be `nightshift`")
    args = dict(re.findall(r"(?m)^ARG\s+(\w+)=(\S+)", text))
    for image in (args.get("RUST_IMAGE", ""), args.get("RUNTIME_IMAGE", "")):
        p.check(bool(re.search(r":\d+\.\d+", image)), f"Dockerfile: base image {image!r} is not pinned to a version")
    users = re.findall(r"(?m)^USER\s+(\S+)", text)
    p.check(bool(users) and all(not u.startswith(("0", "root")) for u in users), f"Dockerfile: runs as {users}")
    for entry in re.findall(r"(?m)^ENTRYPOINT\s+(.*)$", text):
        p.check(entry.startswith("["), f"Dockerfile: ENTRYPOINT {entry} needs a shell (use the exec form)")

    # The build context after .dockerignore must hold every file of the workspace build.
    rules = []
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            rules.append((line.startswith("!"), line.lstrip("!").rstrip("/")))

    def included(rel: str) -> bool:
        keep = True
        for negate, pattern in rules:
            parts = rel.split("/")
            hit = any(fnmatch.fnmatch("/".join(parts[:i]), pattern) for i in range(1, len(parts) + 1))
            if pattern.startswith("**/"):
                hit = hit or any(fnmatch.fnmatch(x, pattern[3:]) for x in parts)
            if hit:
                keep = negate
        return keep

    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"],
                           cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    needed = [f for f in files if f in ("Cargo.toml", "Cargo.lock")
              or (f.startswith(("crates/", "proto/")) and "/tests/" not in f and not f.endswith(".md"))
              or f == "tests/Cargo.toml" or f.startswith("tests/support/") or re.fullmatch(r"tests/[^/]+\.rs", f)]
    missing = [f for f in needed if not included(f)]
    p.check(not missing, f".dockerignore leaves out files the build reads: {missing[:10]}")
    p.check(not included("target/debug/nightshift") and not included(".dev/tools/x"),
            ".dockerignore must keep target/ and .dev/ out of the build context")


# --- helm ---------------------------------------------------------------------------------------

def helm(tools: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(tools / "helm-v4.1.4" / "helm"), *args], capture_output=True, text=True,
                          env={**os.environ, "HELM_CACHE_HOME": str(tools / "helm-home" / "cache"),
                               "HELM_CONFIG_HOME": str(tools / "helm-home" / "config"),
                               "HELM_DATA_HOME": str(tools / "helm-home" / "data")})


def values_files() -> tuple[list[Path], list[Path]]:
    files = sorted(VALUES_DIR.glob("*.yaml"))
    return [f for f in files if not f.name.startswith("invalid-")], [f for f in files if f.name.startswith("invalid-")]


def render(tools: Path, values: Path | None) -> tuple[list[dict] | None, str]:
    args = ["template", "ns", str(CHART), "--namespace", "batch"]
    if values:
        args += ["-f", str(values)]
    out = helm(tools, *args)
    if out.returncode != 0:
        return None, out.stderr
    return load_yaml_docs(out.stdout), ""


def check_helm(p: Problems, tools: Path, rendered: dict) -> None:
    valid, invalid = values_files()
    lint = helm(tools, "lint", "--strict", str(CHART))
    p.check(lint.returncode == 0, f"helm lint --strict (defaults): {lint.stdout[-800:]}{lint.stderr[-800:]}")
    for f in valid:
        lint = helm(tools, "lint", "--strict", str(CHART), "-f", str(f))
        p.check(lint.returncode == 0, f"helm lint --strict -f {f.name}: {lint.stdout[-800:]}{lint.stderr[-800:]}")
    for f in [None, *valid]:
        docs, err = render(tools, f)
        name = f.name if f else "defaults"
        if p.check(docs is not None, f"helm template ({name}) failed: {err[-1500:]}"):
            rendered[name] = docs
    for f in invalid:
        docs, err = render(tools, f)
        p.check(docs is None and "schema" in err,
                f"helm template -f {f.name} must be refused by values.schema.json; it {'rendered' if docs is not None else 'failed otherwise: ' + err[-500:]}")


def check_k8s_schemas(p: Problems, tools: Path, rendered: dict) -> None:
    crds = []
    for name, docs in rendered.items():
        for obj in docs:
            ident = f"{name}: {obj.get('kind')}/{obj.get('metadata', {}).get('name')}"
            if obj.get("kind") in CRD_KINDS:
                crds.append(obj)
                continue
            for version in K8S_VERSIONS:
                try:
                    kubernetes_validate.validate(obj, version, strict=True)
                except kubernetes_validate.ValidationError as e:
                    path = "/".join(str(x) for x in e.path)
                    p.add(f"{ident} (Kubernetes {version}): {path}: {e.message[:300]}")
                except kubernetes_validate.SchemaNotFoundError as e:
                    p.add(f"{ident}: no Kubernetes {version} schema for it: {e}")
    kinds = {o["kind"] for o in crds}
    p.check(kinds == CRD_KINDS, f"the all-on values must render every custom resource kind, got {sorted(kinds)}")
    out = subprocess.run(["node", str(DEPLOY / "check" / "validate_crds.mjs"),
                          str(tools / "crd-validate" / "node_modules")],
                         input=json.dumps(crds), capture_output=True, text=True)
    if out.returncode != 0:
        for line in out.stdout.splitlines() or [out.stderr.strip()[-500:]]:
            p.add(f"custom resource {line}")


def by_kind(docs: list[dict], kind: str) -> dict[str, dict]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def matches(selector: dict, labels: dict) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def check_chart_semantics(p: Problems, rendered: dict) -> None:
    alerts_file = (CHART / "files" / "alerts.yaml").read_text()
    dashboards = {f.name: f.read_text() for f in sorted((CHART / "dashboards").glob("*.json"))}
    for name, docs in rendered.items():
        deployments = by_kind(docs, "Deployment")
        services = by_kind(docs, "Service")
        secrets = by_kind(docs, "Secret")
        configmaps = by_kind(docs, "ConfigMap")
        p.check(sorted(d.split("-")[-1] for d in deployments) == sorted(SERVICES),
                f"{name}: Deployments {sorted(deployments)}, expected one per service")
        for dname, dep in deployments.items():
            where = f"{name}: Deployment {dname}"
            pod = dep["spec"]["template"]
            p.check(matches(dep["spec"]["selector"]["matchLabels"], pod["metadata"]["labels"]),
                    f"{where}: the selector does not select its own pods")
            spec = pod["spec"]
            psc = spec.get("securityContext", {})
            p.check(psc.get("runAsNonRoot") is True and psc.get("runAsUser", 0) != 0, f"{where}: pod may run as root")
            for c in spec["containers"]:
                sc = c.get("securityContext", {})
                p.check(sc.get("readOnlyRootFilesystem") is True, f"{where}: {c['name']} root filesystem is writable")
                p.check(sc.get("allowPrivilegeEscalation") is False, f"{where}: {c['name']} may escalate privileges")
                p.check(c.get("livenessProbe", {}).get("httpGet", {}).get("path") == "/livez", f"{where}: liveness probe is not /livez")
                p.check(c.get("readinessProbe", {}).get("httpGet", {}).get("path") == "/readyz", f"{where}: readiness probe is not /readyz")
                ports = {pt["containerPort"] for pt in c.get("ports", [])}
                for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
                    port = c.get(probe, {}).get("httpGet", {}).get("port")
                    p.check(port in ports, f"{where}: {probe} port {port} is not a container port {ports}")
                env = {e["name"]: e for e in c.get("env", [])}
                listen = env.get(f"NIGHTSHIFT_{c['name'].upper()}__LISTEN", {}).get("value", "")
                p.check(listen.startswith("0.0.0.0:") and int(listen.rsplit(":", 1)[1]) in ports,
                        f"{where}: listens on {listen!r}, not on its container port")
                for e in env.values():
                    ref = e.get("valueFrom", {}).get("secretKeyRef")
                    if ref and ref["name"] in secrets:
                        data = {**secrets[ref["name"]].get("stringData", {}), **secrets[ref["name"]].get("data", {})}
                        p.check(ref.get("optional") or ref["key"] in data,
                                f"{where}: {e['name']} needs key {ref['key']} the chart's Secret lacks")
                    elif ref:
                        # a Secret the chart did not render is the user's (existingSecret, or
                        # internal.existingSecret for the internal token)
                        theirs = (e["name"] == "NIGHTSHIFT_INTERNAL__TOKEN"
                                  or not [s for s in secrets if not s.endswith("-internal")])
                        p.check(theirs, f"{where}: {e['name']} refers to Secret {ref['name']}, "
                                        f"but the chart rendered {sorted(secrets)}")
                if c["name"] in ("executor", "finalizer"):
                    grace = env.get(f"NIGHTSHIFT_{c['name'].upper()}__SHUTDOWN_GRACE", {}).get("value", "0s")
                    p.check(spec.get("terminationGracePeriodSeconds", 30) > int(grace.rstrip("s")),
                            f"{where}: terminationGracePeriodSeconds {spec.get('terminationGracePeriodSeconds')} "
                            f"is not longer than the shutdown grace {grace}")
            for vol in spec.get("volumes", []):
                if "configMap" in vol:
                    p.check(vol["configMap"]["name"] in configmaps, f"{where}: volume {vol['name']} refers to a missing ConfigMap")
        for sname, svc in services.items():
            sel = svc["spec"].get("selector", {})
            targets = [d for d in deployments.values() if matches(sel, d["spec"]["template"]["metadata"]["labels"])]
            p.check(len(targets) == 1, f"{name}: Service {sname} selects {len(targets)} Deployments")
            for port in svc["spec"]["ports"]:
                names = {pt.get("name") for t in targets for c in t["spec"]["template"]["spec"]["containers"] for pt in c["ports"]}
                p.check(port["targetPort"] in names, f"{name}: Service {sname} targets port {port['targetPort']}, not a container port")
        for kind in ("PodDisruptionBudget",):
            for oname, obj in by_kind(docs, kind).items():
                sel = obj["spec"]["selector"]["matchLabels"]
                n = sum(matches(sel, d["spec"]["template"]["metadata"]["labels"]) for d in deployments.values())
                p.check(n == 1, f"{name}: {kind} {oname} selects {n} Deployments")
        for oname, hpa in by_kind(docs, "HorizontalPodAutoscaler").items():
            target = hpa["spec"]["scaleTargetRef"]["name"]
            p.check(target in deployments, f"{name}: HPA {oname} scales {target}, not a Deployment")
            p.check("replicas" not in deployments.get(target, {}).get("spec", {}),
                    f"{name}: Deployment {target} sets replicas while an HPA owns them")
        for oname, so in by_kind(docs, "ScaledObject").items():
            target = so["spec"]["scaleTargetRef"]["name"]
            p.check(target in deployments, f"{name}: ScaledObject {oname} scales {target}, not a Deployment")
            p.check("replicas" not in deployments.get(target, {}).get("spec", {}),
                    f"{name}: Deployment {target} sets replicas while KEDA owns them")
            auths = by_kind(docs, "TriggerAuthentication")
            for trig in so["spec"]["triggers"]:
                p.check(trig.get("authenticationRef", {}).get("name") in auths,
                        f"{name}: ScaledObject {oname} refers to a missing TriggerAuthentication")
                p.check(trig["metadata"].get("queueName", "").endswith(".chunk-tasks"),
                        f"{name}: ScaledObject {oname} does not watch the chunk-tasks queue")
        for oname, sm in by_kind(docs, "ServiceMonitor").items():
            scraped = {ep["port"] for ep in sm["spec"]["endpoints"]}
            selected = [s for s in services.values() if matches(sm["spec"]["selector"]["matchLabels"], s["metadata"]["labels"])
                        and {pt["name"] for pt in s["spec"]["ports"]} & scraped]
            components = sorted(s["metadata"]["labels"].get("app.kubernetes.io/component", "") for s in selected)
            p.check(components == sorted(SERVICES),
                    f"{name}: ServiceMonitor {oname} scrapes Services of {components}, expected one per service")
            ports = {pt["name"] for s in selected for pt in s["spec"]["ports"]}
            for ep in sm["spec"]["endpoints"]:
                p.check(ep["port"] in ports, f"{name}: ServiceMonitor endpoint port {ep['port']} is on no Service")
            job_label = sm["spec"].get("jobLabel")
            for s in selected:
                job = s["metadata"]["labels"].get(job_label, "")
                p.check(re.fullmatch(r"nightshift-(gateway|scheduler|executor|finalizer)", job) is not None,
                        f"{name}: Service {s['metadata']['name']} gets Prometheus job {job!r}, not nightshift-<component>")
        for oname, rule in by_kind(docs, "PrometheusRule").items():
            p.check(rule["spec"] == yaml.safe_load(alerts_file),
                    f"{name}: PrometheusRule {oname} does not carry files/alerts.yaml as it is")
        for oname, cm in configmaps.items():
            if oname.endswith("-dashboards"):
                p.check(cm["data"].keys() == dashboards.keys(), f"{name}: dashboards ConfigMap has {sorted(cm['data'])}")
                for k, v in cm["data"].items():
                    p.check(json.loads(v) == json.loads(dashboards.get(k, "null")), f"{name}: dashboard {k} differs from the file")
                p.check(cm["metadata"]["labels"].get("grafana_dashboard") == "1",
                        f"{name}: dashboards ConfigMap lacks the Grafana sidecar label")
            elif "nightshift.toml" in cm.get("data", {}):
                try:
                    tomllib.loads(cm["data"]["nightshift.toml"])
                except tomllib.TOMLDecodeError as e:
                    p.add(f"{name}: ConfigMap {oname}: nightshift.toml: {e}")


def values_of(name: str) -> dict:
    """The values file a rendering used ({} for the chart's defaults)."""
    return {} if name == "defaults" else (yaml.safe_load((VALUES_DIR / name).read_text()) or {})


def check_chart_security(p: Problems, rendered: dict) -> None:
    for name, docs in rendered.items():
        values = values_of(name)
        deployments = by_kind(docs, "Deployment")
        secrets = by_kind(docs, "Secret")
        services = by_kind(docs, "Service")
        internal = values.get("internal", {})
        for dname, dep in deployments.items():
            component = dep["spec"]["template"]["metadata"]["labels"].get("app.kubernetes.io/component")
            c = dep["spec"]["template"]["spec"]["containers"][0]
            env = {e["name"]: e for e in c.get("env", [])}
            token = env.get("NIGHTSHIFT_INTERNAL__TOKEN", {}).get("valueFrom", {}).get("secretKeyRef")
            if component == "executor":
                p.check(token is None, f"{name}: {dname}: executors call no scheduler, yet get the internal token")
                continue
            if not p.check(token is not None and token.get("optional") is False,
                           f"{name}: {dname}: no (required) NIGHTSHIFT_INTERNAL__TOKEN from a Secret"):
                continue
            if internal.get("existingSecret"):
                p.check(token["name"] == internal["existingSecret"] and token["key"] == internal.get("existingSecretKey"),
                        f"{name}: {dname}: the internal token is not taken from internal.existingSecret")
            else:
                secret = secrets.get(token["name"], {})
                p.check(token["key"] in secret.get("data", {}),
                        f"{name}: {dname}: the chart renders no Secret {token['name']} holding {token['key']}")
            tls = internal.get("tls", {})
            tls_env = {k: env.get(f"NIGHTSHIFT_INTERNAL__TLS__{k.upper()}", {}).get("value") for k in ("ca", "cert", "key")}
            if tls.get("enabled"):
                mounted = {m["mountPath"]: m["name"] for m in c.get("volumeMounts", [])}
                vols = {v["name"]: v for v in dep["spec"]["template"]["spec"].get("volumes", [])}
                for k, path in tls_env.items():
                    vol = vols.get(mounted.get(str(Path(path or "/").parent), ""), {})
                    secret_name = vol.get("secret", {}).get("secretName", "")
                    p.check(path is not None and (secret_name == tls["existingSecret"] if tls.get("existingSecret")
                                                  else secret_name.endswith("-internal-tls")),
                            f"{name}: {dname}: [internal.tls] {k} is not a file of internal.tls.existingSecret")
                url = env.get(f"NIGHTSHIFT_{component.upper()}__SCHEDULER_URL", {}).get("value", "https://")
                p.check(url.startswith("https://"), f"{name}: {dname}: mTLS on, yet the scheduler URL is {url}")
            else:
                p.check(set(tls_env.values()) == {None}, f"{name}: {dname}: [internal.tls] set with internal.tls off")
        for sname, svc in services.items():
            if svc["spec"].get("clusterIP") != "None":
                p.check(all(pt.get("targetPort") != "ops" for pt in svc["spec"]["ports"]),
                        f"{name}: Service {sname} exposes an ops port (only headless Services may)")
        policies = by_kind(docs, "NetworkPolicy")
        enabled = values.get("networkPolicy", {}).get("enabled", True)
        if not enabled:
            p.check(not policies, f"{name}: networkPolicy.enabled is false, yet {sorted(policies)} render")
            continue
        for dname, dep in deployments.items():
            pod_labels = dep["spec"]["template"]["metadata"]["labels"]
            mine = [pol for pol in policies.values() if matches(pol["spec"]["podSelector"]["matchLabels"], pod_labels)]
            if not p.check(len(mine) == 1, f"{name}: {dname} is selected by {len(mine)} NetworkPolicies, expected 1"):
                continue
            pol = mine[0]["spec"]
            p.check(pol.get("policyTypes") == ["Ingress"], f"{name}: {dname}'s NetworkPolicy is not ingress-only")
            component = pod_labels.get("app.kubernetes.io/component")
            ports = {pt["name"] for pt in dep["spec"]["template"]["spec"]["containers"][0]["ports"]}
            for rule in pol.get("ingress") or []:
                for port in rule.get("ports", []):
                    p.check(port["port"] in ports, f"{name}: {dname}'s NetworkPolicy opens {port['port']}, not a container port")
                opened = {pt["port"] for pt in rule.get("ports", [])}
                p.check(bool(opened), f"{name}: {dname}'s NetworkPolicy has a rule for every port")
                if opened & {"ops", "grpc"}:
                    peers = rule.get("from") or []
                    p.check(bool(peers), f"{name}: {dname}'s NetworkPolicy opens {sorted(opened)} to everyone")
                if component == "scheduler" and "grpc" in opened:
                    comps = {peer.get("podSelector", {}).get("matchLabels", {}).get("app.kubernetes.io/component")
                             for peer in rule.get("from") or [] if "namespaceSelector" not in peer}
                    p.check({"gateway", "finalizer"} <= comps,
                            f"{name}: the scheduler's gRPC port does not admit the gateway and the finalizer")
                    extra = values.get("networkPolicy", {}).get("schedulerClients", [])
                    for peer in extra:
                        p.check(peer in (rule.get("from") or []), f"{name}: schedulerClients peer {peer} not admitted")


# --- the services' effective configuration -----------------------------------------------------

PLACEHOLDER_SECRETS = {
    "NIGHTSHIFT_METADATA__URL": "postgres://nightshift:pw@db.example:5432/nightshift",
    "NIGHTSHIFT_QUEUE__URL": "amqp://nightshift:pw@mq.example:5672/%2f",
    "NIGHTSHIFT_STATE__URL": "redis://cache.example:6379",
}


def dump_config(binary: Path, service: str, config: Path, env: dict[str, str]) -> str | None:
    clean = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **env}
    clean.pop("NIGHTSHIFT_CONFIG", None)
    out = subprocess.run([str(binary), "--config", str(config), "--dump-config", service],
                         capture_output=True, text=True, env=clean, timeout=60)
    return None if out.returncode == 0 else (out.stderr or out.stdout).strip()[-600:]


def dockerfile_env() -> dict[str, str]:
    return dict(re.findall(r"(?m)^ENV\s+(NIGHTSHIFT_\w+)=(\S+)", (DEPLOY / "Dockerfile").read_text()))


def check_configs(p: Problems, binary: Path, rendered: dict) -> None:
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    for name, svc in compose["services"].items():
        command = svc.get("command") or []
        if svc.get("image", "").startswith("nightshift:") and command and command[0] in SERVICES:
            mounts = {v.split(":")[1]: v.split(":")[0] for v in svc.get("volumes", []) if isinstance(v, str)}
            env = {k: compose_interpolate(str(v)) for k, v in (svc.get("environment") or {}).items()}
            config = DEPLOY / mounts.get(env.get("NIGHTSHIFT_CONFIG", ""), "missing")
            if p.check(config.is_file(), f"compose {name}: NIGHTSHIFT_CONFIG is not a mounted file"):
                err = dump_config(binary, command[0], config, {**dockerfile_env(), **env})
                p.check(err is None, f"compose {name}: the binary refuses its configuration: {err}")
    with tempfile.TemporaryDirectory() as tmp:
        for name, docs in rendered.items():
            cms = by_kind(docs, "ConfigMap")
            for dname, dep in by_kind(docs, "Deployment").items():
                c = dep["spec"]["template"]["spec"]["containers"][0]
                env = dict(dockerfile_env())
                for e in c.get("env", []):
                    if "value" in e:
                        env[e["name"]] = str(e["value"])
                    elif "secretKeyRef" in e.get("valueFrom", {}):
                        env[e["name"]] = PLACEHOLDER_SECRETS.get(e["name"], "placeholder")
                cm_name = next(v["configMap"]["name"] for v in dep["spec"]["template"]["spec"]["volumes"] if "configMap" in v)
                config = Path(tmp) / f"{name}-{dname}.toml"
                config.write_text(cms[cm_name]["data"]["nightshift.toml"])
                err = dump_config(binary, c["args"][0], config, env)
                p.check(err is None, f"{name}: Deployment {dname}: the binary refuses its configuration: {err}")


# --- alerts and dashboards --------------------------------------------------------------------

def gh_anchor(heading: str) -> str:
    return re.sub(r"[^a-z0-9 _-]", "", heading.strip().lower()).replace(" ", "-")


def check_alerts_dashboards(p: Problems) -> None:
    rules = yaml.safe_load((CHART / "files" / "alerts.yaml").read_text())
    ops = ROOT / "docs" / "operations.md"
    anchors = {gh_anchor(m.group(1)) for m in re.finditer(r"(?m)^#+\s+(.*)$", ops.read_text())} if ops.exists() else set()
    p.check(list(rules) == ["groups"], "alerts.yaml: only `groups` at the top")
    names = set()
    for group in rules["groups"]:
        p.check(set(group) <= {"name", "rules", "interval"}, f"alerts.yaml: group {group.get('name')}: unknown keys")
        for rule in group["rules"]:
            where = f"alerts.yaml: {rule.get('alert')}"
            p.check(set(rule) <= {"alert", "expr", "for", "labels", "annotations", "keep_firing_for"}, f"{where}: unknown keys")
            p.check(rule.get("labels", {}).get("severity") in ("warning", "critical"), f"{where}: severity must be warning or critical")
            ann = rule.get("annotations", {})
            p.check({"summary", "description"} <= set(ann), f"{where}: needs a summary and a description")
            m = re.search(r"docs/operations\.md#([a-z0-9-]+)", ann.get("description", ""))
            if p.check(m is not None, f"{where}: the description must link its runbook in docs/operations.md"):
                p.check(m.group(1) == rule["alert"].lower(), f"{where}: runbook anchor #{m.group(1)} is not the alert's name")
                p.check(m.group(1) in anchors, f"{where}: docs/operations.md has no section #{m.group(1)}")
            names.add(rule["alert"])
    uids = set()
    for f in sorted((CHART / "dashboards").glob("*.json")):
        d = json.loads(f.read_text())
        where = f"dashboard {f.name}"
        p.check(d.get("uid") not in uids and d.get("uid"), f"{where}: missing or duplicate uid")
        uids.add(d.get("uid"))
        ids = [pan["id"] for pan in d["panels"]]
        p.check(len(ids) == len(set(ids)), f"{where}: duplicate panel ids")
        variables = {v["name"] for v in d.get("templating", {}).get("list", [])}
        p.check({"datasource", "namespace"} <= variables, f"{where}: needs the datasource and namespace variables")
        for pan in d["panels"]:
            if pan["type"] == "row":
                continue
            g = pan["gridPos"]
            p.check(g["x"] + g["w"] <= 24, f"{where}: panel {pan['title']!r} overflows the grid")
            p.check(pan.get("datasource", {}).get("uid") == "${datasource}", f"{where}: panel {pan['title']!r} has a fixed datasource")
            p.check(bool(pan.get("targets")) and all(t.get("expr") for t in pan["targets"]), f"{where}: panel {pan['title']!r} queries nothing")
            for t in pan.get("targets", []):
                p.check('namespace=~"$namespace"' in t["expr"], f"{where}: panel {pan['title']!r} ignores $namespace: {t['expr']}")
    unpanelled = CHART / "dashboards" / "unpanelled.txt"
    for line in unpanelled.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            p.check(re.fullmatch(r"nightshift_[a-z0-9_]+\s+\S.*", line) is not None,
                    f"unpanelled.txt: `{line}` is not `<family> <reason>`")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tools", type=Path, default=Path(os.environ.get("NIGHTSHIFT_DEV_DIR", ROOT / ".dev")) / "tools")
    ap.add_argument("--nightshift-bin", type=Path,
                    default=Path(os.environ.get("NIGHTSHIFT_BIN", ROOT / "target" / "debug" / "nightshift")))
    args = ap.parse_args()
    started = time.monotonic()
    p = Problems()
    rendered: dict[str, list[dict]] = {}
    p.section("compose: schema, references, pins, loopback ports, healthchecks", check_compose, args.tools)
    p.section("Dockerfile and .dockerignore", check_dockerfile)
    p.section("helm lint --strict and template (valid and invalid values)", check_helm, args.tools, rendered)
    if rendered:
        p.section(f"rendered objects vs Kubernetes {', '.join(K8S_VERSIONS)} schemas and the CRD validators",
                  check_k8s_schemas, args.tools, rendered)
        p.section("chart semantics: probes, security, selectors, references, grace periods", check_chart_semantics, rendered)
        p.section("chart security: the internal token, ops ports, NetworkPolicies", check_chart_security, rendered)
    if args.nightshift_bin.is_file():
        p.section(f"effective configurations loaded by {args.nightshift_bin.name} --dump-config",
                  check_configs, args.nightshift_bin, rendered)
    else:
        print(f"skip effective configurations: {args.nightshift_bin} is not built (cargo build -p nightshift-cli)")
    p.section("alert rules and dashboards: structure and runbook links", check_alerts_dashboards)
    took = time.monotonic() - started
    if p.failed_sections:
        print(f"ops-check: {len(p.failed_sections)} section(s) failed in {took:.1f}s")
        return 1
    print(f"ops-check: all passed in {took:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
