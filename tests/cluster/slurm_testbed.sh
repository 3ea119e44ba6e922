#!/usr/bin/env bash
# The real SLURM test tier (opt-in; docs/cluster.md): a one-node SLURM cluster on this machine, then
#   1. `cifarlab slurm -- train --nproc 2 ...` submitted with sbatch, run to the end (the reference);
#   2. the same job again, preempted after its first checkpoint (`scancel --signal=USR1 --batch`, what
#      `--signal=B:USR1@120` does before a time limit): it stops at a step boundary, requeues itself with
#      `scontrol requeue`, and the requeued job continues the same run folder (--resume auto);
#   3. a check that the preempted run's per-epoch losses equal the reference's.
# Needs root and Debian's slurm-wlm and munge (installed here when missing). Daemons are stopped at the end
# (KEEP_SLURM=1 keeps them). Usage: sudo tests/cluster/slurm_testbed.sh [WORKDIR]   (python: $PYTHON or python3)
set -euo pipefail

repo=$(cd "$(dirname "$0")/../.." && pwd)
work=${1:-/tmp/cifarlab-slurm-testbed}
python=${PYTHON:-python3}
epochs=${EPOCHS:-3}
say() { echo "[testbed $(date -u +%T)] $*"; }

[ "$(id -u)" = 0 ] || { echo "slurm_testbed.sh: run it as root (it starts munged, slurmctld and slurmd)" >&2; exit 2; }
if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
    say "installing Debian's slurm-wlm and munge"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge >/dev/null
fi

rm -rf "$work" && mkdir -p "$work"/{etc,state,spool,log,run,munge}
host=$(hostname -s)
cpus=$(nproc)
export SLURM_CONF=$work/etc/slurm.conf
cat >"$SLURM_CONF" <<EOF
# one node, this machine: no cgroups, no accounting (the test bed, not a production cluster)
ClusterName=cifarlab-testbed
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MpiDefault=none
ReturnToService=2
JobRequeue=1
RequeueExit=138
KillWait=30
StateSaveLocation=$work/state
SlurmdSpoolDir=$work/spool
SlurmctldPidFile=$work/run/slurmctld.pid
SlurmdPidFile=$work/run/slurmd.pid
SlurmctldLogFile=$work/log/slurmctld.log
SlurmdLogFile=$work/log/slurmd.log
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF

munge_sock=$work/munge/munge.socket
cleanup() {
    if [ "${KEEP_SLURM:-0}" = 1 ]; then say "KEEP_SLURM=1: daemons left running (SLURM_CONF=$SLURM_CONF)"; return; fi
    say "stopping slurmd, slurmctld, munged"
    for f in "$work/run/slurmd.pid" "$work/run/slurmctld.pid" "$work/munge/munged.pid"; do
        [ -f "$f" ] && kill "$(cat "$f")" 2>/dev/null || true
    done
}
trap cleanup EXIT

say "munge key and munged"
dd if=/dev/urandom of="$work/munge/munge.key" bs=1024 count=1 status=none
chmod 400 "$work/munge/munge.key"
munged --force --key-file="$work/munge/munge.key" --socket="$munge_sock" --pid-file="$work/munge/munged.pid" \
       --log-file="$work/log/munged.log" --seed-file="$work/munge/seed"
# slurm's munge plugin finds the socket through this (AuthInfo in slurm.conf)
sed -i "s|^AuthType=auth/munge|AuthType=auth/munge\nAuthInfo=socket=$munge_sock|" "$SLURM_CONF"
say "slurmctld and slurmd (Slurm $(slurmctld -V | awk '{print $2}'), node $host, $cpus CPUs)"
slurmctld -f "$SLURM_CONF"
slurmd -f "$SLURM_CONF" -N "$host"
for _ in $(seq 60); do sinfo -h -o %T 2>/dev/null | grep -qx idle && break; sleep 1; done
sinfo

export PYTHONPATH=$repo/src${PYTHONPATH:+:$PYTHONPATH}
cd "$work"
train=(train --nproc 2 --dataset synthetic --subset 64 --test-subset 16 --batch-size 8 --epochs "$epochs" --seed 7
       --lr 0.02 --out "$work/runs")

wait_for_state() {  # job id, states (regex), seconds
    local state
    for _ in $(seq "$3"); do
        state=$(scontrol show job "$1" 2>/dev/null | grep -o 'JobState=[A-Z_]*' | cut -d= -f2)
        if [[ "$state" =~ ^($2)$ ]]; then echo "$state"; return 0; fi
        sleep 1
    done
    echo "timeout (last state ${state:-none})"; return 1
}

submit() {  # prints cifarlab's lines on stderr, the job id on stdout
    local out
    out=$("$python" -m cifarlab slurm --cpus-per-task "$cpus" -- "${train[@]}")
    echo "$out" | sed 's/^/    /' >&2
    echo "$out" | awk '/^submitted job/{print $3}' | tr -d :
}

say "job 1: the reference, run to the end"
job1=$(submit)
wait_for_state "$job1" "COMPLETED|FAILED|CANCELLED|TIMEOUT|NODE_FAIL" 1200
run1=$(ls -d "$work"/runs/*-train | head -n 1)

say "job 2: the same run, preempted after its first checkpoint"
job2=$(submit)
run2=$(ls -d "$work"/runs/*-train | grep -v "^$run1$" | head -n 1)
for _ in $(seq 1200); do [ -f "$run2/checkpoint.pt" ] && break; sleep 1; done
say "checkpoint of epoch 1 in $run2: scancel --signal=USR1 --batch $job2"
scancel --signal=USR1 --batch "$job2"
for _ in $(seq 300); do
    [ "$(scontrol show job "$job2" | grep -o 'Restarts=[0-9]*' | cut -d= -f2)" -ge 1 ] && break; sleep 1
done
scontrol show job "$job2" | grep -o 'JobState=[A-Z_]* \|Restarts=[0-9]*' | tr '\n' ' '; echo
say "job $job2 requeued; waiting for it to finish"
wait_for_state "$job2" "COMPLETED|FAILED|CANCELLED|TIMEOUT|NODE_FAIL" 1800

for job in "$job1" "$job2"; do
    say "job $job's log:"
    sed 's/^/    /' "$(ls "$work"/runs/*/slurm-"$job".out)"
done

say "comparing the two run folders"
"$python" - "$run1" "$run2" <<'EOF'
import json, sys
from pathlib import Path

ref, pre = (Path(p) for p in sys.argv[1:3])
def load(run):
    return json.loads((run / "run.json").read_text()), json.loads((run / "records.json").read_text())
(r1, rec1), (r2, rec2) = load(ref), load(pre)
print(f"reference  {ref.name}: status {r1['status']}, epochs {[r['epoch'] for r in rec1]}")
print(f"preempted  {pre.name}: status {r2['status']}, epochs {[r['epoch'] for r in rec2]}, "
      f"restarts {json.dumps(r2.get('restarts'))}, resumed {json.dumps(r2.get('resumed'))}")
print(f"{'epoch':>5} {'train_loss reference':>22} {'train_loss preempted':>22} {'test_loss reference':>22} {'test_loss preempted':>22}")
for a, b in zip(rec1, rec2):
    print(f"{a['epoch']:>5} {a['train_loss']:>22.12f} {b['train_loss']:>22.12f} {a['test_loss']:>22.12f} {b['test_loss']:>22.12f}")
ok = (r1["status"] == r2["status"] == "completed" and len(rec1) == len(rec2)
      and all(a["train_loss"] == b["train_loss"] and a["test_loss"] == b["test_loss"] for a, b in zip(rec1, rec2))
      and len(r2.get("restarts") or []) >= 1)
print("RESULT:", "per-epoch losses equal, the preempted run was requeued and resumed" if ok else "MISMATCH")
sys.exit(0 if ok else 1)
EOF
