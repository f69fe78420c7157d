#!/bin/sh
# Render the shared ejabberd configuration template (docker/ejabberd/ejabberd.yml,
# also used by the end-to-end tests through scripts/ejabberd/ejabberd-test.sh)
# into a configuration ejabberd can read, then optionally exec a command.
#
# Usage:
#   render.sh TEMPLATE OUTPUT [-- COMMAND ARGS...]
#
# Values come from the environment (defaults are the container's):
#   EJ_HOST               XMPP domain                    (example.test)
#   EJ_C2S_IP             c2s listener address           (0.0.0.0)
#   EJ_C2S_PORT           c2s listener port              (5222)
#   EJ_CERTFILE           leaf certificate + key PEM     (/certs/ejabberd/server.pem)
#   EJ_CAFILE             CA of that leaf                (/certs/ejabberd/ca.pem)
#   EJ_LOGLEVEL           ejabberd loglevel              (info)
#   EJ_SM_RESUME_TIMEOUT  XEP-0198 resumption window, s  (300)
#
# POSIX sh only: it runs under the ejabberd image's busybox sh, and under
# scripts/check-docker.sh on the build machine.
set -eu

die() {
    echo "render.sh: ERROR: $*" >&2
    exit 1
}

[ $# -ge 2 ] || die "usage: render.sh TEMPLATE OUTPUT [-- COMMAND ARGS...]"
template="$1"
output="$2"
shift 2

host="${EJ_HOST:-example.test}"
ip="${EJ_C2S_IP:-0.0.0.0}"
port="${EJ_C2S_PORT:-5222}"
certfile="${EJ_CERTFILE:-/certs/ejabberd/server.pem}"
cafile="${EJ_CAFILE:-/certs/ejabberd/ca.pem}"
loglevel="${EJ_LOGLEVEL:-info}"
resume="${EJ_SM_RESUME_TIMEOUT:-300}"

# Validate every value: they land inside YAML and inside a sed expression.
printf '%s' "$host" | grep -Eq '^[a-z0-9]([a-z0-9.-]*[a-z0-9])?$' || die "bad EJ_HOST '$host'"
printf '%s' "$ip" | grep -Eq '^[0-9A-Fa-f.:]+$' || die "bad EJ_C2S_IP '$ip'"
if ! printf '%s' "$port" | grep -Eq '^[0-9]{1,5}$' || [ "$port" -lt 1 ] || [ "$port" -gt 65535 ]; then
    die "bad EJ_C2S_PORT '$port'"
fi
for f in "$certfile" "$cafile"; do
    printf '%s' "$f" | grep -Eq '^/[A-Za-z0-9_./-]+$' || die "bad certificate path '$f'"
done
case "$loglevel" in
    none | emergency | alert | critical | error | warning | notice | info | debug) ;;
    *) die "bad EJ_LOGLEVEL '$loglevel'" ;;
esac
printf '%s' "$resume" | grep -Eq '^[0-9]{1,7}$' || die "bad EJ_SM_RESUME_TIMEOUT '$resume'"
[ -r "$template" ] || die "template not readable: $template"

tmp="$output.tmp.$$"
sed -e "s|@HOST@|$host|g" \
    -e "s|@C2S_IP@|$ip|g" \
    -e "s|@C2S_PORT@|$port|g" \
    -e "s|@CERTFILE@|$certfile|g" \
    -e "s|@CAFILE@|$cafile|g" \
    -e "s|@LOGLEVEL@|$loglevel|g" \
    -e "s|@SM_RESUME_TIMEOUT@|$resume|g" \
    "$template" >"$tmp"
# Any placeholder left outside comments means the template grew one that this
# script does not know: refuse to start on a half-rendered configuration.
left=$(grep -v '^[[:space:]]*#' "$tmp" | grep -o '@[A-Z_]*@' | sort -u | tr '\n' ' ' || true)
if [ -n "$left" ]; then
    rm -f "$tmp"
    die "unsubstituted placeholder(s): $left"
fi
mv "$tmp" "$output"
echo "render.sh: wrote $output (host $host, c2s $ip:$port)" >&2

if [ $# -gt 0 ]; then
    [ "$1" = "--" ] || die "expected -- before the command"
    shift
    [ $# -gt 0 ] || die "no command after --"
    exec "$@"
fi
