#!/usr/bin/env bash
# one_node.sh — a throwaway one-node Ceph cluster living entirely inside one directory, for the
# RBD interop tests (#19). One monitor and one memstore OSD, cephx on, no mgr, no systemd.
#
#   one_node.sh start DIR    start it; stdout gets only DIR/ceph.conf once pool "rbd" is usable
#   one_node.sh stop DIR     kill exactly the processes it started (pid files) and remove DIR
#   one_node.sh status DIR   `ceph -s`; exit 1 when not running
#
# DIR must not exist, or be empty, or be one of ours (marker DIR/.vstor-ceph): anything else is
# refused, so a typo cannot wipe a directory. With VSTOR_CEPH_OWNER_PID set, start also leaves a
# watcher that stops the cluster once that process is gone (a crashed or interrupted test run).
# Every step is bounded (`timeout`, or a polling limit); diagnostics go to stderr, logs to DIR/*.log.
# Needs: ceph-mon, ceph-osd (package ceph-osd), ceph, rbd, ceph-authtool, monmaptool (ceph-common).
set -euo pipefail

T0=${EPOCHREALTIME/[.,]/}
say() { # to stderr, with the seconds since the script started
	local us=$((${EPOCHREALTIME/[.,]/} - T0))
	printf 'one_node [%d.%02ds]: %s\n' $((us / 1000000)) $((us % 1000000 / 10000)) "$*" >&2
}
fail() {
	say "ERROR: $*"
	exit 1
}

[ $# -eq 2 ] || [ "${1:-}" = __watch ] || fail "usage: $0 start|stop|status DIR"
ACTION=$1
DIR=$2
case "$DIR" in
/*) ;;
*) DIR="$PWD/$DIR" ;;
esac
while [ "${DIR%/}" != "$DIR" ]; do DIR=${DIR%/}; done
[ -n "$DIR" ] || fail "refusing DIR=/"
case "$DIR" in *:* | *' '*) fail "DIR must contain no ':' or space (it goes into rbd: URLs)" ;; esac
CONF="$DIR/ceph.conf"
MARK="$DIR/.vstor-ceph"
SELF=$(readlink -f "$0")

# Limits (seconds) and sizes; small on purpose: a test cluster that is slow is a broken one.
T_TOOL=30 # ceph-authtool, monmaptool, a mkfs
T_CLI=30  # one `ceph` command
MEM_BYTES=$((2 << 30)) # memstore's logical capacity (RAM is taken only by what is written)
PGS=8                  # placement groups of pool rbd

ceph_cli() { timeout -k 5 "$T_CLI" ceph -c "$CONF" --connect-timeout 10 "$@"; }
# ceph_cli without output. (Redirect commands, never function calls: a signal trapped while a
# function's redirection is in force would send the trap's own messages to /dev/null.)
ceph_ok() { timeout -k 5 "$T_CLI" ceph -c "$CONF" --connect-timeout 10 "$@" >/dev/null 2>&1; }

# Whether pid $1 is alive and has $2 as one of its arguments (guards against pid reuse).
has_arg() {
	[ -n "$1" ] && [ -r "/proc/$1/cmdline" ] || return 1
	tr '\0' '\n' <"/proc/$1/cmdline" 2>/dev/null | grep -qxF -- "$2"
}
ours() { # pid file name ("mon.a", "osd.0", "watch") -> is its pid alive and ours?
	local pid arg
	pid=$(cat "$DIR/$1.pid" 2>/dev/null) || return 1
	if [ "$1" = watch ]; then arg=$DIR; else arg=$CONF; fi
	has_arg "$pid" "$arg"
}

# Two TCP ports free on 127.0.0.1 for the monitor, below the kernel's ephemeral range: a port in
# that range can be taken by any outgoing connection (another cluster's, say) before we bind it.
# python3 is there whenever `ceph` is (the CLI is written in it).
free_ports() {
	local lo
	lo=$(awk '{print $1}' /proc/sys/net/ipv4/ip_local_port_range 2>/dev/null) || lo=32768
	[ "$lo" -gt 11000 ] || lo=32768
	timeout 10 python3 - 10000 "$lo" <<'PY'
import random, socket, sys
low, high = int(sys.argv[1]), int(sys.argv[2])
held, ports = [], []
for port in random.sample(range(low, high), min(200, high - low)):
    s = socket.socket()
    try:
        s.bind(("127.0.0.1", port))
    except OSError:
        s.close()
        continue
    held.append(s)
    ports.append(port)
    if len(ports) == 2:
        print(*ports)
        sys.exit(0)
sys.exit("no free TCP ports")
PY
}

kill_ours() {
	# SIGKILL at once: the data is thrown away, and a clean stop only makes memstore copy the
	# whole store to disk and the daemons linger for seconds after SIGTERM.
	local name pids=() pid _
	for name in watch osd.0 mon.a; do
		if ours "$name"; then
			pid=$(cat "$DIR/$name.pid")
			kill -KILL "$pid" 2>/dev/null || true
			pids+=("$pid")
		fi
	done
	for _ in $(seq 1 100); do # up to 10 s for the kernel to reap them
		local left=0 # (a zombie counts as gone: it is dead, only not yet reaped)
		for pid in "${pids[@]}"; do alive "$pid" && left=1; done
		[ $left -eq 0 ] && break
		sleep 0.1
	done
	say "killed ${#pids[@]} process(es)"
}

show_logs() {
	local f
	for f in "$DIR"/*.log "$DIR"/*.out; do
		[ -s "$f" ] || continue
		say "--- tail of $f"
		tail -n 15 "$f" >&2 || true
	done
}

write_conf() { # fsid v2-port v1-port
	cat >"$CONF" <<EOF
# Written by tests/ceph/one_node.sh; thrown away by \`one_node.sh stop $DIR\`.
[global]
fsid = $1
mon host = [v2:127.0.0.1:$2,v1:127.0.0.1:$3]
public addr = 127.0.0.1
cluster addr = 127.0.0.1
auth cluster required = cephx
auth service required = cephx
auth client required = cephx
keyring = $DIR/keyring
run dir = $DIR
admin socket = $DIR/\$name.asok
pid file = $DIR/\$name.pid
log file = $DIR/\$name.log
crash dir = $DIR/crash
log to stderr = false
err to stderr = false
osd pool default size = 1
osd pool default min size = 1
osd pool default pg num = $PGS
osd pool default pgp num = $PGS
osd pool default pg autoscale mode = off
osd crush chooseleaf type = 0
mon allow pool size one = true
mon allow pool delete = true
mon warn on pool no redundancy = false
mon warn on insecure global id reclaim allowed = false
mon data avail warn = 1
mon data avail crit = 0

[mon]
mon data = $DIR/\$name
mon initial members = a
# A taken port: exit at once (and start over on other ports) instead of retrying for 10 s.
ms bind retry count = 1
mon cluster log file = $DIR/cluster.log
# Commit map changes after 0.1 s instead of 1 s: every step of a start waits on one, so this cuts
# a start from ~7.5 s to ~1.5 s. (It only batches fewer changes per commit; one monitor is fine.)
paxos propose interval = 0.1

[osd]
osd data = $DIR/\$name
keyring = $DIR/\$name/keyring
osd objectstore = memstore
memstore device bytes = $MEM_BYTES
memstore page set = true
memstore page size = 4096
osd op num shards = 2
osd op num threads per shard = 2

[client]
# Fail fast instead of hanging when the cluster is gone or stuck (the defaults wait 300 s, or
# forever for I/O).
client mount timeout = 15
rados mon op timeout = 15
rados osd op timeout = 15
# No exclusive-lock by default: a killed test process holding an image's lock would block the
# next writer. Tests that want more features ask for them (--image-feature).
rbd default features = layering
log file = $DIR/client.log
EOF
}

alive() { # pid $1 exists and is not a zombie
	local state
	state=$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null) && [ "$state" != Z ]
}

# Starts daemon $1 (mon|osd) with id $2 in the foreground of a session of its own, in this
# script's background: its pid is known at once, and so is its death (a monitor whose port was
# taken dies at once, see `ms bind retry count`). Returns once it has written its pid file.
start_daemon() {
	local name="$1.$2" pid _
	setsid "ceph-$1" -f -c "$CONF" -i "$2" </dev/null >>"$DIR/$name.out" 2>&1 &
	pid=$!
	for _ in $(seq 1 150); do # up to 15 s
		alive "$pid" || return 1
		[ "$(cat "$DIR/$name.pid" 2>/dev/null)" = "$pid" ] && return 0
		sleep 0.1
	done
	kill -KILL "$pid" 2>/dev/null || true # not ours to leave behind
	return 1
}

num_up_osds() {
	ceph_cli osd stat -f json 2>/dev/null | sed -n 's/.*"num_up_osds":\([0-9]*\).*/\1/p'
}

do_start() {
	if [ -e "$DIR" ]; then
		if [ -f "$MARK" ]; then
			if ours mon.a && ours osd.0 && ceph_ok health; then
				say "already running in $DIR"
				echo "$CONF"
				return 0
			fi
			fail "$DIR holds a stopped or half-started cluster; run: $0 stop $DIR"
		fi
		[ -d "$DIR" ] && [ -z "$(ls -A "$DIR")" ] || fail "$DIR exists and is not ours; refusing it"
	fi
	for tool in ceph-mon ceph-osd ceph rbd ceph-authtool monmaptool; do
		command -v "$tool" >/dev/null ||
			fail "$tool is missing (apt-get install --no-install-recommends ceph-mon ceph-osd ceph-common)"
	done
	mkdir -p "$DIR"
	: >"$MARK"
	trap 'rc=$?; if [ $rc -ne 0 ]; then show_logs; kill_ours; say "start FAILED; logs kept in $DIR; run: $0 stop $DIR"; fi' EXIT
	trap 'exit 130' INT TERM

	local fsid
	fsid=$(cat /proc/sys/kernel/random/uuid)
	timeout "$T_TOOL" ceph-authtool --create-keyring "$DIR/keyring" --gen-key -n client.admin \
		--cap mon 'allow *' --cap osd 'allow *' --cap mgr 'allow *' >/dev/null
	timeout "$T_TOOL" ceph-authtool --create-keyring "$DIR/mon.keyring" --gen-key -n mon. \
		--cap mon 'allow *' >/dev/null
	timeout "$T_TOOL" ceph-authtool "$DIR/mon.keyring" --import-keyring "$DIR/keyring" >/dev/null

	# The monitor; a port taken between the probe and the bind gets a second and third try.
	local attempt v2 v1 up=0
	for attempt in 1 2 3; do
		read -r v2 v1 < <(free_ports) || fail "no free TCP ports"
		write_conf "$fsid" "$v2" "$v1"
		rm -rf "$DIR/mon.a" "$DIR/monmap"
		timeout "$T_TOOL" monmaptool --create --fsid "$fsid" \
			--addv a "[v2:127.0.0.1:$v2,v1:127.0.0.1:$v1]" "$DIR/monmap" >/dev/null
		timeout -k 5 "$T_TOOL" ceph-mon -c "$CONF" -i a --mkfs --monmap "$DIR/monmap" \
			--keyring "$DIR/mon.keyring" </dev/null >>"$DIR/mon.a.out" 2>&1 ||
			fail "ceph-mon --mkfs failed"
		if start_daemon mon a && ceph_ok mon stat; then
			up=1
			break
		fi
		say "monitor attempt $attempt on ports $v2/$v1 failed"
		kill_ours
	done
	[ $up -eq 1 ] || fail "the monitor did not come up"
	say "mon.a up (v2 port $v2, v1 port $v1)"

	# The OSD: registered with its own cephx key, then formatted and started.
	local uuid key
	uuid=$(cat /proc/sys/kernel/random/uuid)
	key=$(timeout "$T_TOOL" ceph-authtool --gen-print-key)
	mkdir -p "$DIR/osd.0"
	printf '{"cephx_secret": "%s"}\n' "$key" >"$DIR/osd.0/new.json"
	[ "$(ceph_cli osd new "$uuid" 0 -i "$DIR/osd.0/new.json")" = 0 ] || fail "ceph osd new failed"
	rm -f "$DIR/osd.0/new.json"
	timeout "$T_TOOL" ceph-authtool --create-keyring "$DIR/osd.0/keyring" -n osd.0 \
		--add-key "$key" >/dev/null
	timeout -k 5 "$T_TOOL" ceph-osd -c "$CONF" -i 0 --mkfs --osd-uuid "$uuid" \
		</dev/null >>"$DIR/osd.0.out" 2>&1 || fail "ceph-osd --mkfs failed"
	start_daemon osd 0 || fail "ceph-osd did not start"
	local _
	for _ in $(seq 1 60); do # up to ~30 s (each `ceph` call takes a few tenths)
		ours osd.0 || fail "osd.0 died"
		[ "$(num_up_osds)" = 1 ] && break
		sleep 0.2
	done
	[ "$(num_up_osds)" = 1 ] || fail "osd.0 did not come up"
	say "osd.0 up"

	ceph_ok osd pool create rbd "$PGS" "$PGS" || fail "pool create failed"
	# Writes the pool's first object, so it also waits for the placement groups to be active.
	timeout -k 5 60 rbd -c "$CONF" pool init rbd || fail "rbd pool init failed or hung"

	if [ -n "${VSTOR_CEPH_OWNER_PID:-}" ]; then
		local start
		start=$(awk '{print $22}' "/proc/$VSTOR_CEPH_OWNER_PID/stat") || fail "no process $VSTOR_CEPH_OWNER_PID"
		setsid bash "$SELF" __watch "$DIR" "$VSTOR_CEPH_OWNER_PID" "$start" </dev/null \
			>>"$DIR/watch.log" 2>&1 &
		echo $! >"$DIR/watch.pid"
	fi
	trap - EXIT INT TERM
	say "cluster up in $DIR"
	echo "$CONF"
}

# Stops the cluster once the owner (pid $2, started at clock tick $3) is gone.
do_watch() {
	local pid=$1 start=$2
	# (/proc/PID/stat: field 3 the state, Z for a zombie; field 22 the start time; the name in
	# field 2 has no spaces for the owners we expect, deno or bash.)
	while [ "$(awk '$3 != "Z" {print $22}' "/proc/$pid/stat" 2>/dev/null)" = "$start" ]; do
		sleep 1
	done
	[ -f "$MARK" ] || exit 0
	say "owner $pid is gone; stopping the cluster in $DIR"
	rm -f "$DIR/watch.pid" # not kill ourselves
	do_stop
}

do_stop() {
	if [ ! -e "$DIR" ]; then
		say "$DIR does not exist; nothing to stop"
		return 0
	fi
	[ -f "$MARK" ] || fail "$DIR is not a one_node.sh directory (no marker); refusing to touch it"
	kill_ours
	rm -rf -- "$DIR"
	say "removed $DIR"
}

do_status() {
	if [ -f "$MARK" ] && ours mon.a && ours osd.0; then
		ceph_cli -s
	else
		echo "not running"
		return 1
	fi
}

case "$ACTION" in
start) do_start ;;
stop) do_stop ;;
status) do_status ;;
__watch) do_watch "$3" "$4" ;;
*) fail "unknown action '$ACTION' (start|stop|status)" ;;
esac
