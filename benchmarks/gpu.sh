#!/usr/bin/env bash
# One GPU measurement of omniflow, <= 8 minutes on an H100/H200, written to one JSON file:
#
#   1. decode step (bfloat16, real Mini-Omni shape, random weights) at 1, 32, 128 and 512 concurrent
#      A1A2 sessions: eager, and with CUDA graphs (Engine compile=True on CUDA: static shapes,
#      torch.compile mode "reduce-overhead") where they fit the time budget; `best_ms` per count
#   2. first audio through the served graph (graphs/serve.yaml as processes, WebSocket clients in
#      real time: `omniflow bench live --graphs serve`) at 1 and 32 sessions, on real-size demo
#      weights, backbone/whisper/vocoder on the GPU in bfloat16
#   3. sessions held with 0 stalls: the largest live round with no stall (rounds 1, 32, 64, ...),
#      next to the decode-only bound (the largest count whose step <= 85.3 ms)
#
#   bash benchmarks/gpu.sh [OUT.json]          # default: gpu.json (or $OUT/gpu.json when $OUT is set)
#
# Settings (environment): DEVICE (cuda), DECODE_SESSIONS (1,32,128,512), LIVE_SESSIONS (1,32,64),
# ANSWER_SECONDS (10), N_LAYER (all 24; fewer for a smoke run), OMNIFLOW_HOME (weights; default:
# real-size demo weights written to a temp dir first), BUDGET_S (480: later parts are skipped, and
# say so, when the time is spent). Run from the repository root with omniflow installed, or with
# PYTHONPATH set to it. The same pieces run on CPU: DEVICE=cpu N_LAYER=2 DECODE_SESSIONS=1,2 ...
set -euo pipefail
cd "$(dirname "$0")/.."
START=$(date +%s)
OUTFILE=${1:-${OUT:+$OUT/}gpu.json}
DEVICE=${DEVICE:-cuda}
DECODE_SESSIONS=${DECODE_SESSIONS:-1,32,128,512}
LIVE_SESSIONS=${LIVE_SESSIONS:-1,32,64}
ANSWER_SECONDS=${ANSWER_SECONDS:-10}
BUDGET_S=${BUDGET_S:-480}
PY=${PYTHON:-python}
WORK=$(mktemp -d -t omniflow-gpu-XXXXXX)
trap 'rm -rf "$WORK"' EXIT
left() { echo $((BUDGET_S - ($(date +%s) - START))); }
echo "omniflow gpu.sh: device $DEVICE, results -> $OUTFILE" >&2
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >"$WORK/gpu.txt" 2>/dev/null || echo "none" >"$WORK/gpu.txt"

# --- 1. decode steps ---------------------------------------------------------------------------
DECODE_BUDGET=$(( $(left) * 45 / 100 ))
echo "[1/3] decode step at $DECODE_SESSIONS sessions (budget ${DECODE_BUDGET} s) ..." >&2
timeout $((DECODE_BUDGET + 60)) "$PY" - "$WORK/decode.json" "$DEVICE" "$DECODE_SESSIONS" "${N_LAYER:-}" "$DECODE_BUDGET" <<'EOF' || echo "decode timing did not finish (timeout or failure): what ran is kept" >&2
import json, sys, time
import torch
from benchmarks.decode import REAL_TIME_STEPS_PER_S, bench_prefill, bench_step, random_model
from omniflow.model.config import Config

out, device, sessions, n_layer, budget = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], float(sys.argv[5])
t0 = time.monotonic()
cfg = Config() if not n_layer else Config(n_layer=int(n_layer))
model = random_model(cfg, torch.bfloat16, device)
res = {"dtype": "bfloat16", "device": device, "n_layer": cfg.n_layer, "torch": torch.__version__,
       "real_time_step_ms": 1000 / REAL_TIME_STEPS_PER_S,
       "prefill_ms": 1000 * bench_prefill(model, device)["prefill_s"], "steps": {}}
counts = [int(n) for n in sessions.split(",")]


def save():                                        # after every point: a timeout keeps what ran
    for e in res["steps"].values():
        e["best_ms"] = min(v for v in (e["eager_ms"], e.get("graphs_ms")) if v is not None)
        e["rtf"] = res["real_time_step_ms"] / e["best_ms"]
    held = [int(n) for n, e in res["steps"].items() if e["best_ms"] <= res["real_time_step_ms"]]
    res["decode_bound_sessions"] = max(held) if held else 0
    res["seconds"] = time.monotonic() - t0
    json.dump(res, open(out, "w"), indent=2)


for n in counts:                                   # eager first: always affordable
    res["steps"][str(n)] = {"eager_ms": 1000 * bench_step(model, n, 5, device, compile=False)}
    print(f"  {n:4d} sessions eager   {res['steps'][str(n)]['eager_ms']:8.2f} ms", file=sys.stderr)
    save()
for n in counts:                                   # CUDA graphs: compiling costs tens of seconds each
    entry = res["steps"][str(n)]
    if not device.startswith("cuda"):
        entry["graphs_ms"], entry["graphs_skipped"] = None, "CUDA graphs need a CUDA device"
        continue
    if time.monotonic() - t0 > budget:
        entry["graphs_ms"] = None
        entry["graphs_skipped"] = "time budget spent"
        continue
    try:
        entry["graphs_ms"] = 1000 * bench_step(model, n, 5, device, compile=True)
        print(f"  {n:4d} sessions graphs  {entry['graphs_ms']:8.2f} ms", file=sys.stderr)
    except Exception as e:                         # reported, not fatal: eager still stands
        entry["graphs_ms"], entry["graphs_error"] = None, repr(e)[:300]
    save()
res["complete"] = True
save()
EOF

# --- 2. weights for the served graph ------------------------------------------------------------
if [ -z "${OMNIFLOW_HOME:-}" ]; then
  export OMNIFLOW_HOME="$WORK/weights"
  echo "[2/3] writing real-size demo weights to $OMNIFLOW_HOME ..." >&2
  "$PY" -m omniflow.cli fetch --demo --demo-size real --home "$OMNIFLOW_HOME" >&2
fi

# --- 3. first audio and sessions held through the served graph -------------------------------------
LIVE_BUDGET=$(( $(left) - 20 ))
echo "[3/3] bench live, serve graph on $DEVICE at $LIVE_SESSIONS sessions (budget ${LIVE_BUDGET} s) ..." >&2
MAX=$(echo "$LIVE_SESSIONS" | tr , '\n' | sort -n | tail -1)
if [ "$LIVE_BUDGET" -gt 60 ]; then
  timeout "$LIVE_BUDGET" "$PY" -m omniflow.cli bench live --graphs serve --sessions "$LIVE_SESSIONS" \
    --answer-seconds "$ANSWER_SECONDS" --no-original --timeout 120 \
    --set backbone.device="$DEVICE" --set whisper.device="$DEVICE" --set vocoder.device="$DEVICE" \
    --set backbone.dtype=bfloat16 --set whisper.dtype=bfloat16 --set backbone.max_sessions="$MAX" \
    --set gateway.max_sessions="$MAX" --json "$WORK/live.json" >&2 \
    || echo "bench live did not finish (timeout or failure): the rounds that ran are kept" >&2
else
  echo "bench live skipped: the time budget was spent" >&2
fi

# --- one JSON ---------------------------------------------------------------------------------
"$PY" - "$WORK" "$OUTFILE" "$START" <<'EOF'
import json, sys, time
work, out, start = sys.argv[1], sys.argv[2], float(sys.argv[3])
def load(name):                       # a part that never wrote its file says so
    try:
        return json.load(open(f"{work}/{name}.json"))
    except (OSError, ValueError):
        return {"error": f"{name}: no results (it failed or ran out of time before its first point)"}
decode, live = load("decode"), load("live")
rounds = live.get("graphs", {}).get("serve", {}).get("rounds", [])
def worst(r):                       # None when a client heard no answer
    firsts = [c["first_audio_s"] for c in r["clients"]]
    return None if None in firsts else max(firsts)
first = {str(r["sessions"]): worst(r) for r in rounds}
clean = [r["sessions"] for r in rounds
         if all(c["stalls"] == 0 and c["ended"] and not c["timed_out"] for c in r["clients"])]
result = {"gpu": open(f"{work}/gpu.txt").read().strip(), "decode": decode,
          "first_audio_worst_s": first, "sessions_held_without_stalls": max(clean) if clean else 0,
          "live_rounds_tried": [r["sessions"] for r in rounds], "live": live,
          "wall_s": time.time() - start}
json.dump(result, open(out, "w"), indent=2)
print(json.dumps({k: result[k] for k in ("gpu", "first_audio_worst_s", "sessions_held_without_stalls", "wall_s")}
                 | {"decode_best_ms": {n: e.get("best_ms") for n, e in decode.get("steps", {}).items()}}))
EOF
