"""launch.py: process groups, DDP, DeepSpeed, precision, and train.py's run around its loop; a
reader of ALT may skip it (as nanochat's compute_init and save_checkpoint).

How train.py runs under python, torchrun (DDP) and deepspeed: the process group, the model
wrapper, bf16 autocast, the optimizer step, and the optimizer's share of a resume checkpoint (under
DeepSpeed, each rank's ZeRO shard). Then train.py's run: its output folder (prepare_out), p_θ and
p_0 on the device (load_models), Equation 1's vocabulary (sampled_vocab), AdamW, the resume state,
its errors, fingerprint and outputs. None of it changes Equation 1.
"""

import contextlib
import os

import torch

import bookkeeping
import common
from bookkeeping import AltError
from common import meta_path


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


# ----------------------------------------------------------------------------- train.py's run
def prepare_out(args):
    """True when --out is finished (its summary exists) and there is no --overwrite. Under
    --overwrite rank 0 first removes the old summary and resume state: a crashed rerun must not look
    finished, nor resume the old run."""
    # --overwrite deletes parts of --out: no input may be, hold or lie inside it
    bookkeeping.refuse_overlap(
        {"--out": args.out},
        {"--data": args.data, "--model": args.model, "--ref-model": args.ref_model},
    )
    done = [os.path.join(args.out, "train_summary.json")]
    return bookkeeping.finished("train.py", args.out, args, done, done, "done")


def load_models(args, ck, extra, device, bf16):
    """-> (p_θ, p_0, tokenizer). p_θ in fp32 from the resume checkpoint `ck` or --model, with
    Quark's quantile tokens `extra`; p_0 frozen from --ref-model (default --model), in bf16 under
    bf16 runs, and None when β = 0."""
    model, tok = common.load_policy(
        ck or args.model, device, "float32", extra, args.trust_remote_code
    )
    have = {t for t in tok.get_vocab() if t.startswith("<|quantile_")}
    if extra and have != set(extra):
        raise AltError(
            f"{args.model} has {len(have)} quantile tokens but {meta_path(args.data)} lists "
            f"{len(extra)} tags: a pool from another K"
        )
    if not args.beta > 0:
        return model, None, tok
    ref_path = args.ref_model or args.model
    ref, ref_tok = common.load_policy(
        ref_path, device, "bfloat16" if bf16 else "float32", extra, args.trust_remote_code
    )
    if ref_tok.get_vocab() != tok.get_vocab():
        raise AltError(
            f"{ref_path}: p_0's vocabulary differs from {args.model}'s "
            "(the KL needs one vocabulary)"
        )
    return model, ref.eval().requires_grad_(False), tok


def adamw(args, model, total_steps):
    """Gradient checkpointing if asked, dropout on, AdamW, warmup/decay -> (optimizer, schedule)."""
    from transformers import get_linear_schedule_with_warmup

    if args.gradient_checkpointing:
        enable = (
            getattr(model, "activation_checkpointing_enable", None)
            or model.gradient_checkpointing_enable
        )
        enable({"use_reentrant": False})  # the old name is deprecated in recent transformers 5.x
    model.train()  # dropout on (the official code trained in eval mode by mistake)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=args.lr, eps=args.adam_eps, weight_decay=args.weight_decay
    )
    scheduler = get_linear_schedule_with_warmup(
        optimizer, round(args.warmup_ratio * total_steps), total_steps
    )
    return optimizer, scheduler


def sampled_vocab(model, tok, name):
    """The V of Equation 1 -> how many leading vocabulary columns to keep (None: all). NLL, KL and H
    are taken over the tokens sampling can draw: ALT's control tokens (the separator, Quark's
    quantiles) are added last to the vocabulary and suppressed by sample.py, so their columns are
    dropped."""
    control = common.control_token_ids(tok)
    last = list(range(len(tok) - len(control), len(tok)))
    if control != last or model.config.vocab_size != len(tok):
        raise AltError(
            f"{name}: ALT's control tokens must be the last {len(control)} of {len(tok)} ids"
        )
    return control[0] if control else None


def resume(args, ck, fingerprint, optimizer, scheduler, rank):
    """Seed this rank (dropout differs by rank), then restore the resume checkpoint `ck` if any
    -> (step, β, α, this rank's ZeRO shard or None); a fresh run starts at (0, --beta, --alpha)."""
    bookkeeping.seed_everything(args.seed + rank)
    if not ck:
        return 0, args.beta, args.alpha, None
    state = bookkeeping.load_checkpoint(ck, fingerprint, optimizer, scheduler, rank)
    return tuple(state[k] for k in ("step", "beta", "alpha", "zero"))


def too_few_rows(args, n, world):
    """The error when D_k's n trainable rows fill no global batch (an optimizer step's rows)."""
    B, A = args.batch_size, args.grad_accum
    return AltError(
        f"{args.data}: {n} trainable rows, fewer than one global batch "
        f"(batch {B} x grad-accum {A} x world {world} = {B * A * world})"
    )


def nonfinite_loss(total, step, out, bar):
    """The error that stops a run whose step loss is NaN/Inf, before the step's update; closes the
    progress bar so that the error is the last line the user sees."""
    bar.close()
    kept = bookkeeping.find_checkpoint(out)
    return AltError(
        f"non-finite loss ({total}) at step {step + 1}; stopped before the update; "
        + (f"last good checkpoint kept: {kept}" if kept else "no checkpoint yet")
    )


def save_outputs(args, model, tok, meta, counts, fingerprint, final, pad, slots, t_start):
    """Rank 0, once trained: the model, then train_summary.json (its presence marks --out done)."""
    ref_model = (args.ref_model or args.model) if args.beta > 0 else None
    summary = dict(method=meta.get("method"), tags=meta.get("tags") or None)
    summary.update(exemplar=meta.get("exemplar"), data=args.data, model=args.model)
    summary.update(ref_model=ref_model, counts=counts, examples=fingerprint["examples"])
    summary.update(steps=fingerprint["steps"], epochs=args.epochs)
    summary.update(global_batch=fingerprint["global_batch"], world_size=fingerprint["world"])
    summary.update(
        deepspeed=args.deepspeed, final=final, padding_share=round(pad / max(slots, 1), 4)
    )
    path = os.path.join(args.out, "train_summary.json")
    bookkeeping.save_trained(args.out, model, tok, path, summary, t_start, args)
    print(
        f"train.py: {fingerprint['steps']} steps on {fingerprint['examples']} rows -> {args.out} "
        f"(final loss {final['total']:.4f})"
    )


def run_fingerprint(args, n_examples, global_batch, world, steps):
    """What a resume checkpoint must agree with: the data, its size, the step layout, lr, seed."""
    fingerprint = dict(
        data=os.path.abspath(args.data), examples=n_examples, global_batch=global_batch
    )
    fingerprint.update(world=world, steps=steps, lr=args.lr, seed=args.seed)
    return fingerprint
