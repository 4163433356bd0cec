#!/usr/bin/env bash
# The GPU rows of the README's speed table, as one prepared script (about 10-15 minutes on one GPU):
#   1. `avlowshot bench --device cuda` for AVCA, ClipClap, TCAF and AV-DIFF at full size (synthetic UCF);
#   2. one short `avlowshot run --device cuda` through both stages (TCAF, synthetic UCF at scale 0.3);
#   3. the same checkpoints evaluated under bf16 autocast and in fp32, side by side.
# Usage: scripts/gpu-check.sh [OUT_DIR]        (default gpu-check/; DEVICE=cpu SCALE=0.05 tries it on a CPU)
set -euo pipefail
out=${1:-gpu-check}
device=${DEVICE:-cuda}
scale=${SCALE:-1.0}
mkdir -p "$out"
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true; } > "$out/device.txt" 2>&1
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" >> "$out/device.txt"

for row in "avca avca-cls" "clipclap clipclap" "tcaf tcaf-cls" "avdiff avdiff --shots 5"; do
    read -r method layout extra <<< "$row"
    # shellcheck disable=SC2086  # $extra is "" or "--shots 5"
    avlowshot bench --method "$method" --layout "$layout" --dataset UCF --scale "$scale" --device "$device" \
        --batches 20 $extra --work-dir "$out/work" --out "$out/bench_$method.json"
done

avlowshot synth --layout tcaf-cls --dataset UCF --scale 0.3 --seed 0 --out "$out/UCF"
avlowshot run --method tcaf --layout tcaf-cls --dataset UCF --root-dir "$out/UCF" --device "$device" \
    --log-dir "$out/runs" --cache-dir "$out/cache" --set epochs=2 --set n_batches=30 --quiet

python - "$out/runs/tcaf_UCF_tcaf-cls_seed42" "$device" "$out/bf16_vs_fp32.json" <<'PY'
import json
import sys

from avlowshot.train.protocol import evaluate_run

run, device, path = sys.argv[1:]
res = {amp: evaluate_run(run, device=device, write=False, amp=amp) for amp in ("off", "bf16")}
keys = sorted(res["off"]["metrics"])
diff = {k: res["bf16"]["metrics"][k] - res["off"]["metrics"][k] for k in keys}
out = {amp: {"metrics": r["metrics"], "beta": r["beta"]} for amp, r in res.items()} | {"bf16_minus_fp32": diff}
json.dump(out, open(path, "w"), indent=2)
for k in keys:
    print(f"{k:>6}: fp32 {res['off']['metrics'][k]:7.3f}  bf16 {res['bf16']['metrics'][k]:7.3f}  diff {diff[k]:+.3f}")
print("beta: fp32", res["off"]["beta"], " bf16", res["bf16"]["beta"])
PY
echo "done: $out (bench_*.json, runs/, bf16_vs_fp32.json, device.txt)"
