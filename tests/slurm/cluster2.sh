#!/usr/bin/env bash
# A two-node SLURM cluster on one machine for the tests (run as root, no systemd).
#   tests/slurm/cluster2.sh start DIR              -> prints the slurm.conf path; export SLURM_CONF to use it
#   tests/slurm/cluster2.sh stop DIR               -> everything down, by PID; veths, namespaces, bridge deleted
#   tests/slurm/cluster2.sh kill-node DIR NODE     -> SIGKILL every process of NODE (its slurmd, job steps, tasks)
#   tests/slurm/cluster2.sh start-node DIR NODE    -> start NODE's slurmd again (after kill-node); waits until it answers
#   tests/slurm/cluster2.sh nodes DIR              -> "NODE ADDRESS VETH" per node (VETH: the bridge side)
#
# Each node is a network namespace with its own address on a Linux bridge, entered with
# nsenter and given its own UTS (hostname), mount and IPC namespace by unshare; its slurmd
# and everything that starts (job steps, MPI ranks) run there. What each part is for:
# - IPC namespace: without it the mpich wheel's UCX sees one machine (same boot id and IPC
#   namespace) and the ranks of both nodes talk over shared memory, not TCP;
# - /dev/shm: a tmpfs of the node's own. MPICH names its node segment after the job
#   (mpich_shm_<hash of the PMI job id>_<node index>), so on a shared /dev/shm a job of
#   another SLURM on this machine with the same job id opens the same segment and both
#   jobs hang (seen with job 2 of the one-node test cluster); FirstJobId differs too;
# - hosts file: bind-mounted on /etc/hosts so that node names and the machine's name (for
#   slurmctld) resolve inside the node (/etc/hosts maps the machine to 127.0.0.1);
# - not `ip netns exec`: it remounts /sys, and slurmd then dies ("No filesystem mounted
#   on /sys/fs/cgroup").
# slurmctld and munged run outside, slurmctld on the bridge address; the munge socket is a
# path on the shared filesystem. SlurmdTimeout=5 and MessageTimeout=3 (slurmctld retries a
# refused connection for MessageTimeout seconds, at most 10) let a killed node be set DOWN,
# and its jobs end (NODE_FAIL), about 10 s after the kill instead of minutes.
#
# Apart from tests/slurm/cluster.sh (the one-node cluster) in everything: ports 6827/6828,
# cluster, node and partition names, job ids from 20001, addresses, DIR. Needs Debian's
# slurmctld, slurmd, slurm-client and munge (.ci/run installs them), iproute2, util-linux.
set -euo pipefail
usage="usage: cluster2.sh start|stop DIR | kill-node|start-node DIR NODE | nodes DIR"
cmd=${1:?$usage}
dir=$(realpath -m "${2:?$usage}")

net=${FEDMPI_SLURM2_NET:-10.247.93}  # a private /24; the bridge is .1, node i is .1i
bridge=fm2br
nodes=(fedmpi-n1 fedmpi-n2)
ctld_port=6827
slurmd_port=6828
marker=/run/fedmpi-cluster2.dir  # DIR of the cluster that runs, so that a start elsewhere stops it first

veth() { echo "fm2v${1#fedmpi-n}"; }              # host side of node's veth pair (inside: eth0)
addr() { echo "$net.1${1#fedmpi-n}"; }

node_pids() { ip netns pids "$1" 2>/dev/null || true; }

kill_node() {  # SIGKILL everything in the node's network namespace, until nothing is left
    local pids
    for _ in $(seq 50); do
        pids=$(node_pids "$1")
        [ -z "$pids" ] && return 0
        # shellcheck disable=SC2086
        kill -KILL $pids 2>/dev/null || true
        sleep 0.05
    done
    echo "processes left in $1: $(node_pids "$1")" >&2
    return 1
}

pidfile_pid() { [ -f "$1" ] && cat "$1" 2>/dev/null || true; }

stop() {  # SIGTERM to every daemon and node process at once, SIGKILL to what is left after 3 s
    local node pids="" alive pid
    for node in "${nodes[@]}"; do
        pids="$pids $(node_pids "$node")"
    done
    pids="$pids $(pidfile_pid "$dir/run/slurmctld.pid") $(pidfile_pid "$dir/run/munged.pid")"
    # shellcheck disable=SC2086
    [ -n "${pids// /}" ] && kill -TERM $pids 2>/dev/null || true
    for _ in $(seq 60); do
        alive=""
        for pid in $pids; do
            kill -0 "$pid" 2>/dev/null && alive="$alive $pid"
        done
        [ -z "$alive" ] && break
        sleep 0.05
    done
    # shellcheck disable=SC2086
    [ -n "$alive" ] && kill -KILL $alive 2>/dev/null || true
    for node in "${nodes[@]}"; do
        [ -e "/run/netns/$node" ] && kill_node "$node"
    done
    rm -f "$dir/run/slurmctld.pid" "$dir/run/munged.pid"
    # the network: veths first (deleting a namespace frees its devices asynchronously, so an
    # immediate restart could still find them), then the namespaces and the bridge
    for node in "${nodes[@]}"; do
        ip link del "$(veth "$node")" 2>/dev/null || true
        ip netns del "$node" 2>/dev/null || true
    done
    ip link del "$bridge" 2>/dev/null || true
    if [ "$(cat "$marker" 2>/dev/null)" = "$dir" ]; then
        rm -f "$marker"
    fi
}

start_node() {  # slurmd in the node's namespaces; it daemonises, so this returns at once
    local node=$1
    if [ -n "$(node_pids "$node")" ]; then
        return 0  # running already
    fi
    nsenter --net="/run/netns/$node" unshare --uts --mount --ipc --propagation private \
        sh -c 'hostname "$1" && mount --bind "$2" /etc/hosts && mount -t tmpfs -o mode=1777 "shm-$1" /dev/shm \
               && exec slurmd -c -f "$3" -N "$1"' \
        sh "$node" "$dir/$node/hosts" "$dir/slurm.conf"
}

wait_for() {  # wait_for REGEX NODE...: until every node's state (sinfo %t) matches REGEX
    local pattern=$1 states
    shift
    for _ in $(seq 150); do
        states=$(SLURM_CONF="$dir/slurm.conf" sinfo -h -N -n "$(IFS=,; echo "$*")" -o "%N %t" 2>/dev/null || true)
        [ "$(grep -cE " ($pattern)\$" <<<"$states")" = "$#" ] && return 0
        sleep 0.1
    done
    echo "nodes not ${pattern}: $states; see $dir/log" >&2
    return 1
}

case "$cmd" in
    stop) stop; exit 0 ;;
    nodes) for node in "${nodes[@]}"; do echo "$node $(addr "$node") $(veth "$node")"; done; exit 0 ;;
    kill-node) kill_node "${3:?$usage}"; exit 0 ;;
    start-node) node=${3:?$usage}; start_node "$node"; wait_for "idle|mix|alloc|comp" "$node"; exit 0 ;;
    start) ;;
    *) echo "$usage" >&2; exit 2 ;;
esac

# leftovers of an earlier start, with this DIR or another
previous=$(cat "$marker" 2>/dev/null || true)
if [ -n "$previous" ] && [ "$previous" != "$dir" ]; then
    "$0" stop "$previous"
fi
stop
if ss -Hltn "( sport = :$ctld_port )" | grep -q .; then
    echo "port $ctld_port is in use (another slurmctld?): $(ss -Hltnp "( sport = :$ctld_port )")" >&2
    exit 1
fi
rm -rf "$dir/state" "$dir/spool" "$dir/run"
echo "$dir" > "$marker"
trap 'echo "cluster2.sh: start failed; tearing down" >&2; stop' ERR
host=$(hostname -s)
mkdir -p "$dir"/{state,log,run,munge-socket,munge-key}
chmod 0755 "$dir/munge-socket"
chmod 0700 "$dir/munge-key"
key="$dir/munge-key/munge.key"
[ -f "$key" ] || mungekey -c -k "$key" >/dev/null
socket="$dir/munge-socket/munge.socket"
munged -S "$socket" --key-file="$key" --pid-file="$dir/run/munged.pid" --log-file="$dir/log/munged.log" \
    --seed-file="$dir/munge-key/seed" --force

ip link add "$bridge" type bridge
ip addr add "$net.1/24" dev "$bridge"
ip link set "$bridge" up
hosts="127.0.0.1 localhost
$net.1 $host"
for node in "${nodes[@]}"; do
    hosts="$hosts
$(addr "$node") $node"
done
for node in "${nodes[@]}"; do
    ip netns add "$node"
    ip link add "$(veth "$node")" type veth peer name eth0 netns "$node"
    ip link set "$(veth "$node")" master "$bridge" up
    nsenter --net="/run/netns/$node" sh -c "ip link set lo up && ip addr add $(addr "$node")/24 dev eth0 && ip link set eth0 up"
    mkdir -p "$dir/$node" "$dir/spool/$node"
    echo "$hosts" > "$dir/$node/hosts"
done

# 4 CPUs per node advertised (config_overrides), whatever the machine has: -N 2 -n 8 fits
memory=$(slurmd -C | head -n 1 | sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p')
node_lines=""
for node in "${nodes[@]}"; do
    node_lines="${node_lines}NodeName=$node NodeAddr=$(addr "$node") NodeHostname=$node CPUs=4 Boards=1 SocketsPerBoard=1 \
CoresPerSocket=4 ThreadsPerCore=1 RealMemory=$memory State=UNKNOWN
"
done
cat > "$dir/slurm.conf" <<CONF
ClusterName=fedmpi-test2
SlurmctldHost=$host($net.1)
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
KillWait=2
SlurmdTimeout=5
MessageTimeout=3
JobRequeue=1
FirstJobId=20001
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool/%n
SlurmctldPidFile=$dir/run/slurmctld.pid
SlurmdPidFile=$dir/run/slurmd-%n.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd-%n.log
SlurmctldPort=$ctld_port
SlurmdPort=$slurmd_port
${node_lines}PartitionName=two Nodes=$(IFS=,; echo "${nodes[*]}") Default=YES MaxTime=INFINITE State=UP
CONF
export SLURM_CONF="$dir/slurm.conf"
slurmctld -c -f "$SLURM_CONF"
for node in "${nodes[@]}"; do
    start_node "$node"
done
if wait_for idle "${nodes[@]}"; then
    echo "$SLURM_CONF"
    exit 0
fi
trap - ERR
echo "SLURM did not come up; see $dir/log" >&2
stop
exit 1
