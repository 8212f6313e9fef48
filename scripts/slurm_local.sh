#!/usr/bin/env bash
# A throw-away two-node SLURM (munged + slurmctld + two slurmd nodes, each node in its own network
# namespace) for the job-script tests and CI, on one machine.
#
#   bash scripts/slurm_local.sh install   # apt-get install slurm-wlm munge shellcheck iproute2
#   bash scripts/slurm_local.sh start     # idempotent: make the network, configure, start daemons
#   bash scripts/slurm_local.sh status    # exit 0 when munged and slurmctld answer, both nodes up
#   bash scripts/slurm_local.sh env       # prints the exports (SLURM_CONF, PATH) for the clients
#   bash scripts/slurm_local.sh stop      # cancel our jobs, end our daemons, delete our network
#
# What `start` makes and `stop` deletes (P = INFOTOK_SLURM_NETNS, default "infotok";
# S = INFOTOK_SLURM_SUBNET, a /24, default 10.77.31.0/24):
#   network namespace P-ctl: bridge br0 with address S.1; slurmctld, host P-ctl
#   network namespace P-n1:  eth0 with S.11, linked to br0 by veth-n1; slurmd of node P-n1
#   network namespace P-n2:  eth0 with S.12, linked to br0 by veth-n2; slurmd of node P-n2
# Both ends of every link are created inside these namespaces: nothing outside them gets an
# address or a link, and they can reach nothing else. Each daemon also runs in its own UTS and
# mount namespace, with its name as hostname and the state dir's hosts file bind mounted over
# /etc/hosts there only, so a node is a host as on a real cluster: in a job, `hostname`,
# `getent hosts P-n2` and torch.distributed (gloo binds to the address its hostname resolves to)
# see the node's own name and address. Job steps (slurmstepd and what it starts) inherit the node's
# namespaces. munged runs in the machine's namespaces: its socket is a file, reachable from all.
#
# Clients: the controller is reachable only from inside these namespaces. `env` puts $DIR/bin first
# on PATH: its sbatch, srun, scontrol, ... run the real client inside P-ctl (`ip netns exec`, root)
# when called from anywhere else, and directly on the nodes (jobs inherit the submitter's PATH).
#
# Everything else lives in one state directory (INFOTOK_SLURM_DIR, default /tmp/infotok-slurm): its
# own slurm.conf, hosts file, munge key and socket, spools, logs and pid files. Nothing under /etc
# is touched, so a real SLURM or munged on the machine is left alone; clients find this cluster
# through SLURM_CONF. Runs without systemd (DESIGN §8): the daemons are started by hand, in the
# foreground (-D / -F) under nohup, and their pids are recorded so that `stop` ends only them (and
# whatever is left in the namespaces it made).
#
# Each node advertises the machine's memory, at least 4 CPUs, and a fake `Gres=gpu:8` backed by
# /dev/null-like character devices (mknod c 1 3), so `#SBATCH --gres=gpu:8` headers are accepted
# on a CPU box.
# AuthInfo cred_expire is short because it is also how long a requeued job waits before it may
# start again (120 s by default).
#
# Settings (environment): INFOTOK_SLURM_DIR, INFOTOK_SLURM_NETNS (namespace and node name prefix,
# one per state dir), INFOTOK_SLURM_SUBNET, INFOTOK_SLURMCTLD_PORT (6817), INFOTOK_SLURMD_PORT
# (6818), INFOTOK_SLURM_CRED_EXPIRE (seconds, 5).
set -euo pipefail

DIR="${INFOTOK_SLURM_DIR:-/tmp/infotok-slurm}"
PREFIX="${INFOTOK_SLURM_NETNS:-infotok}"
SUBNET="${INFOTOK_SLURM_SUBNET:-10.77.31.0/24}"
CTLD_PORT="${INFOTOK_SLURMCTLD_PORT:-6817}"
SLURMD_PORT="${INFOTOK_SLURMD_PORT:-6818}"
CRED_EXPIRE="${INFOTOK_SLURM_CRED_EXPIRE:-5}"
CONF="$DIR/etc/slurm.conf"
HOSTS="$DIR/etc/hosts"
MUNGE_SOCKET="$DIR/munge/munge.socket.2"
CTL="$PREFIX-ctl"
NODES=("$PREFIX-n1" "$PREFIX-n2")
DAEMONS=(munged slurmctld "${NODES[@]/#/slurmd-}")
CLIENTS=(sbatch srun salloc squeue scontrol scancel sinfo sacct)

log() { echo "[slurm_local] $*" >&2; }
die() { log "error: $*"; exit 1; }

[[ "$SUBNET" =~ ^([0-9]+\.[0-9]+\.[0-9]+)\.0/24$ ]] \
    || die "INFOTOK_SLURM_SUBNET=$SUBNET: expected a /24 such as 10.77.31.0/24"
CTL_ADDR="${BASH_REMATCH[1]}.1"
ADDRS=("${BASH_REMATCH[1]}.11" "${BASH_REMATCH[1]}.12")

# Whether process $1 runs (a zombie does not: init reaps our daemons only a while after they end).
alive() {
    local state
    state="$(ps -o stat= -p "$1" 2>/dev/null)" && [[ "$state" != Z* ]]
}

# pid of a daemon we started, if it is still alive ("" otherwise).
live_pid() {
    local pidfile="$DIR/run/$1.pid" pid
    [[ -f "$pidfile" ]] || return 0
    pid="$(cat "$pidfile")"
    if [[ -n "$pid" ]] && alive "$pid"; then echo "$pid"; fi
}

# A SLURM client run by this script (in the machine's namespace) inside the controller's.
client() { SLURM_CONF="$CONF" ip netns exec "$CTL" "$@"; }

netns_exists() { ip netns list | awk '{print $1}' | grep -qxF "$1"; }

cmd_install() {
    if command -v slurmctld >/dev/null && command -v munged >/dev/null \
            && command -v shellcheck >/dev/null && command -v ip >/dev/null; then
        log "slurm-wlm, munge, shellcheck and iproute2 are already installed"
        return 0
    fi
    [[ "$(id -u)" == 0 ]] \
        || die "install needs root (apt-get install -y slurm-wlm munge shellcheck iproute2)"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge shellcheck iproute2 \
        >/dev/null
    log "installed: $(slurmctld -V), munge," \
        "shellcheck $(shellcheck --version | sed -n 's/^version: //p')"
}

write_config() {
    mkdir -p "$DIR"/{bin,etc,munge,run,log,ctld,dev}
    local i node
    for node in "${NODES[@]}"; do mkdir -p "$DIR/slurmd/$node"; done
    # Eight fake GPU device files: gres/gpu only needs character devices to hand out.
    for i in 0 1 2 3 4 5 6 7; do
        [[ -e "$DIR/dev/nvidia$i" ]] || mknod "$DIR/dev/nvidia$i" c 1 3
    done
    # The machine's memory (minus a little for the daemons) and its CPUs, but at least 4, on each
    # node: a 2-task test job and a 1-task one may then run side by side on a node even on a 1-2
    # core CI box (config_overrides lets slurmd accept a node description larger than the hardware).
    local cpus mem
    cpus="$(nproc)"
    (( cpus >= 4 )) || cpus=4
    mem="$(slurmd -C | sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p')"
    mem=$(( ${mem:-2048} * 9 / 10 ))
    cat > "$CONF" <<EOF
# Generated by scripts/slurm_local.sh: a two-node test cluster. Do not use in production.
ClusterName=infotok-local
SlurmctldHost=$CTL($CTL_ADDR)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$MUNGE_SOCKET,cred_expire=$CRED_EXPIRE
StateSaveLocation=$DIR/ctld
SlurmdSpoolDir=$DIR/slurmd/%n
SlurmctldPidFile=$DIR/run/slurmctld.daemon.pid
SlurmdPidFile=$DIR/run/slurmd-%n.daemon.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
# No cgroups in containers: track processes by parent pid, no task confinement.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SwitchType=switch/none
SchedulerType=sched/builtin
SchedulerParameters=sched_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
GresTypes=gpu
ReturnToService=2
SlurmdParameters=config_overrides
JobRequeue=1
# Keep finished jobs visible to scontrol (Restarts=, ExitCode=) long enough for tests.
MinJobAge=900
KillWait=10
InactiveLimit=0
SlurmctldTimeout=30
SlurmdTimeout=60
PlugStackConfig=$DIR/etc/plugstack.conf
EOF
    for i in "${!NODES[@]}"; do
        echo "NodeName=${NODES[i]} NodeHostname=${NODES[i]} NodeAddr=${ADDRS[i]} CPUs=$cpus" \
            "RealMemory=$mem Gres=gpu:8 State=UNKNOWN" >> "$CONF"
    done
    local nodelist
    nodelist="$(IFS=,; echo "${NODES[*]}")"
    echo "PartitionName=debug Nodes=$nodelist Default=YES MaxTime=INFINITE State=UP" \
        "OverSubscribe=NO" >> "$CONF"
    echo "NodeName=$nodelist Name=gpu File=$DIR/dev/nvidia[0-7]" > "$DIR/etc/gres.conf"
    # An empty plugstack keeps the system-wide one (and any SPANK plugins it names) out.
    : > "$DIR/etc/plugstack.conf"
    # The cluster's name service, seen as /etc/hosts by the daemons and their jobs only.
    {
        echo "127.0.0.1 localhost"
        echo "::1 localhost ip6-localhost ip6-loopback"
        echo "$CTL_ADDR $CTL"
        for i in "${!NODES[@]}"; do echo "${ADDRS[i]} ${NODES[i]}"; done
    } > "$HOSTS"
}

# $DIR/bin/CLIENT for each SLURM client: the real one, inside the controller's namespace unless
# already inside one of the cluster's.
write_wrappers() {
    local c real ip_cmd
    ip_cmd="$(command -v ip)"
    for c in "${CLIENTS[@]}"; do
        real="$(type -aP "$c" | grep -vm1 "^$DIR/bin/")" || die "$c is not installed"
        cat > "$DIR/bin/$c" <<EOF
#!/bin/sh
# Generated by scripts/slurm_local.sh: $c for the two-node test cluster, whose controller is
# reachable only from its network namespaces; from anywhere else enter $CTL (needs root).
case "\$($ip_cmd netns identify \$\$ 2>/dev/null)" in
    $CTL|${NODES[0]}|${NODES[1]}) exec $real "\$@" ;;
    *) exec $ip_cmd netns exec $CTL $real "\$@" ;;
esac
EOF
        chmod 755 "$DIR/bin/$c"
    done
}

make_network() {
    local ns i
    for ns in "$CTL" "${NODES[@]}"; do
        ip netns add "$ns"
        ip -n "$ns" link set lo up
    done
    ip -n "$CTL" link add br0 type bridge
    ip -n "$CTL" addr add "$CTL_ADDR/24" dev br0
    ip -n "$CTL" link set br0 up
    for i in "${!NODES[@]}"; do
        # Created with both ends already in their namespaces: never a link on the machine itself.
        ip link add "veth-n$((i + 1))" netns "$CTL" type veth peer name eth0 netns "${NODES[i]}"
        ip -n "$CTL" link set "veth-n$((i + 1))" master br0 up
        ip -n "${NODES[i]}" addr add "${ADDRS[i]}/24" dev eth0
        ip -n "${NODES[i]}" link set eth0 up
    done
}

# End whatever still runs in our namespaces (steps and jobs outlive slurmd), then delete them; the
# veth pairs and the bridge go with them.
remove_network() {
    local ns pids i
    for ns in "${NODES[@]}" "$CTL"; do
        netns_exists "$ns" || continue
        pids="$(ip netns pids "$ns")"
        if [[ -n "$pids" ]]; then
            log "ending leftover processes in $ns: $(echo "$pids" | tr '\n' ' ')"
            # shellcheck disable=SC2086  # one argument per pid
            kill -TERM $pids 2>/dev/null || true
            for (( i = 0; i < 20; i++ )); do
                [[ -z "$(ip netns pids "$ns")" ]] && break
                sleep 0.25
            done
            pids="$(ip netns pids "$ns")"
            # shellcheck disable=SC2086  # one argument per pid
            if [[ -n "$pids" ]]; then kill -KILL $pids 2>/dev/null || true; fi
        fi
        ip netns delete "$ns"
    done
}

# Start one daemon in the foreground under nohup, detached from our stdio (so that a caller that
# captures output never waits on it), and record its pid. With a namespace NS, it runs as host NS:
# in network namespace NS and its own UTS and mount namespaces (hostname NS, our hosts file).
# nsenter, not `ip netns exec`: that remounts /sys, hiding the cgroup mounts slurmd checks for.
# Every step execs the next, so the recorded pid is the daemon's.
spawn() {
    local name="$1" ns="$2"
    shift 2
    local -a cmd=("$@")
    if [[ -n "$ns" ]]; then
        # shellcheck disable=SC2016  # expanded by the inner sh
        cmd=(nsenter --net="/run/netns/$ns" unshare --uts --mount --propagation slave
             sh -c 'hostname "$1" && mount --bind "$2" /etc/hosts && shift 2 && exec "$@"'
             sh "$ns" "$HOSTS" "$@")
    fi
    nohup setsid "${cmd[@]}" </dev/null >>"$DIR/log/$name.out" 2>&1 9>&- &
    echo $! > "$DIR/run/$name.pid"
}

wait_until() {
    local what="$1" tries="$2"; shift 2
    local i
    for (( i = 0; i < tries; i++ )); do
        if "$@" >/dev/null 2>&1; then return 0; fi
        sleep 0.5
    done
    die "$what did not come up; see $DIR/log/"
}

nodes_ready() {
    local node state
    for node in "${NODES[@]}"; do
        state="$(client sinfo -h -n "$node" -o %T 2>/dev/null)"
        [[ "$state" == idle* || "$state" == mixed* || "$state" == allocated* ]] || return 1
    done
}

# Take the lock that makes start and stop one at a time (concurrent test sessions may call them).
lock() {
    mkdir -p "$DIR/run"
    exec 9>"$DIR/run/start.lock"
    flock 9
}

cmd_start() {
    command -v slurmctld >/dev/null \
        || die "slurmctld is not installed (bash scripts/slurm_local.sh install)"
    # Namespaces, mknod for the fake GPUs, and jobs that run as the submitting user need root.
    [[ "$(id -u)" == 0 ]] || die "start needs root (a private test cluster: SlurmUser=root)"
    lock
    if cmd_status 2>/dev/null; then
        log "already running ($DIR)"
        return 0
    fi
    # Half-started leftovers (a daemon died): stop what is ours, then start afresh; and if this
    # start fails, leave nothing running either.
    teardown
    trap 'log "start failed: stopping what it started"; teardown' EXIT
    write_config
    write_wrappers
    make_network
    if [[ ! -s "$DIR/munge/munge.key" ]]; then
        dd if=/dev/urandom of="$DIR/munge/munge.key" bs=1024 count=1 status=none
    fi
    # munged insists on private key/socket directories owned by the user that runs it.
    chmod 700 "$DIR/munge"
    chmod 600 "$DIR/munge/munge.key"
    rm -f "$MUNGE_SOCKET" "$MUNGE_SOCKET.lock"
    spawn munged "" munged -F --force --socket="$MUNGE_SOCKET" --key-file="$DIR/munge/munge.key" \
        --pid-file="$DIR/run/munged.daemon.pid" --log-file="$DIR/log/munged.log" \
        --seed-file="$DIR/munge/seed"
    wait_until munged 40 munge -n -S "$MUNGE_SOCKET"
    # -c: start from an empty state (no jobs of an earlier session); -i: ignore state errors.
    spawn slurmctld "$CTL" slurmctld -D -i -c -f "$CONF"
    wait_until slurmctld 60 client scontrol ping
    local node
    for node in "${NODES[@]}"; do
        spawn "slurmd-$node" "$node" slurmd -D -N "$node" -f "$CONF"
    done
    wait_until "slurmd (nodes ${NODES[*]} idle)" 120 nodes_ready
    trap - EXIT
    log "running: cluster infotok-local, controller $CTL ($CTL_ADDR), nodes ${NODES[*]}" \
        "(${ADDRS[*]}), gres gpu:8 each; $(cmd_env | tr '\n' ' ')"
}

cmd_status() {
    local d
    for d in "${DAEMONS[@]}"; do
        [[ -n "$(live_pid "$d")" ]] || { log "$d is not running"; return 1; }
    done
    [[ -f "$CONF" ]] && client scontrol ping >/dev/null 2>&1 && nodes_ready
}

# Stop the daemons recorded in our pid files (TERM, then KILL after a grace period).
stop_daemons() {
    local d pid i j
    for (( i = ${#DAEMONS[@]} - 1; i >= 0; i-- )); do
        d="${DAEMONS[i]}"
        pid="$(live_pid "$d")"
        [[ -n "$pid" ]] || { rm -f "$DIR/run/$d.pid"; continue; }
        kill -TERM "$pid" 2>/dev/null || true
        for (( j = 0; j < 40; j++ )); do
            alive "$pid" || break
            sleep 0.25
        done
        if alive "$pid"; then
            log "$d (pid $pid) ignored TERM; killing it"
            kill -KILL "$pid" 2>/dev/null || true
        fi
        rm -f "$DIR/run/$d.pid"
    done
}

# Everything start made, in reverse: daemons, leftover processes, namespaces (safe to repeat).
teardown() {
    stop_daemons
    remove_network
}

cmd_stop() {
    if [[ ! -d "$DIR/run" ]]; then
        log "no state dir $DIR: removing only our namespaces"
        remove_network
        return 0
    fi
    lock
    # Jobs first: slurmstepd processes outlive slurmd, so end every job of this cluster and wait
    # for its steps to go away before the daemons do.
    if [[ -n "$(live_pid slurmctld)" ]]; then
        local jobs i
        jobs="$(client squeue -h -o %i 2>/dev/null || true)"
        if [[ -n "$jobs" ]]; then
            # shellcheck disable=SC2086  # one argument per job id
            client scancel --quiet $jobs 2>/dev/null || true
            for (( i = 0; i < 60; i++ )); do
                [[ -z "$(client squeue -h -o %i 2>/dev/null || true)" ]] && break
                sleep 0.5
            done
        fi
    fi
    teardown
    log "stopped ($DIR)"
}

cmd_env() {
    printf 'export SLURM_CONF=%q\n' "$CONF"
    printf 'export PATH=%q:"%s"\n' "$DIR/bin" "\$PATH"
}

case "${1:-}" in
    install) cmd_install ;;
    start) cmd_start ;;
    stop) cmd_stop ;;
    status) cmd_status ;;
    env) cmd_env ;;
    *) echo "usage: $0 install|start|stop|status|env" >&2; exit 2 ;;
esac
