#!/usr/bin/env bash
# Installs and runs the real servers the backends are tested against:
# etcd, Redis, MariaDB (MySQL protocol) and tansu (Kafka protocol), on free
# loopback ports, with their data under .services/ in the repository.
#
#   scripts/services.sh install          install what is missing (Debian packages, tansu), start nothing
#   scripts/services.sh up [svc...]      install what is missing, start, wait until each answers
#   scripts/services.sh down [svc...]    stop exactly the processes 'up' started (by pid)
#   scripts/services.sh restart svc...   stop and start again on the same port, keeping data
#   scripts/services.sh kill svc...      SIGKILL (a crash, for fault tests); 'up' starts it again
#   scripts/services.sh status           what runs where
#   scripts/services.sh env              print the IMINFRA_* variables (file: .services/env)
#
# etcd and Redis also listen with TLS on a second port, MariaDB on its one
# port, with a private CA made once under .services/tls (variables
# IMINFRA_ETCD_TLS_ENDPOINTS, IMINFRA_REDIS_TLS_URL, IMINFRA_TLS_CA_FILE).
#
# svc is one of: etcd redis redis-cluster mysql kafka (default: all). 'up' is idempotent:
# a server that already runs is left alone. A server that fails to start
# stops the script with its name and the tail of its log.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DIR="${IMINFRA_SERVICES_DIR:-$ROOT/.services}"
ENV_FILE="$DIR/env"
ALL=(etcd redis redis-cluster mysql kafka)
TANSU_VERSION="0.6.0"
START_TIMEOUT="${IMINFRA_START_TIMEOUT:-60}"
MYSQL_DB="iminfra"
MYSQL_USER="iminfra"
MYSQL_PASSWORD="iminfra-test-password"
# An ACL user on Redis, for the authentication tests.
REDIS_USER="iminfra"
REDIS_PASSWORD="iminfra-test-password"

mkdir -p "$DIR"

log() { printf '[services] %s\n' "$*" >&2; }
die() { printf '[services] ERROR: %s\n' "$*" >&2; exit 1; }
now_ms() { date +%s%3N; }

# --- installation ---------------------------------------------------------

need_apt=()
check_bin() { command -v "$1" >/dev/null 2>&1 || need_apt+=("$2"); }
# A library package (headers for a -sys crate): checked with dpkg.
check_lib() { command -v dpkg >/dev/null 2>&1 || return 0; dpkg -s "$1" >/dev/null 2>&1 || need_apt+=("$1"); }

install_debian_packages() {
    need_apt=()
    check_bin etcd etcd-server
    check_bin etcdctl etcd-client
    check_bin redis-server redis-server
    check_bin mariadbd mariadb-server
    check_bin protoc protobuf-compiler
    # rdkafka's bundled librdkafka: TLS through OpenSSL, found by pkg-config.
    check_bin pkg-config pkg-config
    # The test CA and the servers' TLS certificates.
    check_bin openssl openssl
    check_lib libssl-dev
    [ ${#need_apt[@]} -eq 0 ] && return 0
    command -v apt-get >/dev/null 2>&1 || die "missing ${need_apt[*]} and no apt-get to install them"
    local sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    local t0; t0=$(now_ms)
    log "installing ${need_apt[*]} (apt-get)"
    $sudo apt-get update -qq >"$DIR/apt.log" 2>&1 || { tail -20 "$DIR/apt.log" >&2; die "apt-get update failed"; }
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${need_apt[@]}" >>"$DIR/apt.log" 2>&1 ||
        { tail -20 "$DIR/apt.log" >&2; die "apt-get install ${need_apt[*]} failed"; }
    log "installed Debian packages in $(( ($(now_ms) - t0) / 1000 ))s"
}

tansu_bin() {
    if command -v tansu >/dev/null 2>&1; then command -v tansu; return; fi
    local b="${CARGO_HOME:-$HOME/.cargo}/bin/tansu"
    [ -x "$b" ] && { echo "$b"; return; }
    echo ""
}

install_tansu() {
    [ -n "$(tansu_bin)" ] && return 0
    command -v cargo >/dev/null 2>&1 || die "tansu is missing and cargo is not available to build it"
    local t0; t0=$(now_ms)
    log "building tansu $TANSU_VERSION with cargo install (once per machine, about 16 minutes on 2 cores)"
    cargo install tansu --version "$TANSU_VERSION" --locked --features dynostore,libsql \
        >"$DIR/tansu-install.log" 2>&1 || { tail -30 "$DIR/tansu-install.log" >&2; die "cargo install tansu failed"; }
    log "built tansu in $(( ($(now_ms) - t0) / 1000 ))s"
}

# --- ports and processes --------------------------------------------------

port_in_use() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

free_port() {
    local p
    for _ in $(seq 1 200); do
        p=$(( 20000 + RANDOM % 30000 ))
        if ! port_in_use "$p" && ! grep -qx "$p" "$DIR"/*.port 2>/dev/null; then echo "$p"; return; fi
    done
    die "no free port found"
}

# The port of a service: the one it had before (so a restart keeps the
# address), or a new free one.
port_of() {
    local svc=$1 f="$DIR/$1.port"
    if [ -s "$f" ]; then cat "$f"; else free_port | tee "$f"; fi
}

# Starts a server in its own session, detached from this script: stdin from
# /dev/null, output to its log, and no other inherited descriptor (a leaked
# pipe would keep a caller such as `scripts/services.sh up | tail` waiting).
# The recorded pid is the server's own (the subshell execs into it); a
# service of several processes (the Redis cluster) records one per line.
spawn() {
    local svc=$1 logf=$2 wd=$3
    shift 3
    (
        cd "$wd" || exit 1
        for fd in /proc/$BASHPID/fd/*; do
            fd=${fd##*/}
            if [ "$fd" -gt 2 ] 2>/dev/null; then eval "exec $fd>&-" 2>/dev/null || true; fi
        done
        exec setsid "$@" </dev/null >"$logf" 2>&1
    ) &
    echo $! >>"$DIR/$svc.pid"
}

# The pids of a service, space-separated.
pid_of() { [ -s "$DIR/$1.pid" ] && tr '\n' ' ' <"$DIR/$1.pid" | sed 's/ $//' || true; }

alive() {
    local pids p; pids=$(pid_of "$1")
    [ -n "$pids" ] || return 1
    for p in $pids; do kill -0 "$p" 2>/dev/null || return 1; done
}

fail_start() {
    local svc=$1 logf=$2
    log "$svc failed to start; last lines of $logf:"
    tail -n 30 "$logf" >&2 2>/dev/null || true
    stop_one "$svc" quiet
    die "$svc did not start"
}

wait_ready() {
    local svc=$1 logf=$2 t0; t0=$(now_ms)
    local deadline=$(( $(date +%s) + START_TIMEOUT ))
    until ready_"$svc"; do
        if [ "$(date +%s)" -ge "$deadline" ]; then fail_start "$svc" "$logf"; fi
        if ! alive "$svc"; then fail_start "$svc" "$logf"; fi
        sleep 0.1
    done
    log "$svc ready on 127.0.0.1:$(cat "$DIR/$svc.port") after $(( $(now_ms) - t0 )) ms"
}

# --- TLS material ---------------------------------------------------------

# A private CA and one server certificate for 127.0.0.1 and localhost, made
# once and kept under $DIR/tls. etcd, Redis and MariaDB also listen with TLS
# (etcd and Redis on a second port, MariaDB on its one port), for the tests
# of the backends' TLS options.
TLS_DIR="$DIR/tls"

make_tls() {
    [ -s "$TLS_DIR/server.pem" ] && [ -s "$TLS_DIR/ca.pem" ] && return 0
    command -v openssl >/dev/null 2>&1 || die "openssl is needed to make the test certificates"
    mkdir -p "$TLS_DIR"
    local l="$TLS_DIR/openssl.log"
    {
        openssl req -x509 -newkey rsa:2048 -nodes -days 3650 -subj "/CN=im-infra test CA" \
            -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
            -keyout "$TLS_DIR/ca.key" -out "$TLS_DIR/ca.pem" &&
        openssl req -newkey rsa:2048 -nodes -subj "/CN=127.0.0.1" \
            -keyout "$TLS_DIR/server.key" -out "$TLS_DIR/server.csr" &&
        printf '%s\n' "subjectAltName=IP:127.0.0.1,DNS:localhost" "basicConstraints=CA:FALSE" \
            "keyUsage=critical,digitalSignature,keyEncipherment" "extendedKeyUsage=serverAuth,clientAuth" \
            >"$TLS_DIR/server.ext" &&
        openssl x509 -req -in "$TLS_DIR/server.csr" -CA "$TLS_DIR/ca.pem" -CAkey "$TLS_DIR/ca.key" \
            -CAcreateserial -days 3650 -extfile "$TLS_DIR/server.ext" -out "$TLS_DIR/server.pem"
    } >"$l" 2>&1 || { tail -20 "$l" >&2; die "making the test certificates failed"; }
    chmod 600 "$TLS_DIR/ca.key" "$TLS_DIR/server.key"
    log "made a test CA and server certificate in $TLS_DIR"
}

# --- etcd -----------------------------------------------------------------

ready_etcd() { etcdctl --endpoints="127.0.0.1:$(cat "$DIR/etcd.port")" --dial-timeout=1s endpoint health >/dev/null 2>&1; }

start_etcd() {
    local port peer tls; port=$(port_of etcd); tls=$(port_of etcd-tls)
    if [ -s "$DIR/etcd.peer" ]; then peer=$(cat "$DIR/etcd.peer"); else peer=$(free_port); echo "$peer" >"$DIR/etcd.peer"; fi
    mkdir -p "$DIR/etcd"
    spawn etcd "$DIR/etcd.log" "$DIR" etcd --name iminfra --data-dir "$DIR/etcd/data" \
        --listen-client-urls "http://127.0.0.1:$port,https://127.0.0.1:$tls" \
        --advertise-client-urls "http://127.0.0.1:$port,https://127.0.0.1:$tls" \
        --cert-file "$TLS_DIR/server.pem" --key-file "$TLS_DIR/server.key" \
        --listen-peer-urls "http://127.0.0.1:$peer" --initial-advertise-peer-urls "http://127.0.0.1:$peer" \
        --initial-cluster "iminfra=http://127.0.0.1:$peer"
    wait_ready etcd "$DIR/etcd.log"
}

# --- Redis ----------------------------------------------------------------

ready_redis() { [ "$(redis-cli -p "$(cat "$DIR/redis.port")" ping 2>/dev/null)" = "PONG" ]; }

start_redis() {
    local port tls; port=$(port_of redis); tls=$(port_of redis-tls)
    mkdir -p "$DIR/redis"
    # Append-only file on: a restarted server keeps its data, as in production.
    spawn redis "$DIR/redis.log" "$DIR/redis" redis-server --port "$port" --bind 127.0.0.1 \
        --dir "$DIR/redis" --save '' --appendonly yes --appendfsync everysec \
        --tls-port "$tls" --tls-cert-file "$TLS_DIR/server.pem" --tls-key-file "$TLS_DIR/server.key" \
        --tls-ca-cert-file "$TLS_DIR/ca.pem" --tls-auth-clients no
    wait_ready redis "$DIR/redis.log"
    redis-cli -p "$port" ACL SETUSER "$REDIS_USER" on ">$REDIS_PASSWORD" '~*' '&*' '+@all' >/dev/null ||
        fail_start redis "$DIR/redis.log"
}

# --- Redis Cluster --------------------------------------------------------

# Three primaries (no replicas) sharing the 16384 slots, for the backend's
# cluster mode. The nodes find each other by the ports in nodes.conf.
cluster_ports() { echo "$(port_of redis-cluster) $(port_of redis-cluster-2) $(port_of redis-cluster-3)"; }

cluster_urls() {
    local p out=""
    for p in $(cluster_ports); do out="$out${out:+,}redis://127.0.0.1:$p/0"; done
    echo "$out"
}

ready_redis-cluster() {
    local p
    for p in $(cluster_ports); do
        redis-cli -p "$p" cluster info 2>/dev/null | grep -q '^cluster_state:ok' || return 1
    done
}

start_redis-cluster() {
    local p n=0 nodes=() ports
    ports=$(cluster_ports)
    # The nodes know each other by port (nodes.conf): on other ports, the
    # cluster is made afresh.
    if [ "$(cat "$DIR/redis-cluster/ports" 2>/dev/null)" != "$ports" ]; then
        rm -rf "$DIR/redis-cluster"
        mkdir -p "$DIR/redis-cluster"
        echo "$ports" >"$DIR/redis-cluster/ports"
    fi
    for p in $ports; do
        n=$((n + 1))
        mkdir -p "$DIR/redis-cluster/$n"
        spawn redis-cluster "$DIR/redis-cluster/$n.log" "$DIR/redis-cluster/$n" redis-server --port "$p" \
            --bind 127.0.0.1 --cluster-enabled yes --cluster-config-file nodes.conf \
            --cluster-node-timeout 2000 --save '' --appendonly no
        nodes+=("127.0.0.1:$p")
    done
    local deadline=$(( $(date +%s) + START_TIMEOUT ))
    for p in $(cluster_ports); do
        until [ "$(redis-cli -p "$p" ping 2>/dev/null)" = "PONG" ]; do
            [ "$(date +%s)" -lt "$deadline" ] && alive redis-cluster || fail_start redis-cluster "$DIR/redis-cluster/1.log"
            sleep 0.1
        done
    done
    # A cluster made before keeps its slots (nodes.conf); a new one is made here.
    if ! redis-cli -p "$(port_of redis-cluster)" cluster info 2>/dev/null | grep -q '^cluster_slots_assigned:16384'; then
        redis-cli --cluster create "${nodes[@]}" --cluster-replicas 0 --cluster-yes \
            >"$DIR/redis-cluster/create.log" 2>&1 || fail_start redis-cluster "$DIR/redis-cluster/create.log"
    fi
    wait_ready redis-cluster "$DIR/redis-cluster/1.log"
}

# --- MariaDB --------------------------------------------------------------

ready_mysql() { mariadb-admin --no-defaults --socket="$DIR/mysql.sock" -uroot status >/dev/null 2>&1; }

start_mysql() {
    local port; port=$(port_of mysql)
    if [ ! -d "$DIR/mysql/data/mysql" ]; then
        mkdir -p "$DIR/mysql"
        mariadb-install-db --no-defaults --user=root --datadir="$DIR/mysql/data" \
            --auth-root-authentication-method=normal --skip-test-db >"$DIR/mysql-install.log" 2>&1 ||
            fail_start mysql "$DIR/mysql-install.log"
    fi
    spawn mysql "$DIR/mysql.out" "$DIR" mariadbd --no-defaults --user=root --datadir="$DIR/mysql/data" \
        --socket="$DIR/mysql.sock" --port="$port" --bind-address=127.0.0.1 --skip-name-resolve \
        --pid-file="$DIR/mysql.server.pid" --log-error="$DIR/mysql.log" --max-connections=500 \
        --ssl-ca="$TLS_DIR/ca.pem" --ssl-cert="$TLS_DIR/server.pem" --ssl-key="$TLS_DIR/server.key"
    wait_ready mysql "$DIR/mysql.log"
    mariadb --no-defaults --socket="$DIR/mysql.sock" -uroot -e "
        CREATE DATABASE IF NOT EXISTS \`$MYSQL_DB\`;
        CREATE USER IF NOT EXISTS '$MYSQL_USER'@'%' IDENTIFIED BY '$MYSQL_PASSWORD';
        GRANT ALL PRIVILEGES ON \`$MYSQL_DB\`.* TO '$MYSQL_USER'@'%';
        FLUSH PRIVILEGES;" >>"$DIR/mysql.log" 2>&1 || fail_start mysql "$DIR/mysql.log"
}

# --- tansu (Kafka protocol) -----------------------------------------------

# An ApiVersions request answered with our correlation id: the broker speaks Kafka.
ready_kafka() {
    python3 - "$(cat "$DIR/kafka.port")" <<'PY' 2>/dev/null
import socket, struct, sys
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=1)
cid = b"im-infra-services"
body = struct.pack(">hhih", 18, 0, 7, len(cid)) + cid
s.sendall(struct.pack(">i", len(body)) + body)
size = struct.unpack(">i", s.recv(4))[0]
data = b""
while len(data) < size:
    chunk = s.recv(size - len(data))
    if not chunk:
        break
    data += chunk
sys.exit(0 if struct.unpack(">i", data[:4])[0] == 7 else 1)
PY
}

start_kafka() {
    local port bin; port=$(port_of kafka); bin=$(tansu_bin)
    [ -n "$bin" ] || die "tansu is not installed"
    mkdir -p "$DIR/kafka"
    spawn kafka "$DIR/kafka.log" "$DIR/kafka" "$bin" broker --listener-url "tcp://127.0.0.1:$port" \
        --advertised-listener-url "tcp://127.0.0.1:$port" --storage-engine "sqlite://tansu.db"
    wait_ready kafka "$DIR/kafka.log"
}

# --- commands -------------------------------------------------------------

write_env() {
    {
        [ -s "$DIR/etcd.port" ] && echo "export IMINFRA_ETCD_ENDPOINTS=http://127.0.0.1:$(cat "$DIR/etcd.port")"
        [ -s "$DIR/redis.port" ] && echo "export IMINFRA_REDIS_URL=redis://127.0.0.1:$(cat "$DIR/redis.port")/0"
        [ -s "$DIR/mysql.port" ] && echo "export IMINFRA_MYSQL_URL=mysql://$MYSQL_USER:$MYSQL_PASSWORD@127.0.0.1:$(cat "$DIR/mysql.port")/$MYSQL_DB"
        [ -s "$DIR/kafka.port" ] && echo "export IMINFRA_KAFKA_BROKERS=127.0.0.1:$(cat "$DIR/kafka.port")"
        [ -s "$DIR/etcd-tls.port" ] && echo "export IMINFRA_ETCD_TLS_ENDPOINTS=https://127.0.0.1:$(cat "$DIR/etcd-tls.port")"
        [ -s "$DIR/redis-tls.port" ] && echo "export IMINFRA_REDIS_TLS_URL=rediss://127.0.0.1:$(cat "$DIR/redis-tls.port")/0"
        [ -s "$DIR/redis-cluster-3.port" ] && echo "export IMINFRA_REDIS_CLUSTER_URLS=$(cluster_urls)"
        [ -s "$TLS_DIR/ca.pem" ] && echo "export IMINFRA_TLS_CA_FILE=$TLS_DIR/ca.pem"
        # The server certificate is also good for client authentication.
        [ -s "$TLS_DIR/server.pem" ] && echo "export IMINFRA_TLS_CERT_FILE=$TLS_DIR/server.pem"
        [ -s "$TLS_DIR/server.key" ] && echo "export IMINFRA_TLS_KEY_FILE=$TLS_DIR/server.key"
    } >"$ENV_FILE"
}

stop_one() {
    local svc=$1 quiet=${2:-}
    local pids pid; pids=$(pid_of "$svc")
    if [ -z "$pids" ]; then [ -n "$quiet" ] || log "$svc: not started by this script"; return 0; fi
    for pid in $pids; do
        if kill -0 "$pid" 2>/dev/null; then
            kill "$pid" 2>/dev/null || true
            for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
            if kill -0 "$pid" 2>/dev/null; then kill -9 "$pid" 2>/dev/null || true; fi
            [ -n "$quiet" ] || log "$svc stopped (pid $pid)"
        fi
    done
    rm -f "$DIR/$svc.pid"
}

up_one() {
    local svc=$1
    if alive "$svc" && ready_"$svc"; then
        log "$svc already running (pid $(pid_of "$svc"), port $(cat "$DIR/$svc.port"))"
        return 0
    fi
    stop_one "$svc" quiet
    # A saved port taken by someone else: pick another one.
    # The service's own port files: svc.port, svc-tls.port, svc-N.port
    # (not another service's whose name starts the same).
    local f
    for f in "$DIR/$svc.port" "$DIR/$svc-tls.port" "$DIR/$svc"-[0-9].port; do
        if [ -s "$f" ] && port_in_use "$(cat "$f")"; then rm -f "$f"; fi
    done
    make_tls
    start_"$svc"
}

services_of() {
    if [ $# -eq 0 ]; then echo "${ALL[@]}"; return; fi
    for s in "$@"; do
        case " ${ALL[*]} " in *" $s "*) ;; *) die "unknown service '$s' (one of: ${ALL[*]})";; esac
    done
    echo "$@"
}

cmd=${1:-}
shift || true
case "$cmd" in
    up)
        svcs=$(services_of "$@")
        install_debian_packages
        case " $svcs " in *" kafka "*) install_tansu;; esac
        for s in $svcs; do up_one "$s"; done
        write_env
        log "environment written to $ENV_FILE:"
        cat "$ENV_FILE"
        ;;
    install)
        install_debian_packages
        install_tansu
        ;;
    down)
        for s in $(services_of "$@"); do stop_one "$s"; done
        ;;
    kill)
        [ $# -gt 0 ] || die "kill needs a service name"
        for s in $(services_of "$@"); do
            for pid in $(pid_of "$s"); do
                kill -9 "$pid" 2>/dev/null && log "$s killed (pid $pid)"
                for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
            done
            rm -f "$DIR/$s.pid"
        done
        ;;
    restart)
        [ $# -gt 0 ] || die "restart needs a service name"
        for s in $(services_of "$@"); do stop_one "$s"; up_one "$s"; done
        write_env
        ;;
    status)
        for s in "${ALL[@]}"; do
            if alive "$s"; then echo "$s: running (pid $(pid_of "$s"), port $(cat "$DIR/$s.port"))"; else echo "$s: stopped"; fi
        done
        ;;
    env)
        [ -s "$ENV_FILE" ] || die "no environment yet: run scripts/services.sh up"
        cat "$ENV_FILE"
        ;;
    *)
        sed -n '2,/^set -euo/{/^#/p}' "$0" | sed 's/^# \{0,1\}//'
        exit 2
        ;;
esac
