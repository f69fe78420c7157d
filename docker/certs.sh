#!/bin/bash
# One-shot certificate set-up for docker-compose.yml (service `certs`).
#
# Runs in the o2tr-proxy image, as root (only to hand each file to the user
# that reads it), with the `certs` volume mounted at /certs. Makes, once:
#
#   /certs/ejabberd/server.pem   ejabberd's leaf certificate + key (for @CERTFILE@)
#   /certs/ejabberd/ca.pem       the CA that issued it (for @CAFILE@)
#   /certs/proxy/cert.pem        the proxy's client-leg certificate (O2TR_TLS_CERT)
#   /certs/proxy/key.pem         its key (O2TR_TLS_KEY)
#   /certs/proxy/upstream-ca.pem ejabberd's CA, trusted by the proxy (O2TR_UPSTREAM_CA)
#   /certs/client-ca.pem         the CA your XMPP client must trust for the proxy
#
# Both certificate pairs come from `o2tr-proxy certs --domain DOMAIN` (a small
# CA plus a leaf for DOMAIN, localhost, 127.0.0.1 and ::1; the CA's private key
# is not kept). The proxy checks ejabberd's certificate against the XMPP
# domain, not the container name, so one domain is all either leaf needs.
#
# Existing certificates are kept; they are made again when O2TR_DOMAIN changed
# or when O2TR_CERTS_RENEW=1.
#
# Environment: O2TR_DOMAIN (required), EJABBERD_UID (9000, the `ejabberd` user
# of the ejabberd image), PROXY_UID (10001), O2TR_CERTS_RENEW.
set -euo pipefail

domain="${O2TR_DOMAIN:?O2TR_DOMAIN must be set}"
ej_uid="${EJABBERD_UID:-9000}"
px_uid="${PROXY_UID:-10001}"
out="${CERTS_DIR:-/certs}"

die() {
    echo "certs: ERROR: $*" >&2
    exit 1
}

[[ "$domain" =~ ^[a-z0-9]([a-z0-9.-]*[a-z0-9])?$ ]] || die "bad O2TR_DOMAIN '$domain' (lower-case DNS name expected)"
[[ "$ej_uid" =~ ^[0-9]+$ && "$px_uid" =~ ^[0-9]+$ ]] || die "EJABBERD_UID and PROXY_UID must be numbers"
[ -d "$out" ] || die "$out is not mounted"

complete() {
    [ -s "$out/ejabberd/server.pem" ] && [ -s "$out/ejabberd/ca.pem" ] &&
        [ -s "$out/proxy/cert.pem" ] && [ -s "$out/proxy/key.pem" ] &&
        [ -s "$out/proxy/upstream-ca.pem" ] && [ -s "$out/client-ca.pem" ] &&
        [ "$(cat "$out/domain" 2>/dev/null)" = "$domain" ]
}

if complete && [ "${O2TR_CERTS_RENEW:-0}" != 1 ]; then
    echo "certs: certificates for $domain already in place"
else
    tmp="$out/.new"
    rm -rf "$tmp"
    mkdir -p "$tmp"
    o2tr-proxy certs --domain "$domain" --out "$tmp/ejabberd"
    o2tr-proxy certs --domain "$domain" --out "$tmp/proxy"
    # ejabberd wants the leaf and its key in one PEM.
    cat "$tmp/ejabberd/cert.pem" "$tmp/ejabberd/key.pem" >"$tmp/ejabberd/server.pem"
    rm -f "$tmp/ejabberd/cert.pem" "$tmp/ejabberd/key.pem"
    cp "$tmp/ejabberd/ca.pem" "$tmp/proxy/upstream-ca.pem"
    cp "$tmp/proxy/ca.pem" "$tmp/client-ca.pem"
    printf '%s\n' "$domain" >"$tmp/domain"
    # Swap in the new set (rm + mv: a crash in between leaves "incomplete",
    # which the next run repairs).
    rm -rf "$out/ejabberd" "$out/proxy" "$out/client-ca.pem" "$out/domain"
    mv "$tmp/ejabberd" "$tmp/proxy" "$tmp/client-ca.pem" "$tmp/domain" "$out/"
    rmdir "$tmp"
    echo "certs: made certificates for $domain"
fi

# Ownership and modes are (re)applied on every run: private keys readable only
# by the one service that uses them, CA certificates by everyone.
chmod 0755 "$out"
chown -R "$ej_uid:$ej_uid" "$out/ejabberd"
chown -R "$px_uid:$px_uid" "$out/proxy"
chown 0:0 "$out/client-ca.pem" "$out/domain"
chmod 0700 "$out/ejabberd" "$out/proxy"
chmod 0600 "$out/ejabberd/server.pem" "$out/proxy/key.pem"
chmod 0644 "$out/ejabberd/ca.pem" "$out/proxy/cert.pem" "$out/proxy/ca.pem" \
    "$out/proxy/upstream-ca.pem" "$out/client-ca.pem" "$out/domain"
echo "certs: clients must trust $out/client-ca.pem (SHA-256 fingerprint below)"
# Print the fingerprint without openssl: the DER body's hash, as clients show it.
sed -e '/-----BEGIN CERTIFICATE-----/,/-----END CERTIFICATE-----/!d' -e '/-----/d' \
    "$out/client-ca.pem" | base64 -d | sha256sum | awk '{print "certs: client CA sha256 " $1}'
