#!/bin/sh
# Install what o2tr-proxy's interop and end-to-end tests need on a fresh
# Debian 12 machine. Idempotent: every step is skipped when already done.
# Runs non-interactively (CI); apt steps need root (or passwordless sudo).
#
#   scripts/install-test-deps.sh
#
# Installs:
#   * libotr 4.1.1: libotr5 libotr5-dev libotr5-bin (+ gcc, pkg-config to
#     build tests/peers/libotr_peer.c), and ejabberd for e2e tests;
#   * python-potr 1.0.2 in a Python 3.7 venv at $POTR_VENV (default
#     /opt/potr-venv). pycrypto 2.6.1, which potr needs, does not build on
#     Python 3.8+, hence 3.7 (found in pyenv or on PATH, or $PYTHON37);
#     Debian's python3-potr is broken and is not used;
#   * slixmpp for the system python3 (e2e test clients).
#
# Environment: POTR_VENV, PYTHON37 (a python3.7 interpreter), PYTHON3 (the
# interpreter that gets slixmpp; default python3).
set -eu

POTR_VENV=${POTR_VENV:-/opt/potr-venv}
PYTHON3=${PYTHON3:-python3}
APT_PACKAGES="libotr5 libotr5-dev libotr5-bin ejabberd gcc libc6-dev pkg-config"

log() { printf '[install-test-deps] %s\n' "$*"; }
die() { printf '[install-test-deps] ERROR: %s\n' "$*" >&2; exit 1; }

as_root() {
    if [ "$(id -u)" -eq 0 ]; then
        "$@"
    elif command -v sudo >/dev/null 2>&1; then
        sudo -n "$@"
    else
        die "need root for: $*"
    fi
}

is_installed() {
    dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed"
}

apt_updated=0
apt_install() {
    if [ "$apt_updated" -eq 0 ]; then
        log "apt-get update"
        as_root env DEBIAN_FRONTEND=noninteractive apt-get update -q
        apt_updated=1
    fi
    log "apt-get install $*"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
        -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold "$@"
}

# --- 1. Debian packages -----------------------------------------------------
missing=""
for p in $APT_PACKAGES; do
    is_installed "$p" || missing="$missing $p"
done
if [ -n "$missing" ]; then
    # shellcheck disable=SC2086
    apt_install $missing
else
    log "Debian packages present: $APT_PACKAGES"
fi

# --- 2. python-potr in a Python 3.7 venv -----------------------------------
potr_ok() {
    [ -x "$POTR_VENV/bin/python" ] &&
        "$POTR_VENV/bin/python" -c \
            'import potr; from potr.compatcrypto import DSAKey; import Crypto' \
            >/dev/null 2>&1
}

find_python37() {
    if [ -n "${PYTHON37:-}" ]; then
        echo "$PYTHON37"
        return 0
    fi
    for root in "${PYENV_ROOT:-}" "$HOME/.pyenv" /root/.pyenv /opt/pyenv; do
        [ -n "$root" ] || continue
        for py in "$root"/versions/3.7*/bin/python3; do
            if [ -x "$py" ]; then
                echo "$py"
                return 0
            fi
        done
    done
    for py in python3.7 /usr/local/bin/python3.7 /usr/bin/python3.7; do
        if command -v "$py" >/dev/null 2>&1; then
            command -v "$py"
            return 0
        fi
    done
    return 1
}

if potr_ok; then
    log "python-potr present in $POTR_VENV"
else
    py37=$(find_python37) ||
        die "no Python 3.7 found (pycrypto needs <= 3.7); set PYTHON37=/path/to/python3.7"
    "$py37" -c 'import sys; assert sys.version_info[:2] == (3, 7), sys.version' ||
        die "$py37 is not Python 3.7"
    log "creating $POTR_VENV with $py37"
    parent=$(dirname "$POTR_VENV")
    [ -w "$parent" ] || as_root mkdir -p "$parent"
    if [ -w "$parent" ]; then
        rm -rf "$POTR_VENV"
        "$py37" -m venv "$POTR_VENV"
        pip_run() { "$POTR_VENV/bin/python" -m pip "$@"; }
    else
        as_root rm -rf "$POTR_VENV"
        as_root "$py37" -m venv "$POTR_VENV"
        pip_run() { as_root "$POTR_VENV/bin/python" -m pip "$@"; }
    fi
    export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1
    pip_run install -q 'setuptools<58' wheel
    pip_run install -q --no-build-isolation 'python-potr==1.0.2'
    potr_ok || die "python-potr installed but 'import potr' fails in $POTR_VENV"
    log "python-potr installed in $POTR_VENV"
fi

# --- 3. slixmpp for the system python3 ---------------------------------------
if "$PYTHON3" -c 'import slixmpp' >/dev/null 2>&1; then
    log "slixmpp present for $PYTHON3"
else
    if ! "$PYTHON3" -m pip --version >/dev/null 2>&1; then
        apt_install python3-pip
    fi
    export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1
    log "pip install slixmpp for $PYTHON3"
    # Debian's own python3 is "externally managed" (PEP 668).
    "$PYTHON3" -m pip install -q slixmpp 2>/dev/null ||
        "$PYTHON3" -m pip install -q --break-system-packages slixmpp
    "$PYTHON3" -c 'import slixmpp' || die "slixmpp still not importable by $PYTHON3"
fi

log "done"
