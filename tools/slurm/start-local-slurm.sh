#!/usr/bin/env bash
# Start a real single-node SLURM cluster on 127.0.0.1 for the SLURM workflow tests.
#
#   sudo tools/slurm/start-local-slurm.sh [STATE_DIR]     (default /tmp/mriaudit-slurm)
#   sudo tools/slurm/start-local-slurm.sh --install-only  (only the Debian packages)
#   sudo tools/slurm/stop-local-slurm.sh  [STATE_DIR] [--purge]
#
# Debian 12 only: installs slurm-wlm 22.05 (slurmctld, slurmd, client), munge,
# slurmdbd and mariadb-server when missing, writes every config under STATE_DIR,
# starts munged, a private MariaDB on a loopback port, slurmdbd, slurmctld and
# slurmd by hand (no systemd), waits until the node is idle and runs `srun true`.
# Running it again is safe: live daemons with an unchanged config are kept.
#
# Partitions "debug" (the default) and "gpu" on the same node, so profiles/slurm (which
# names no partition: its jobs go to the default one) and a site profile that sends the
# model rules to "gpu" (profiles/slurm-ci) both run here; one fake GPU (gres.conf File=/dev/null, so `--gpus=1` is accepted on a
# CPU-only machine; code must still check that CUDA works), accounting through
# slurmdbd (the executor plugin polls with sacct), job comments stored (sacct shows
# the rule of each job) and memory enforced by polling (JobAcctGatherParams=
# OverMemoryKill: a job above its --mem is killed as OUT_OF_MEMORY, no cgroups needed).
#
# Environment (all optional):
#   MRIAUDIT_SLURM_CPUS       CPUs advertised (default: what `slurmd -C` finds)
#   MRIAUDIT_SLURM_MEM_MB     memory advertised (default: 90 % of what slurmd finds)
#   MRIAUDIT_SLURM_GPUS       fake GPUs on the node (default 1; 0 = none)
#   MRIAUDIT_SLURM_PARTITIONS partition names, the first one the default (default "debug gpu");
#                             every partition holds the node
#   MRIAUDIT_SLURM_ACCOUNT    account created for the calling user (default ci)
#   MRIAUDIT_SLURM_PORTS      "slurmctld slurmd slurmdbd mariadb" (default "6817 6818 6819 3307")
#   MRIAUDIT_SLURM_NO_APT=1   never run apt-get; fail when a package is missing
set -euo pipefail

INSTALL_ONLY=0
if [[ ${1:-} == --install-only ]]; then
  INSTALL_ONLY=1
  shift
fi
STATE=$(realpath -m "${1:-${MRIAUDIT_SLURM_DIR:-/tmp/mriaudit-slurm}}")
GPUS=${MRIAUDIT_SLURM_GPUS:-1}
read -r -a PARTITIONS <<<"${MRIAUDIT_SLURM_PARTITIONS:-debug gpu}"
ACCOUNT=${MRIAUDIT_SLURM_ACCOUNT:-ci}
read -r CTLD_PORT SLURMD_PORT DBD_PORT DB_PORT <<<"${MRIAUDIT_SLURM_PORTS:-6817 6818 6819 3307}"
CLUSTER=mriaudit
NODE=$(hostname -s)
USER_NAME=$(id -un)
# The database only listens on 127.0.0.1 and lives in STATE; the password guards nothing else.
DB_PASSWORD=mriaudit-local
ETC=$STATE/etc RUN=$STATE/run LOG=$STATE/log

say() { printf '[slurm %s] %s\n' "$(date +%T)" "$*"; }
fail() {
  say "ERROR: $*" >&2
  exit 1
}

[[ $(id -u) == 0 ]] || fail "run as root: it installs packages, starts daemons and links /etc/slurm"
grep -q '^ID=debian' /etc/os-release 2>/dev/null || fail "written for Debian 12 (slurm-wlm 22.05)"

install_packages() {
  local pkgs=(slurmctld slurmd slurm-client slurmdbd munge mariadb-server) missing=() p
  for p in "${pkgs[@]}"; do
    dpkg-query -W -f='${db:Status-Status}' "$p" 2>/dev/null | grep -qx installed || missing+=("$p")
  done
  ((${#missing[@]})) || return 0
  [[ ${MRIAUDIT_SLURM_NO_APT:-0} == 1 ]] && fail "missing packages: ${missing[*]}"
  say "apt-get install ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  # Without systemd the postinst scripts start nothing; the daemons are started below.
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

# alive PIDFILE NAME: the pid in PIDFILE is a running process called NAME.
alive() {
  local pid
  pid=$(cat "$1" 2>/dev/null) || return 1
  [[ -n $pid && $(cat "/proc/$pid/comm" 2>/dev/null) == "$2" ]]
}

# halt PIDFILE NAME: stop that process (TERM, then KILL after 15 s) and remove the file.
halt() {
  local pid i
  if alive "$1" "$2"; then
    pid=$(cat "$1")
    kill "$pid" 2>/dev/null || true
    for i in $(seq 150); do
      [[ -d /proc/$pid ]] || break
      sleep 0.1
    done
    kill -9 "$pid" 2>/dev/null || true
  fi
  rm -f "$1"
}

# listening PORT SECONDS: wait until something accepts TCP connections on 127.0.0.1:PORT.
listening() {
  local i
  for i in $(seq $(($2 * 10))); do
    (: <>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
    sleep 0.1
  done
  return 1
}

# check_port PIDFILE NAME PORT: when our NAME is not running, nothing else may hold PORT
# (checked before /etc/slurm is touched, so another cluster on these ports keeps working).
check_port() {
  alive "$1" "$2" && return 0
  if (: <>"/dev/tcp/127.0.0.1/$3") 2>/dev/null; then
    fail "127.0.0.1:$3 (for $2) is taken by another process; another cluster? see MRIAUDIT_SLURM_PORTS"
  fi
}

# replace FILE MODE < content: write FILE only when the content differs; 0 = changed.
replace() {
  local new
  new=$(mktemp "$1.XXXXXX")
  cat >"$new"
  chmod "$2" "$new"
  if cmp -s "$new" "$1"; then
    rm -f "$new"
    return 1
  fi
  mv -f "$new" "$1"
}

write_configs() {
  local cpus mem found_cpus found_mem gres_line="" gres_types="" partition default=YES partition_lines=""
  read -r found_cpus found_mem < <(slurmd -C | tr ' ' '\n' | awk -F= '$1=="CPUs"{c=$2} $1=="RealMemory"{m=$2} END{print c, m}')
  cpus=${MRIAUDIT_SLURM_CPUS:-$found_cpus}
  mem=${MRIAUDIT_SLURM_MEM_MB:-$((found_mem * 9 / 10))}
  if ((GPUS > 0)); then
    gres_types="GresTypes=gpu"
    gres_line="Gres=gpu:$GPUS"
  fi
  ((${#PARTITIONS[@]})) || fail "MRIAUDIT_SLURM_PARTITIONS names no partition"
  for partition in "${PARTITIONS[@]}"; do
    partition_lines+="PartitionName=$partition Nodes=$NODE Default=$default MaxTime=INFINITE State=UP"$'\n'
    default=NO
  done
  CONFIG_CHANGED=0
  replace "$ETC/slurm.conf" 644 <<EOF && CONFIG_CHANGED=1
# Written by tools/slurm/start-local-slurm.sh: one node on 127.0.0.1, for tests only.
ClusterName=$CLUSTER
SlurmctldHost=$NODE(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CryptoType=crypto/munge
MpiDefault=none
MailProg=/bin/true
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/slurmd
SlurmctldPidFile=$RUN/slurmctld.pid
SlurmdPidFile=$RUN/slurmd.pid
SlurmctldLogFile=$LOG/slurmctld.log
SlurmdLogFile=$LOG/slurmd.log
# Process tracking and affinity without cgroups: works in containers and small VMs.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/affinity
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SchedulerType=sched/backfill
ReturnToService=2
# squeue keeps finished jobs 5 min, enough for the plugin's squeue fallback.
MinJobAge=300
InactiveLimit=0
KillWait=5
Waittime=0
DefMemPerCPU=1000
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort=$DBD_PORT
AccountingStorageEnforce=associations
AccountingStorageTRES=gres/gpu
# The plugin puts the rule name in --comment; storing it lets sacct show which rule ran.
AccountingStoreFlags=job_comment
# Memory limits are enforced by polling every 2 s (no cgroups): over --mem = OUT_OF_MEMORY.
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=task=2
JobAcctGatherParams=OverMemoryKill
$gres_types
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem $gres_line State=UNKNOWN
# The first partition is the default: jobs without -p go there.
${partition_lines%$'\n'}
EOF
  {
    # A count without a device file drains the node; /dev/null exists everywhere.
    for ((i = 0; i < GPUS; i++)); do echo "NodeName=$NODE Name=gpu File=/dev/null"; done
  } | replace "$ETC/gres.conf" 644 && CONFIG_CHANGED=1
  replace "$ETC/slurmdbd.conf" 600 <<EOF && DBD_CHANGED=1 || DBD_CHANGED=0
AuthType=auth/munge
DbdAddr=127.0.0.1
DbdHost=localhost
DbdPort=$DBD_PORT
SlurmUser=root
LogFile=$LOG/slurmdbd.log
PidFile=$RUN/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=$DB_PASSWORD
StorageLoc=slurm_acct_db
EOF
  NODE_CPUS=$cpus NODE_MEM=$mem
}

# Clients inside jobs must find the cluster without $SLURM_CONF (the executor plugin
# drops SLURM_* variables before its inner srun), so /etc/slurm points at STATE.
link_etc() {
  local f
  mkdir -p /etc/slurm
  for f in slurm.conf gres.conf; do
    if [[ -e /etc/slurm/$f && ! -L /etc/slurm/$f ]]; then
      fail "/etc/slurm/$f is a real file (another SLURM set-up?); not replacing it"
    fi
    ln -sfn "$ETC/$f" "/etc/slurm/$f"
  done
}

start_munge() {
  munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && return 0
  if [[ ! -s /etc/munge/munge.key ]]; then
    say "creating /etc/munge/munge.key"
    mungekey --create --keyfile=/etc/munge/munge.key
  fi
  chown munge:munge /etc/munge/munge.key
  chmod 400 /etc/munge/munge.key
  install -d -o munge -g munge -m 0755 /run/munge
  say "starting munged"
  runuser -u munge -- /usr/sbin/munged --pid-file=/run/munge/munged.pid
  for _ in $(seq 50); do
    munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break
    sleep 0.1
  done
  # Our own copy of the pid file tells stop-local-slurm.sh that munged is ours to stop.
  cp /run/munge/munged.pid "$RUN/munged.pid"
  munge -n | unmunge >/dev/null || fail "munged does not answer"
}

start_database() {
  local data=$STATE/mariadb sock=$RUN/mariadb.sock
  if [[ ! -d $data/mysql ]]; then
    say "initialising MariaDB in $data"
    mariadb-install-db --no-defaults --datadir="$data" --user=root --skip-test-db \
      --auth-root-authentication-method=socket >"$LOG/mariadb-install.log" 2>&1 ||
      fail "mariadb-install-db failed (see $LOG/mariadb-install.log)"
  fi
  if ! alive "$RUN/mariadb.pid" mariadbd; then
    say "starting MariaDB on 127.0.0.1:$DB_PORT"
    mariadbd --no-defaults --datadir="$data" --user=root --socket="$sock" \
      --pid-file="$RUN/mariadb.pid" --bind-address=127.0.0.1 --port="$DB_PORT" \
      --log-error="$LOG/mariadb.log" --innodb-buffer-pool-size=64M \
      --innodb-lock-wait-timeout=900 </dev/null >/dev/null 2>&1 &
    listening "$DB_PORT" 30 || fail "MariaDB did not start (see $LOG/mariadb.log)"
  fi
  mariadb --no-defaults -S "$sock" -uroot -e "
    CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY '$DB_PASSWORD';
    CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY '$DB_PASSWORD';
    GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';
    GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';" || fail "cannot set up the slurm database user"
}

start_slurmdbd() {
  ((DBD_CHANGED)) && halt "$RUN/slurmdbd.pid" slurmdbd
  if ! alive "$RUN/slurmdbd.pid" slurmdbd; then
    say "starting slurmdbd"
    slurmdbd
    listening "$DBD_PORT" 30 || fail "slurmdbd did not start (see $LOG/slurmdbd.log)"
  fi
  # Cluster, account and user must be known before slurmctld registers (enforced associations).
  sacctmgr -n -P list cluster format=cluster | grep -qx "$CLUSTER" ||
    sacctmgr -i add cluster "$CLUSTER" >/dev/null
  sacctmgr -n -P list account format=account | grep -qx "$ACCOUNT" ||
    sacctmgr -i add account "$ACCOUNT" cluster="$CLUSTER" description=tests organization=tests >/dev/null
  sacctmgr -n -P list assoc user="$USER_NAME" account="$ACCOUNT" format=account | grep -qx "$ACCOUNT" ||
    sacctmgr -i add user "$USER_NAME" account="$ACCOUNT" defaultaccount="$ACCOUNT" cluster="$CLUSTER" >/dev/null
}

start_slurm() {
  if ((CONFIG_CHANGED)); then
    halt "$RUN/slurmd.pid" slurmd
    halt "$RUN/slurmctld.pid" slurmctld
  fi
  if ! alive "$RUN/slurmctld.pid" slurmctld; then
    say "starting slurmctld"
    slurmctld -i
    listening "$CTLD_PORT" 30 || fail "slurmctld did not start (see $LOG/slurmctld.log)"
  fi
  if ! alive "$RUN/slurmd.pid" slurmd; then
    say "starting slurmd on node $NODE"
    slurmd -N "$NODE"
  fi
}

wait_until_idle() {
  local state=""
  for _ in $(seq 300); do
    state=$(sinfo -h -n "$NODE" -o %T 2>/dev/null | head -n1 || true)
    case $state in
      idle* | mixed* | allocated* | completing*) break ;;
      # A node restarted with a new config may come back drained; it is ours, resume it.
      drain* | down* | inval*) scontrol update nodename="$NODE" state=resume 2>/dev/null || true ;;
    esac
    sleep 0.2
  done
  case $state in
    idle* | mixed* | allocated* | completing*) ;;
    *)
      scontrol show node "$NODE" >&2 || true
      fail "node $NODE is '$state' (see $LOG/slurmd.log and $LOG/slurmctld.log)"
      ;;
  esac
  timeout 60 srun -N1 -n1 -t 1 true || fail "smoke test 'srun true' failed"
}

install_packages
((INSTALL_ONLY)) && exit 0
mkdir -p "$ETC" "$RUN" "$LOG" "$STATE/ctld" "$STATE/slurmd"
check_port "$RUN/mariadb.pid" mariadbd "$DB_PORT"
check_port "$RUN/slurmdbd.pid" slurmdbd "$DBD_PORT"
check_port "$RUN/slurmctld.pid" slurmctld "$CTLD_PORT"
check_port "$RUN/slurmd.pid" slurmd "$SLURMD_PORT"
write_configs
link_etc
# Daemons read slurmdbd.conf and gres.conf next to the slurm.conf they are given.
export SLURM_CONF=$ETC/slurm.conf
start_munge
start_database
start_slurmdbd
start_slurm
wait_until_idle

say "cluster '$CLUSTER' ready: node $NODE, $NODE_CPUS CPUs, $NODE_MEM MB, $GPUS fake GPU(s), partitions ${PARTITIONS[*]} (default ${PARTITIONS[0]}), account $ACCOUNT"
sinfo -o '%P %a %T %c %m %G'
say "logs in $LOG; stop with $(dirname "$(realpath "$0")")/stop-local-slurm.sh $STATE"
