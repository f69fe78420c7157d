#!/usr/bin/env bash
# Run a self-contained ejabberd (Debian's ejabberd 23.01) on loopback for
# o2tr-proxy's end-to-end tests: no systemd, no epmd, no /etc or /var state,
# works as root or as any user.
#
# Usage:
#   ejabberd-test.sh start   DIR C2S_PORT [DOMAIN]   create (if needed) + start, wait until ready
#   ejabberd-test.sh stop    DIR                     stop this node (and only this node)
#   ejabberd-test.sh restart DIR                     stop + start with the same port/domain/data
#   ejabberd-test.sh kill    DIR                     SIGKILL this node (crash simulation)
#   ejabberd-test.sh register DIR USER PASSWORD      create an account USER@DOMAIN
#   ejabberd-test.sh ctl     DIR ARGS...             any ejabberdctl command for this node
#   ejabberd-test.sh dump    DIR FILE                dump the whole Mnesia database as text
#   ejabberd-test.sh status  DIR                     exit 0 if the node answers
#
# DIR must be an absolute path without spaces or shell metacharacters (the
# ejabberdctl cfg is sourced as shell). DOMAIN defaults to example.test.
#
# Environment (start/restart):
#   EJ_LOGLEVEL           info (default) | debug (logs every stanza, lossless)
#   EJ_SM_RESUME_TIMEOUT  XEP-0198 resumption window, seconds (default 300)
#   EJ_TEMPLATE           config template (default: docker/ejabberd/ejabberd.yml
#                         of this repository)
#   EJ_START_TIMEOUT      seconds to wait for readiness (default 30)
#   EJ_WATCH_PID          if set, a watchdog stops the node when that process
#                         exits (the test process: no orphaned servers even
#                         when the tests are killed)
#   EJABBERDCTL           path to ejabberdctl (default /usr/sbin/ejabberdctl)
#
# Layout of DIR:
#   certs/ca.pem, certs/ca.key, certs/server.pem (leaf + key), certs/leaf.pem
#   ejabberd.yml, ejabberdctl.cfg, vm.args, .erlang.cookie, instance.env
#   db/ (Mnesia), logs/ejabberd.log, logs/error.log, logs/console.log
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)"
REPO_ROOT="$(cd "$SCRIPT_DIR/../.." && pwd -P)"
EJABBERDCTL="${EJABBERDCTL:-/usr/sbin/ejabberdctl}"

die() {
    echo "ejabberd-test: ERROR: $*" >&2
    exit 1
}

check_dir() {
    local dir="$1"
    case "$dir" in
        /*) ;;
        *) die "DIR must be absolute: '$dir'" ;;
    esac
    [[ "$dir" =~ ^[A-Za-z0-9_./+-]+$ ]] || die "DIR may only contain [A-Za-z0-9_./+-]: '$dir'"
}

need_tools() {
    [ -x "$EJABBERDCTL" ] || die "ejabberd is not installed ($EJABBERDCTL missing). Install: apt-get install -y ejabberd"
    command -v openssl >/dev/null || die "openssl is not installed. Install: apt-get install -y openssl"
}

# Is TCP port $1 listening on this machine (any address)? Reads /proc so no
# ss/netstat is needed.
port_in_use() {
    local hex
    hex=$(printf '%04X' "$1")
    awk -v p=":$hex" 'NR > 1 && $4 == "0A" && substr($2, length($2) - 4) == p { found = 1 } END { exit !found }' \
        /proc/net/tcp /proc/net/tcp6 2>/dev/null
}

free_port() {
    local p i
    for i in $(seq 1 200); do
        p=$(( (RANDOM * 32768 + RANDOM) % 20000 + 30000 ))
        if ! port_in_use "$p"; then
            echo "$p"
            return 0
        fi
    done
    die "no free port found for Erlang distribution"
}

# Erlang short node name, unique and stable per DIR: Mnesia binds its spool
# to the node name, so the same DIR must always get the same name.
node_name() {
    local sum
    sum=$(printf '%s' "$1" | cksum | awk '{print $1}')
    echo "o2tr_ej_${sum}@localhost"
}

# Debian's ejabberdctl refuses to run for users other than root and
# `ejabberd` before it reads our cfg. For any other user, run a copy without
# that check (EXEC_CMD=as_current_user in the cfg does the rest).
ctl_bin() {
    local dir="$1"
    if [ "$(id -u)" = 0 ] || [ "$(id -un)" = ejabberd ]; then
        echo "$EJABBERDCTL"
        return
    fi
    if [ ! -x "$dir/ejabberdctl" ]; then
        sed -e 's/^INSTALLUSER=ejabberd$/INSTALLUSER=/' "$EJABBERDCTL" >"$dir/ejabberdctl"
        chmod 755 "$dir/ejabberdctl"
    fi
    echo "$dir/ejabberdctl"
}

ctl() {
    local dir="$1"
    shift
    HOME="$dir" "$(ctl_bin "$dir")" --config-dir "$dir" --ctl-config "$dir/ejabberdctl.cfg" "$@"
}

make_certs() {
    local dir="$1" domain="$2" c="$1/certs"
    [ -f "$c/server.pem" ] && [ -f "$c/ca.pem" ] && return 0
    mkdir -p "$c"
    chmod 700 "$c"
    # A small CA (CA:TRUE) plus a leaf (CA:FALSE, serverAuth, SANs): rustls
    # rejects a self-signed end-entity certificate.
    # ECDSA P-256: key generation is instant (RSA-2048 costs ~0.5 s per key
    # on a loaded 2-core machine); rustls, OpenSSL (ejabberd) and Python's
    # ssl all accept it.
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -sha256 -days 3650 \
        -keyout "$c/ca.key" -out "$c/ca.pem" -subj "/CN=o2tr-proxy test CA" \
        -addext "basicConstraints=critical,CA:TRUE" \
        -addext "keyUsage=critical,keyCertSign,cRLSign" \
        -addext "subjectKeyIdentifier=hash" 2>/dev/null
    openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -sha256 \
        -keyout "$c/leaf.key" -out "$c/leaf.csr" -subj "/CN=$domain" 2>/dev/null
    cat >"$c/leaf.ext" <<EOF
basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature
extendedKeyUsage=serverAuth
subjectAltName=DNS:$domain,DNS:localhost,IP:127.0.0.1,IP:::1
authorityKeyIdentifier=keyid
subjectKeyIdentifier=hash
EOF
    openssl x509 -req -in "$c/leaf.csr" -CA "$c/ca.pem" -CAkey "$c/ca.key" \
        -CAcreateserial -days 3650 -sha256 -extfile "$c/leaf.ext" \
        -out "$c/leaf.pem" 2>/dev/null
    # ejabberd wants certificate and key in one PEM.
    cat "$c/leaf.pem" "$c/leaf.key" >"$c/server.pem"
    chmod 600 "$c/ca.key" "$c/leaf.key" "$c/server.pem"
    rm -f "$c/leaf.csr" "$c/leaf.ext"
}

write_config() {
    local dir="$1" port="$2" domain="$3"
    local template="${EJ_TEMPLATE:-$REPO_ROOT/docker/ejabberd/ejabberd.yml}"
    local loglevel="${EJ_LOGLEVEL:-info}"
    local resume="${EJ_SM_RESUME_TIMEOUT:-300}"
    [ -f "$template" ] || die "config template not found: $template"
    case "$loglevel" in
        none|emergency|alert|critical|error|warning|notice|info|debug) ;;
        *) die "bad EJ_LOGLEVEL '$loglevel'" ;;
    esac
    sed -e "s|@HOST@|$domain|g" \
        -e "s|@C2S_IP@|127.0.0.1|g" \
        -e "s|@C2S_PORT@|$port|g" \
        -e "s|@CERTFILE@|$dir/certs/server.pem|g" \
        -e "s|@CAFILE@|$dir/certs/ca.pem|g" \
        -e "s|@LOGLEVEL@|$loglevel|g" \
        -e "s|@SM_RESUME_TIMEOUT@|$resume|g" \
        "$template" >"$dir/ejabberd.yml"
    local left
    left=$(grep -v '^[[:space:]]*#' "$dir/ejabberd.yml" | grep -o '@[A-Z_]*@' | sort -u | tr '\n' ' ' || true)
    [ -z "$left" ] || die "unsubstituted placeholder(s) in $dir/ejabberd.yml: $left"

    # A fresh free port for Erlang distribution on every start: with
    # ERL_DIST_PORT set, ejabberdctl needs no epmd and the ctl client connects
    # straight to this port.
    local dist_port
    dist_port=$(free_port)
    cat >"$dir/ejabberdctl.cfg" <<EOF
# Generated by ejabberd-test.sh; sourced by ejabberdctl.
ERLANG_NODE=$(node_name "$dir")
SPOOL_DIR=$dir/db
LOGS_DIR=$dir/logs
EJABBERD_CONFIG_PATH=$dir/ejabberd.yml
EJABBERD_PID_PATH=$dir/ejabberd.pid
ERL_DIST_PORT=$dist_port
EXEC_CMD=as_current_user
ERL_OPTIONS="-env ERL_CRASH_DUMP_BYTES 0 -ejabberd log_burst_limit_count 1000000000 -ejabberd log_rotate_size infinity"
EOF
    # Keep Erlang distribution on loopback.
    echo '-kernel inet_dist_use_interface {127,0,0,1}' >"$dir/vm.args"
    if [ ! -f "$dir/.erlang.cookie" ]; then
        # Cookie in HOME (=DIR), not -setcookie, which would show in ps.
        (umask 077 && head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$dir/.erlang.cookie")
        chmod 400 "$dir/.erlang.cookie"
    fi
    # ejabberdctl points ERL_INETRC at CONFIG_DIR/inetrc: resolve names from
    # /etc/hosts first and make "localhost" (the node's host) always resolve.
    printf '%s\n' '{lookup,["file","native"]}.' '{host,{127,0,0,1}, ["localhost"]}.' >"$dir/inetrc"
    printf 'PORT=%s\nDOMAIN=%s\nLOGLEVEL=%s\nSM_RESUME_TIMEOUT=%s\n' \
        "$port" "$domain" "$loglevel" "$resume" >"$dir/instance.env"
}

node_pid() {
    local dir="$1" pid
    [ -f "$dir/ejabberd.pid" ] || return 1
    pid=$(cat "$dir/ejabberd.pid" 2>/dev/null) || return 1
    [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null && [ -r "/proc/$pid/cmdline" ] || return 1
    # Make sure the pid is still our node (pids get reused).
    tr '\0' ' ' <"/proc/$pid/cmdline" | grep -q -- "$(node_name "$dir")" || return 1
    echo "$pid"
}

# Open a stream and wait for <stream:features> with STARTTLS in it.
probe() {
    local port="$1" domain="$2"
    timeout 3 bash -c '
        exec 3<>"/dev/tcp/127.0.0.1/$0" || exit 1
        printf "%s" "<?xml version=\"1.0\"?><stream:stream to=\"$1\" xmlns=\"jabber:client\" xmlns:stream=\"http://etherx.jabber.org/streams\" version=\"1.0\">" >&3
        buf=""
        while IFS= read -r -d ">" -u 3 chunk; do
            buf+="$chunk>"
            case "$buf" in
                *"</stream:features>"*)
                    case "$buf" in *"urn:ietf:params:xml:ns:xmpp-tls"*) exit 0 ;; *) exit 2 ;; esac ;;
            esac
        done
        exit 1' "$port" "$domain" 2>/dev/null
}

log_tail() {
    local dir="$1" f
    for f in console.log error.log ejabberd.log; do
        if [ -s "$dir/logs/$f" ]; then
            echo "----- last lines of $dir/logs/$f -----" >&2
            tail -n 40 "$dir/logs/$f" >&2
        fi
    done
}

start_watchdog() {
    local dir="$1" watch="$2"
    [ -n "$watch" ] || return 0
    # setsid + nohup: survives the test's process group; exits on its own.
    setsid nohup bash -c '
        dir="$0"; watch="$1"; script="$2"
        while kill -0 "$watch" 2>/dev/null; do
            [ -f "$dir/watchdog.pid" ] || exit 0
            sleep 1
        done
        rm -f "$dir/watchdog.pid"
        "$script" stop "$dir" >/dev/null 2>&1
    ' "$dir" "$watch" "$SCRIPT_DIR/ejabberd-test.sh" </dev/null >/dev/null 2>&1 &
    echo $! >"$dir/watchdog.pid"
}

stop_watchdog() {
    local dir="$1" pid
    if [ -f "$dir/watchdog.pid" ]; then
        pid=$(cat "$dir/watchdog.pid" 2>/dev/null || true)
        rm -f "$dir/watchdog.pid"
        [ -n "$pid" ] && kill "$pid" 2>/dev/null || true
    fi
}

cmd_start() {
    local dir="$1" port="$2" domain="${3:-example.test}"
    check_dir "$dir"
    need_tools
    [[ "$port" =~ ^[0-9]+$ ]] && [ "$port" -gt 0 ] && [ "$port" -lt 65536 ] || die "bad port '$port'"
    [[ "$domain" =~ ^[a-z0-9.-]+$ ]] || die "bad domain '$domain'"
    mkdir -p "$dir" "$dir/db" "$dir/logs"
    if node_pid "$dir" >/dev/null; then
        die "a node is already running for $dir (pid $(node_pid "$dir"))"
    fi
    if port_in_use "$port"; then
        die "port $port is already in use"
    fi
    make_certs "$dir" "$domain"
    write_config "$dir" "$port" "$domain"

    local t0 deadline
    t0=$(date +%s%N)
    deadline=$(( $(date +%s) + ${EJ_START_TIMEOUT:-30} ))
    # foreground mode under setsid: the boot output (errors before the
    # logger is up) goes to console.log, and the node leaves the caller's
    # process group.
    : >"$dir/logs/console.log"
    HOME="$dir" setsid nohup "$(ctl_bin "$dir")" --config-dir "$dir" \
        --ctl-config "$dir/ejabberdctl.cfg" foreground \
        </dev/null >>"$dir/logs/console.log" 2>&1 &
    local launcher=$!
    while true; do
        if probe "$port" "$domain"; then
            break
        fi
        if ! kill -0 "$launcher" 2>/dev/null; then
            log_tail "$dir"
            die "ejabberd for $dir exited during start"
        fi
        if [ "$(date +%s)" -ge "$deadline" ]; then
            log_tail "$dir"
            cmd_stop "$dir" >/dev/null 2>&1 || true
            kill -9 "$launcher" 2>/dev/null || true
            die "ejabberd for $dir not ready on 127.0.0.1:$port after ${EJ_START_TIMEOUT:-30} s"
        fi
        sleep 0.1
    done
    start_watchdog "$dir" "${EJ_WATCH_PID:-}"
    echo "ejabberd ready: $domain on 127.0.0.1:$port (pid $(node_pid "$dir" || echo '?'), $(( ($(date +%s%N) - t0) / 1000000 )) ms) dir=$dir"
}

cmd_stop() {
    local dir="$1" pid i
    check_dir "$dir"
    stop_watchdog "$dir"
    [ -f "$dir/ejabberdctl.cfg" ] || return 0
    pid=$(node_pid "$dir" || true)
    [ -n "$pid" ] || return 0
    # SIGTERM makes the Erlang VM (OTP >= 20) run init:stop(): applications,
    # Mnesia included, stop in order, as with `ejabberdctl stop`, but ~1.5 s
    # faster (no extra ctl VM, no polling).
    kill -TERM "$pid" 2>/dev/null || true
    for i in $(seq 1 100); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    if kill -0 "$pid" 2>/dev/null; then
        echo "ejabberd-test: node $pid did not stop in 10 s, killing it" >&2
        kill -9 "$pid" 2>/dev/null || true
    fi
    # Children of the node (erl_child_setup, inet_gethost) die with it.
    rm -f "$dir/ejabberd.pid"
}

cmd_kill() {
    local dir="$1" pid
    check_dir "$dir"
    stop_watchdog "$dir"
    pid=$(node_pid "$dir" || true)
    [ -n "$pid" ] || die "no node running for $dir"
    kill -9 "$pid"
    while kill -0 "$pid" 2>/dev/null; do sleep 0.05; done
    rm -f "$dir/ejabberd.pid"
}

load_env() {
    local dir="$1"
    [ -f "$dir/instance.env" ] || die "$dir was never started (no instance.env)"
    # shellcheck disable=SC1091
    . "$dir/instance.env"
}

cmd_restart() {
    local dir="$1"
    check_dir "$dir"
    load_env "$dir"
    cmd_stop "$dir"
    EJ_LOGLEVEL="${EJ_LOGLEVEL:-$LOGLEVEL}" EJ_SM_RESUME_TIMEOUT="${EJ_SM_RESUME_TIMEOUT:-$SM_RESUME_TIMEOUT}" \
        cmd_start "$dir" "$PORT" "$DOMAIN"
}

cmd_register() {
    local dir="$1" user="$2" pass="$3"
    check_dir "$dir"
    load_env "$dir"
    ctl "$dir" register "$user" "$DOMAIN" "$pass"
}

cmd_dump() {
    local dir="$1" out="$2"
    check_dir "$dir"
    case "$out" in /*) ;; *) out="$PWD/$out" ;; esac
    rm -f "$out"
    ctl "$dir" dump "$out" >/dev/null
    [ -f "$out" ] || die "dump did not produce $out"
}

main() {
    [ $# -ge 2 ] || { sed -n '2,32p' "${BASH_SOURCE[0]}" >&2; exit 2; }
    local cmd="$1"
    shift
    case "$cmd" in
        start) [ $# -ge 2 ] || die "usage: start DIR C2S_PORT [DOMAIN]"; cmd_start "$@" ;;
        stop) cmd_stop "$1" ;;
        restart) cmd_restart "$1" ;;
        kill) cmd_kill "$1" ;;
        register) [ $# -eq 3 ] || die "usage: register DIR USER PASSWORD"; cmd_register "$@" ;;
        ctl) local d="$1"; shift; check_dir "$d"; ctl "$d" "$@" ;;
        dump) [ $# -eq 2 ] || die "usage: dump DIR FILE"; cmd_dump "$@" ;;
        status) check_dir "$1"; ctl "$1" status >/dev/null 2>&1 ;;
        *) die "unknown command '$cmd'" ;;
    esac
}

main "$@"
