#!/usr/bin/env bash
# A one-node Slurm on this machine, for the `slurm`-marked tests (tests/test_slurm.py).
#
# Installs Debian's Slurm and MUNGE if missing, writes a slurm.conf for this machine (CPUs and memory
# as `slurmd -C` reads them; no cgroup plugins, so no systemd needed), starts munged, slurmctld and
# slurmd on localhost and waits until `sinfo` shows the node idle. Idempotent: a cluster already up is
# left as it is. Everything it writes lives under $PROMPTLAB_SLURM_DIR (default /tmp/promptlab-slurm),
# nothing under /etc: clients find the cluster through SLURM_CONF, which the last line prints
# (`export SLURM_CONF=...`). `slurm-up.sh stop` ends the daemons it started.
set -euo pipefail
DIR=${PROMPTLAB_SLURM_DIR:-/tmp/promptlab-slurm}
CONF=$DIR/slurm.conf
export SLURM_CONF=$CONF
MUNGE_SOCKET=$DIR/munge/munge.socket

die() { echo "slurm-up: $*" >&2; exit 1; }

stop() {
    for pidfile in "$DIR/slurmd.pid" "$DIR/slurmctld.pid" "$DIR/munge/munged.pid"; do
        if [ -s "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null; then kill "$(cat "$pidfile")"; fi
        rm -f "$pidfile"
    done
}
if [ "${1:-}" = stop ]; then stop; exit 0; fi

node_idle() { sinfo -h -o '%T' 2>/dev/null | grep -qx 'idle'; }
node_up() { sinfo -h -o '%T' 2>/dev/null | grep -qxE 'idle|mixed|allocated|completing'; }  # busy counts as up
if [ -f "$CONF" ] && command -v sinfo >/dev/null && node_up; then
    echo "export SLURM_CONF=$CONF"
    exit 0
fi

# ---- install
if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v sbatch >/dev/null \
    || ! command -v munged >/dev/null; then
    [ "$(id -u)" = 0 ] || die "Slurm is not installed and this is not root: apt-get install slurmctld slurmd slurm-client munge"
    pkgs=(slurmctld slurmd slurm-client munge)
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -q --no-install-recommends "${pkgs[@]}" >"$DIR.apt.log" 2>&1 \
        || { apt-get update -q >>"$DIR.apt.log" 2>&1 \
             && apt-get install -y -q --no-install-recommends "${pkgs[@]}" >>"$DIR.apt.log" 2>&1; } \
        || die "apt-get install ${pkgs[*]} failed (log: $DIR.apt.log): $(tail -n 3 "$DIR.apt.log")"
fi

# ---- configuration (rewritten each time the cluster is not up: CPUs / memory of this machine)
stop
mkdir -p "$DIR/state" "$DIR/spool" "$DIR/munge"
node=$(slurmd -C | head -1)                       # NodeName=<host> CPUs=.. ... RealMemory=..
host=$(hostname -s)
cat >"$CONF" <<EOF
# written by .ci/slurm-up.sh: one node, this machine; state and logs under $DIR
ClusterName=promptlab
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$MUNGE_SOCKET
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/slurmctld.log
SlurmdLogFile=$DIR/slurmd.log
SlurmctldPort=6817
SlurmdPort=6818
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
ReturnToService=2
JobRequeue=1
KillWait=5
MinJobAge=600
SchedulerParameters=sched_interval=2
$node NodeAddr=127.0.0.1 State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
# slurmd -C may print "UpTime=..." on a second line; only the first line is kept above.

# ---- MUNGE (its own socket, so a system munged, if any, is left alone)
chown munge:munge "$DIR/munge" 2>/dev/null || true
[ -s /etc/munge/munge.key ] || { mungekey --create --keyfile=/etc/munge/munge.key && chown munge:munge /etc/munge/munge.key; }
runuser -u munge -- munged --socket="$MUNGE_SOCKET" --pid-file="$DIR/munge/munged.pid" \
    --log-file="$DIR/munge/munged.log" --seed-file="$DIR/munge/munged.seed" \
    || die "munged did not start: $(tail -n 3 "$DIR/munge/munged.log" 2>/dev/null)"

# ---- daemons (they fork into the background and write their pid files)
slurmctld -f "$CONF" || die "slurmctld did not start: $(tail -n 5 "$DIR/slurmctld.log" 2>/dev/null)"
slurmd -f "$CONF" || die "slurmd did not start: $(tail -n 5 "$DIR/slurmd.log" 2>/dev/null)"

for _ in $(seq 60); do
    if node_idle; then echo "export SLURM_CONF=$CONF"; exit 0; fi
    sleep 1
done
die "the node is not idle after 60 s: sinfo says '$(sinfo -h -o '%T %E' 2>&1)'; logs: $(tail -n 3 "$DIR/slurmctld.log" "$DIR/slurmd.log" 2>&1)"
