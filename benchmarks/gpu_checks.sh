#!/usr/bin/env bash
# The GPU checks in one call on a one-GPU machine. Every lab figure is paired with a bare
# loop or a 02 run of the same configuration measured in the same call, so the ratios hold
# whatever the card.
#
#   OUT=/some/folder bash benchmarks/gpu_checks.sh          # everything (about 10 min, H100)
#   OUT=... PART=1 bash benchmarks/gpu_checks.sh            # eager runs, 01, gloo, pytest -m gpu
#   OUT=... PART=2 bash benchmarks/gpu_checks.sh            # compiled runs, fp32 02, the report
#
# Two parts, so that each fits a 10-minute command limit; run both into the same OUT.
# Needs python3 with torch, torchvision, numpy, psutil, tqdm (PYTHON=... to choose one).
set -u
cd "$(dirname "$0")/.."
out=${OUT:-gpu-checks}
py=${PYTHON:-python3}
part=${PART:-all}
mkdir -p "$out"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
cfg=(--model resnet50 --batch-size 256 --amp bf16 --channels-last --data synthetic
     --epochs 1 --steps-per-epoch 60 --warmup-steps 15)
step() { local name=$1; shift; echo "+ $name: $*" >&2; "$@" > "$out/$name.log" 2>&1 || echo "FAILED ($?): $name" >&2; }

if [ "$part" = all ] || [ "$part" = 1 ]; then
  nvidia-smi -L > "$out/gpu.txt" 2>&1
  step bare_eager   "$py" benchmarks/bare_loop.py --batch-size 256 --amp bf16 --channels-last --warmup 15 --steps 60
  step lab02_eager  "$py" 02_baseline_single_gpu.py "${cfg[@]}" --results-dir "$out/r02"
  step lab04_ws1    "$py" 04_ddp_training.py --nproc 1 "${cfg[@]}" --results-dir "$out/r04"
  step lab03_1gpu   "$py" 03_dataparallel_training.py --gpus 0 "${cfg[@]}" --results-dir "$out/r03"
  step gloo_rehearsal "$py" 04_ddp_training.py --nproc 2 --backend gloo --preset smoke --device cuda --results-dir "$out/rgloo"
  step env01 bash -c "time $py 01_environment_check.py --results-dir $out/env"
  # includes the sync-debug test: the steady-state step never synchronises (bf16, fp16)
  step pytest_gpu "$py" -m pytest -q -n0 -m "gpu or multigpu" tests  # one process: the GPU tests share one device
fi
if [ "$part" = all ] || [ "$part" = 2 ]; then
  step bare_compile "$py" benchmarks/bare_loop.py --batch-size 256 --amp bf16 --channels-last --compile --warmup 15 --steps 60
  step lab02_compile "$py" 02_baseline_single_gpu.py "${cfg[@]}" --compile --results-dir "$out/r02c"
  step lab04_compile "$py" 04_ddp_training.py --nproc 1 "${cfg[@]}" --compile --results-dir "$out/r04c"
  step lab02_fp32   "$py" 02_baseline_single_gpu.py "${cfg[@]}" --amp off --results-dir "$out/r02fp32"
  # the report over the eager bf16 runs, the fp32 reference and step 01: headline, AMP
  # effect, exposed communication
  mkdir -p "$out/report_in"
  cp "$out"/r02/*.json "$out"/r04/*.json "$out"/r03/*.json "$out"/r02fp32/*.json \
     "$out"/env/*.json "$out/report_in/" 2>/dev/null
  step report05 "$py" 05_performance_comparison.py --results-dir "$out/report_in" \
       --format md --output-report "$out/report.md"
fi

"$py" - "$out" <<'PY' | tee "$out/summary.txt"
import glob, json, os, sys
out = sys.argv[1]
def bare(name):
    path = f"{out}/{name}.log"
    for line in open(path) if os.path.exists(path) else []:
        if line.startswith("{"):
            return json.loads(line)["throughput_img_s_median"]
def record(folder):
    files = glob.glob(f"{out}/{folder}/*.json")
    return json.load(open(files[0])) if files else None
def lab(folder):
    r = record(folder)
    return r["metrics"]["throughput_img_s"]["median"] if r and r["metrics"] else None
rows = [("02 eager vs bare eager (>= 0.95)", lab("r02"), bare("bare_eager")),
        ("02 compiled vs bare compiled (>= 0.95)", lab("r02c"), bare("bare_compile")),
        ("04 world size 1 vs 02 (>= 0.97)", lab("r04"), lab("r02")),
        ("04 ws1 compiled vs 02 compiled (>= 0.97)", lab("r04c"), lab("r02c")),
        ("03 one GPU vs 02 (>= 0.98)", lab("r03"), lab("r02")),
        ("02 bf16 vs 02 fp32 (AMP speed-up)", lab("r02"), lab("r02fp32"))]
for name, a, b in rows:
    ratio = f"{a / b:.3f}" if a and b else "n/a"
    print(f"{name:42s} {a or 0:9.1f} / {b or 0:9.1f} img/s = {ratio}")
r04 = record("r04")
if r04 and r04["metrics"]:
    m = r04["metrics"]
    print("04 ws1 exposed communication:", m.get("exposed_comm_s"),
          "compute-only step:", m.get("compute_only_step_time_s"))
print("gloo rehearsal result:", bool(glob.glob(f"{out}/rgloo/*.json")))
if os.path.exists(f"{out}/report.md"):  # the report's top: headline and verdict
    top = open(f"{out}/report.md").read().split("\n## Results")[0]
    print(top)
PY
