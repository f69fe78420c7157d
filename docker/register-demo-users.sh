#!/bin/bash
# Register demo accounts on the composed ejabberd and print their passwords.
#
# Usage (from the repository root or docker/):
#   docker/register-demo-users.sh [USER...]      default users: alice bob
#
# Runs `ejabberdctl register USER DOMAIN PASSWORD` inside the running
# `ejabberd` container with a fresh random password per user. DOMAIN is
# O2TR_DOMAIN from the environment or docker/.env (example.test).
# COMPOSE overrides the compose command (default: `docker compose`, else
# `docker-compose`).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"

domain="${O2TR_DOMAIN:-}"
if [ -z "$domain" ] && [ -f .env ]; then
    domain=$(sed -n 's/^O2TR_DOMAIN=//p' .env | tail -n 1)
fi
domain="${domain:-example.test}"

if [ -n "${COMPOSE:-}" ]; then
    read -r -a compose <<<"$COMPOSE"
elif docker compose version >/dev/null 2>&1; then
    compose=(docker compose)
else
    compose=(docker-compose)
fi

users=("$@")
[ ${#users[@]} -gt 0 ] || users=(alice bob)
for user in "${users[@]}"; do
    [[ "$user" =~ ^[a-z0-9._-]+$ ]] || { echo "bad user name '$user'" >&2; exit 2; }
    # 18 random bytes, base64 without the characters shells and URLs dislike.
    pw=$(head -c 18 /dev/urandom | base64 | tr '+/' '-_')
    "${compose[@]}" exec -T ejabberd ejabberdctl register "$user" "$domain" "$pw" >/dev/null
    echo "$user@$domain  password: $pw"
done
