#!/usr/bin/env bash
# Launch step 04 (DDP) under torchrun on this machine's GPUs, after checking that the
# GPUs and torchrun are there.
#
#   ./train_ddp.sh [GPUS] [BATCH_PER_GPU] [EPOCHS] [IMG_SIZE] [-- extra 04 options]
#   ./train_ddp.sh 4 64 5 224 -- --channels-last
#
# Defaults: every visible GPU, 64 images per GPU, 5 epochs, 224 pixels.
# DRY_RUN=1 prints the torchrun command instead of running it.
set -euo pipefail

usage="usage: $0 [GPUS] [BATCH_PER_GPU] [EPOCHS] [IMG_SIZE] [-- extra options for 04]"
die() { echo "$0: error: $1" >&2; exit "${2:-2}"; }

positional=()
while [ $# -gt 0 ]; do
    case "$1" in
        -h|--help) echo "$usage"; exit 0 ;;
        --) shift; break ;;
        -*) die "unknown option $1 ($usage)" ;;
        *) positional+=("$1"); shift ;;
    esac
done
[ ${#positional[@]} -le 4 ] || die "too many arguments ($usage)"

is_positive() { [[ "$1" =~ ^[1-9][0-9]*$ ]]; }
gpus_arg=${positional[0]:-all}
batch=${positional[1]:-64}
epochs=${positional[2]:-5}
img_size=${positional[3]:-224}
if [ "$gpus_arg" != all ]; then
    is_positive "$gpus_arg" || die "GPUS must be a positive integer or 'all', got '$gpus_arg'"
fi
is_positive "$batch" || die "BATCH_PER_GPU must be a positive integer, got '$batch'"
is_positive "$epochs" || die "EPOCHS must be a positive integer, got '$epochs'"
is_positive "$img_size" || die "IMG_SIZE must be a positive integer, got '$img_size'"
[ "$img_size" -ge 16 ] || die "IMG_SIZE must be at least 16 pixels, got $img_size"

here=$(cd "$(dirname "$0")" && pwd)
python=${PYTHON:-python3}
command -v "$python" >/dev/null 2>&1 || die "$python not found: activate the lab's virtual environment" 1
"$python" -c "import torch.distributed.run" 2>/dev/null \
    || die "torchrun is not available to $python: activate the lab's virtual environment (see README.md)" 1

visible=$("$python" -c "import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)")
if [ "$visible" -eq 0 ]; then
    die "no CUDA GPU is visible; on the CPU run: python 04_ddp_training.py --nproc 2 --preset smoke" 1
fi
gpus=$([ "$gpus_arg" = all ] && echo "$visible" || echo "$gpus_arg")
if [ "$gpus" -gt "$visible" ]; then
    die "asked for $gpus GPUs but $visible are visible (NCCL needs one GPU per process)" 1
fi

cmd=("$python" -m torch.distributed.run --standalone "--nproc_per_node=$gpus"
     "$here/04_ddp_training.py" --batch-size "$batch" --epochs "$epochs" --img-size "$img_size" "$@")
echo "+ ${cmd[*]}"
[ "${DRY_RUN:-0}" = 1 ] && exit 0
exec "${cmd[@]}"
