#!/usr/bin/env python3
"""Step 03: the baseline under nn.DataParallel, one process driving several GPUs.

    python 03_dataparallel_training.py --model resnet50 --batch-size 256 --epochs 5 --gpus 0,1,2,3

`--batch-size` is the GLOBAL batch: every step DataParallel scatters it across --gpus,
copies the model from GPU 0 to the others, runs the replicas in threads, and gathers
the outputs back on GPU 0, where the loss and the optimizer step happen. That GPU 0
surplus (memory and work) and the single Python process are why DDP (step 04) scales
better. With no GPU or one GPU, DataParallel calls the plain module: the run still
works and is recorded as world size 1. `grep -n "DP:" 03_dataparallel_training.py`
lists every line that DataParallel changes.
"""

from labs import cli

LAB = "03_dataparallel"
if __name__ == "__main__":  # --help and typos: answered before torch loads (seconds)
    cli.check_early(cli.parse_args, LAB, __doc__, torch_checks=False)
# The imports below come after that on purpose (flake8: E402).

import torch
import torch.nn.functional as F
from torch.utils.data import RandomSampler

from labs import console, data, dp, envinfo, files, models, results, train  # DP: dp
from labs.measure import Meter


def train_step(model, optimizer, scaler, step: train.Step, dtype) -> None:
    """One optimizer step: forward and backward on each micro-batch (their gradients add
    up, --grad-accum-steps of them), then the update. The same lines in 02, 03 and 04,
    except for 04's `# DDP:` ones."""
    for images, labels in step.micro_batches():  # on the device already
        with torch.autocast(images.device.type, dtype, enabled=dtype is not None):
            loss = F.cross_entropy(model(images), labels) / step.grad_accum_steps
        scaler.scale(loss).backward()  # fp16: scaled up, or small gradients underflow to 0
        step.add_loss(loss)  # for the epoch's mean loss, without waiting for the device
    scaler.step(optimizer)  # fp16: unscales, and skips the step if a gradient overflowed
    scaler.update()
    optimizer.zero_grad(set_to_none=True)


def main() -> None:
    args = cli.parse_args(LAB, __doc__)  # bad input: one line, exit status 2
    gpu_ids = envinfo.select_gpus(args.gpus)  # DP: the GPUs to split each batch across
    dp.check_options(args, gpu_ids)  # DP: a global batch of >= 1 image per GPU; no --compile
    devices = [torch.device("cuda", i) for i in gpu_ids] or [torch.device("cpu")]  # DP:
    device = devices[0]  # DP: inputs, outputs, loss and optimizer all live on the first
    files.ensure_writable_dir(args.results_dir)  # an unwritable folder fails now, not after training
    console.warn_if_slow_on_cpu(device, args.preset)

    torch.manual_seed(args.seed)
    train.configure_backends(device)
    amp = train.resolve_amp(args.amp, device)
    dtype = train.autocast_dtype(amp)  # of the forward pass; the weights stay float32

    dataset = data.build_dataset(args, device)
    sampler = RandomSampler(dataset, generator=torch.Generator().manual_seed(args.seed))
    num_workers = data.default_num_workers(args)
    loader = data.build_loader(dataset, args, sampler, device, num_workers)
    val_loader = data.build_val_loader(args, device, num_workers)  # None with --no-eval
    steps = train.steps_per_epoch(len(loader), args.grad_accum_steps, args.steps_per_epoch)
    train.check_schedule(steps, args.epochs, args.warmup_steps, f"{len(dataset)} images")

    model = models.build_model(args.model, args.num_classes, args.img_size)
    model = train.to_device(model, device, args.channels_last)
    train.check_trains(model, args, devices, dtype)  # DP: with each GPU's share
    model = dp.AutocastForward(model, device.type, dtype)  # DP: replica threads default to fp16
    model = torch.nn.DataParallel(model, device_ids=gpu_ids or None,  # DP: scatter each batch,
                                  output_device=gpu_ids[0] if gpu_ids else None)  # DP: gather
    if args.compile:
        model = torch.compile(model)
    samples_per_step = args.batch_size * args.grad_accum_steps
    lr = args.lr or train.default_lr(samples_per_step)
    optimizer = train.build_optimizer(model, lr, device)
    scaler = torch.amp.GradScaler(device.type, enabled=amp == "fp16")  # bf16 needs none

    meter = Meter(device, args.warmup_steps, samples_per_step,
                  devices=devices,  # DP: peak memory on every GPU (GPU 0 holds more)
                  data_pool_bytes=data.resident_bytes(dataset))
    trainer = train.Trainer(model, optimizer, device, amp=amp,
                            channels_last=args.channels_last,
                            grad_accum_steps=args.grad_accum_steps, meter=meter,
                            lr_warmup_steps=train.lr_warmup_steps(args, steps),
                            steps_per_epoch=steps, epochs=args.epochs)
    run = results.Run(LAB, args, strategy="dp", devices=devices,  # DP: one process, N GPUs
                      config=results.config_from_args(
                          args, per_device_batch_size=args.batch_size // len(devices),  # DP:
                          global_batch_size=samples_per_step,
                          gpus=gpu_ids,  # DP: which GPUs shared each batch
                          steps_per_epoch=steps, amp=amp, lr=lr, num_workers=num_workers,
                          train_set=data.describe(dataset),
                          augmentation_seed=data.augmentation_seed(dataset, args.seed)))
    run.note(*dp.notes(args.batch_size, gpu_ids))  # DP: one device, or an uneven split

    with run.guard(meter):  # OOM, Ctrl-C or a crash still writes a result with its status
        for epoch in range(args.epochs):
            model.train()
            for step in trainer.steps(loader, epoch):  # timed, with lr warmup and progress
                train_step(model, optimizer, scaler, step, dtype)
            trainer.evaluate(val_loader, epoch)  # accuracy; timed apart from training

    path = run.write(meter)
    console.print_summary(run.record, path)


if __name__ == "__main__":
    cli.run(main)
