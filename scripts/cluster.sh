#!/usr/bin/env bash
# Private RabbitMQ nodes for the restart, cluster and RabbitMQ 4 tests, beside
# the machine's default node (which this script never touches).
#
#   scripts/cluster.sh up   VERSION   three clustered nodes
#   scripts/cluster.sh down VERSION   stop them and delete their data
#   scripts/cluster.sh single-up VERSION [NODE] / single-down VERSION [NODE]
#                      one node: "single", or pPORT for a private node on PORT
#   scripts/cluster.sh ctl VERSION NODE ARGS...   rabbitmqctl for one node
#   scripts/cluster.sh start-node|stop-node|kill-node VERSION NODE
#   scripts/cluster.sh chroot [VERSION]   build a version's chroot if missing (default 4.0)
#   scripts/cluster.sh env VERSION [single|pPORT]   shell variables for the tests
#   scripts/cluster.sh nodes VERSION   one line per node: KEY NAME AMQP_PORT DIST_PORT
#   scripts/cluster.sh root VERSION   the version's chroot ("" for the machine's broker)
#
# VERSION is one of
#   3.10  the machine's rabbitmq-server
#   4.0   Debian 13 (trixie)'s rabbitmq-server 4.0.5, in a chroot cached in
#         $DEB_RABBITMQ4_CHROOT (default /var/cache/domain-event-broker/rabbitmq-4.0)
#   4.3   Debian forky's rabbitmq-server 4.3.x, in a chroot cached in
#         $DEB_RABBITMQ43_CHROOT (default /var/cache/domain-event-broker/rabbitmq-4.3)
# A chroot is built once with debootstrap (root needed); a debootstrap that has
# no script for the suite yet (forky) is given its sid script.
#
# Nodes, AMQP ports and Erlang distribution ports:
#   3.10 cluster  deb-c1..3@HOST    5681-5683  25681-25683
#   3.10 single   deb-restart@HOST  5684       25684
#   4.0 cluster   deb-r4a..c@HOST   5691-5693  25691-25693
#   4.0 single    deb-r4@HOST       5690       25690
#   4.3 cluster   deb-r43a..c@HOST  5701-5703  25701-25703
#   4.3 single    deb-r43@HOST      5700       25700
# Data and logs live under $DEB_CLUSTER_BASE (default /tmp/deb-cluster), with
# their own Erlang cookie; nothing of /etc/rabbitmq is read. Nodes get the
# broker's defaults, except that 4.3's nodes deny transient non-exclusive
# queues as upstream 4.3 does (Debian's build permits them; see node_config).
set -euo pipefail

HOST="$(hostname -s)"
BASE="${DEB_CLUSTER_BASE:-/tmp/deb-cluster}"
CACHE=/var/cache/domain-event-broker
MIRROR="${DEB_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
COOKIE="domain-event-broker-test-cookie"

die() { echo "cluster.sh: $*" >&2; exit 1; }

# node_spec VERSION NODE -> "name amqp_port dist_port"
node_spec() {
    case "$1:$2" in
        3.10:c1) echo "deb-c1 5681 25681" ;;
        3.10:c2) echo "deb-c2 5682 25682" ;;
        3.10:c3) echo "deb-c3 5683 25683" ;;
        3.10:single) echo "deb-restart 5684 25684" ;;
        4.0:c1) echo "deb-r4a 5691 25691" ;;
        4.0:c2) echo "deb-r4b 5692 25692" ;;
        4.0:c3) echo "deb-r4c 5693 25693" ;;
        4.0:single) echo "deb-r4 5690 25690" ;;
        4.3:c1) echo "deb-r43a 5701 25701" ;;
        4.3:c2) echo "deb-r43b 5702 25702" ;;
        4.3:c3) echo "deb-r43c 5703 25703" ;;
        4.3:single) echo "deb-r43 5700 25700" ;;
        # pPORT: a private node on any free port, for one experiment
        # (e.g. "single-up 4.0 p5810"); its distribution port is PORT + 20000.
        *:p[0-9][0-9][0-9][0-9]) echo "deb-${2} ${2#p} $((${2#p} + 20000))" ;;
        *) die "unknown node $2 of version $1 (nodes: c1 c2 c3 single; versions: 3.10 4.0 4.3)" ;;
    esac
}

# version_spec VERSION -> "debian_suite chroot_dir", or "" for the machine's broker.
version_spec() {
    case "$1" in
        3.10) echo "" ;;
        4.0) echo "trixie ${DEB_RABBITMQ4_CHROOT:-$CACHE/rabbitmq-4.0}" ;;
        4.3) echo "forky ${DEB_RABBITMQ43_CHROOT:-$CACHE/rabbitmq-4.3}" ;;
        *) die "unknown version $1 (versions: 3.10 4.0 4.3)" ;;
    esac
}

# The root a version's nodes run in ("" for the machine's own); the broker's
# own scripts are under it (not /usr/sbin's wrappers, which switch to the
# rabbitmq user and read /etc/rabbitmq).
root_of() { local suite root; read -r suite root <<<"$(version_spec "$1")"; echo "$root"; }

ensure_chroot() {
    local version="$1" suite dir script
    read -r suite dir <<<"$(version_spec "$version")"
    [ -n "$dir" ] || return 0
    [ -x "$dir/usr/lib/rabbitmq/bin/rabbitmq-server" ] && return 0
    [ "$(id -u)" = 0 ] || die "building $dir needs root (debootstrap, chroot)"
    if ! command -v debootstrap >/dev/null && command -v apt-get >/dev/null; then
        echo "cluster.sh: installing debootstrap with apt-get" >&2
        apt-get install -y -q debootstrap >&2 || { apt-get update -q >&2 && apt-get install -y -q debootstrap >&2; }
    fi
    command -v debootstrap >/dev/null || die "debootstrap is needed to build $dir (apt-get install debootstrap)"
    # Nothing under the cache may be a mount point (the host's /dev bound in
    # a chroot) before anything there is deleted.
    if grep -q " $dir[/. ]" /proc/mounts; then
        die "$dir is incomplete but something is mounted under it; unmount it first"
    fi
    if [ -e "$dir" ]; then   # a half-built chroot, or node folders made before it
        echo "cluster.sh: removing the incomplete $dir" >&2
        rm -rf "$dir"
    fi
    echo "cluster.sh: building the RabbitMQ $version chroot (Debian $suite) in $dir (a minute or two)" >&2
    mkdir -p "$(dirname "$dir")"
    rm -rf "$dir.tmp"
    # An older debootstrap has no script for a newer suite; sid's fits them all.
    script=/usr/share/debootstrap/scripts/sid
    [ ! -e "/usr/share/debootstrap/scripts/$suite" ] || script=""
    debootstrap --variant=minbase --include=rabbitmq-server "$suite" "$dir.tmp" "$MIRROR" ${script:+"$script"} \
        >"$dir.log" 2>&1 || die "debootstrap failed, see $dir.log"
    mv "$dir.tmp" "$dir"
}

# Unmount /proc, /dev and /sys from the chroot once none of its nodes runs
# (so that deleting the cached chroot can never reach the host's /dev).
release_mounts() {
    local version="$1" dir pidfile pid fs
    dir="$(root_of "$version")"
    [ -n "$dir" ] || return 0
    for pidfile in "$dir$BASE/$version"/*/pid; do   # every node of the version, private ones too
        pid="$(cat "$pidfile" 2>/dev/null || true)"
        if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then return 0; fi
    done
    for fs in sys dev proc; do
        for _ in 1 2 3 4 5 6 7 8 9 10; do   # the node's processes may still be exiting
            mountpoint -q "$dir/$fs" || break
            umount "$dir/$fs" 2>/dev/null || sleep 0.5
        done
    done
}

ensure_mounts() {
    local dir="$1" fs
    for fs in proc dev sys; do
        mountpoint -q "$dir/$fs" || mount --bind "/$fs" "$dir/$fs"
    done
}

# node_config VERSION PORT: a node's rabbitmq.conf. RabbitMQ 4.3 denies
# transient non-exclusive queues by default (4.3.0's release notes), but
# Debian's build still permits them: deny them here as upstream does (and
# global QoS, which 4.3 already denies), so that the suite meets 4.3's defaults.
node_config() {
    printf 'listeners.tcp.default = 127.0.0.1:%s\nloopback_users = none\n' "$2"
    if [ "$1" = 4.3 ]; then
        printf 'deprecated_features.permit.transient_nonexcl_queues = false\n'
        printf 'deprecated_features.permit.global_qos = false\n'
    fi
}

# run VERSION NODE COMMAND ARGS...: a broker script with the node's environment.
run() {
    local version="$1" node="$2" command="$3"; shift 3
    local name port dist root dir
    read -r name port dist <<<"$(node_spec "$version" "$node")"
    root="$(root_of "$version")"
    dir="$BASE/$version/$name"     # as seen from inside the root
    [ -z "$root" ] || ensure_chroot "$version"   # before making the node's folders in it
    mkdir -p "$root$dir/home"
    if [ ! -f "$root$dir/home/.erlang.cookie" ]; then
        printf '%s' "$COOKIE" >"$root$dir/home/.erlang.cookie"
        chmod 400 "$root$dir/home/.erlang.cookie"
    fi
    [ -f "$root$dir/rabbitmq.conf" ] || node_config "$version" "$port" >"$root$dir/rabbitmq.conf"
    [ -f "$root$dir/enabled_plugins" ] || echo '[].' >"$root$dir/enabled_plugins"
    : >"$root$dir/rabbitmq-env.conf"
    local -a environment=(
        HOME="$dir/home" PATH=/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8 LC_ALL=C.UTF-8
        RABBITMQ_NODENAME="$name@$HOST" RABBITMQ_NODE_IP_ADDRESS=127.0.0.1
        RABBITMQ_NODE_PORT="$port" RABBITMQ_DIST_PORT="$dist"
        RABBITMQ_MNESIA_BASE="$dir/mnesia" RABBITMQ_LOG_BASE="$dir/log"
        RABBITMQ_CONFIG_FILE="$dir/rabbitmq.conf" RABBITMQ_CONF_ENV_FILE="$dir/rabbitmq-env.conf"
        RABBITMQ_ENABLED_PLUGINS_FILE="$dir/enabled_plugins"
        RABBITMQ_PID_FILE="$dir/pid" ERL_EPMD_ADDRESS=127.0.0.1
        RABBITMQ_CTL_DIST_PORT_MIN="$((dist + 10000))" RABBITMQ_CTL_DIST_PORT_MAX="$((dist + 10009))"
    )
    if [ -n "$root" ]; then
        ensure_mounts "$root"
        exec chroot "$root" /usr/bin/env -i "${environment[@]}" "/usr/lib/rabbitmq/bin/$command" "$@"
    fi
    command -v rabbitmq-server >/dev/null || die "rabbitmq-server is not installed"
    exec /usr/bin/env -i "${environment[@]}" "/usr/lib/rabbitmq/bin/$command" "$@"
}

ctl() { (run "$1" "$2" rabbitmqctl "${@:3}"); }

start_node() {
    local version="$1" node="$2" name port dist root
    read -r name port dist <<<"$(node_spec "$version" "$node")"
    root="$(root_of "$version")"
    if ctl "$version" "$node" -q status >/dev/null 2>&1; then return 0; fi
    mkdir -p "$root$BASE/$version/$name"
    (run "$version" "$node" rabbitmq-server >"$root$BASE/$version/$name/server.out" 2>&1 &)
    ctl "$version" "$node" -q wait --timeout 120 "$BASE/$version/$name/pid" >/dev/null \
        || die "node $name@$HOST did not start, see $root$BASE/$version/$name/server.out and log/"
}

stop_node() { ctl "$1" "$2" -q stop >/dev/null 2>&1 || true; }

kill_node() {
    local name port dist root pid
    read -r name port dist <<<"$(node_spec "$1" "$2")"
    root="$(root_of "$1")"
    pid="$(cat "$root$BASE/$1/$name/pid" 2>/dev/null || true)"
    [ -n "$pid" ] && kill -9 "$pid" 2>/dev/null || true
}

wipe_node() {
    local name port dist root
    read -r name port dist <<<"$(node_spec "$1" "$2")"
    root="$(root_of "$1")"
    rm -rf "$root$BASE/$1/$name"
}

up() {
    local version="$1" node
    for node in c1 c2 c3; do start_node "$version" "$node"; done
    for node in c2 c3; do
        local name port dist
        read -r name port dist <<<"$(node_spec "$version" c1)"
        if ! ctl "$version" "$node" -q cluster_status 2>/dev/null | grep -q "$name@$HOST"; then
            ctl "$version" "$node" -q stop_app
            ctl "$version" "$node" -q join_cluster "$name@$HOST"
            ctl "$version" "$node" -q start_app
        fi
    done
    ctl "$version" c1 -q await_online_nodes 3 --timeout 120 2>/dev/null || true
    echo "cluster $version up: $(urls "$version")"
}

down() {
    local version="$1" node
    for node in c3 c2 c1; do stop_node "$version" "$node"; done
    for node in c3 c2 c1; do kill_node "$version" "$node"; wipe_node "$version" "$node"; done
    release_mounts "$version"
}

urls() {
    local version="$1" node name port dist out=""
    for node in c1 c2 c3; do
        read -r name port dist <<<"$(node_spec "$version" "$node")"
        out="$out${out:+ }amqp://guest:guest@127.0.0.1:$port/%2F"
    done
    echo "$out"
}

# An unknown version stops the script here (inside "$(...)" die would not).
case "${1:-}" in
    up|down|single-up|single-down|start-node|stop-node|kill-node|ctl|urls|env|nodes|root) version_spec "${2:?version}" >/dev/null ;;
    chroot) version_spec "${2:-4.0}" >/dev/null ;;
esac

case "${1:-}" in
    up) up "${2:?version}" ;;
    down) down "${2:?version}" ;;
    single-up)
        start_node "${2:?version}" "${3:-single}"
        read -r name port dist <<<"$(node_spec "$2" "${3:-single}")"
        echo "node $name@$HOST up: amqp://guest:guest@127.0.0.1:$port/%2F" ;;
    single-down)
        stop_node "${2:?version}" "${3:-single}"; kill_node "$2" "${3:-single}"; wipe_node "$2" "${3:-single}"
        release_mounts "$2" ;;
    start-node) start_node "${2:?version}" "${3:?node}" ;;
    stop-node) stop_node "${2:?version}" "${3:?node}" ;;
    kill-node) kill_node "${2:?version}" "${3:?node}" ;;
    ctl) shift; ctl "${1:?version}" "${2:?node}" "${@:3}" ;;
    chroot) ensure_chroot "${2:-4.0}" ;;
    urls) urls "${2:?version}" ;;
    nodes)   # the one table of names and ports (tests/cluster/conftest.py reads it)
        for node in c1 c2 c3 single; do echo "$node $(node_spec "${2:?version}" "$node")"; done ;;
    root) root_of "${2:?version}" ;;
    env)
        if [ -n "${3:-}" ]; then   # single, or a private pPORT node
            read -r name port dist <<<"$(node_spec "${2:?version}" "$3")"
            echo "export DOMAIN_EVENT_BROKER='amqp://guest:guest@127.0.0.1:$port/%2F'"
            echo "export DEB_TEST_RABBITMQ_NODE='$name@$HOST'"
            echo "export DEB_TEST_RABBITMQCTL='$0 ctl $2 $3'"
        else
            echo "export DEB_TEST_CLUSTER_VERSION='${2:?version}'"
        fi ;;
    *) sed -n '2,/^set /{/^set /!p}' "$0"; exit 2 ;;
esac
