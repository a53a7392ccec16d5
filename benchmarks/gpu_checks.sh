#!/usr/bin/env bash
# The GPU checks of issues 2-4 in one call on a one-GPU machine (about 6-8 minutes on an
# H100). Every lab figure is paired with a bare loop or a 02 run of the same
# configuration measured in the same call, so the ratios hold whatever the card.
#
#   OUT=/some/folder bash benchmarks/gpu_checks.sh        # results and a summary in $OUT
#
# Needs python3 with torch, torchvision, numpy, psutil, tqdm (PYTHON=... to choose one).
set -u
cd "$(dirname "$0")/.."
out=${OUT:-gpu-checks}
py=${PYTHON:-python3}
mkdir -p "$out"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
cfg=(--model resnet50 --batch-size 256 --amp bf16 --channels-last --data synthetic
     --epochs 1 --steps-per-epoch 60 --warmup-steps 15)
step() { local name=$1; shift; echo "+ $name: $*" >&2; "$@" > "$out/$name.log" 2>&1 || echo "FAILED ($?): $name" >&2; }

nvidia-smi -L > "$out/gpu.txt" 2>&1
step bare_eager   "$py" benchmarks/bare_loop.py --batch-size 256 --amp bf16 --channels-last --warmup 15 --steps 60
step lab02_eager  "$py" 02_baseline_single_gpu.py "${cfg[@]}" --results-dir "$out/r02"
step lab04_ws1    "$py" 04_ddp_training.py --nproc 1 "${cfg[@]}" --results-dir "$out/r04"
step lab03_1gpu   "$py" 03_dataparallel_training.py --gpus 0 "${cfg[@]}" --results-dir "$out/r03"
step bare_compile "$py" benchmarks/bare_loop.py --batch-size 256 --amp bf16 --channels-last --compile --warmup 15 --steps 60
step lab02_compile "$py" 02_baseline_single_gpu.py "${cfg[@]}" --compile --results-dir "$out/r02c"
step gloo_rehearsal "$py" 04_ddp_training.py --nproc 2 --backend gloo --preset smoke --device cuda --results-dir "$out/rgloo"
step env01 bash -c "time $py 01_environment_check.py --results-dir $out/env"
step pytest_gpu "$py" -m pytest -q -m "gpu or multigpu" tests

"$py" - "$out" <<'PY' | tee "$out/summary.txt"
import glob, json, sys
out = sys.argv[1]
def bare(name):
    for line in open(f"{out}/{name}.log"):
        if line.startswith("{"):
            return json.loads(line)["throughput_img_s_median"]
def lab(folder):
    files = glob.glob(f"{out}/{folder}/*.json")
    return json.load(open(files[0]))["metrics"]["throughput_img_s"]["median"] if files else None
rows = [("02 eager vs bare eager (>= 0.95)", lab("r02"), bare("bare_eager")),
        ("02 compiled vs bare compiled (>= 0.95)", lab("r02c"), bare("bare_compile")),
        ("04 world size 1 vs 02 (>= 0.97)", lab("r04"), lab("r02")),
        ("03 one GPU vs 02 (>= 0.98)", lab("r03"), lab("r02"))]
for name, a, b in rows:
    ratio = f"{a / b:.3f}" if a and b else "n/a"
    print(f"{name:42s} {a or 0:9.1f} / {b or 0:9.1f} img/s = {ratio}")
print("gloo rehearsal result:", bool(glob.glob(f"{out}/rgloo/*.json")))
PY
