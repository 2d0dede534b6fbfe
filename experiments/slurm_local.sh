#!/usr/bin/env bash
# A one-node SLURM cluster on this machine, for trying the SLURM launcher and for the `slurm` tests.
#
#   bash experiments/slurm_local.sh up       # install (once), start munged, slurmctld and slurmd; wait for the node
#   bash experiments/slurm_local.sh status   # exit 0 when the node answers, 1 otherwise
#   bash experiments/slurm_local.sh down     # cancel all jobs, stop the daemons this script started
#
# Debian, as root, without systemd: `apt-get install slurm-wlm munge` (SLURM 22.05 on Debian 12), munged
# run as the munge user, and the two SLURM daemons run in the background with `-D`. No cgroups and no
# accounting database: processes are tracked by /proc (proctrack/linuxproc), each job is bound to its
# cores with sched_setaffinity (task/affinity), accounting is off (submitit warns that `sacct` is
# unavailable and still collects results). The node's CPUs and memory are read with `slurmd -C`; NVIDIA
# GPUs, if any, become `gpu` generic resources. Jobs share the node by cores (select/cons_tres, CR_Core),
# so several jobs run at once.
#
# The cluster's configuration is /etc/slurm/slurm.conf (where the SLURM commands look for it; or
# $SLURM_CONF); a file there that this script did not write is never overwritten. Logs and state are under /var/log/slurm
# and /var/lib/slurm/knots-local. `up` and `down` are idempotent. Every failure is one line on stderr
# and a non-zero exit status.
set -euo pipefail

MARKER="# Written by knots experiments/slurm_local.sh"
CONF=${SLURM_CONF:-/etc/slurm/slurm.conf}  # the SLURM commands and daemons read SLURM_CONF too
GRES_CONF=$(dirname "$CONF")/gres.conf
STATE=/var/lib/slurm/knots-local
LOGS=/var/log/slurm
RUN=/run/knots-slurm
PARTITION=local

die() { echo "slurm_local.sh: $*" >&2; exit 1; }

alive() {  # alive PIDFILE: the process named like the file (slurmctld.pid -> slurmctld) runs
    local pid
    pid=$(cat "$1" 2>/dev/null) || return 1
    [ -n "$pid" ] && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$(basename "$1" .pid)" ]
}

preflight() {
    [ "$(id -u)" = 0 ] || die "cannot start a SLURM cluster: must run as root (uid is $(id -u))"
    [ -f /etc/debian_version ] || die "cannot start a SLURM cluster: not a Debian system (no /etc/debian_version)"
    local file
    for file in "$CONF" "$GRES_CONF"; do
        if [ -f "$file" ] && ! grep -qF "$MARKER" "$file"; then
            die "cannot start a SLURM cluster: $file exists and was not written by this script (move it away to use the local cluster)"
        fi
    done
    if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v munged >/dev/null; then
        command -v apt-get >/dev/null || die "cannot install SLURM: apt-get is not available"
        local log
        log=$(mktemp)
        if ! DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge >"$log" 2>&1; then
            { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge; } >"$log" 2>&1 \
                || die "cannot install SLURM: 'apt-get install slurm-wlm munge' failed (log: $log)"
        fi
        rm -f "$log"
    fi
}

start_munge() {
    install -d -o munge -g munge -m 0755 /run/munge
    install -d -o munge -g munge -m 0700 /var/lib/munge /var/log/munge
    if [ ! -s /etc/munge/munge.key ]; then
        mungekey --create --keyfile=/etc/munge/munge.key >/dev/null 2>&1 || die "cannot create the munge key /etc/munge/munge.key"
    fi
    chown munge:munge /etc/munge/munge.key
    chmod 0400 /etc/munge/munge.key
    if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
        return 0  # a munged is already serving credentials
    fi
    runuser -u munge -- /usr/sbin/munged --force 2>"$RUN/munged.err" || die "munged did not start: $(head -n1 "$RUN/munged.err")"
    for _ in $(seq 50); do
        if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
            cp /run/munge/munged.pid "$RUN/munged.pid"  # ours to stop in `down`
            return 0
        fi
        sleep 0.1
    done
    die "munged started but does not answer (see /var/log/munge/munged.log)"
}

node_line() {
    # `slurmd -C` prints the node's real hardware: NodeName=... CPUs=... RealMemory=... (and UpTime=...).
    local line gpus
    line=$(slurmd -C 2>/dev/null | head -n1) || true
    [ -n "$line" ] || die "'slurmd -C' did not describe this node"
    gpus=$(gpu_count)
    [ "$gpus" -gt 0 ] && line="$line Gres=gpu:$gpus"
    echo "$line NodeAddr=127.0.0.1 State=UNKNOWN"
}

gpu_count() {
    ls /dev/nvidia[0-9]* 2>/dev/null | grep -c -E '/dev/nvidia[0-9]+$' || true
}

write_conf() {
    local node host gpus new
    node=$(node_line) || exit 1
    host=$(sed -E 's/^NodeName=([^ ]+).*/\1/' <<<"$node")
    gpus=$(gpu_count)
    new=$(cat <<EOF
$MARKER: a one-node cluster without cgroups or accounting.
ClusterName=knots-local
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/d
SlurmctldPidFile=$RUN/slurmctld.pid
SlurmdPidFile=$RUN/slurmd.pid
SlurmctldLogFile=$LOGS/knots-local-slurmctld.log
SlurmdLogFile=$LOGS/knots-local-slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/affinity
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
ReturnToService=2
MailProg=/bin/true
MinJobAge=600
KillWait=10
SlurmdTimeout=60
InactiveLimit=0
$([ "$gpus" -gt 0 ] && echo "GresTypes=gpu")
$node
PartitionName=$PARTITION Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
)
    if [ "$gpus" -gt 0 ]; then
        printf '%s\nNodeName=%s Name=gpu File=/dev/nvidia[0-%d]\n' "$MARKER" "$host" "$((gpus - 1))" >"$GRES_CONF"
    fi
    if [ -f "$CONF" ] && [ "$(cat "$CONF")" = "$new" ]; then
        return 1  # unchanged
    fi
    install -d "$(dirname "$CONF")"
    printf '%s\n' "$new" >"$CONF.tmp" && mv "$CONF.tmp" "$CONF"
    return 0
}

node_state() {  # the node's state, empty when no controller answers within 5 s
    [ -f "$CONF" ] || return 0
    if grep -qF "$MARKER" "$CONF" && ! alive "$RUN/slurmctld.pid"; then
        return 0  # our cluster, and its controller is not running
    fi
    timeout 5 sinfo -h -N -p "$PARTITION" -o %T 2>/dev/null | head -n1 || true
}

start_daemon() {  # start_daemon NAME ARGS...: run NAME -D in the background unless ours is running
    local name=$1
    shift
    alive "$RUN/$name.pid" && return 0
    setsid "$name" -D "$@" >>"$LOGS/knots-local-$name.out" 2>&1 </dev/null &
    echo $! >"$RUN/$name.pid"
}

stop_daemon() {  # stop_daemon NAME: SIGTERM the daemon this script started, SIGKILL after 10 s
    local pidfile=$RUN/$1.pid pid
    alive "$pidfile" || { rm -f "$pidfile"; return 0; }
    pid=$(cat "$pidfile")
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 100); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    kill -0 "$pid" 2>/dev/null && kill -9 "$pid" 2>/dev/null || true
    rm -f "$pidfile"
}

up() {
    preflight
    install -d "$RUN" "$LOGS" "$STATE/ctld" "$STATE/d"
    start_munge
    if write_conf; then
        # New or changed configuration: (re)start both daemons on it, with a clean controller state.
        stop_daemon slurmd
        stop_daemon slurmctld
    fi
    local fresh=()
    alive "$RUN/slurmctld.pid" || fresh=(-c)  # a controller started from scratch forgets old jobs
    start_daemon slurmctld "${fresh[@]}"
    start_daemon slurmd
    local state=""
    for _ in $(seq 150); do
        state=$(node_state)
        case "$state" in
            idle*|mixed*|allocated*|completing*) break ;;
            down*|drain*) scontrol update NodeName="$(sinfo -h -N -o %N | head -n1)" State=RESUME >/dev/null 2>&1 || true ;;
        esac
        alive "$RUN/slurmctld.pid" || die "slurmctld exited (see $LOGS/knots-local-slurmctld.log)"
        alive "$RUN/slurmd.pid" || die "slurmd exited (see $LOGS/knots-local-slurmd.log)"
        sleep 0.2
    done
    case "$state" in
        idle*|mixed*|allocated*|completing*) ;;
        *) die "the node did not become ready within 30 s (state: ${state:-no answer}; see $LOGS/knots-local-*.log)" ;;
    esac
    sinfo -h -N -o "SLURM cluster up: node %N, partition %P, %c CPUs, %m MB, gres %G, state %T" | head -n1
}

down() {
    [ "$(id -u)" = 0 ] || die "cannot stop the SLURM cluster: must run as root (uid is $(id -u))"
    if alive "$RUN/slurmctld.pid"; then
        # Cancel every job so that no job step outlives the daemons, then wait for them to end.
        scancel --full --quiet --partition="$PARTITION" 2>/dev/null || true
        for _ in $(seq 100); do
            [ -z "$(squeue -h -p "$PARTITION" -o %A 2>/dev/null)" ] && break
            sleep 0.2
        done
    fi
    stop_daemon slurmd
    stop_daemon slurmctld
    stop_daemon munged
    echo "SLURM cluster down"
}

status() {
    local state
    state=$(node_state)
    case "$state" in
        idle*|mixed*|allocated*|completing*)
            sinfo -h -N -o "SLURM cluster up: node %N, partition %P, %c CPUs, %m MB, gres %G, state %T" | head -n1
            squeue -h -o "  job %i %j %T %M" 2>/dev/null || true
            ;;
        *) echo "SLURM cluster not running${state:+ (node state: $state)}"; return 1 ;;
    esac
}

case "${1:-}" in
    up) up ;;
    down) down ;;
    status) status ;;
    *) echo "usage: $0 up|down|status" >&2; exit 2 ;;
esac
