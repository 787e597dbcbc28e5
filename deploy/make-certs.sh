#!/usr/bin/env bash
# Secrets for a first secure run: a private CA, a server and a client
# certificate, bearer tokens for an admin, a trainer and a viewer, and the
# password Prometheus scrapes /metrics with.
#
#   deploy/make-certs.sh [DIR]       (default deploy/secrets; `make certs` runs it)
#
# Run it again to renew the server and client certificates with the same CA
# (then `docker compose kill -s HUP trainer`); the CA, the tokens and the
# metrics password are kept while their files exist. See deploy/README.md.
#
# Needs openssl and ntrain (`ntrain token`, which hashes the tokens; set
# NTRAIN to another command, e.g. "python -m service.cli"). Names on the server
# certificate: $NTRAIN_CERT_NAMES (default trainer,localhost), and the
# loopback addresses 127.0.0.1 and ::1.
#
# DIR is 0700 and must stay private: it holds the CA's key and the tokens.
# Every secret in it is 0600; only the certificates are 0644. Compose mounts
# file secrets with their host owner and mode, and the containers read theirs
# as other users (the trainer as $NTRAIN_UID, default 10001; Prometheus as
# nobody, 65534): run as root, the script gives each file the containers read
# to the user that reads it; otherwise it prints the chown that does.
set -euo pipefail
umask 077

dir=${1:-"$(cd "$(dirname "$0")" && pwd)/secrets"}
names=${NTRAIN_CERT_NAMES:-trainer,localhost}
read -r -a ntrain <<<"${NTRAIN:-ntrain}"
days=${NTRAIN_CERT_DAYS:-397}

command -v openssl >/dev/null || { echo "make-certs.sh: openssl is not installed" >&2; exit 1; }
"${ntrain[@]}" --version >/dev/null 2>&1 || {
    echo "make-certs.sh: cannot run '${ntrain[*]}' (install ntrain, or set NTRAIN)" >&2
    exit 1
}
if [[ ${ntrain[0]} == */* ]]; then  # a relative path must survive the cd below
    ntrain[0]="$(cd "$(dirname "${ntrain[0]}")" && pwd)/$(basename "${ntrain[0]}")"
fi
mkdir -p "$dir"
chmod 700 "$dir"
cd "$dir"

ec_key() { openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1" 2>/dev/null; }

if [ ! -f ca.key ]; then
    ec_key ca.key
    openssl req -x509 -new -key ca.key -out ca.crt -days 3650 -subj "/CN=ntrain private CA" \
        -addext "basicConstraints=critical,CA:TRUE" \
        -addext "keyUsage=critical,keyCertSign,cRLSign"
    echo "made a private CA: $dir/ca.crt"
fi

# sign NAME SUBJECT EXTENSIONS: NAME.key and NAME.crt, signed by the CA.
sign() {
    local name=$1 subject=$2 extensions=$3
    ec_key "$name.key.new"
    openssl req -new -key "$name.key.new" -subj "$subject" -out "$name.csr"
    printf '%s\n' "$extensions" >"$name.ext"
    openssl x509 -req -in "$name.csr" -CA ca.crt -CAkey ca.key -CAcreateserial \
        -days "$days" -extfile "$name.ext" -out "$name.crt.new" 2>/dev/null
    # cat, not mv: a file that compose mounted keeps its inode, so the container
    # sees the new certificate after a SIGHUP.
    cat "$name.key.new" >"$name.key"
    cat "$name.crt.new" >"$name.crt"
    rm -f "$name.key.new" "$name.crt.new" "$name.csr" "$name.ext"
}

san="IP:127.0.0.1,IP:::1"
IFS=, read -r -a dns <<<"$names"
for name in "${dns[@]}"; do san="DNS:$name,$san"; done
sign server "/CN=${dns[0]}" "subjectAltName=$san
basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature
extendedKeyUsage=serverAuth"
sign client "/CN=ntrain-client" "basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature
extendedKeyUsage=clientAuth"
echo "made server and client certificates for ${names} and loopback, valid $days days"

if [ ! -f tokens ]; then
    for role in admin trainer viewer; do
        "${ntrain[@]}" token new "$role" --role "$role" --auth-tokens tokens >"$role.token"
    done
    echo "made tokens for admin, trainer and viewer: $dir/{admin,trainer,viewer}.token"
fi

if [ ! -f metrics.password ]; then
    openssl rand -hex 24 >metrics.password
    printf 'prometheus %s\n' "$("${ntrain[@]}" token hash <metrics.password)" >metrics-users
    echo "made the metrics password Prometheus scrapes with: $dir/metrics.password"
fi

# Certificates are public; every secret is its owner's alone.
chmod 644 ca.crt server.crt
chmod 600 ca.key client.key ./*.token server.key tokens metrics.password metrics-users
trainer_uid=${NTRAIN_UID:-10001}
prometheus_uid=${NTRAIN_PROMETHEUS_UID:-65534}
if [ "$(id -u)" = 0 ]; then
    chown "$trainer_uid" server.key tokens metrics-users
    chown "$prometheus_uid" metrics.password
    echo "gave server.key, tokens, metrics-users to uid $trainer_uid (the trainer) and" \
        "metrics.password to uid $prometheus_uid (Prometheus), each 0600"
else
    echo "for docker compose, whose containers read these as other users: sudo chown" \
        "$trainer_uid $dir/{server.key,tokens,metrics-users} && sudo chown $prometheus_uid" \
        "$dir/metrics.password"
fi
