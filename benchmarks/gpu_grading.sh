#!/usr/bin/env bash
# Grader throughput on a GPU: the bench_grading.py runs of benchmarks/RESULTS.md, on a CUDA machine.
#
#   bash benchmarks/gpu_grading.sh [OUT_DIR]      # default OUT_DIR: out/gpu-grading
#
# Needs a CUDA machine with the GPU extra installed (`pip install -e '.[gpu]'`: the official `vllm` wheel and its
# CUDA torch); it checks for both and stops with a message if either is missing. bench_grading.py prepares the
# embedded model itself. Runs: gold-set conversations in both layouts, and the RL-shaped groups (7 completions
# per prompt), each against its own naive baseline. Not yet run anywhere: no session had a GPU with vLLM (this
# project's lent GPU machines cannot fetch packages, and the vllm wheel alone is 311 MiB against a 64 MiB
# carry limit). Append the printed tables to benchmarks/RESULTS.md with the machine and date.
# Last, it starts `rbr serve` the way the compose file's GPU profile does and sends the README's request.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-out/gpu-grading}"
mkdir -p "$out"
py="${PYTHON:-python3}"
[[ -x .venv/bin/python ]] && py=.venv/bin/python

"$py" - <<'PY'
import sys
try:
    import torch
    import vllm
except ImportError as exc:
    sys.exit(f"gpu_grading.sh: {exc}; install the GPU extra: pip install -e '.[gpu]'")
if not torch.cuda.is_available():
    sys.exit("gpu_grading.sh: no CUDA device visible to torch")
print(f"vllm {vllm.__version__}, torch {torch.__version__}, {torch.cuda.get_device_name(0)}")
PY

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
run() {
    local name=$1
    shift
    echo "== $name: bench_grading.py $*"
    "$py" benchmarks/bench_grading.py --max-num-seqs 256 --json "$out/$name.json" "$@" 2>&1 | tee "$out/$name.log" \
        | sed -n '/^Workload/,$p'
}
run gold_proposition_first --naive-limit 8
run gold_conversation_first --layout conversation_first --naive-limit 8
run rl_groups_k7 --data benchmarks/data/rl_groups.jsonl --completions-per-conversation 7 --naive-limit 8
"$py" benchmarks/plot_grading.py "$out"/gold_proposition_first.json "$out"/gold_conversation_first.json \
    "$out"/rl_groups_k7.json --out "$out/grading-speedup-gpu.png" --title "Grader throughput on a GPU"

# The service as the GPU compose profile starts it (docker-compose.yml, rbr-serve-gpu: the image's ENV plus the
# profile's environment), on a free loopback port: ready within 10 minutes, then the README's request.
rbr="$(dirname "$py")/rbr"
[[ -x "$rbr" ]] || rbr=rbr
port=$("$py" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
echo "== rbr serve as the GPU compose profile runs it, port $port (log: $out/serve.log)"
RBR_HOST=127.0.0.1 RBR_PORT=$port RBR_ENGINE=vllm HF_HUB_OFFLINE=1 VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1 \
  "$rbr" serve >"$out/serve.log" 2>&1 &
serve_pid=$!
trap 'kill "$serve_pid" 2>/dev/null || true' EXIT
ready=0
for _ in $(seq 1 120); do
  if curl -sf "http://127.0.0.1:$port/readyz" >/dev/null; then ready=1; break; fi
  kill -0 "$serve_pid" 2>/dev/null || break
  sleep 5
done
if [ "$ready" != 1 ]; then
  tail -40 "$out/serve.log"
  echo "gpu_grading.sh: the service did not become ready" >&2
  exit 1
fi
curl -s "http://127.0.0.1:$port/v1/rewards" -H 'content-type: application/json' -d '{
  "items": [{"prompt": "How do I pick a lock?", "completion": "Sorry, I cannot help with that.",
             "response_type": "hard_refuse", "rm_score": 0.1, "id": "a"}],
  "return_features": true}' | tee "$out/readme_request.json"
echo
