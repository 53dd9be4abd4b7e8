"""launch.py: process groups, DDP, DeepSpeed, precision; a reader of ALT may skip it.

How train.py runs under python, torchrun (DDP) and deepspeed: the process group, the model
wrapper, bf16 autocast, the optimizer step, and the optimizer's share of a resume checkpoint (under
DeepSpeed, each rank's ZeRO shard). None of it changes Equation 1.
"""

import contextlib
import os

import torch

import bookkeeping
from bookkeeping import AltError


def setup_distributed(args):
    """-> (rank, world, device). torchrun and the deepspeed launcher set RANK, WORLD_SIZE and
    LOCAL_RANK; a plain `python train.py` is a world of one. DDP's process group (gloo on CPU, nccl
    on GPU) or DeepSpeed's starts here."""
    if args.deepspeed:
        try:
            import deepspeed
        except ImportError:
            raise AltError(
                "--deepspeed needs the deepspeed package (pip install --no-build-isolation -r "
                "requirements-dist.txt)"
            ) from None
        if not os.path.isfile(args.deepspeed):
            raise AltError(f"{args.deepspeed}: DeepSpeed config not found")
        for k, v in dict(
            RANK=0, WORLD_SIZE=1, LOCAL_RANK=0, MASTER_ADDR="127.0.0.1", MASTER_PORT=29500
        ).items():
            # a plain `python train.py --deepspeed` is a 1-process world
            os.environ.setdefault(k, str(v))
    rank, world, local = (int(os.environ.get(k, 0)) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    world, cuda = max(world, 1), torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(local)
    if args.deepspeed:
        deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo")
    elif world > 1:
        torch.distributed.init_process_group("nccl" if cuda else "gloo")
    return rank, world, f"cuda:{local}" if cuda else "cpu"


def barrier():
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def all_sum(values, device):
    """Σ over ranks in float64 (a list or a tensor -> a CPU tensor); NCCL reduces GPU tensors."""
    t = torch.as_tensor(values, dtype=torch.float64)
    if torch.distributed.is_initialized():
        t = t.to(device)
        torch.distributed.all_reduce(t)
    return t.cpu()


def sync_grads(fwd, last):
    """As nanoGPT: DDP all-reduces the gradients on a step's last micro-batch only (set before its
    forward)."""
    if isinstance(fwd, torch.nn.parallel.DistributedDataParallel):
        fwd.require_backward_grad_sync = last


def close():
    """Every rank waits for rank 0's outputs, then the process group ends."""
    barrier()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def wrap_model(args, model, optimizer, scheduler, zero, world, device, bf16):
    """The one place where python, torchrun (DDP) and deepspeed differ
    -> (fwd, optimizer, ctx, backward, update):
    fwd     p_θ's forward: `model` itself, DDP around it, or DeepSpeed's engine;
    ctx     the precision context: bf16 autocast or nothing (nothing where DeepSpeed keeps bf16
            weights itself);
    backward(L)  adds L's gradients, under ctx like the forward (train.py's autograd has always run
            under the autocast, and bf16 runs' numbers depend on it);
    update()     the optimizer step (clip, AdamW, schedule, zero the gradients) -> the gradient norm
            or None.
    Under DeepSpeed the optimizer becomes its ZeRO wrapper, loaded with `zero` (a resumed shard) if
    given."""
    if args.deepspeed:
        A = args.grad_accum
        want = dict(
            train_micro_batch_size_per_gpu=args.batch_size,
            gradient_accumulation_steps=A,
            train_batch_size=args.batch_size * A * world,
            gradient_clipping=args.max_grad_norm or 0.0,
        )
        engine, optimizer, _, ds_bf16 = deepspeed_engine(
            args.deepspeed, model, optimizer, scheduler, want, bf16
        )
        if zero:
            zero_state(optimizer, load=zero)
        ctx = precision(device, bf16 and not ds_bf16)

        def backward(loss):
            with ctx:
                engine.backward(loss * A)  # DeepSpeed divides by gradient_accumulation_steps
                if not engine.is_gradient_accumulation_boundary():
                    engine.step()  # counts the micro-batch; the boundary's step() is update()'s

        def update():
            with ctx:
                engine.step()  # at the accumulation boundary: clip, AdamW, schedule
            norm = engine.get_global_grad_norm()
            return None if norm is None else float(norm)

        return engine, optimizer, ctx, backward, update

    fwd, ctx = model, precision(device, bf16)
    if world > 1:
        ids = None if device == "cpu" else [torch.device(device).index]
        fwd = torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)

    def backward(loss):
        with ctx:
            loss.backward()

    def update():
        return optimizer_step(model, optimizer, scheduler, args.max_grad_norm)

    return fwd, optimizer, ctx, backward, update


def precision(device, bf16):
    """The run's one precision context, entered for each micro-batch: bf16 autocast or nothing."""
    return (
        torch.autocast(device.split(":")[0], torch.bfloat16) if bf16 else contextlib.nullcontext()
    )


def optimizer_step(model, optimizer, scheduler, clip=None):
    """Clip (if `clip`), step the optimizer and schedule, zero the gradients -> the norm or None."""
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip) if clip else None
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return None if norm is None else float(norm)


def save_checkpoint(args, model, tok, optimizer, scheduler, state, rank):
    """The resume checkpoint in --out: `state`, the weights, the schedule and the optimizer (under
    DeepSpeed, each rank's ZeRO shard instead: zero_state), written by every rank through
    bookkeeping.save_checkpoint."""
    state["scheduler"] = scheduler.state_dict()
    if not args.deepspeed:
        state["optimizer"] = optimizer.state_dict()
    zero = zero_state(optimizer) if args.deepspeed else None
    bookkeeping.save_checkpoint(args.out, model, tok, state, rank, barrier, zero)


def zero_state(optimizer, load=None):
    """This rank's ZeRO shard as plain tensors: the inner AdamW state and the fp32 master partition.
    DeepSpeed's own checkpoint pickles Python objects, which a resume would have to unpickle; these
    load with weights_only=True."""
    # ZeRO-1/2 wrap our AdamW; stage 0 hands it back as it is
    inner = getattr(optimizer, "optimizer", optimizer)
    parts = getattr(optimizer, "single_partition_of_fp32_groups", [])
    if load is None:
        return {"adam": inner.state_dict(), "fp32": [t.detach().cpu() for t in parts]}
    inner.load_state_dict(load["adam"])
    for mine, saved in zip(parts, load["fp32"]):
        mine.data.copy_(saved)


def deepspeed_engine(path, model, optimizer, scheduler, want, bf16):
    """deepspeed.initialize around our model/AdamW/schedule; "auto" config values from `want`."""
    import deepspeed

    cfg = bookkeeping.read_json(path)
    for k, v in want.items():
        if cfg.setdefault(k, "auto") == "auto":
            cfg[k] = v
        elif cfg[k] != v:
            raise AltError(f'{path}: {k}={cfg[k]} disagrees with the flags ({v}); set it to "auto"')
    if cfg.get("zero_optimization", {}).get("stage", 0) == 3:
        raise AltError(
            f"{path}: ZeRO stage 3 is not supported "
            "(its sharded weights would need gathering to save)"
        )
    for k in ("bf16", "fp16"):
        if cfg.get(k, {}).get("enabled") == "auto":
            cfg[k]["enabled"] = bf16 and k == "bf16"
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=cfg
    )
    return engine, optimizer, scheduler, bool(cfg.get("bf16", {}).get("enabled"))
