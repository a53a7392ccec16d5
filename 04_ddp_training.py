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
    cli.check_early(lambda: cli.read_args(LAB, __doc__))
# The imports below come after that on purpose (flake8: E402).

import datetime  # DDP: for the process group's timeout

import torch
import torch.distributed as dist  # DDP: process groups and collectives
from torch.distributed.elastic.multiprocessing.errors import record  # DDP:
from torch.nn.parallel import DistributedDataParallel as DDP  # DDP: the wrapper
from torch.utils.data.distributed import DistributedSampler  # DDP: 1/N the data

from labs import console, data, distributed, files, launch, models, results, train  # DDP:
from labs.measure import Meter


@record  # DDP: torchrun's failure summary then names the rank and shows its traceback
def main() -> None:
    args = cli.parse_args(LAB, __doc__)  # bad input: one line, exit status 2
    ranks = launch.ranks_from_env(args.local_rank)  # DDP: RANK, LOCAL_RANK, WORLD_SIZE
    master_process = ranks.rank == 0  # DDP: only rank 0 prints, checkpoints and writes
    device = distributed.rank_device(ranks, args.device)  # DDP: GPU number LOCAL_RANK
    backend = distributed.choose_backend(args.backend, device)  # DDP: nccl on GPUs, else gloo
    timeout = datetime.timedelta(seconds=args.timeout_s)  # DDP: a dead peer times out
    dist.init_process_group(backend, timeout=timeout,  # DDP: join the group
                            rank=ranks.rank, world_size=ranks.world_size,  # DDP:
                            **launch.process_group_kwargs(ranks, device, backend, timeout))  # DDP:
    files.ensure_writable_dir(args.results_dir)  # an unwritable folder fails now, not after training
    console.warn_if_slow_on_cpu(device, args.preset, show=master_process)  # DDP: rank 0 only

    torch.manual_seed(args.seed)
    train.configure_backends(device)
    amp = train.resolve_amp(args.amp, device)

    dataset = data.build_dataset(args, device)
    sampler = DistributedSampler(dataset, shuffle=True, seed=args.seed,  # DDP: each rank
                                 drop_last=True)  # DDP: its own 1/N of every epoch
    num_workers = data.default_num_workers(args, ranks.local_world_size)  # DDP: cores/rank
    loader = data.build_loader(dataset, args, sampler, device,  # DDP: random crops seeded
                               args.batch_size, num_workers, rank=ranks.rank)  # DDP: per rank
    val_loader = data.build_val_loader(args, device, num_workers,  # DDP: this rank's share
                                       shard=(ranks.rank, ranks.world_size))  # DDP: no repeats
    steps = train.steps_per_epoch(len(loader), args.grad_accum_steps, args.steps_per_epoch)
    train.check_schedule(steps, args.epochs, args.warmup_steps, f"{len(dataset)} images")

    model = models.build_model(args.model, args.num_classes)
    if args.sync_bn:  # DDP: batch-norm statistics over the global batch, not per rank
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)  # DDP:
    model = train.to_device(model, device, args.channels_last)
    raw_model = model  # DDP: the unwrapped module, for checkpoints
    model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None,  # DDP:
                **distributed.ddp_kwargs(args))  # DDP: all-reduce in buckets during backward
    distributed.register_comm_hook(model, args.comm_hook)  # DDP: optional compression
    if args.compile:
        model = torch.compile(model)
    samples_per_step = args.batch_size * args.grad_accum_steps
    lr = args.lr or train.default_lr(samples_per_step * ranks.world_size)  # DDP: global batch
    optimizer = train.build_optimizer(model, lr, device)

    meter = Meter(device, args.warmup_steps, samples_per_step,
                  data_pool_bytes=data.resident_bytes(dataset))
    trainer = train.Trainer(model, optimizer, device, amp=amp,
                            skip_grad_sync=model.no_sync,  # DDP: no all-reduce mid-accumulation
                            show_progress=master_process,  # DDP: one progress bar, rank 0's
                            reduce_sum=distributed.all_reduce_sum,  # DDP: counts of all ranks
                            channels_last=args.channels_last,
                            grad_accum_steps=args.grad_accum_steps, meter=meter,
                            lr_warmup_steps=train.lr_warmup_steps(args, steps),
                            steps_per_epoch=steps, epochs=args.epochs)
    resumed = distributed.resume(args, raw_model, optimizer, trainer.scaler, device)  # DDP:
    run = results.Run(LAB, args, strategy="ddp", writer=master_process,  # DDP: rank 0 writes
                      world=distributed.describe_world(ranks, backend, device, resumed),  # DDP:
                      config=results.config_from_args(
                          args, per_device_batch_size=args.batch_size,
                          global_batch_size=samples_per_step * ranks.world_size,  # DDP:
                          **distributed.ddp_settings(args, backend, raw_model),  # DDP: options
                          steps_per_epoch=steps, amp=amp, lr=lr, num_workers=num_workers,
                          train_set=data.describe(dataset),
                          augmentation_seed=data.augmentation_seed(dataset, args.seed)))
    run.note(*distributed.launch_notes(run.record["world"], device))  # DDP: how it ran

    with run.guard(meter, distributed.PeerReports(ranks.rank, ranks.world_size)):  # DDP:
        for epoch in range(resumed.start_epoch, args.epochs):  # DDP: after a checkpoint
            sampler.set_epoch(epoch)  # DDP: a different shuffle every epoch, same on all ranks
            trainer.train_one_epoch(loader, epoch)
            distributed.broadcast_buffers(raw_model)  # DDP: all evaluate rank 0's BN statistics
            trainer.evaluate(val_loader, epoch)  # accuracy; timed apart from training
            if master_process and distributed.checkpoint_due(  # DDP: rank 0 saves the
                    epoch, args.checkpoint_every):  # DDP: unwrapped model, every N epochs
                distributed.save_checkpoint(args.checkpoint_dir, epoch + 1, raw_model,  # DDP:
                                            optimizer, trainer.scaler)  # DDP:
        if args.comm_probe:  # DDP: the same steps without all-reduce: what sync costs
            trainer.time_compute_only(loader, inside=model.no_sync)  # DDP:

    rank_summaries = distributed.gather_to_rank0(meter.rank_summary(ranks.rank))  # DDP:
    path = run.write(rank_summaries)  # DDP: every rank's measurements; rank 0 writes
    console.print_summary(run.record, path)
    dist.destroy_process_group()  # DDP: leave the group


if __name__ == "__main__":
    launch.run(main, LAB)  # DDP: with --nproc N, N processes each run main(), as torchrun
