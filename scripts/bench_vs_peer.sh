#!/usr/bin/env bash
# Side-by-side training throughput: retune vs PyTorch + PEFT, on the same machine, alternately.
#
# Usage:
#   scripts/bench_vs_peer.sh [ROUNDS] [STEPS]
#     ROUNDS  A/B rounds per configuration (default 3); each round runs retune, then the peer.
#     STEPS   timed steps per run, for both sides (default 3; one untimed warm-up step for
#             retune, two for the peer).
#   Environment:
#     RETUNE      retune binary (default target/release/retune; build it with
#                 `cargo build --release -p retune-cli`)
#     PEER_PY     python of the peer venv (default $HOME/.cache/retune/peer-venv/bin/python)
#     PEER_BENCH  the peer script (default ../shared/peer/lora_bench.py beside the checkout)
#     CONFIGS     space-separated method:retune-dtype:peer-dtype triples
#                 (default "lora:bf16:bf16 lora:f32:fp32 full:bf16:bf16 full:f32:fp32")
#     LOG_DIR     where every run's raw output goes (default: a fresh mktemp -d)
#
# The machine is shared and noisy, so the runs alternate (A B A B ...) and the table shows
# medians over rounds of each side's tok/s (itself a median over its steps) and peak RSS,
# with the ratios retune / peer (tok/s: higher is better for retune; RSS: lower is).
# Both sides: SmolLM2-135M shape, random weights, batch 4 x 256, LoRA r16 alpha 32 on all
# linear layers (or full fine-tuning), AdamW step included.
set -euo pipefail

ROUNDS=${1:-3}
STEPS=${2:-3}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
RETUNE=${RETUNE:-$ROOT/target/release/retune}
PEER_PY=${PEER_PY:-$HOME/.cache/retune/peer-venv/bin/python}
PEER_BENCH=${PEER_BENCH:-$ROOT/../shared/peer/lora_bench.py}
CONFIGS=${CONFIGS:-"lora:bf16:bf16 lora:f32:fp32 full:bf16:bf16 full:f32:fp32"}
LOG_DIR=${LOG_DIR:-$(mktemp -d -t bench_vs_peer.XXXXXX)}
mkdir -p "$LOG_DIR"

[[ -x $RETUNE ]] || { echo "no retune binary at $RETUNE (cargo build --release -p retune-cli)" >&2; exit 1; }
[[ -x $PEER_PY ]] || { echo "no peer python at $PEER_PY" >&2; exit 1; }
[[ -f $PEER_BENCH ]] || { echo "no peer script at $PEER_BENCH" >&2; exit 1; }

# One line per run: "side method dtype tok_s rss_mib"; parsed from each side's JSON.
RESULTS=$LOG_DIR/results.txt
: >"$RESULTS"

run_retune() { # method dtype round
    local out=$LOG_DIR/retune-$1-$2-$3.json
    # Full fine-tuning with the optimizer in the backward (train.optimizer_in_backward): the
    # same AdamW update as the peer's, which clips nothing and accumulates nothing.
    local extra=()
    [[ $1 == full ]] && extra=(--optimizer-in-backward)
    "$RETUNE" bench --grads "$1" --dtype "$2" --steps "$STEPS" "${extra[@]}" --json >"$out" 2>"$out.err"
    python3 -c 'import json,sys; r=json.load(open(sys.argv[1]))
print("retune", sys.argv[2], sys.argv[3], round(r["tokens_per_s"], 2), round(r["peak_rss_bytes"]/2**20))' \
        "$out" "$1" "$2" >>"$RESULTS"
}

run_peer() { # method retune-dtype peer-dtype round
    local out=$LOG_DIR/peer-$1-$3-$4.txt
    "$PEER_PY" "$PEER_BENCH" --preset smollm-135m --method "$1" --dtype "$3" \
        --steps "$STEPS" --warmup 2 >"$out" 2>&1
    python3 -c 'import json,sys
line=[l for l in open(sys.argv[1]) if l.startswith("JSON ")][-1]
r=json.loads(line[5:])
print("peer", sys.argv[2], sys.argv[3], round(r["tok_per_s"], 2), round(r["peak_rss_mib"]))' \
        "$out" "$1" "$2" >>"$RESULTS"
}

for ((round = 1; round <= ROUNDS; round++)); do
    for cfg in $CONFIGS; do
        IFS=: read -r method rdtype pdtype <<<"$cfg"
        echo "round $round/$ROUNDS: $method $rdtype (retune), $pdtype (peer)" >&2
        run_retune "$method" "$rdtype" "$round"
        run_peer "$method" "$rdtype" "$pdtype" "$round"
    done
done

python3 - "$RESULTS" "$CONFIGS" <<'EOF'
import statistics, sys
rows = [l.split() for l in open(sys.argv[1]) if l.strip()]
print(f"{'method':<6} {'dtype':<5} {'n':>2} {'retune tok/s':>12} {'peer tok/s':>10} {'ratio':>6}"
      f" {'retune RSS MiB':>14} {'peer RSS MiB':>12} {'ratio':>6}")
for cfg in sys.argv[2].split():
    method, dtype, _ = cfg.split(":")
    def med(side, col):
        v = [float(r[col]) for r in rows if r[0] == side and r[1] == method and r[2] == dtype]
        return statistics.median(v), len(v)
    (rt, n), (pt, _) = med("retune", 3), med("peer", 3)
    (rr, _), (pr, _) = med("retune", 4), med("peer", 4)
    print(f"{method:<6} {dtype:<5} {n:>2} {rt:>12.1f} {pt:>10.1f} {rt/pt:>6.2f}"
          f" {rr:>14.0f} {pr:>12.0f} {rr/pr:>6.2f}")
EOF
echo "raw output: $LOG_DIR" >&2
