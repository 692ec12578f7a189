#!/usr/bin/env bash
# A throw-away SLURM cluster on this machine: munge, slurmctld and NODES emulated slurmd nodes, all on
# 127.0.0.1, with private sockets, ports and state under $SLURM_LOCAL_DIR (default /tmp/balcony-slurm).
#
#   cluster/local/start.sh [NODES]                    # default 2; installs Debian's SLURM if missing (root)
#   export SLURM_CONF=/tmp/balcony-slurm/slurm.conf   # sbatch / squeue / srun now talk to it
#   cluster/local/stop.sh
#
# No systemd, no cgroups: processes are tracked by pid (proctrack/linuxproc) and nodes advertise
# more CPUs than the machine has (config_overrides), so a 2-core machine can host 2-node jobs.
set -euo pipefail
NODES=${1:-2}
DIR=${SLURM_LOCAL_DIR:-/tmp/balcony-slurm}
CPUS=${SLURM_LOCAL_CPUS:-4}
MEM_MB=${SLURM_LOCAL_MEM_MB:-8000}
PORT=${SLURM_LOCAL_PORT:-16817}   # slurmctld; node i listens on PORT+i
CONF=$DIR/slurm.conf
export SLURM_CONF=$CONF

if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v sbatch >/dev/null \
   || ! command -v munged >/dev/null; then
  if [ "$(id -u)" != 0 ]; then
    echo "error: SLURM is not installed; as root: apt-get install slurmctld slurmd slurm-client munge" >&2
    exit 1
  fi
  echo "local SLURM: installing Debian's slurmctld slurmd slurm-client munge"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null
fi

if [ -f "$CONF" ] && timeout 5 scontrol ping 2>/dev/null | grep -q UP; then
  running=$(sinfo -h -N -o %N | sort -u | wc -l)
  if [ "$running" != "$NODES" ]; then
    echo "error: a local cluster with $running nodes is already running; stop it first: cluster/local/stop.sh" >&2
    exit 1
  fi
  echo "local SLURM: already up with $NODES nodes; export SLURM_CONF=$CONF"
  exit 0
fi

started=$(date +%s%N)
rm -rf "$DIR/state" "$DIR/spool" "$DIR/log"
mkdir -p "$DIR/munge" "$DIR/state" "$DIR/log"
chmod 0755 "$DIR" "$DIR/munge"   # munged refuses a socket directory writable by group or other

# munge: a private key, socket and pid file (no system munged needed)
[ -f "$DIR/munge/munge.key" ] || dd if=/dev/urandom of="$DIR/munge/munge.key" bs=1024 count=1 status=none
chmod 0600 "$DIR/munge/munge.key"
munged --key-file="$DIR/munge/munge.key" --socket="$DIR/munge/munge.socket" --pid-file="$DIR/munge/munged.pid" \
       --log-file="$DIR/log/munged.log" --seed-file="$DIR/munge/munged.seed" --force

cat > "$CONF" <<CONF
# Written by cluster/local/start.sh; throw-away single-host cluster.
ClusterName=balcony-local
SlurmctldHost=$(hostname -s)(127.0.0.1)
SlurmctldPort=$PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$DIR/munge/munge.socket
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool/%n
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd-%n.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
MpiDefault=none
MailProg=/bin/true
SchedulerParameters=batch_sched_delay=0
SlurmdParameters=config_overrides
ReturnToService=2
MinJobAge=3600
KillWait=5
InactiveLimit=0
JobCompType=jobcomp/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
NodeName=n[1-$NODES] NodeAddr=127.0.0.1 Port=$((PORT + 1))-$((PORT + NODES)) CPUs=$CPUS Sockets=1 CoresPerSocket=$CPUS ThreadsPerCore=1 RealMemory=$MEM_MB State=UNKNOWN
PartitionName=local Nodes=ALL Default=YES MaxTime=INFINITE State=UP
CONF

slurmctld -f "$CONF"
for i in $(seq 1 "$NODES"); do
  mkdir -p "$DIR/spool/n$i"
  slurmd -f "$CONF" -N "n$i"
done

for _ in $(seq 1 120); do
  # "idle" exactly: a node slurmd has not registered yet shows as "idle*" (not responding)
  idle=$(sinfo -h -N -o '%N %T' 2>/dev/null | sort -u | awk '$2 == "idle"' | wc -l)
  [ "$idle" = "$NODES" ] && break
  sleep 0.25
done
if [ "$idle" != "$NODES" ]; then
  echo "error: $idle of $NODES nodes came up; logs in $DIR/log/" >&2
  exit 1
fi
ms=$(( ($(date +%s%N) - started) / 1000000 ))
echo "local SLURM: $NODES nodes up in $ms ms; export SLURM_CONF=$CONF"
