#!/usr/bin/env python3
"""Step 04: the baseline under DistributedDataParallel, one process per GPU, with AMP.

    torchrun --nproc_per_node=4 04_ddp_training.py --model resnet50 --batch-size 64 --epochs 5
    python 04_ddp_training.py --nproc 2 --preset smoke     # self-launched; CPU over gloo

Each process (rank) holds a full copy of the model, reads its own 1/world_size of the
data, and after backward() DDP averages the gradients across ranks with all-reduce,
bucket by bucket while backward is still running. `--batch-size` is per process.
`diff 02_baseline_single_gpu.py 04_ddp_training.py` shows what DDP changes, every line
marked `# DDP:`; `grep -n "DDP:" 04_ddp_training.py` lists them.
"""

from labs import cli

LAB = "04_ddp"
if __name__ == "__main__":  # --help and typos: answered before torch loads (seconds)
    cli.check_early(cli.parse_args, LAB, __doc__, torch_checks=False)
# The imports below come after that on purpose (flake8: E402).

import contextlib  # DDP: nullcontext, for the micro-batch that does synchronise

import torch
import torch.distributed as dist  # DDP: process groups and collectives
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP  # DDP: the wrapper
from torch.utils.data.distributed import DistributedSampler  # DDP: 1/N of the data per rank

from labs import (console, data, distributed, files, launch, local_sgd, models,  # DDP:
                  partition, results, train)  # DDP:
from labs.measure import Meter


def train_step(model, optimizer, scaler, step: train.Step, dtype) -> None:
    """One optimizer step: forward and backward on each micro-batch (their gradients add
    up, --grad-accum-steps of them), then the update. The same lines in 02, 03 and 04,
    except for 04's `# DDP:` ones."""
    for images, labels in step.micro_batches():  # on the device already
        # DDP: no all-reduce before the last micro-batch; no_sync must hold the forward pass
        sync = contextlib.nullcontext() if step.last_micro_batch else model.no_sync()  # DDP:
        with sync, torch.autocast(images.device.type, dtype, enabled=dtype is not None):  # DDP:
            loss = F.cross_entropy(model(images), labels) / step.grad_accum_steps
        scaler.scale(loss).backward()  # DDP: all-reduce here, bucket by bucket, as backward runs
        step.add_loss(loss)  # for the epoch's mean loss, without waiting for the device
    scaler.step(optimizer)  # fp16: unscales, and skips the step if a gradient overflowed
    scaler.update()
    optimizer.zero_grad(set_to_none=True)


def main() -> None:
    args = cli.parse_args(LAB, __doc__)  # bad input: one line, exit status 2
    ranks = launch.ranks_from_env(args.local_rank)  # DDP: RANK, LOCAL_RANK, WORLD_SIZE
    master_process = ranks.rank == 0  # DDP: only rank 0 prints, checkpoints and writes
    device = distributed.rank_device(ranks, args.device)  # DDP: GPU number LOCAL_RANK
    backend = distributed.choose_backend(args.backend, device)  # DDP: nccl on GPUs, else gloo
    dist.init_process_group(backend, rank=ranks.rank, world_size=ranks.world_size,  # DDP: join
                            **launch.process_group_kwargs(args, ranks, device, backend))  # DDP:
    files.ensure_writable_dir(args.results_dir)  # an unwritable folder fails now, not after training
    console.warn_if_slow_on_cpu(device, args.preset)

    torch.manual_seed(args.seed)
    train.configure_backends(device)
    amp = train.resolve_amp(args.amp, device)
    dtype = train.autocast_dtype(amp)  # of the forward pass; the weights stay float32

    dataset = data.build_dataset(args, device)
    # DDP: each rank its 1/N of the images (the same shuffle on all), its own crops and flips;
    # --partition dirichlet: a fixed, label-skewed shard per rank, as federated clients hold
    sampler = (DistributedSampler(dataset, shuffle=True, seed=args.seed, drop_last=True)  # DDP:
               if args.partition == "iid" else partition.DirichletSampler(dataset, args, ranks))  # DDP:
    num_workers = data.default_num_workers(args)
    loader = data.build_loader(dataset, args, sampler, device, num_workers, rank=ranks.rank)  # DDP:
    val_loader = data.build_val_loader(args, device, num_workers, shard=ranks)  # DDP: 1/N each
    steps = train.steps_per_epoch(len(loader), args.grad_accum_steps, args.steps_per_epoch)
    train.check_schedule(steps, args.epochs, args.warmup_steps, f"{len(dataset)} images")

    model = models.build_model(args.model, args.num_classes, args.img_size)
    if args.sync_bn:  # DDP: batch-norm statistics over the global batch, not per rank
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)  # DDP:
    model = train.to_device(model, device, args.channels_last)
    train.check_trains(model, args, [device], dtype)  # one step's shapes, tried now
    raw_model = model  # DDP: the unwrapped module, for checkpoints
    model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None,  # DDP:
                **distributed.ddp_kwargs(args))  # DDP: all-reduce in buckets during backward
    distributed.register_comm_hook(model, args.comm_hook)  # DDP: optional compression
    if args.compile:
        model = torch.compile(model)
    samples_per_step = args.batch_size * args.grad_accum_steps
    lr = args.lr or train.default_lr(samples_per_step * ranks.world_size)  # DDP: global batch
    optimizer = train.build_optimizer(model, lr, device)
    scaler = torch.amp.GradScaler(device.type, enabled=amp == "fp16")  # bf16 needs none

    meter = Meter(device, args.warmup_steps, samples_per_step,
                  data_pool_bytes=data.resident_bytes(dataset))
    trainer = train.Trainer(model, optimizer, device, amp=amp,
                            channels_last=args.channels_last,
                            grad_accum_steps=args.grad_accum_steps, meter=meter,
                            lr_warmup_steps=train.lr_warmup_steps(args, steps),
                            show_progress=master_process,  # DDP: one progress bar, rank 0's
                            reduce_sum=distributed.all_reduce_sum,  # DDP: counts of all ranks
                            steps_per_epoch=steps, epochs=args.epochs)
    # DDP: --sync local-sgd: gradients stay local, the replicas are averaged every H steps
    averager = local_sgd.setup(model, args, trainer)  # DDP:
    resumed = distributed.resume(args, raw_model, optimizer, scaler, device)  # DDP:
    # DDP: one result for all ranks, written by rank 0: every rank's device and timings
    run = results.Run(LAB, args, strategy="ddp", devices=[device], sampler=sampler,  # DDP:
                      ranks=ranks, backend=backend, model=model, resumed=resumed,  # DDP:
                      config=results.config_from_args(
                          args, per_device_batch_size=args.batch_size,
                          global_batch_size=samples_per_step * ranks.world_size,  # DDP:
                          steps_per_epoch=steps, amp=amp, lr=lr, num_workers=num_workers,
                          train_set=data.describe(dataset),
                          augmentation_seed=data.augmentation_seed(dataset, args.seed)))

    with run.guard(meter):  # OOM, Ctrl-C or a crash still writes a result with its status
        for epoch in range(resumed.start_epoch, args.epochs):  # DDP: after a checkpoint
            sampler.set_epoch(epoch)  # DDP: a different shuffle every epoch, same on all ranks
            model.train()
            for step in trainer.steps(loader, epoch):  # timed, with lr warmup and progress
                train_step(model, optimizer, scaler, step, dtype)
                averager.after_step()  # DDP: local SGD: every H steps, replicas averaged
            distributed.broadcast_buffers(raw_model)  # DDP: all evaluate rank 0's BN statistics
            trainer.evaluate(val_loader, epoch)  # accuracy; timed apart from training
            if master_process and distributed.checkpoint_due(epoch, args.checkpoint_every):  # DDP:
                distributed.save_checkpoint(args, epoch + 1, raw_model, optimizer, scaler)  # DDP:
        if args.profile_steps:  # DDP: a profiler's timeline of backward and all-reduce
            for step in trainer.profiled_steps(loader, args.profile_steps, run.trace_path()):  # DDP:
                train_step(model, optimizer, scaler, step, dtype)  # DDP:
        if args.comm_probe:  # DDP: the same steps without all-reduce: what the sync costs
            with model.no_sync():  # DDP:
                for step in trainer.compute_only_steps(loader):  # DDP: timed apart
                    train_step(model, optimizer, scaler, step, dtype)  # DDP:

    path = run.write(meter)
    console.print_summary(run.record, path)
    dist.destroy_process_group()  # DDP: leave the group


if __name__ == "__main__":
    launch.run(main, LAB)  # DDP: with --nproc N, N processes each run main(), as torchrun
