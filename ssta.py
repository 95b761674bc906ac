"""SSTA: head-level attention distillation from a supervised teacher and a self-supervised teaching
assistant (Wu et al., "Self-supervised Models are Good Teaching Assistants for Vision Transformers",
ICML 2022). There is no official code (github.com/GlassyWu/SSTA holds only a README): where the paper
leaves a choice open, the choice made is said in place and is a flag here. Names: `teacher` is the supervised teacher (the paper's
SL model), `ta` the self-supervised teaching assistant (its SSL model), in flags and code alike.

  # Table 2: DeiT-Ti student, DeiT-S supervised teacher, DINO ViT-S/16 assistant with its linear probe (8 GPUs)
  torchrun --nproc_per_node=8 ssta.py --student deit_tiny --teacher deit_small --teacher_weights deit_s.pth \\
      --ta vit_small_patch16_224 --ta_weights dino_deitsmall16_pretrain.pth --ta_probe dino_deitsmall16_linearweights.pth \\
      --data_path /imagenet --output_dir out/ssta
  # only the head selection (cached in output_dir/heads.json)
  python ssta.py ... --select_only

Method: in each distilled layer (default: the last three blocks) student head 0 learns the attention
map (N x N, CLS included) of the most important head of the supervised teacher and student head 1 that of
the assistant, by KL(teacher || student) per query row. The most important heads are the
combination (one head per distilled layer, all zeroed together) whose removal costs the teacher the
most accuracy on a fixed held-out subset of the training split; all H^|L| combinations are evaluated
as a tree over the distilled layers. Loss: alpha CE + beta L_teacher + lambda L_ta, with beta = lambda = 0
after the early-stop epoch (default: the first third of training), after which the teachers no longer
run and the student is back to fused attention. Paper: DeiT-Ti 72.2 -> 74.0 top-1 on ImageNet. The recipe is
DeiT's main.py (repeated augmentation on, drop path 0.1, 5 warm-up epochs), as SSTA's 72.2 baseline; that
baseline: vitkd.py --student deit_tiny --drop_path 0.1 --warmup_epochs 5 --clip_grad 0 --repeated_aug.
"""
import argparse
import itertools
import json
import os

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

import common

# the name checkpoints, logs and --resume checks carry: a copy of this file under another name is another script
SCRIPT = os.path.basename(__file__)


def get_args_parser():
    p = argparse.ArgumentParser("SSTA head-level attention distillation", add_help=False)
    g = p.add_argument_group("models")
    g.add_argument("--student", default="deit_tiny", type=str)
    g.add_argument("--patch_size", default=None, type=int, help="student override")
    g.add_argument("--depth", default=None, type=int, help="student override")
    g.add_argument("--embed_dim", default=None, type=int, help="student override")
    g.add_argument("--num_heads", default=None, type=int, help="student override")
    g.add_argument("--drop_path", default=0.1, type=float, help="student drop-path rate (DeiT recipe)")
    g.add_argument("--teacher", default=None, type=str,
                   help="supervised teacher architecture (optional for files of this repository)")
    g.add_argument("--teacher_weights", default="", type=str,
                   help="supervised teacher: file, hub:NAME or 'random'; '' = no supervised teacher")
    g.add_argument("--teacher_key", default=None, type=str)
    g.add_argument("--teacher_mean", default=None, type=float, nargs=3,
                   help="the teacher's input normalisation (default: its file's, timm's config for hub / tagged names, else ImageNet's)")
    g.add_argument("--teacher_std", default=None, type=float, nargs=3)
    common.add_shape_args(g, "teacher_", "the supervised teacher")
    g.add_argument("--ta", default=None, type=str, help="assistant architecture (optional for files of this repository)")
    g.add_argument("--ta_weights", default="", type=str, help="assistant: file, hub:NAME or 'random'; '' = no assistant")
    g.add_argument("--ta_key", default=None, type=str)
    g.add_argument("--ta_mean", default=None, type=float, nargs=3, help="the assistant's input normalisation (default as the teacher's)")
    g.add_argument("--ta_std", default=None, type=float, nargs=3)
    common.add_shape_args(g, "ta_", "the assistant")
    g.add_argument("--ta_probe", default="", type=str,
                   help="the assistant's linear probe (eval_knn_linear.py, or DINO's *_linearweights.pth): its classifier for head selection")
    g.add_argument("--ta_supervised", action=argparse.BooleanOptionalAction, default=False,
                   help="the assistant is a supervised model with its own classifier (Table 3's two-supervised-teachers row)")
    # DeiT's main.py recipe (the paper follows DeiT; its 72.2 DeiT-Ti baseline is DeiT's): lr 5e-4 per 512, 5 warm-up
    # epochs, no clipping, repeated augmentation on (and --drop_path 0.1 above)
    g = p.add_argument_group("optimisation (DeiT's main.py)")
    g.add_argument("--epochs", default=300, type=int)
    g.add_argument("--batch_size", default=128, type=int, help="per process (8 x 128 = 1024 on 8 GPUs)")
    g.add_argument("--blr", default=2.5e-4, type=float, help="lr per 256 images (DeiT: 5e-4 per 512)")
    g.add_argument("--lr", default=None, type=float, help="absolute lr (overrides --blr)")
    g.add_argument("--min_lr", default=1e-5, type=float, help="end of the cosine")
    g.add_argument("--warmup_epochs", default=5, type=int, help="linear warm-up")
    g.add_argument("--warmup_ratio", default=1e-3, type=float, help="warm-up starts at lr x ratio")
    g.add_argument("--weight_decay", default=0.05, type=float)
    g.add_argument("--clip_grad", default=0.0, type=float, help="gradient-norm clipping (0: off)")
    g = p.add_argument_group("augmentation (DeiT's)")
    g.add_argument("--randaug", default="rand-m9-mstd0.5-inc1", type=str, help="timm RandAugment string ('' = off)")
    g.add_argument("--reprob", default=0.25, type=float, help="random erasing probability")
    g.add_argument("--smoothing", default=0.1, type=float, help="label smoothing")
    g.add_argument("--mixup", default=0.8, type=float, help="Mixup alpha (0 = off)")
    g.add_argument("--cutmix", default=1.0, type=float, help="CutMix alpha (0 = off)")
    g.add_argument("--mixup_prob", default=1.0, type=float)
    g.add_argument("--mixup_switch_prob", default=0.5, type=float)
    g.add_argument("--repeated_aug", action=argparse.BooleanOptionalAction, default=True,
                   help="DeiT's repeated augmentation (3 augmented copies of each image per epoch; DeiT's main.py: on)")
    g.add_argument("--eval_every", default=1, type=int, help="evaluate every N epochs (and at the end)")
    g = p.add_argument_group("SSTA (paper 3.2: head selection, Eq. 5-7: the loss)")
    g.add_argument("--distill_layers", default=[-3, -2, -1], type=int, nargs="+", help="blocks distilled (paper: 10-12 of 12)")
    g.add_argument("--early_stop_epoch", default=None, type=int,
                   help="last distillation epoch + 1 (default: a third of --epochs, the paper's 100 of 300; --epochs: never stop)")
    g.add_argument("--alpha", default=1.0, type=float, help="weight of the cross-entropy")
    g.add_argument("--beta", default=1.0, type=float, help="weight of the supervised teacher's loss")
    g.add_argument("--lambda_ta", default=1.0, type=float, help="weight of the assistant's loss")
    g.add_argument("--head_mode", default="imp", choices=["imp", "avg", "rand"],
                   help="target head: most important (imp), mean of the layer's heads (avg), seeded random (rand) (Table 3)")
    g.add_argument("--heads_teacher", default=None, type=int, nargs="+", help="supervised teacher heads by hand, one per distilled layer")
    g.add_argument("--heads_ta", default=None, type=int, nargs="+", help="assistant heads by hand, one per distilled layer")
    g.add_argument("--assignment", default="eq", choices=["eq", "fig6"],
                   help="eq: student head 0 <- teacher, head 1 <- assistant (Eq. 5-6); fig6: the reverse (Fig. 6 caption)")
    g.add_argument("--kl", default="forward", choices=["forward", "reverse"], help="KL(teacher || student) or the reverse")
    g.add_argument("--teacher_loss", default="head", choices=["head", "lkd", "at"],
                   help="the supervised teacher's loss: head-level (ours), logit KD or attention transfer (Table 6)")
    g.add_argument("--kd_temperature", default=1.0, type=float, help="for --teacher_loss lkd and --distill_token soft")
    g.add_argument("--distill_token", default="none", choices=["none", "hard", "soft"],
                   help="Table 2's distilled rows: the student (timm deit_*_distilled_*) also learns from --token_teacher "
                        "through its distillation token (DeiT); its maps drop that token before the head-level losses")
    g.add_argument("--token_teacher", default=None, type=str, help="the token's teacher (a CNN or any classifier)")
    g.add_argument("--token_teacher_weights", default="", type=str, help="file, hub:NAME or 'random'")
    g.add_argument("--token_teacher_key", default=None, type=str)
    common.add_shape_args(g, "token_teacher_", "the token's teacher")
    g.add_argument("--token_weight", default=0.5, type=float, help="DeiT's alpha between the class and distillation heads")
    g.add_argument("--selection_images", default=10000, type=int, help="held-out training images for head selection")
    g.add_argument("--selection_batch_size", default=64, type=int)
    g.add_argument("--select_only", action="store_true", help="select the heads, write heads.json, stop")
    common.add_data_args(p)
    common.add_run_args(p)
    return p


def main(args):
    device = common.init_distributed()
    # ---------------- checks, before any work ----------------
    use_teacher, use_ta = bool(args.teacher_weights) and args.beta > 0, bool(args.ta_weights) and args.lambda_ta > 0
    if not (use_teacher or use_ta):
        common.fail("no teacher: give --teacher_weights and/or --ta_weights (with --beta / --lambda_ta > 0); "
                    "for the plain baseline with this recipe use vitkd.py without a teacher and --drop_path 0.1 "
                    "--warmup_epochs 5 --clip_grad 0 --repeated_aug (DeiT's; vitkd.py's defaults are mmcls')")
    if (args.distill_token != "none") != bool(args.token_teacher_weights):
        common.fail("--distill_token and --token_teacher_weights go together (the token's teacher)")
    if use_ta and args.head_mode == "imp" and not args.heads_ta and not (args.ta_probe or args.ta_supervised):
        common.fail("choosing the assistant's heads needs its classifier: --ta_probe (or --ta_supervised, or --heads_ta)")
    early = args.epochs // 3 if args.early_stop_epoch is None else args.early_stop_epoch
    if early < 1:
        common.fail(f"the distillation would be empty: it stops at epoch {early} (--early_stop_epoch, default a third of "
                    f"--epochs {args.epochs}); give --early_stop_epoch >= 1 or more --epochs")
    ckpt = common.resume_checkpoint(args, SCRIPT)
    start_epoch = ckpt["epoch"] if ckpt is not None else 0
    common.seed_everything(args.seed)

    # ---------------- data ----------------
    train_set, loader, val_loader, mixup, criterion = common.build_supervised_data(args)
    num_classes = len(train_set.classes)

    # ---------------- student and teachers ----------------
    torch.manual_seed(args.seed)
    mean_std = common.data_stats(args)  # the student's input normalisation = the data pipeline's
    student = common.create_model(args.student, num_classes=num_classes, img_size=args.input_size,
                                  patch_size=args.patch_size, depth=args.depth, embed_dim=args.embed_dim,
                                  num_heads=args.num_heads, drop_path_rate=args.drop_path, mean=mean_std[0], std=mean_std[1]).to(device)
    token_teacher = None
    if args.distill_token != "none":
        if not hasattr(student, "set_distilled_training"):
            common.fail(f"--distill_token needs a student with a distillation token (timm deit_*_distilled_*), not {args.student}")
        student.set_distilled_training(True)  # training: (class head, distillation head) logits; eval: their mean
        token_teacher = common.build_teacher(args.token_teacher, args.token_teacher_weights, args.token_teacher_key, mean_std,
                                             label="token_teacher", num_classes=num_classes, img_size=args.input_size,
                                             trust=args.trust_checkpoint, **common.shape_args(args, "token_teacher_")).to(device)
    layers = {"student": resolve_layers(args.distill_layers, student, "student")}
    # the student head that learns from each teacher (paper: head 0 from the SL teacher, head 1 from the assistant)
    student_head = {"teacher": 0, "ta": 1} if args.assignment == "eq" else {"teacher": 1, "ta": 0}
    if student.blocks[0].attn.num_heads < (2 if use_teacher and use_ta else 1):
        common.fail(f"the student has {student.blocks[0].attn.num_heads} head(s); SSTA needs one per teacher")
    if not (use_teacher and use_ta):
        student_head = {"teacher": 0, "ta": 0}  # a single teacher teaches head 0
    teachers = {}
    # built and checked at the start of every run, except a run resumed after the early stop, which needs none
    if use_teacher and start_epoch < early:
        teachers["teacher"] = common.build_teacher(args.teacher, args.teacher_weights, args.teacher_key, mean_std,
                                                   args.teacher_mean, args.teacher_std, num_classes=num_classes,
                                                   img_size=args.input_size, trust=args.trust_checkpoint,
                                                   **common.shape_args(args, "teacher_")).to(device)
    if use_ta and start_epoch < early:
        teachers["ta"] = common.build_teacher(args.ta, args.ta_weights, args.ta_key, mean_std, args.ta_mean, args.ta_std,
                                              label="ta", img_size=args.input_size,
                                              num_classes=num_classes if args.ta_supervised else 0, trust=args.trust_checkpoint,
                                              **common.shape_args(args, "ta_")).to(device)
    for name, t in teachers.items():
        if not hasattr(t, "blocks") and (name == "ta" or args.teacher_loss != "lkd"):
            common.fail(f"the {name} is a {type(t).__name__}: head-level losses need a ViT (a CNN teacher works "
                        "with --teacher_loss lkd)")
        if hasattr(t, "blocks"):
            layers[name] = resolve_layers(args.distill_layers, t, name)
            check_tokens(student, t, name)
    if "ta" in teachers and args.head_mode == "imp" and not args.heads_ta and not args.ta_supervised:
        teacher_classifier(args, "ta", teachers["ta"], device, num_classes)  # a bad --ta_probe: an error now

    # ---------------- head selection (cached in output_dir/heads.json) ----------------
    common.start_run(args, SCRIPT)  # every check has passed: output_dir is written from here on
    heads = {}
    if teachers:
        attending = {n: t for n, t in teachers.items() if n == "ta" or args.teacher_loss == "head"}  # maps read
        heads = select_heads(args, attending, {n: layers[n] for n in attending}, train_set, device)
        if args.select_only:
            return heads
    student_ddp = DistributedDataParallel(student) if common.get_world_size() > 1 else student
    common.compile_models(args, student, token_teacher, *teachers.values())  # after head selection: it runs eager

    # ---------------- optimizer, resume ----------------
    lr = common.resolve_lr(args)
    optimizer = torch.optim.AdamW(common.param_groups(student, args.weight_decay), lr=lr)
    scaler = common.grad_scaler(device, args.amp)
    state = dict(model=student, optimizer=optimizer, scaler=scaler)  # saved every epoch, restored here
    common.restore(ckpt, **state)
    schedule = common.lr_schedule(lr, args.min_lr, args.epochs * len(loader), args.warmup_epochs * len(loader),
                                  lr * args.warmup_ratio)

    # ---------------- taps: attention maps of the distilled blocks only ----------------
    taps = {}
    if teachers:
        # q and k kept only where a head-level loss reads the maps; block outputs only for attention transfer
        maps = {"teacher": args.teacher_loss == "head", "ta": True}
        maps["student"] = any(maps[n] for n in teachers)
        tokens = {"teacher": args.teacher_loss == "at", "ta": False, "student": args.teacher_loss == "at" and "teacher" in teachers}
        taps = {n: common.ViTTaps(m, attn_blocks=layers[n] if maps[n] else (), token_blocks=layers[n] if tokens[n] else ())
                for n, m in (("student", student), *teachers.items()) if n in layers}  # a CNN teacher (lkd): no taps
    # the distilled pairs of each teacher: the i-th distilled block of the student learns from the i-th of the teacher,
    # (student block, teacher block, the teacher's selected head there: an index or 'avg', the student head)
    pairs = {n: [(s, t, heads[n][i] if n in heads else None, student_head[n])
                 for i, (s, t) in enumerate(zip(layers["student"], layers[n]))] for n in teachers if n in layers}

    # ---------------- training ----------------
    common.print0(f"| distillation until epoch {early}, training until {args.epochs}")
    test_stats = {}
    for epoch in range(start_epoch, args.epochs):
        if epoch == early and teachers:  # early stop: drop the teachers and the taps: the plain student's step
            for t in taps.values():
                t.close()
            teachers, taps = {}, {}
            common.print0(f"| early stop of the distillation at epoch {epoch}")
        common.seed_everything(args.seed, epoch)
        loader.sampler.set_epoch(epoch)
        train_stats = train_one_epoch(student_ddp, teachers, token_teacher, taps, pairs, loader, criterion, mixup, optimizer,
                                      scaler, schedule, epoch, device, args)
        test_stats = {}  # logged only where measured
        if (epoch + 1) % args.eval_every == 0 or epoch + 1 == args.epochs:
            test_stats = common.evaluate(student, val_loader, device, args.amp)
            common.print0(f"| epoch {epoch}: top-1 {test_stats['acc1']:.2f}  top-5 {test_stats['acc5']:.2f}")
        common.end_epoch(args.output_dir, SCRIPT, args, epoch, train_stats, test_stats, args.save_every,
                         model_config=student.model_config, **state)
    for t in taps.values():
        t.close()
    common.export_backbone(student, os.path.join(args.output_dir, "student_backbone.pth"))
    if not test_stats:
        test_stats = common.evaluate(student, val_loader, device, args.amp)
    common.print0(f"| final top-1 {test_stats['acc1']:.2f}  top-5 {test_stats['acc5']:.2f}")
    return student, test_stats


def train_one_epoch(student, teachers, token_teacher, taps, pairs, loader, criterion, mixup, optimizer, scaler, schedule,
                    epoch, device, args):
    student.train()
    meter = common.Meter()
    steps = len(loader)
    for it, batch in enumerate(meter.timed(loader)):
        lr = schedule(epoch * steps + it)
        for g in optimizer.param_groups:
            g["lr"] = lr
        images, target = common.to_device(batch, device, loader)
        if mixup is not None:
            images, target = mixup(images, target)
        with common.autocast(device, args.amp):
            t_out = {}  # the teacher's logits for --teacher_loss lkd; otherwise only the taps' maps / tokens are read
            with torch.no_grad():  # all three networks see the same (mixed) batch
                for name, t in teachers.items():
                    t_out[name] = t(images) if name == "teacher" and args.teacher_loss == "lkd" else t.forward_features(images)
                token_logits = token_teacher(images) if token_teacher is not None else None  # all training long
            # the taps keep q and k of the distilled blocks (and .tokens[block] for --teacher_loss at) in these forwards
            logits = student(images)
            if token_teacher is not None:  # DeiT: the class head learns the labels, the distillation head the teacher
                logits, dist_logits = logits
            w_ce = args.alpha * (1 - args.token_weight if token_teacher is not None else 1)
            losses = {"ce": w_ce * criterion(logits, target)}
            if token_teacher is not None:
                losses["token"] = args.token_weight * common.token_loss(dist_logits, token_logits, args.distill_token,
                                                                        args.kd_temperature)
            losses.update(ssta_losses(logits, t_out, taps, pairs, args))
            loss = sum(losses.values())
        meter.log(epoch, it, steps, args.log_every, loss=loss, lr=lr, **losses)
        scaler.scale(loss).backward()
        if args.clip_grad > 0:
            scaler.unscale_(optimizer)
            nn.utils.clip_grad_norm_(student.parameters(), args.clip_grad)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
    return common.reduce_metrics(meter.averages(), device)


# ---------------------------------------------------------------------------------------------
# losses and targets
# ---------------------------------------------------------------------------------------------
def ssta_losses(logits, t_out, taps, pairs, args):
    """{teacher name: its weighted distillation term} for the teachers still teaching (t_out: their outputs, in the
    order teacher, assistant). Paper Eq. 5-7: per distilled pair, KL between the teacher head's map and the student
    head's (beta for the supervised teacher, lambda for the assistant), summed over pairs. Only the selected heads'
    maps are computed (from the taps' q and k): every pair of every teacher in one batched map per network and one
    KL. --teacher_loss lkd: logit KD from the teacher instead; at: attention transfer between the paired blocks'
    tokens."""
    losses, head_level = {}, []
    for name, out in t_out.items():
        if name == "teacher" and args.teacher_loss == "lkd":
            losses[name] = args.beta * common.kd_loss(logits, out, args.kd_temperature)
        elif name == "teacher" and args.teacher_loss == "at":
            npt = taps["student"].num_prefix_tokens
            losses[name] = args.beta * sum(attention_transfer(taps["student"].tokens[s], taps[name].tokens[t], npt)
                                           for s, t, _, _ in pairs[name])
        else:
            head_level.append(name)
    if head_level:
        every = [p for name in head_level for p in pairs[name]]  # (student block, teacher block, t head, s head)
        student_maps = taps["student"].maps([p[0] for p in every], [p[3] for p in every], cls_patches=True)
        targets = torch.cat([teacher_maps(taps[name], pairs[name]) for name in head_level])
        kl = attention_kd_loss(student_maps, targets, reverse=args.kl == "reverse")  # one value per pair
        start = 0
        for name in head_level:
            n = len(pairs[name])
            losses[name] = (args.beta if name == "teacher" else args.lambda_ta) * kl[start:start + n].sum()
            start += n
    return {name: losses[name] for name in t_out}  # in t_out's order


def attention_kd_loss(student_attn, teacher_attn, reverse=False, eps=1e-8):
    """(..., B, N, N) maps of one head each: KL(teacher || student) of every query row (summed over keys), mean over
    batch and rows: one value per leading index (a scalar for B x N x N). fp32, probabilities clamped at eps (bf16
    rows underflow). reverse=True: KL(student || teacher)."""
    s, t = student_attn.float().clamp_min(eps), teacher_attn.float().detach().clamp_min(eps)
    p, q = (s, t) if reverse else (t, s)
    return (p * (p.log() - q.log())).sum(-1).mean((-2, -1))


def teacher_maps(taps, pairs):
    """The teacher's target maps of its distilled pairs, L x B x (1 + P) x (1 + P), CLS and patches: each block's
    selected head, or the mean of its heads ('avg')."""
    blocks, heads = [t for _, t, _, _ in pairs], [h for _, _, h, _ in pairs]
    if "avg" not in heads:
        return taps.maps(blocks, heads, cls_patches=True)
    return torch.stack([teacher_map(taps, b, h) for b, h in zip(blocks, heads)])


def teacher_map(taps, layer, head):
    """The teacher's target map in `layer`: one head (an int) or the mean of all heads ('avg'), over CLS and patches."""
    if head != "avg":
        return taps.maps([layer], [head], cls_patches=True)[0]
    return cls_and_patches(taps.maps([layer])[0].mean(1), taps.num_prefix_tokens)


def cls_and_patches(a, num_prefix_tokens):
    """B x N x N maps -> B x (1 + P) x (1 + P): prefix tokens other than CLS (DeiT's distillation token, registers)
    dropped, rows and columns, and the rows renormalised (our choice: the paper does not say), so that every network's maps
    compare. (ViTTaps.maps(..., cls_patches=True) gives the same from q and k, without the full map.)"""
    if num_prefix_tokens == 1:
        return a
    a = torch.cat([a[:, :1], a[:, num_prefix_tokens:]], 1)  # slices, no index tensor: no host-to-device copy per step
    a = torch.cat([a[..., :1], a[..., num_prefix_tokens:]], -1)
    return a / a.sum(-1, keepdim=True)


def attention_transfer(s_tokens, t_tokens, npt):
    """Attention transfer (Zagoruyko & Komodakis) on ViT tokens, our reading for Table 6: the spatial map
    mean_c(F^2) of the patch tokens, L2-normalised, squared distance, batch mean."""
    a_s = F.normalize(s_tokens[:, npt:].float().pow(2).mean(-1), dim=1)
    a_t = F.normalize(t_tokens[:, -a_s.shape[1]:].float().pow(2).mean(-1), dim=1)
    return (a_s - a_t).pow(2).sum(1).mean()


# ---------------------------------------------------------------------------------------------
# head selection (paper 3.2.1)
# ---------------------------------------------------------------------------------------------
def select_heads(args, teachers, layers, train_set, device):
    """{'teacher' / 'ta': [head per distilled layer] or 'avg' entries}; layers: {name: its distilled blocks}.
    imp mode: the combination with the
    largest accuracy drop on a fixed held-out subset of the training split (cached, with every
    combination's accuracy, in output_dir/heads.json); --heads_teacher / --heads_ta by hand; rand: seeded."""
    by_hand = {"teacher": args.heads_teacher, "ta": args.heads_ta}
    path = os.path.join(args.output_dir, "heads.json")
    cached = {}
    if os.path.exists(path):
        with open(path) as f:
            cached = json.load(f)
    n = min(args.selection_images, len(train_set))
    subset = torch.randperm(len(train_set), generator=torch.Generator().manual_seed(args.seed))[:n].sort().values
    heads, record = {}, {}
    for name, model in teachers.items():
        H, L = model.blocks[0].attn.num_heads, len(layers[name])
        key = {"weights": args.teacher_weights if name == "teacher" else args.ta_weights, "probe": args.ta_probe if name == "ta" else "",
               "layers": layers[name], "images": n, "seed": args.seed, "mode": args.head_mode}
        if by_hand[name]:
            if len(by_hand[name]) != L or not all(0 <= h < H for h in by_hand[name]):
                common.fail(f"--heads_{name} needs one head in [0, {H}) per distilled layer ({L})")
            heads[name] = list(by_hand[name])
        elif args.head_mode == "avg":
            heads[name] = ["avg"] * L
        elif args.head_mode == "rand":
            g = torch.Generator().manual_seed(args.seed + (0 if name == "teacher" else 1))
            heads[name] = torch.randint(0, H, (L,), generator=g).tolist()
        elif cached.get(name, {}).get("key") == key:
            heads[name] = cached[name]["heads"]
            common.print0(f"| {name} heads {heads[name]} from {path}")
        else:
            classify, need = teacher_classifier(args, name, model, device, len(train_set.classes))
            eval_set = common.build_dataset(args, "train", common.build_transform(args, False))
            data = torch.utils.data.Subset(eval_set, subset.tolist())
            loader = common.build_loader(data, args.selection_batch_size, False, args.num_workers)
            acc_all, accs = head_importance(model, classify, need, layers[name], loader, device, args.amp)
            combos = list(itertools.product(range(H), repeat=L))
            best = max(range(len(accs)), key=lambda i: (acc_all - accs[i], -i))  # ties: the lowest combination
            heads[name] = [int(h) for h in combos[best]]
            record[name] = {"key": key, "heads": heads[name], "acc_all": acc_all,
                            "importance": {",".join(map(str, c)): acc_all - a for c, a in zip(combos, accs)},
                            "indices": subset.tolist()}
            common.print0(f"| {name}: accuracy {acc_all:.2f}% on {n} held-out training images; most important "
                          f"heads {heads[name]} (drop {acc_all - accs[best]:.2f} points)")
    if record and common.is_main_process():
        cached.update(record)
        with open(path + ".tmp", "w") as f:
            json.dump(cached, f)
        os.replace(path + ".tmp", path)
    return heads


def teacher_classifier(args, name, model, device, num_classes=None):
    """(classify(last_tokens, block_outputs) -> logits, blocks whose outputs it reads) for head selection:
    the teacher's own head, or the assistant's linear probe on the feature it was trained on (its classes:
    num_classes, the data's, when given)."""
    if name == "teacher" or args.ta_supervised:
        return (lambda x, outs: model.forward_head(model.norm(x))), set()
    probe, spec = common.load_probe(args.ta_probe, model.embed_dim, args.trust_checkpoint)
    need = set(common.feature_blocks(model, [spec]))
    dim = common.features_from_tokens(model, {b: torch.zeros(1, 2, model.embed_dim) for b in need}, spec).shape[1]
    if probe.linear.in_features != dim:
        common.fail(f"--ta_probe {args.ta_probe} expects {probe.linear.in_features}-d features, but its spec {spec} "
                    f"gives {dim} on this assistant")
    if num_classes is not None and probe.linear.out_features != num_classes:
        common.fail(f"--ta_probe {args.ta_probe} classifies {probe.linear.out_features} classes, the data has {num_classes}: "
                    "the assistant's probe must be trained on the data's classes")
    probe = probe.to(device)

    def classify(x, outs):
        return probe(common.features_from_tokens(model, {b: model.norm(outs[b]) for b in need}, spec).float())
    return classify, need


@torch.no_grad()
def head_importance(model, classify, need, layers, loader, device, amp="bf16"):
    """Accuracy (%) with all heads and with each combination (one head zeroed per distilled layer, all at
    once), in itertools.product order. Tree evaluation: the blocks before the first distilled layer run
    once per image; each zeroed head of a distilled layer runs once and its output feeds every choice
    in the next distilled layer (3 layers of 6 heads: 6 + 36 + 216 block runs per image, not 216
    full forwards; bench/bench_ssta.py has the brute-force search it equals). Sharded over processes; every
    process returns the same numbers."""
    depth = len(model.blocks)
    H = model.blocks[layers[0]].attn.num_heads
    combos = list(itertools.product(range(H), repeat=len(layers)))
    hits = torch.zeros(len(combos) + 1, device=device, dtype=torch.float64)  # last entry: all heads
    count = torch.zeros(1, device=device, dtype=torch.float64)
    taps = common.ViTTaps(model)  # head masks only

    def run(x, outs, first, stop):  # blocks [first, stop) on all rows, keeping the outputs the classifier reads
        for b in range(first, stop):
            x = model.blocks[b](x)
            if b in need:
                outs[b] = x
        return x

    def zeroed(rows, per_row_head):  # (rows, H) masks with one head off per row
        m = torch.ones(rows, H, device=device)
        m[torch.arange(rows, device=device), per_row_head] = 0
        return m

    def subtree(x, outs, level):  # -> logits (H, ..., H, B, C) for every choice of the remaining layers
        B = x.shape[0]
        l = layers[level]
        xs = x.repeat(H, 1, 1)  # child h: rows h*B .. (h+1)*B
        outs = {b: v.repeat(H, 1, 1) for b, v in outs.items()}
        taps.set_head_masks({l: zeroed(H * B, torch.arange(H, device=device).repeat_interleave(B))})
        xs = model.blocks[l](xs)
        taps.set_head_masks({})
        if l in need:
            outs[l] = xs
        xs = run(xs, outs, l + 1, layers[level + 1] if level + 1 < len(layers) else depth)
        if level + 1 == len(layers):
            return classify(xs, outs).unflatten(0, (H, B))
        return torch.stack([subtree(xs[h * B:(h + 1) * B], {b: v[h * B:(h + 1) * B] for b, v in outs.items()}, level + 1)
                            for h in range(H)])

    try:
        for images, target in common.progress(loader, "head selection"):
            images, target = images.to(device), target.to(device)
            with common.autocast(device, amp):
                x = common.vit_embed(model, images)
                outs = {}
                x = run(x, outs, 0, layers[0])
                all_outs = dict(outs)
                logits_all = classify(run(x, all_outs, layers[0], depth), all_outs)
                logits = subtree(x, outs, 0).reshape(len(combos), len(images), -1)
            hits[:-1] += (logits.argmax(-1) == target).sum(1).double()
            hits[-1] += (logits_all.argmax(-1) == target).sum().double()
            count += len(target)
    finally:
        taps.close()
    common.all_reduce_sum(hits)
    common.all_reduce_sum(count)
    acc = (100.0 * hits / count.clamp_min(1)).tolist()
    return acc[-1], acc[:-1]


# ---------------------------------------------------------------------------------------------
# checks
# ---------------------------------------------------------------------------------------------
def resolve_layers(layers, model, name):
    """Distilled block indices of one model (0-based, sorted; negative indices count from its end)."""
    depth = len(model.blocks)
    if any(not -depth <= l < depth for l in layers):
        common.fail(f"--distill_layers {layers} outside the {depth} blocks of the {name}")
    out = sorted({l % depth for l in layers})
    if len(out) != len(layers):
        common.fail(f"--distill_layers {layers} name a block of the {name} twice")
    return out


def check_tokens(student, teacher, name):
    s_grid, t_grid = tuple(student.patch_embed.grid_size), tuple(teacher.patch_embed.grid_size)
    if s_grid != t_grid or getattr(teacher, "cls_token", None) is None:
        common.fail(f"student and {name} attention maps differ: patch grids {s_grid} vs {t_grid}, prefix tokens "
                    f"{student.num_prefix_tokens} vs {teacher.num_prefix_tokens} (same input size and patch size needed)")


if __name__ == "__main__":
    common.run_main(main, argparse.ArgumentParser(SCRIPT, parents=[get_args_parser()]))
