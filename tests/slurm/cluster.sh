#!/usr/bin/env bash
# A one-node SLURM cluster for the tests, without systemd (run as root).
#   tests/slurm/cluster.sh start DIR   -> prints the slurm.conf path; export SLURM_CONF to use it
#   tests/slurm/cluster.sh stop DIR
# Needs Debian's slurmctld, slurmd, slurm-client and munge (.ci/run installs them).
set -euo pipefail
cmd=${1:?usage: cluster.sh start|stop DIR}
dir=$(realpath -m "${2:?usage: cluster.sh start|stop DIR}")

stop() {
    for name in slurmd slurmctld munged; do
        if [ -f "$dir/run/$name.pid" ]; then
            kill "$(cat "$dir/run/$name.pid")" 2>/dev/null || true
        fi
    done
    for _ in $(seq 50); do
        alive=0
        for name in slurmd slurmctld munged; do
            [ -f "$dir/run/$name.pid" ] && kill -0 "$(cat "$dir/run/$name.pid" 2>/dev/null)" 2>/dev/null && alive=1
        done
        [ "$alive" = 0 ] && break
        sleep 0.1
    done
}

if [ "$cmd" = stop ]; then
    stop
    exit 0
fi
[ "$cmd" = start ] || { echo "usage: cluster.sh start|stop DIR" >&2; exit 2; }

mkdir -p "$dir"/{state,spool,log,run,munge-socket,munge-key}
chmod 0755 "$dir/munge-socket"
chmod 0700 "$dir/munge-key"
key="$dir/munge-key/munge.key"
[ -f "$key" ] || mungekey -c -k "$key" >/dev/null
socket="$dir/munge-socket/munge.socket"
munged -S "$socket" --key-file="$key" --pid-file="$dir/run/munged.pid" --log-file="$dir/log/munged.log" \
    --seed-file="$dir/munge-key/seed" --force

host=$(hostname -s)
# the node as slurmd sees it, but advertising 8 CPUs so that -n 8 jobs fit (config_overrides)
memory=$(slurmd -C | head -n 1 | sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p')
node="NodeName=$host CPUs=8 Boards=1 SocketsPerBoard=1 CoresPerSocket=8 ThreadsPerCore=1 RealMemory=$memory"
cat > "$dir/slurm.conf" <<CONF
ClusterName=fedmpi-test
SlurmctldHost=$host(127.0.0.1)
AuthType=auth/munge
AuthInfo=socket=$socket
CredType=cred/munge
SlurmUser=root
SlurmdUser=root
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=$dir/log/jobcomp.log
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerParameters=batch_sched_delay=0
EnforcePartLimits=ALL
MpiDefault=none
ReturnToService=2
SlurmdParameters=config_overrides
KillWait=5
JobRequeue=1
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/run/slurmctld.pid
SlurmdPidFile=$dir/run/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
SlurmctldPort=6817
SlurmdPort=6818
$node NodeAddr=127.0.0.1 State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
CONF
export SLURM_CONF="$dir/slurm.conf"
slurmctld -f "$SLURM_CONF"
slurmd -f "$SLURM_CONF" -N "$host"
for _ in $(seq 100); do
    if [ "$(sinfo -h -o %t 2>/dev/null | head -n 1)" = idle ]; then
        echo "$SLURM_CONF"
        exit 0
    fi
    sleep 0.2
done
echo "SLURM did not come up; see $dir/log" >&2
stop
exit 1
