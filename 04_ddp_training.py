#!/usr/bin/env python3
"""Step 04: the baseline under DistributedDataParallel, one process per GPU, with AMP.

    torchrun --nproc_per_node=4 04_ddp_training.py --model resnet50 --batch-size 64 --epochs 5
    python 04_ddp_training.py --nproc 2 --preset smoke     # self-launched; CPU over gloo

Each process (rank) holds a full copy of the model, reads its own 1/world_size of the
data, and after backward() DDP averages the gradients across ranks with all-reduce,
bucket by bucket while backward is still running. `--batch-size` is per process.
`grep -n "DDP:" 04_ddp_training.py` lists every line that DDP adds to step 02;
`diff 02_baseline_single_gpu.py 04_ddp_training.py` shows them in place.
"""

import datetime

import torch
import torch.distributed as dist
from torch.distributed.elastic.multiprocessing.errors import record
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data.distributed import DistributedSampler

from labs import cli, console, data, distributed, models, results, train
from labs.measure import Meter

LAB = "04_ddp"


def main() -> None:
    args = cli.parse_args(LAB, __doc__)  # bad input: one line, exit status 2
    results.prepare_dir(args.results_dir)  # an unwritable folder fails now, not after training
    if args.nproc:  # DDP: `--nproc N` starts N copies of rank_main() here, as torchrun would
        distributed.spawn(rank_main, args)
    else:  # DDP: under torchrun this process is one of the ranks
        rank_main(args)


@record  # DDP: torchrun's error summary names the failing rank and shows its traceback
def rank_main(args) -> None:
    ranks = distributed.ranks_from_env(args.local_rank)  # DDP: RANK, LOCAL_RANK, WORLD_SIZE
    rank, world_size = ranks.rank, ranks.world_size
    master_process = rank == 0  # DDP: only rank 0 prints and writes
    distributed.check_backend(args.backend, args.device, ranks.local_world_size)
    device = distributed.device_for(ranks, args.device)
    distributed.check_sync_bn(args.sync_bn, device)
    backend = distributed.choose_backend(args.backend, device)
    if device.type == "cuda":
        torch.cuda.set_device(device)  # DDP: one GPU per rank, chosen by local rank
    timeout = datetime.timedelta(seconds=args.timeout_s)  # a dead peer times out, not hangs
    dist.init_process_group(  # DDP: join the group
        backend, timeout=timeout, rank=rank, world_size=world_size,
        store=distributed.store_for_attempt(ranks, timeout),  # None: env:// as usual
        device_id=device if backend == "nccl" else None)
    try:
        run_training(args, ranks, device, backend, master_process)
    finally:
        dist.destroy_process_group()  # DDP: always leave the group


def run_training(args, ranks, device, backend, master_process) -> None:
    rank, world_size = ranks.rank, ranks.world_size
    if master_process:
        console.warn_if_slow_on_cpu(device, args.preset)

    torch.manual_seed(args.seed)  # same initial weights everywhere (DDP also broadcasts)
    train.configure_backends(device)
    amp = train.resolve_amp(args.amp, device)

    dataset = data.build_dataset(args, device)
    sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank,  # DDP: each
                                 shuffle=True, seed=args.seed, drop_last=True)  # rank 1/N
    num_workers = data.default_num_workers(args, ranks.local_world_size)
    loader = data.build_loader(dataset, args, sampler, device, args.batch_size, num_workers)
    steps = train.steps_per_epoch(len(loader), args.grad_accum_steps, args.steps_per_epoch)
    train.check_schedule(steps, args.epochs, args.warmup_steps,
                         f"{len(dataset)} images over {world_size} ranks")

    model = models.build_model(args.model, args.num_classes)
    if args.sync_bn:  # DDP: batch-norm statistics over the global batch, not per rank
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model = train.prepare_model(model, device, args.channels_last)
    raw_model = model  # DDP: the unwrapped module, for checkpoints
    model = DDP(  # DDP: all-reduce gradients in buckets, overlapped with backward
        model, device_ids=[device.index] if device.type == "cuda" else None,
        bucket_cap_mb=args.bucket_cap_mb, static_graph=args.static_graph,
        find_unused_parameters=args.find_unused_parameters,
        gradient_as_bucket_view=True, **distributed.buffer_sync(args.broadcast_buffers))
    distributed.register_comm_hook(model, args.comm_hook)
    if args.compile:
        model = torch.compile(model)
    samples_per_step = args.batch_size * args.grad_accum_steps
    lr = args.lr or train.default_lr(samples_per_step * world_size)  # DDP: global batch
    optimizer = train.build_optimizer(model, lr, device)

    meter = Meter(device, args.warmup_steps, samples_per_step,
                  data_pool_bytes=data.resident_bytes(dataset))
    trainer = train.Trainer(model, optimizer, device, amp=amp,
                            channels_last=args.channels_last,
                            grad_accum_steps=args.grad_accum_steps, meter=meter,
                            steps_per_epoch=steps, epochs=args.epochs,
                            skip_grad_sync=model.no_sync,  # DDP: no all-reduce mid-accumulation
                            show_progress=master_process)
    start_epoch = 0
    checkpoint = distributed.resolve_resume(args.resume, args.checkpoint_dir)
    if checkpoint is not None:  # DDP: every rank loads the same file into the unwrapped model
        start_epoch = distributed.load_checkpoint(checkpoint, raw_model, optimizer,
                                                  trainer.scaler, device)
    run = results.Run(
        LAB, args, strategy="ddp", writer=master_process,
        config=results.config_from_args(
            args, per_device_batch_size=args.batch_size,
            global_batch_size=samples_per_step * world_size, steps_per_epoch=steps, amp=amp,
            lr=lr, num_workers=num_workers,
            **distributed.ddp_config(args, backend, raw_model)),
        world=distributed.describe_world(ranks, backend, device),
    )
    distributed.note_launch(run, ranks, device, checkpoint, start_epoch)

    with run.guard(meter, rank):  # OOM, Ctrl-C or a crash still writes a result with its status
        for epoch in range(start_epoch, args.epochs):
            sampler.set_epoch(epoch)  # DDP: a different shuffle every epoch, same on all ranks
            trainer.train_one_epoch(loader, epoch)
            if master_process and distributed.checkpoint_due(epoch, args.checkpoint_every):
                distributed.save_checkpoint(args.checkpoint_dir, epoch + 1, raw_model,
                                            optimizer, trainer.scaler)
        if args.comm_probe:  # DDP: the same steps without all-reduce: what sync costs
            trainer.time_compute_only(loader, inside=model.no_sync)

    rank_summaries = distributed.gather_to_rank0(meter.rank_summary(rank))  # DDP: to rank 0
    if master_process:  # DDP: one process writes the result
        path = run.write(rank_summaries)
        console.print_summary(run.record, path)


if __name__ == "__main__":
    cli.run(main)
