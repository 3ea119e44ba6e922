#!/usr/bin/env bash
# Multi-node on one machine: two torchrun agents (--nnodes 2, one process each, c10d on 127.0.0.1) against
# `--nproc 2` (one agent, two processes) with the same flags; prints both runs' per-epoch losses and timings.
# Usage: benchmarks/two_agents.sh [OUT_DIR] [extra train flags...]   (python: $PYTHON or python3)
set -euo pipefail
python=${PYTHON:-python3}
out=${1:-/tmp/cifarlab-two-agents}; shift || true
flags=(--dataset synthetic --subset 64 --test-subset 32 --batch-size 8 --epochs 3 --seed 5 --lr 0.02 "$@")
rm -rf "$out" && mkdir -p "$out"
port=$("$python" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')

echo "== one agent, --nproc 2"
"$python" -m cifarlab train --nproc 2 --out "$out/nproc2" "${flags[@]}"
echo "== two agents, --nnodes 2 --nproc 1 --rdzv-endpoint 127.0.0.1:$port (the other agent's console: $out/agent1.log; global rank 0, which prints, is on either)"
"$python" -m cifarlab train --nnodes 2 --nproc 1 --rdzv-endpoint "127.0.0.1:$port" --rdzv-id two-agents \
    --out "$out/nnodes2" "${flags[@]}" >"$out/agent1.log" 2>&1 &
agent1=$!
"$python" -m cifarlab train --nnodes 2 --nproc 1 --rdzv-endpoint "127.0.0.1:$port" --rdzv-id two-agents \
    --out "$out/nnodes2" "${flags[@]}"
wait "$agent1"
"$python" - "$out" <<'EOF'
import json, sys
from pathlib import Path

def load(folder):
    (run,) = [p for p in Path(folder).iterdir() if p.is_dir()]
    return json.loads((run / "run.json").read_text()), json.loads((run / "records.json").read_text())
(r1, a), (r2, b) = load(f"{sys.argv[1]}/nproc2"), load(f"{sys.argv[1]}/nnodes2")
print(f"world size {r1['distributed']['world_size']} vs {r2['distributed']['world_size']}, global batch "
      f"{r1['distributed']['global_batch_size']} vs {r2['distributed']['global_batch_size']}")
print(f"{'epoch':>5} {'images':>6} {'train_loss --nproc 2':>21} {'train_loss 2 agents':>21} {'epoch_s --nproc 2':>18} {'epoch_s 2 agents':>17}")
for x, y in zip(a, b):
    print(f"{x['epoch']:>5} {y['images']:>6} {x['train_loss']:>21.12f} {y['train_loss']:>21.12f} {x['epoch_s']:>18.2f} {y['epoch_s']:>17.2f}")
same = all(x["train_loss"] == y["train_loss"] and x["test_loss"] == y["test_loss"] for x, y in zip(a, b))
print("per-epoch losses equal" if same else "LOSSES DIFFER")
sys.exit(0 if same else 1)
EOF
