#!/usr/bin/env python3
"""A bare training loop, the yardstick for the lab's own overhead.

    python benchmarks/bare_loop.py --model resnet50 --batch-size 256 --amp bf16 --channels-last
    python benchmarks/bare_loop.py --device cpu --model resnet18 --img-size 32 --batch-size 8

No labs code: one fixed batch already on the device, SGD with momentum, the same AMP and
memory-layout switches as the lab, step boundaries timed with CUDA events. Prints one JSON
line with the median step time and throughput, so the lab's throughput for the same
configuration can be quoted as a ratio of this loop measured in the same session.
"""

import argparse
import json
import statistics
import time

import torch
import torchvision


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--num-classes", type=int, default=1000)
    parser.add_argument("--amp", choices=("off", "fp16", "bf16"), default="off")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()

    device = torch.device(args.device)
    torch.manual_seed(0)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    model = torchvision.models.get_model(args.model, weights=None,
                                         num_classes=args.num_classes)
    model = model.to(device, memory_format=fmt)
    opt_kwargs = {"fused": True} if device.type == "cuda" else {"foreach": True}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4,
                                **opt_kwargs)
    step_model = torch.compile(model) if args.compile else model
    images = torch.randn(args.batch_size, 3, args.img_size, args.img_size, device=device)
    images = images.contiguous(memory_format=fmt)
    labels = torch.randint(0, args.num_classes, (args.batch_size,), device=device)
    dtype = {"off": None, "fp16": torch.float16, "bf16": torch.bfloat16}[args.amp]
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp == "fp16")
    criterion = torch.nn.CrossEntropyLoss()

    def mark():
        # CUDA events, read after the loop: no host sync between steps, as in the lab
        if device.type == "cuda":
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def seconds(a, b):
        return a.elapsed_time(b) / 1000 if device.type == "cuda" else b - a

    def one_step():
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = criterion(step_model(images), labels)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(args.warmup):
        one_step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    wall_started = time.perf_counter()
    marks = [mark()]
    for _ in range(args.steps):
        one_step()
        marks.append(mark())
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    wall = time.perf_counter() - wall_started
    times = [seconds(a, b) for a, b in zip(marks, marks[1:])]
    median = statistics.median(times)
    print(json.dumps({
        "bare_loop": vars(args), "steps": len(times), "step_time_s_median": median,
        "throughput_img_s_median": args.batch_size / median,
        "throughput_img_s_mean": args.batch_size * args.steps / wall,
        "peak_allocated_bytes": (torch.cuda.max_memory_allocated(device)
                                 if device.type == "cuda" else None),
    }))


if __name__ == "__main__":
    main()
