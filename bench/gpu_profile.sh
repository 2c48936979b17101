#!/usr/bin/env bash
# Kernel time beside wall time, per phase, on a GPU: Nsight Compute times the kernels of exactly
# one UNet call of sampling and exactly one training step; the same regions run unprofiled give
# their wall time. A stage of bench/gpu_session.sh.
#
#   DREAMBRIDGE=path/to/dreambridge bench/gpu_profile.sh OUTDIR [LABEL]
#
# The binary brackets the region named by DREAMBRIDGE_PROFILE_RANGE (its DREAMBRIDGE_PROFILE_AT-th
# occurrence) with cuProfilerStart/Stop, so `ncu --profile-from-start off` profiles nothing else;
# DREAMBRIDGE_REGION_WALL=1 prints every occurrence's wall time instead. Profiled: the 3rd UNet
# call of sampling (after cuDNN's and the allocator's first calls) and the 3rd training step.
# Writes OUTDIR/kernels_per_phase.csv (phase,kernel,calls,total_ms) and OUTDIR/phases.json (per
# phase: kernels, kernel ms, wall ms, kernel share of wall), and prints the phases and the top
# kernels. The speed switches in the environment apply (LABEL names the state in the output).
set -euo pipefail
OUT=$1
LABEL=${2:-default}
DB=${DREAMBRIDGE:?set DREAMBRIDGE to the binary}
PY=${PYTHON:-python3}
NCU=${NCU:-$(command -v ncu || echo /usr/local/cuda/bin/ncu)}
mkdir -p "$OUT"
GEN=(bench generate --steps 4 --images 1 --warmup 0)
TRAIN=(bench train --steps 1 --warmup 3 --skip-check)
# Unprofiled: the wall time of every occurrence.
DREAMBRIDGE_PROFILE_RANGE=unet_step DREAMBRIDGE_REGION_WALL=1 "$DB" "${GEN[@]}" > /dev/null 2> "$OUT/unet_step.wall.txt"
DREAMBRIDGE_PROFILE_RANGE=train_step DREAMBRIDGE_REGION_WALL=1 "$DB" "${TRAIN[@]}" > /dev/null 2> "$OUT/train_step.wall.txt"
# Profiled: one occurrence each.
for phase in unet_step train_step; do
    if [ "$phase" = unet_step ]; then args=("${GEN[@]}"); else args=("${TRAIN[@]}"); fi
    DREAMBRIDGE_PROFILE_RANGE=$phase DREAMBRIDGE_PROFILE_AT=3 "$NCU" --profile-from-start off \
        --metrics gpu__time_duration.sum --cache-control none --clock-control none --csv \
        --log-file "$OUT/$phase.ncu.csv" "$DB" "${args[@]}" > "$OUT/$phase.bench.txt" 2>&1
done
"$PY" - "$OUT" "$LABEL" <<'PY'
import csv, json, re, statistics, sys
out, label = sys.argv[1], sys.argv[2]
scale = {"nsecond": 1e-6, "ns": 1e-6, "usecond": 1e-3, "us": 1e-3, "msecond": 1.0, "ms": 1.0, "second": 1e3, "s": 1e3}
rows, phases = [], {}
for phase in ("unet_step", "train_step"):
    lines = [l for l in open(f"{out}/{phase}.ncu.csv") if l.startswith('"')]
    kernels = {}
    for r in csv.DictReader(lines):
        if r.get("Metric Name") != "gpu__time_duration.sum":
            continue
        ms = float(r["Metric Value"].replace(",", "")) * scale[r["Metric Unit"]]
        calls, total = kernels.get(r["Kernel Name"], (0, 0.0))
        kernels[r["Kernel Name"]] = (calls + 1, total + ms)
    walls = [float(m.group(1)) for m in re.finditer(r"wall ([0-9.]+) ms", open(f"{out}/{phase}.wall.txt").read())]
    wall = statistics.median(walls[2:] or walls) if walls else float("nan")  # after the first calls
    kernel_ms = sum(t for _, t in kernels.values())
    phases[phase] = {"label": label, "kernels": sum(c for c, _ in kernels.values()), "kernel_ms": kernel_ms, "wall_ms": wall, "kernel_share_of_wall": kernel_ms / wall if wall == wall and wall > 0 else None}
    for name, (calls, total) in sorted(kernels.items(), key=lambda kv: -kv[1][1]):
        rows.append((phase, name, calls, round(total, 3)))
with open(f"{out}/kernels_per_phase.csv", "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["phase", "kernel", "calls", "total_ms"])
    w.writerows(rows)
json.dump(phases, open(f"{out}/phases.json", "w"), indent=2)
for phase, p in phases.items():
    share = p["kernel_share_of_wall"]
    print(f"{label} {phase}: {p['kernels']} kernels, {p['kernel_ms']:.1f} ms of kernels, wall {p['wall_ms']:.1f} ms, kernels {100 * share:.0f} % of wall" if share else f"{label} {phase}: {p['kernels']} kernels, {p['kernel_ms']:.1f} ms of kernels, no wall time")
    for _, name, calls, total in [r for r in rows if r[0] == phase][:8]:
        print(f"    {total:8.2f} ms {calls:5d}x {name[:100]}")
PY
