#!/usr/bin/env bash
# Stops the cluster of cluster/local/start.sh: cancels jobs, lets the queue drain, shuts the daemons
# down and waits for each by pid (read before shutdown: the daemons delete their pid files early).
set -uo pipefail
DIR=${SLURM_LOCAL_DIR:-/tmp/balcony-slurm}
export SLURM_CONF=$DIR/slurm.conf
[ -f "$SLURM_CONF" ] || { echo "local SLURM: nothing to stop under $DIR"; exit 0; }

pids=$(cat "$DIR"/slurmctld.pid "$DIR"/slurmd-*.pid 2>/dev/null || true)
munge_pid=$(cat "$DIR/munge/munged.pid" 2>/dev/null || true)

alive() {  # running and not a zombie (exited daemons can linger as zombies in a sandbox)
  local state
  state=$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null) || return 1
  [ "$state" != Z ]
}

if timeout 5 scontrol ping 2>/dev/null | grep -q UP; then
  scancel --full --user "$(id -un)" 2>/dev/null || true
  for _ in $(seq 1 60); do [ -z "$(squeue -h -t running,completing 2>/dev/null)" ] && break; sleep 0.5; done
  scontrol shutdown >/dev/null 2>&1 || true
fi
for pid in $pids; do
  for _ in $(seq 1 40); do alive "$pid" || break; sleep 0.25; done
  alive "$pid" && kill -9 "$pid" 2>/dev/null
done
if [ -n "$munge_pid" ]; then
  kill "$munge_pid" 2>/dev/null
  for _ in $(seq 1 20); do alive "$munge_pid" || break; sleep 0.25; done
fi
rm -f "$SLURM_CONF"
echo "local SLURM: stopped (logs kept in $DIR/log/)"
