#!/usr/bin/env bash
# A one-node SLURM cluster on this machine's loopback, for trying `hydra/launcher=submitit_slurm` and for the
# tests (tests/test_slurm.py): munged, slurmctld and slurmd (Debian's `slurm-wlm` and `munge` packages), every
# file they write - configuration, munge key and socket, state, spool, logs, pid files - under DIR.
#
#   scripts/slurm_cluster.sh start  [--dir DIR] [--partition debug] [--port 6817] [--timeout 60]
#   scripts/slurm_cluster.sh stop   [--dir DIR]
#   scripts/slurm_cluster.sh status [--dir DIR]
#
#   export SLURM_CONF=DIR/slurm.conf       # what `start` prints: sinfo, sbatch and submitit read it
#   python train.py -m hydra/launcher=submitit_slurm hydra.launcher.partition=debug \
#       hydra.launcher.cpus_per_task=1 hydra.launcher.mem_gb=1 model.hidden=64,128
#
# DIR defaults to mlruns/slurm. `start` waits until `sinfo` shows the node idle (at most --timeout seconds) and
# does nothing to daemons that already run from DIR; `stop` ends them by their pid files; both are safe to
# repeat. --port is slurmctld's port, slurmd takes the next one. Needs root (slurmd starts jobs as their
# users): Debian: apt-get install slurm-wlm munge. The cluster has no accounting database (no slurmdbd), so
# `sacct` answers nothing; the sweeps know (mnist_sweep/slurm.py).
set -euo pipefail

cmd="${1:-}"
[ $# -gt 0 ] && shift
dir="mlruns/slurm"
partition="debug"
port=6817
timeout=60
while [ $# -gt 0 ]; do
    case "$1" in
        --dir) dir="$2"; shift 2 ;;
        --partition) partition="$2"; shift 2 ;;
        --port) port="$2"; shift 2 ;;
        --timeout) timeout="$2"; shift 2 ;;
        *) echo "error: unknown option $1; see the top of $0 for usage" >&2; exit 2 ;;
    esac
done

die() { echo "error: $*" >&2; exit 1; }

mkdir -p "$dir"
dir="$(cd "$dir" && pwd)"
conf="$dir/slurm.conf"
export SLURM_CONF="$conf"
node="$(hostname -s)"
munge_dir="$dir/munge"
munge_socket="$munge_dir/munge.socket"

pid_of() {  # the pid in pid file $1 when that process is alive, else nothing
    local pid
    [ -f "$1" ] || return 1
    pid="$(cat "$1" 2>/dev/null)" || return 1
    [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null && echo "$pid"
}

write_conf() {
    local cpus mem
    cpus="$(nproc)"
    mem="$(awk '/^MemTotal:/ {print int($2 / 1024 * 0.9)}' /proc/meminfo)"  # MiB, leaving the OS a tenth
    cat >"$conf" <<EOF
# Written by $0: a one-node cluster on 127.0.0.1, every file under $dir.
ClusterName=mnistsweep
SlurmctldHost=$node(127.0.0.1)
SlurmctldPort=$port
SlurmdPort=$((port + 1))
SlurmUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$munge_socket
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SwitchType=switch/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU_Memory
ReturnToService=2
# No accounting database: sacct has nothing to read (mnist_sweep/slurm.py keeps submitit from asking it).
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/slurmctld.log
SlurmdLogFile=$dir/slurmd.log
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
KillWait=5
MinJobAge=300
NodeName=$node NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=$partition Nodes=$node Default=YES MaxTime=INFINITE State=UP
EOF
}

conf_partition() { awk -F'[= ]' '/^PartitionName=/ {print $2}' "$conf"; }

node_state() { sinfo -h -n "$node" -o %t 2>/dev/null | head -n 1; }

start() {
    for daemon in slurmctld slurmd munged; do
        command -v "$daemon" >/dev/null || die "$daemon not found; install SLURM and munge: apt-get install slurm-wlm munge"
    done
    [ "$(id -u)" -eq 0 ] || die "the cluster needs root (slurmd starts jobs as their users); run: sudo $0 start --dir $dir"
    chmod 0755 "$dir"  # jobs of other users read slurm.conf and reach the munge socket
    mkdir -p "$dir/state" "$dir/spool" "$munge_dir"
    chmod 0755 "$munge_dir"
    # A fresh start (no daemon of DIR running) takes this command's options; a partial one keeps the file.
    if [ -z "$(pid_of "$dir/slurmctld.pid")" ] && [ -z "$(pid_of "$dir/slurmd.pid")" ]; then
        write_conf
    fi

    if [ -z "$(pid_of "$munge_dir/munged.pid")" ]; then
        if [ ! -f "$munge_dir/munge.key" ]; then
            (umask 077 && head -c 1024 /dev/urandom >"$munge_dir/munge.key")
            chmod 0400 "$munge_dir/munge.key"
        fi
        # --force: munged runs as root here, with its key, socket and seed in DIR instead of /etc and /run.
        munged --force --socket="$munge_socket" --key-file="$munge_dir/munge.key" \
            --pid-file="$munge_dir/munged.pid" --log-file="$munge_dir/munged.log" \
            --seed-file="$munge_dir/munged.seed" || die "munged did not start; see $munge_dir/munged.log"
    fi
    if [ -z "$(pid_of "$dir/slurmctld.pid")" ]; then
        # -c: a fresh start forgets jobs of an earlier run of this cluster.
        slurmctld -c -f "$conf" >>"$dir/slurmctld.out" 2>&1 \
            || die "slurmctld did not start; see $dir/slurmctld.log (port $port taken? use --port)"
    fi
    if [ -z "$(pid_of "$dir/slurmd.pid")" ]; then
        slurmd -N "$node" -f "$conf" >>"$dir/slurmd.out" 2>&1 \
            || die "slurmd did not start; see $dir/slurmd.log (port $((port + 1)) taken? use --port)"
    fi

    local deadline=$((SECONDS + timeout)) state=""
    while [ "$SECONDS" -lt "$deadline" ]; do
        state="$(node_state)"
        case "$state" in
            idle | mix | alloc)
                echo "SLURM cluster up: node $node ($state), partition $(conf_partition), files in $dir"
                echo "use it with: export SLURM_CONF=$conf"
                return 0
                ;;
            down* | drain* | fail*)  # e.g. after a restart: the controller waits for an admin to resume it
                scontrol update NodeName="$node" State=RESUME >/dev/null 2>&1 || true
                ;;
        esac
        sleep 0.5
    done
    tail -n 20 "$dir/slurmctld.log" "$dir/slurmd.log" >&2 2>/dev/null || true
    die "node $node was not idle after $timeout s (sinfo says: ${state:-nothing}); the daemons' logs are above"
}

stop_pid_file() {  # $1: pid file, $2: name
    local pid
    pid="$(pid_of "$1")" || { rm -f "$1"; return 0; }
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 1 40); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.25
    done
    kill -KILL "$pid" 2>/dev/null || true
    rm -f "$1"
    echo "stopped $2 (pid $pid)"
}

stop() {
    # Jobs first, while the controller can still cancel them; then the daemons that need munge, then munge.
    if [ -n "$(pid_of "$dir/slurmctld.pid")" ]; then
        scancel --quiet --partition "$(conf_partition)" 2>/dev/null || true
    fi
    stop_pid_file "$dir/slurmd.pid" slurmd
    stop_pid_file "$dir/slurmctld.pid" slurmctld
    stop_pid_file "$munge_dir/munged.pid" munged
    echo "stopped the SLURM cluster of $dir"
}

status() {
    local up=0
    for daemon in "munged:$munge_dir/munged.pid" "slurmctld:$dir/slurmctld.pid" "slurmd:$dir/slurmd.pid"; do
        if pid="$(pid_of "${daemon#*:}")"; then
            echo "${daemon%%:*}: running (pid $pid)"
        else
            echo "${daemon%%:*}: stopped"
            up=1
        fi
    done
    [ "$up" -eq 0 ] && sinfo
    return "$up"
}

case "$cmd" in
    start) start ;;
    stop) stop ;;
    status) status ;;
    *) echo "usage: $0 start|stop|status [--dir DIR] [--partition NAME] [--port PORT] [--timeout SECONDS]" >&2; exit 2 ;;
esac
