#!/usr/bin/env bash
# Builds local Docker images of the test servers without any image registry
# (none can be pulled on these machines): one Debian bookworm root file
# system made once with debootstrap (cached under .services/images/), the
# server's Debian packages installed into a copy of it, and the result
# imported with 'docker import'.
#
#   scripts/images.sh build [svc...]   build what is missing or out of date (default: all)
#   scripts/images.sh list             which images exist, their size, up to date or not
#   scripts/images.sh rm [svc...]      remove the images (default: all)
#   scripts/images.sh purge            remove the images and the cached root file system
#
# svc is one of: etcd redis mysql kafka. The images:
#
#   im-infra/etcd:local     etcd 3.4 + etcdctl, client port 2379, peer 2380
#   im-infra/redis:local    redis-server 7.0 + redis-sentinel, port 6379
#   im-infra/mariadb:local  MariaDB 10.11, port 3306, database iminfra,
#                           user iminfra / iminfra-test-password
#   im-infra/tansu:local    tansu (Kafka protocol, memory storage), port 9092
#
# Each starts by default with /usr/local/bin/im-infra-start, which runs the
# server in the foreground (extra arguments go to the server), listening on
# 0.0.0.0, and prints one line to stdout once the server answers:
#
#   im-infra: etcd ready | im-infra: redis ready | im-infra: mariadb ready | im-infra: tansu ready
#
# (the image's label im-infra.ready holds the line). Environment of the
# start scripts: etcd reads its own ETCD_* variables (defaults: name
# 'default', client URLs http://0.0.0.0:2379); MariaDB MARIADB_DATABASE,
# MARIADB_USER, MARIADB_PASSWORD; tansu KAFKA_ADVERTISED_URL (default
# tcp://127.0.0.1:9092: set it to the host-mapped address), KAFKA_LISTENER_URL,
# KAFKA_STORAGE_ENGINE (default memory://tansu/).
#
# 'build' is idempotent: each image carries a hash of its recipe (packages,
# start script, settings, and for tansu the binary) as the label
# im-infra.recipe, and an image whose hash matches is left alone. The tansu
# image copies the binary 'scripts/services.sh install' builds (PATH or
# ~/.cargo/bin); it is built last, after waiting for a 'cargo install tansu'
# still running (up to IMINFRA_TANSU_WAIT seconds, default 1800). The Debian
# mirror is the one the machine's apt sources name (IMINFRA_DEBIAN_MIRROR
# overrides it). Run as root.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DIR="${IMINFRA_SERVICES_DIR:-$ROOT/.services}"
IMG_DIR="$DIR/images"
BASE="$IMG_DIR/base"
WORK="$IMG_DIR/work"
SUITE="bookworm"
ALL=(etcd redis mysql kafka)
# Bump when the way images are made changes in a way the recipe text does not show.
RECIPE_VERSION=1
# Same values as scripts/services.sh.
MYSQL_DB="iminfra"
MYSQL_USER="iminfra"
MYSQL_PASSWORD="iminfra-test-password"
# How long 'build kafka' waits for a 'cargo install tansu' that is running.
TANSU_WAIT="${IMINFRA_TANSU_WAIT:-1800}"
CHROOT_PATH="/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

log() { printf '[images] %s\n' "$*" >&2; }
die() { printf '[images] ERROR: %s\n' "$*" >&2; exit 1; }
now_ms() { date +%s%3N; }
# Seconds since a now_ms value, one decimal.
since() { local d=$(( $(now_ms) - $1 )); printf '%d.%ds' $(( d / 1000 )) $(( d % 1000 / 100 )); }

# --- recipes --------------------------------------------------------------

tag_of() {
    case "$1" in
        etcd) echo "im-infra/etcd:local" ;;
        redis) echo "im-infra/redis:local" ;;
        mysql) echo "im-infra/mariadb:local" ;;
        kafka) echo "im-infra/tansu:local" ;;
    esac
}

ready_line_of() {
    case "$1" in
        etcd) echo "im-infra: etcd ready" ;;
        redis) echo "im-infra: redis ready" ;;
        mysql) echo "im-infra: mariadb ready" ;;
        kafka) echo "im-infra: tansu ready" ;;
    esac
}

packages_of() {
    case "$1" in
        etcd) echo "etcd-server etcd-client" ;;
        redis) echo "redis-server redis-sentinel redis-tools" ;;
        mysql) echo "mariadb-server mariadb-client" ;;
        kafka) echo "" ;;
    esac
}

# Dockerfile instructions given to 'docker import --change' (one a line).
changes_of() {
    echo 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin'
    echo 'CMD ["/usr/local/bin/im-infra-start"]'
    echo "LABEL im-infra.ready=\"$(ready_line_of "$1")\""
    case "$1" in
        etcd) echo 'EXPOSE 2379 2380' ;;
        redis) echo 'EXPOSE 6379' ;;
        mysql) echo 'EXPOSE 3306' ;;
        kafka) echo 'EXPOSE 9092'; echo 'WORKDIR /var/lib/tansu' ;;
    esac
}

# The start script of each image: the server runs in the foreground as the
# container's main process (it gets docker stop's SIGTERM); a background
# watcher prints the ready line once the server answers.
start_script_of() {
    case "$1" in
        etcd) cat <<'EOF'
#!/bin/bash
# im-infra etcd. etcd reads ETCD_* variables; these are the defaults, any
# of them (and any ETCD_* etcd knows) can be set with 'docker run -e'.
set -u
export ETCD_NAME="${ETCD_NAME:-default}"
export ETCD_DATA_DIR="${ETCD_DATA_DIR:-/var/lib/etcd/$ETCD_NAME}"
export ETCD_LISTEN_CLIENT_URLS="${ETCD_LISTEN_CLIENT_URLS:-http://0.0.0.0:2379}"
export ETCD_ADVERTISE_CLIENT_URLS="${ETCD_ADVERTISE_CLIENT_URLS:-http://0.0.0.0:2379}"
export ETCD_LISTEN_PEER_URLS="${ETCD_LISTEN_PEER_URLS:-http://0.0.0.0:2380}"
export ETCD_INITIAL_ADVERTISE_PEER_URLS="${ETCD_INITIAL_ADVERTISE_PEER_URLS:-http://127.0.0.1:2380}"
export ETCD_INITIAL_CLUSTER="${ETCD_INITIAL_CLUSTER:-$ETCD_NAME=$ETCD_INITIAL_ADVERTISE_PEER_URLS}"
ep="${ETCD_LISTEN_CLIENT_URLS%%,*}"
ep="${ep/0.0.0.0/127.0.0.1}"
(
    for _ in $(seq 1 600); do
        if etcdctl --endpoints="$ep" --dial-timeout=1s endpoint health >/dev/null 2>&1; then
            echo "im-infra: etcd ready"; exit 0
        fi
        sleep 0.1
    done
    echo "im-infra: etcd not ready after 60 s" >&2
) &
exec etcd "$@"
EOF
        ;;
        redis) cat <<'EOF'
#!/bin/bash
# im-infra redis. Extra arguments go to redis-server (a later --port wins).
set -u
port=6379 prev=""
for a in "$@"; do [ "$prev" = "--port" ] && port=$a; prev=$a; done
(
    for _ in $(seq 1 600); do
        case "$(redis-cli -p "$port" ping 2>/dev/null)" in
            PONG|NOAUTH*) echo "im-infra: redis ready"; exit 0 ;;
        esac
        sleep 0.1
    done
    echo "im-infra: redis not ready after 60 s" >&2
) &
exec redis-server --bind 0.0.0.0 --port 6379 --protected-mode no --save '' --appendonly no "$@"
EOF
        ;;
        mysql) cat <<EOF
#!/bin/bash
# im-infra mariadb. The data directory is made when the image is built; the
# database and the user are made (if missing) each time the server starts,
# and only then is the ready line printed. Extra arguments go to mariadbd.
set -u
db="\${MARIADB_DATABASE:-$MYSQL_DB}"
user="\${MARIADB_USER:-$MYSQL_USER}"
password="\${MARIADB_PASSWORD:-$MYSQL_PASSWORD}"
datadir=/var/lib/mysql
sock=/run/mysqld/mysqld.sock
opts=(--no-defaults --user=root --datadir="\$datadir" --innodb-log-file-size=16M)
mkdir -p /run/mysqld
if [ ! -d "\$datadir/mysql" ]; then
    mariadb-install-db "\${opts[@]}" --auth-root-authentication-method=normal --skip-test-db --force \\
        >/tmp/mariadb-install-db.log 2>&1 || { cat /tmp/mariadb-install-db.log >&2; exit 1; }
fi
(
    for _ in \$(seq 1 1200); do
        if mariadb-admin --no-defaults --socket="\$sock" -uroot ping >/dev/null 2>&1; then
            if mariadb --no-defaults --socket="\$sock" -uroot -e "
                CREATE DATABASE IF NOT EXISTS \\\`\$db\\\`;
                CREATE USER IF NOT EXISTS '\$user'@'%' IDENTIFIED BY '\$password';
                GRANT ALL PRIVILEGES ON \\\`\$db\\\`.* TO '\$user'@'%';
                FLUSH PRIVILEGES;"; then
                echo "im-infra: mariadb ready"
            else
                echo "im-infra: creating the database and user failed" >&2
            fi
            exit 0
        fi
        sleep 0.1
    done
    echo "im-infra: mariadb not ready after 120 s" >&2
) &
exec mariadbd "\${opts[@]}" --socket="\$sock" --port=3306 --bind-address=0.0.0.0 \\
    --skip-name-resolve --max-connections=500 "\$@"
EOF
        ;;
        kafka) cat <<'EOF'
#!/bin/bash
# im-infra tansu (Kafka protocol). Clients are sent the advertised URL, so
# set KAFKA_ADVERTISED_URL to the address the host reaches the broker on
# (the host-mapped port). Extra arguments go to 'tansu broker'.
set -u
listen="${KAFKA_LISTENER_URL:-tcp://0.0.0.0:9092}"
advertised="${KAFKA_ADVERTISED_URL:-tcp://127.0.0.1:9092}"
storage="${KAFKA_STORAGE_ENGINE:-memory://tansu/}"
port="${listen##*:}"
port="${port%%/*}"
mkdir -p /var/lib/tansu
cd /var/lib/tansu || exit 1
# An ApiVersions request (correlation id 7): ready once the answer carries it.
kafka_answers() {
    (
        exec 3<>"/dev/tcp/127.0.0.1/$port" || exit 1
        printf '\x00\x00\x00\x0b\x00\x12\x00\x00\x00\x00\x00\x07\x00\x01x' >&3
        r=$(timeout 2 head -c 8 <&3 | od -An -tx1 | tr -d ' \n')
        [ "${r:8:8}" = "00000007" ]
    ) 2>/dev/null
}
(
    for _ in $(seq 1 600); do
        if kafka_answers; then echo "im-infra: tansu ready"; exit 0; fi
        sleep 0.1
    done
    echo "im-infra: tansu not ready after 60 s" >&2
) &
exec /usr/local/bin/tansu broker --listener-url "$listen" --advertised-listener-url "$advertised" \
    --storage-engine "$storage" "$@"
EOF
        ;;
    esac
}

tansu_bin() {
    if command -v tansu >/dev/null 2>&1; then command -v tansu; return; fi
    local b="${CARGO_HOME:-$HOME/.cargo}/bin/tansu"
    [ -x "$b" ] && { echo "$b"; return; }
    echo ""
}

# A 'cargo install tansu' process (such as scripts/services.sh install starts).
tansu_installing() { pgrep -f '^[^ ]*cargo install tansu' >/dev/null 2>&1; }

# The tansu binary; waits for a 'cargo install tansu' that is running.
need_tansu() {
    local t0 deadline
    t0=$(now_ms)
    deadline=$(( $(date +%s) + TANSU_WAIT ))
    if tansu_installing; then
        log "a 'cargo install tansu' is running: waiting for it (up to ${TANSU_WAIT}s)"
        while tansu_installing; do
            [ "$(date +%s)" -lt "$deadline" ] || die "tansu is still being built after ${TANSU_WAIT}s"
            sleep 5
        done
        log "waited $(since "$t0") for tansu"
    fi
    [ -n "$(tansu_bin)" ] || die "tansu is not installed (looked in PATH and ${CARGO_HOME:-$HOME/.cargo}/bin): run scripts/services.sh install first"
}

recipe_hash() {
    local svc=$1
    {
        echo "recipe $RECIPE_VERSION suite $SUITE tag $(tag_of "$svc")"
        # The image's own setup step and the clean-up: a change to them makes the image again.
        declare -f "setup_$svc" clean_rootfs
        echo "packages $(packages_of "$svc")"
        changes_of "$svc"
        start_script_of "$svc"
        if [ "$svc" = kafka ]; then sha256sum <"$(tansu_bin)"; fi
    } | sha256sum | cut -c1-16
}

image_recipe() { docker image inspect -f '{{index .Config.Labels "im-infra.recipe"}}' "$1" 2>/dev/null || true; }

# --- the base root file system --------------------------------------------

# The Debian mirror the machine's own apt sources name (deb822 .sources
# files, then one-line .list files), for the suite $SUITE.
debian_mirror() {
    if [ -n "${IMINFRA_DEBIAN_MIRROR:-}" ]; then echo "$IMINFRA_DEBIAN_MIRROR"; return; fi
    local f m
    for f in /etc/apt/sources.list.d/*.sources; do
        [ -f "$f" ] || continue
        m=$(awk -v suite="$SUITE" '
            BEGIN { RS = ""; FS = "\n" }
            {
                uris = ""; suites = ""; types = ""; enabled = 1
                for (i = 1; i <= NF; i++) {
                    l = $i
                    if (l ~ /^[ \t]*#/) continue
                    if (match(l, /^URIs:[ \t]*/)) uris = substr(l, RLENGTH + 1)
                    else if (match(l, /^Suites:[ \t]*/)) suites = substr(l, RLENGTH + 1)
                    else if (match(l, /^Types:[ \t]*/)) types = substr(l, RLENGTH + 1)
                    else if (l ~ /^Enabled:[ \t]*[Nn]o/) enabled = 0
                }
                if (enabled && (" " types " ") ~ / deb / && (" " suites " ") ~ (" " suite " ")) {
                    split(uris, u, /[ \t]+/); print u[1]; exit
                }
            }' "$f")
        if [ -n "$m" ]; then echo "$m"; return; fi
    done
    for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
        [ -f "$f" ] || continue
        m=$(awk -v suite="$SUITE" '
            $1 == "deb" {
                i = 2
                if ($2 ~ /^\[/) { while (i <= NF && $i !~ /\]$/) i++; i++ }
                if ($(i + 1) == suite) { print $i; exit }
            }' "$f")
        if [ -n "$m" ]; then echo "$m"; return; fi
    done
    echo "http://deb.debian.org/debian"
}

in_chroot() { LC_ALL=C DEBIAN_FRONTEND=noninteractive PATH="$CHROOT_PATH" chroot "$@"; }

ensure_base() {
    [ -f "$BASE/.im-infra-base" ] && return 0
    local t0 mirror l="$IMG_DIR/debootstrap.log"
    mkdir -p "$IMG_DIR"
    if ! command -v debootstrap >/dev/null 2>&1; then
        t0=$(now_ms)
        log "installing debootstrap (apt-get)"
        { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap; } \
            >"$IMG_DIR/apt.log" 2>&1 || { tail -20 "$IMG_DIR/apt.log" >&2; die "installing debootstrap failed"; }
        log "installed debootstrap in $(since "$t0")"
    fi
    mirror=$(debian_mirror)
    t0=$(now_ms)
    log "debootstrap --variant=minbase $SUITE from $mirror (once, about 1-2 min; log: $l)"
    rm -rf "$BASE.tmp"
    debootstrap --variant=minbase "$SUITE" "$BASE.tmp" "$mirror" >"$l" 2>&1 ||
        { tail -20 "$l" >&2; rm -rf "$BASE.tmp"; die "debootstrap failed"; }
    log "debootstrap took $(since "$t0")"
    t0=$(now_ms)
    # No service starts inside the chroot; no documentation is installed.
    printf '#!/bin/sh\nexit 101\n' >"$BASE.tmp/usr/sbin/policy-rc.d"
    chmod 755 "$BASE.tmp/usr/sbin/policy-rc.d"
    printf '%s\n' 'path-exclude=/usr/share/doc/*' 'path-exclude=/usr/share/man/*' \
        'path-exclude=/usr/share/info/*' 'path-exclude=/usr/share/lintian/*' \
        'path-exclude=/usr/share/locale/*/LC_MESSAGES/*.mo' \
        >"$BASE.tmp/etc/dpkg/dpkg.cfg.d/01-im-infra-nodoc"
    printf '%s\n' 'APT::Install-Recommends "false";' 'APT::Install-Suggests "false";' \
        >"$BASE.tmp/etc/apt/apt.conf.d/01-im-infra"
    rm -rf "$BASE.tmp"/usr/share/doc/* "$BASE.tmp"/usr/share/man/* "$BASE.tmp"/usr/share/info/*
    cp /etc/resolv.conf "$BASE.tmp/etc/resolv.conf"
    in_chroot "$BASE.tmp" apt-get update -q >>"$l" 2>&1 ||
        { tail -20 "$l" >&2; rm -rf "$BASE.tmp"; die "apt-get update in the base root file system failed"; }
    echo "$SUITE $mirror $(date -u +%FT%TZ)" >"$BASE.tmp/.im-infra-base"
    rm -rf "$BASE"
    mv "$BASE.tmp" "$BASE"
    log "base root file system ready in $BASE ($(du -sh "$BASE" | cut -f1), apt-get update $(since "$t0"))"
}

# --- building one image ---------------------------------------------------

# Removes a work directory left by an interrupted build.
cleanup_work() { [ -n "${CUR_WORK:-}" ] && rm -rf "$CUR_WORK"; true; }
trap cleanup_work EXIT

clean_rootfs() {
    local r=$1
    in_chroot "$r" apt-get clean >/dev/null 2>&1 || true
    rm -rf "$r"/var/lib/apt/lists/* "$r"/var/cache/apt/*.bin "$r"/var/cache/apt/archives/*.deb \
        "$r"/var/cache/debconf/*-old "$r"/var/lib/dpkg/*-old "$r"/var/log/apt/* "$r"/var/log/*.log \
        "$r"/usr/share/doc/* "$r"/usr/share/man/* "$r"/usr/share/info/* "$r"/tmp/* "$r"/var/tmp/* \
        "$r"/root/.bash_history "$r"/.im-infra-base
    # Translations: the servers run in the C locale.
    find "$r/usr/share/locale" -mindepth 1 -maxdepth 1 -type d -exec rm -rf {} + 2>/dev/null || true
    # Docker mounts its own resolv.conf over this one.
    : >"$r/etc/resolv.conf"
}

# What each image needs beyond its packages and start script, done in its
# root file system $1 (log file $2).
setup_etcd() { mkdir -p "$1/var/lib/etcd"; }

setup_redis() { :; }

setup_mysql() {
    local r=$1 l=$2 uts=()
    # A fresh data directory owned by root (the server runs as root),
    # root@localhost without password (normal authentication), no test
    # database; made with the host name 'localhost' (own UTS namespace) so
    # that no root@<build machine> account is made.
    rm -rf "$r"/var/lib/mysql/*
    mkdir -p "$r/run/mysqld"
    if unshare --uts true 2>/dev/null; then uts=(unshare --uts sh -c 'hostname localhost && exec "$@"' sh); fi
    LC_ALL=C PATH="$CHROOT_PATH" "${uts[@]}" chroot "$r" mariadb-install-db --no-defaults --user=root \
        --datadir=/var/lib/mysql --innodb-log-file-size=16M --auth-root-authentication-method=normal \
        --skip-test-db --force >>"$l" 2>&1 || { tail -20 "$l" >&2; die "mariadb-install-db failed (log: $l)"; }
}

setup_kafka() {
    local r=$1 l=$2
    install -m 755 "$(tansu_bin)" "$r/usr/local/bin/tansu"
    mkdir -p "$r/var/lib/tansu"
    in_chroot "$r" /usr/local/bin/tansu --version >>"$l" 2>&1 ||
        { tail -20 "$l" >&2; die "the tansu binary does not run in the Debian root file system (log: $l)"; }
}

build_one() {
    local svc=$1 tag hash cur t0 t1 r l pkgs old
    t0=$(now_ms)
    tag=$(tag_of "$svc")
    hash=$(recipe_hash "$svc")
    cur=$(image_recipe "$tag")
    if [ "$cur" = "$hash" ]; then
        log "$tag is up to date (recipe $hash): nothing to do"
        return 0
    fi
    ensure_base
    log "building $tag (recipe $hash${cur:+, was $cur})"
    r="$WORK/$svc"
    l="$IMG_DIR/$svc.log"
    CUR_WORK=$r
    rm -rf "$r" "$r.del"
    mkdir -p "$WORK"
    t1=$(now_ms)
    cp -a "$BASE" "$r"
    log "  copied the base root file system in $(since "$t1")"
    : >"$l"
    pkgs=$(packages_of "$svc")
    if [ -n "$pkgs" ]; then
        t1=$(now_ms)
        cp /etc/resolv.conf "$r/etc/resolv.conf"
        # shellcheck disable=SC2086
        if ! in_chroot "$r" apt-get install -y -q --no-install-recommends $pkgs >>"$l" 2>&1; then
            log "  apt-get install failed, updating the package lists and trying again"
            # shellcheck disable=SC2086
            { in_chroot "$r" apt-get update -q && in_chroot "$r" apt-get install -y -q --no-install-recommends $pkgs; } \
                >>"$l" 2>&1 || { tail -20 "$l" >&2; die "apt-get install $pkgs failed (log: $l)"; }
        fi
        log "  installed $pkgs in $(since "$t1")"
    fi
    t1=$(now_ms)
    start_script_of "$svc" >"$r/usr/local/bin/im-infra-start"
    chmod 755 "$r/usr/local/bin/im-infra-start"
    setup_"$svc" "$r" "$l"
    clean_rootfs "$r"
    log "  set up and cleaned the root file system in $(since "$t1") ($(du -sh "$r" | cut -f1))"
    t1=$(now_ms)
    local args=() c
    while IFS= read -r c; do args+=(--change "$c"); done < <(changes_of "$svc")
    args+=(--change "LABEL im-infra.recipe=$hash")
    old=$(docker image inspect -f '{{.Id}}' "$tag" 2>/dev/null || true)
    tar --numeric-owner -C "$r" -c . | docker import "${args[@]}" - "$tag" >/dev/null ||
        die "docker import of $tag failed"
    log "  imported $tag in $(since "$t1") ($(image_size "$tag"))"
    # The image this one replaces, if nothing else uses it.
    if [ -n "$old" ] && [ "$old" != "$(docker image inspect -f '{{.Id}}' "$tag")" ]; then
        docker image rm "$old" >/dev/null 2>&1 || true
    fi
    # Deleting a root file system takes a while (about 15 s for MariaDB's):
    # in the background, while the next image is made.
    mv "$r" "$r.del"
    CUR_WORK=""
    rm -rf "$r.del" &
    log "built $tag in $(since "$t0")"
}

image_size() { docker image inspect -f '{{.Size}}' "$1" 2>/dev/null | awk '{ printf "%.0f MB", $1 / 1000000 }'; }

services_of() {
    if [ $# -eq 0 ]; then echo "${ALL[@]}"; return; fi
    local s
    for s in "$@"; do
        case " ${ALL[*]} " in *" $s "*) ;; *) die "unknown service '$s' (one of: ${ALL[*]})";; esac
    done
    echo "$@"
}

# --- commands -------------------------------------------------------------

cmd=${1:-}
shift || true
case "$cmd" in
    build)
        [ "$(id -u)" -eq 0 ] || die "run as root (debootstrap and chroot need it)"
        command -v docker >/dev/null 2>&1 || die "docker is not installed"
        docker info >/dev/null 2>&1 || die "the Docker engine does not answer"
        T0=$(now_ms)
        svcs=$(services_of "$@")
        # tansu last: it may still be being built by scripts/services.sh install.
        ordered=""
        for s in $svcs; do [ "$s" = kafka ] || ordered="$ordered $s"; done
        case " $svcs " in *" kafka "*) ordered="$ordered kafka";; esac
        for s in $ordered; do
            [ "$s" = kafka ] && need_tansu
            build_one "$s"
        done
        t=$(now_ms)
        wait
        [ $(( $(now_ms) - t )) -lt 500 ] || log "removed the work directories in $(since "$t")"
        log "done in $(since "$T0")"
        ;;
    list)
        for s in "${ALL[@]}"; do
            tag=$(tag_of "$s")
            cur=$(image_recipe "$tag")
            if [ -z "$(docker image inspect -f '{{.Id}}' "$tag" 2>/dev/null)" ]; then
                printf '%-24s missing\n' "$tag"
                continue
            fi
            if [ "$s" = kafka ] && [ -z "$(tansu_bin)" ]; then
                state="recipe $cur (no tansu binary to compare)"
            elif [ "$cur" = "$(recipe_hash "$s")" ]; then
                state="up to date"
            else
                state="out of date"
            fi
            printf '%-24s %8s  created %s  %s\n' "$tag" "$(image_size "$tag")" \
                "$(docker image inspect -f '{{.Created}}' "$tag" | cut -c1-19)" "$state"
        done
        if [ -f "$BASE/.im-infra-base" ]; then
            echo "base root file system: $BASE ($(du -sh "$BASE" | cut -f1), $(cut -d' ' -f1,3 "$BASE/.im-infra-base"))"
        else
            echo "base root file system: not made yet"
        fi
        ;;
    rm)
        for s in $(services_of "$@"); do
            tag=$(tag_of "$s")
            if docker image inspect "$tag" >/dev/null 2>&1; then
                docker image rm "$tag" >/dev/null && log "removed $tag"
            else
                log "$tag: no such image"
            fi
        done
        ;;
    purge)
        "$0" rm
        rm -rf "$IMG_DIR"
        log "removed $IMG_DIR"
        ;;
    *)
        sed -n '2,/^set -euo/{/^#/p}' "$0" | sed 's/^# \{0,1\}//'
        exit 2
        ;;
esac
