#!/usr/bin/env bash
# Stop what tools/slurm/start-local-slurm.sh started, by the pid files under STATE_DIR/run
# (never by process name, so other SLURM or MariaDB instances on the machine are untouched).
#
#   sudo tools/slurm/stop-local-slurm.sh [STATE_DIR] [--purge]   (default /tmp/mriaudit-slurm)
#
# Jobs still queued or running on this cluster are cancelled first. munged is stopped only
# when the start script started it. --purge also deletes STATE_DIR (database, logs, state).
set -uo pipefail

STATE=${MRIAUDIT_SLURM_DIR:-/tmp/mriaudit-slurm}
PURGE=0
for arg in "$@"; do
  case $arg in
    --purge) PURGE=1 ;;
    *) STATE=$arg ;;
  esac
done
STATE=$(realpath -m "$STATE")
RUN=$STATE/run

say() { printf '[slurm %s] %s\n' "$(date +%T)" "$*"; }

alive() {
  local pid
  pid=$(cat "$1" 2>/dev/null) || return 1
  [[ -n $pid && $(cat "/proc/$pid/comm" 2>/dev/null) == "$2" ]]
}

halt() {
  local pid i
  if alive "$1" "$2"; then
    pid=$(cat "$1")
    say "stopping $2 (pid $pid)"
    kill "$pid" 2>/dev/null || true
    for i in $(seq 150); do
      [[ -d /proc/$pid ]] || break
      sleep 0.1
    done
    if [[ -d /proc/$pid ]]; then
      say "$2 ignored SIGTERM for 15 s, sending SIGKILL"
      kill -9 "$pid" 2>/dev/null || true
    fi
  fi
  rm -f "$1"
}

if alive "$RUN/slurmctld.pid" slurmctld; then
  export SLURM_CONF=$STATE/etc/slurm.conf
  jobs=$(squeue -h -o %A 2>/dev/null | tr '\n' ' ')
  if [[ -n ${jobs// /} ]]; then
    say "cancelling jobs $jobs"
    # shellcheck disable=SC2086  # one argument per job id
    scancel $jobs 2>/dev/null || true
    for _ in $(seq 50); do
      [[ -z $(squeue -h -o %A 2>/dev/null) ]] && break
      sleep 0.2
    done
  fi
fi

halt "$RUN/slurmd.pid" slurmd
halt "$RUN/slurmctld.pid" slurmctld
halt "$RUN/slurmdbd.pid" slurmdbd
halt "$RUN/mariadb.pid" mariadbd
halt "$RUN/munged.pid" munged

# Remove the /etc/slurm links only when they still point into this STATE_DIR.
for f in slurm.conf gres.conf; do
  if [[ -L /etc/slurm/$f && $(readlink "/etc/slurm/$f") == "$STATE/etc/$f" ]]; then
    rm -f "/etc/slurm/$f"
  fi
done
if ((PURGE)); then
  say "removing $STATE"
  rm -rf "$STATE"
fi
say "stopped"
