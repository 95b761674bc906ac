"""ViTKD: feature distillation for ViTs (Yang et al. 2022), with NKD and classic KD logit losses, and
plain supervised DeiT-recipe training (the baseline, and the way supervised teachers are made here).

  # baseline / a supervised teacher (8 GPUs)
  torchrun --nproc_per_node=8 vitkd.py --student deit_small --data_path /imagenet --output_dir out/deit_s
  # ViTKD + NKD from that teacher (the paper's Table 5, DeiT-Ti student)
  torchrun --nproc_per_node=8 vitkd.py --student deit_tiny --teacher deit_small --teacher_weights out/deit_s/checkpoint.pth \\
      --nkd --data_path /imagenet --output_dir out/vitkd_nkd
  # CPU smoke run on the built-in synthetic data
  python vitkd.py --student deit_tiny --depth 2 --patch_size 8 --dataset synthetic --input_size 32 --epochs 2 --num_workers 0

Method (defaults = the official mmcls code, github.com/yzd-v/cls_KD, mmcls/distillation/losses/vitkd.py): the student's blocks 0 and 1
(full block output, patch tokens only) mimic the teacher's through one Linear adapter each
(L_lr = alpha x sum of squared errors / B, alpha = 3e-5); the student's last block after the
final norm goes through a Linear adapter, exactly half its patch tokens are replaced by a learnable
mask token, and a conv projector (3x3 conv, ReLU, 3x3 conv) must generate the teacher's last-layer
tokens at the masked places (L_gen = beta x sum of squared errors on masked tokens / B / mask ratio,
beta = 3e-6). Total: CE (label smoothing, Mixup / CutMix) + L_lr + L_gen (+ NKD) (+ KD). The paper's
ImageNet numbers (DeiT-Ti 74.42 -> 75.40 ViTKD, 76.18 ViTKD + NKD with a DeiT-S teacher) come from
300 epochs on 8 GPUs with the mmcls recipe that is the default here.
"""
import argparse
import math
import os

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

import common

# the name checkpoints, logs and --resume checks carry: a copy of this file under another name is another script
SCRIPT = os.path.basename(__file__)


def get_args_parser():
    p = argparse.ArgumentParser("ViTKD / NKD / KD / supervised DeiT training", add_help=False)
    g = p.add_argument_group("models")
    g.add_argument("--student", default="deit_tiny", type=str, help="timm name or alias of the student")
    g.add_argument("--patch_size", default=None, type=int, help="student override (default: the architecture's)")
    g.add_argument("--depth", default=None, type=int, help="student override")
    g.add_argument("--embed_dim", default=None, type=int, help="student override")
    g.add_argument("--num_heads", default=None, type=int, help="student override")
    g.add_argument("--drop_path", default=0.0, type=float, help="student drop-path rate (mmcls DeiT-Ti/S: 0; DeiT: 0.1)")
    g.add_argument("--teacher", default=None, type=str,
                   help="teacher architecture; optional for a checkpoint or backbone of this repository")
    g.add_argument("--teacher_weights", default="", type=str,
                   help="file, hub:<timm name>, or 'random' (smoke tests). Without it: plain supervised training")
    g.add_argument("--teacher_key", default=None, type=str, help="top-level key of the teacher file (default: auto)")
    g.add_argument("--teacher_mean", default=None, type=float, nargs=3,
                   help="the teacher's input normalisation (default: its file's, timm's config for hub / tagged names, else ImageNet's)")
    g.add_argument("--teacher_std", default=None, type=float, nargs=3)
    common.add_shape_args(g, "teacher_", "the teacher")
    # the ViTKD paper's recipe (the official mmcls DeiT configs): DeiT's, with 20 warm-up epochs and clipping at 5
    g = p.add_argument_group("optimisation (mmcls DeiT recipe)")
    g.add_argument("--epochs", default=300, type=int)
    g.add_argument("--batch_size", default=128, type=int, help="per process (8 x 128 = 1024 on 8 GPUs)")
    g.add_argument("--blr", default=2.5e-4, type=float, help="lr per 256 images (DeiT: 5e-4 per 512)")
    g.add_argument("--lr", default=None, type=float, help="absolute lr (overrides --blr)")
    g.add_argument("--min_lr", default=1e-5, type=float, help="end of the cosine")
    g.add_argument("--warmup_epochs", default=20, type=int, help="linear warm-up")
    g.add_argument("--warmup_ratio", default=1e-3, type=float, help="warm-up starts at lr x ratio")
    g.add_argument("--weight_decay", default=0.05, type=float)
    g.add_argument("--clip_grad", default=5.0, type=float, help="gradient-norm clipping (0: off)")
    g = p.add_argument_group("augmentation (DeiT's)")
    g.add_argument("--randaug", default="rand-m9-mstd0.5-inc1", type=str, help="timm RandAugment string ('' = off)")
    g.add_argument("--reprob", default=0.25, type=float, help="random erasing probability")
    g.add_argument("--smoothing", default=0.1, type=float, help="label smoothing")
    g.add_argument("--mixup", default=0.8, type=float, help="Mixup alpha (0 = off)")
    g.add_argument("--cutmix", default=1.0, type=float, help="CutMix alpha (0 = off)")
    g.add_argument("--mixup_prob", default=1.0, type=float)
    g.add_argument("--mixup_switch_prob", default=0.5, type=float)
    g.add_argument("--repeated_aug", action=argparse.BooleanOptionalAction, default=False,
                   help="DeiT's repeated augmentation (3 augmented copies of each image per epoch; mmcls: off, DeiT's main.py: on)")
    g.add_argument("--eval_every", default=1, type=int, help="evaluate every N epochs (and at the end)")
    g = p.add_argument_group("ViTKD (paper section 3; the official vitkd.py)")
    g.add_argument("--alpha_vitkd", default=3e-5, type=float, help="weight of L_lr, shallow mimicking (0: off)")
    g.add_argument("--beta_vitkd", default=3e-6, type=float, help="weight of L_gen, deep generation (0: off)")
    g.add_argument("--mimic_layers", default=[0, 1], type=int, nargs="+", help="blocks mimicked (paper Table 7)")
    g.add_argument("--mimic_where", default="ffn", choices=["ffn", "mha"], help="block output or MHA-out (Table 4)")
    g.add_argument("--mimic_type", default="linear", choices=["linear", "correlation"], help="Eq. 2 or Eq. 3-4")
    g.add_argument("--generator", default="conv", choices=["conv", "mae", "cae"],
                   help="conv projector, self-attention blocks (MAE) or cross-attention blocks (CAE) (Table 2)")
    g.add_argument("--generator_depth", default=6, type=int, help="blocks of the mae / cae generators")
    g.add_argument("--mask_ratio", default=0.5, type=float, help="share of patch tokens masked for generation")
    g.add_argument("--vitkd_rescale", action=argparse.BooleanOptionalAction, default=False,
                   help="scale alpha and beta by 196 / patches (the losses are sums over tokens; for small grids)")
    g.add_argument("--resample_teacher_grid", action=argparse.BooleanOptionalAction, default=False,
                   help="resize the teacher's patch grid to the student's when they differ (else: an error)")
    g = p.add_argument_group("logit losses")
    g.add_argument("--nkd", action=argparse.BooleanOptionalAction, default=False, help="add NKD (paper: ViTKD + NKD)")
    g.add_argument("--nkd_gamma", default=1.0, type=float)
    g.add_argument("--nkd_temperature", default=1.0, type=float)
    g.add_argument("--kd_weight", default=0.0, type=float,
                   help="classic KD weight (0: off; the official ViTKD repository's KD: 0.5 with --ce_weight 0.5, T 1)")
    g.add_argument("--kd_temperature", default=1.0, type=float)
    g.add_argument("--ce_weight", default=1.0, type=float, help="weight of the cross-entropy with the labels")
    g.add_argument("--distill_token", default="none", choices=["none", "hard", "soft"],
                   help="DeiT's distillation token (student: a timm deit_*_distilled_* model): its head learns the "
                        "teacher's argmax (hard) or its distribution at --kd_temperature (soft); the class head the labels")
    g.add_argument("--token_weight", default=0.5, type=float,
                   help="DeiT's alpha: (1 - alpha) x the class head's loss + alpha x the distillation head's")
    common.add_data_args(p)
    common.add_run_args(p)
    return p


def main(args):
    device = common.init_distributed()
    # ---------------- checks, before any work ----------------
    token = args.distill_token != "none"
    logit_kd = args.nkd or args.kd_weight > 0 or token
    feature_kd = args.alpha_vitkd > 0 or args.beta_vitkd > 0
    if args.teacher_weights and not (logit_kd or feature_kd):
        common.fail("a teacher is given but every distillation loss is off (--alpha_vitkd / --beta_vitkd / --nkd / "
                    "--kd_weight / --distill_token)")
    if logit_kd and not args.teacher_weights:
        common.fail("--nkd / --kd_weight / --distill_token need a teacher: --teacher_weights")
    if token and args.kd_weight > 0:
        common.fail("--distill_token and --kd_weight both distil the teacher's logits: the token's head takes them, "
                    "leave --kd_weight at 0")
    if args.teacher and not args.teacher_weights:
        common.fail(f"--teacher {args.teacher} needs --teacher_weights (a file, hub:NAME, or 'random' for smoke tests)")
    if not 0 < args.mask_ratio < 1:
        common.fail("--mask_ratio must be in (0, 1)")
    ckpt = common.resume_checkpoint(args, SCRIPT)
    common.seed_everything(args.seed)

    # ---------------- data ----------------
    train_set, loader, val_loader, mixup, criterion = common.build_supervised_data(args)
    num_classes = len(train_set.classes)

    # ---------------- student, teacher, ViTKD modules ----------------
    torch.manual_seed(args.seed)  # the same initial student on every rank
    mean_std = common.data_stats(args)  # the student's input normalisation = the data pipeline's
    student = common.create_model(args.student, num_classes=num_classes, img_size=args.input_size,
                                  patch_size=args.patch_size, depth=args.depth, embed_dim=args.embed_dim,
                                  num_heads=args.num_heads, drop_path_rate=args.drop_path, mean=mean_std[0], std=mean_std[1]).to(device)
    if token:
        if not hasattr(student, "set_distilled_training"):
            common.fail(f"--distill_token needs a student with a distillation token (timm deit_*_distilled_*), not {args.student}")
        student.set_distilled_training(True)  # training: (class head, distillation head) logits; eval: their mean
    teacher = vitkd = None
    if args.teacher_weights:
        # the classifier is only needed (and then must match the data) for the logit losses
        teacher = common.build_teacher(args.teacher, args.teacher_weights, args.teacher_key, mean_std, args.teacher_mean,
                                       args.teacher_std, img_size=args.input_size, num_classes=num_classes if logit_kd else 0,
                                       trust=args.trust_checkpoint, **common.shape_args(args, "teacher_")).to(device)
    if teacher is not None and feature_kd:
        for name, m in (("student", student), ("teacher", teacher)):
            if not hasattr(m, "blocks"):
                common.fail(f"ViTKD needs ViT student and teacher; the {name} is a {type(m).__name__} (use --alpha_vitkd 0 --beta_vitkd 0)")
        s_grid, t_grid = tuple(student.patch_embed.grid_size), tuple(teacher.patch_embed.grid_size)
        if s_grid != t_grid and not args.resample_teacher_grid:
            common.fail(f"student patch grid {s_grid} != teacher patch grid {t_grid}: pass --resample_teacher_grid "
                        "to resize the teacher's tokens to the student's grid")
        num_patches = s_grid[0] * s_grid[1]
        scale = 196 / num_patches if args.vitkd_rescale else 1.0
        vitkd = ViTKDLoss(student.embed_dim, teacher.embed_dim, num_patches, len(args.mimic_layers), args.mimic_type,
                          args.generator, args.generator_depth, args.mask_ratio, args.alpha_vitkd * scale,
                          args.beta_vitkd * scale).to(device)
        common.print0(f"| ViTKD: {num_patches} patches, alpha {vitkd.alpha:.3g}, beta {vitkd.beta:.3g}, "
                      f"{sum(p.numel() for p in vitkd.parameters()) / 1e6:.2f} M extra parameters")
    trainable = nn.ModuleDict({"student": student, **({"vitkd": vitkd} if vitkd is not None else {})})  # for the optimizer
    ddp = common.get_world_size() > 1
    student_ddp = DistributedDataParallel(student) if ddp else student
    # DDP refuses a module with nothing to train (--mimic_type correlation or equal widths, with --beta_vitkd 0)
    vitkd_ddp = DistributedDataParallel(vitkd) if ddp and vitkd is not None and any(
        p.requires_grad for p in vitkd.parameters()) else vitkd
    common.compile_models(args, student, teacher)

    # ---------------- optimizer, schedule, resume ----------------
    lr = common.resolve_lr(args)
    optimizer = torch.optim.AdamW(common.param_groups(trainable, args.weight_decay), lr=lr)
    scaler = common.grad_scaler(device, args.amp)
    state = dict(model=student, vitkd=vitkd, optimizer=optimizer, scaler=scaler)  # saved every epoch, restored here
    start_epoch = common.restore(ckpt, **state)
    schedule = common.lr_schedule(lr, args.min_lr, args.epochs * len(loader), args.warmup_epochs * len(loader),
                                  lr * args.warmup_ratio)

    # ---------------- taps: the features ViTKD reads, captured during the normal forwards ----------------
    taps = None
    if vitkd is not None:
        shallow = args.mimic_layers if args.alpha_vitkd > 0 else []
        taps = {name: (common.ViTTaps(m, token_blocks=shallow, where=args.mimic_where),
                       common.ViTTaps(m, token_blocks=[-1], norm=True)) for name, m in (("student", student), ("teacher", teacher))}

    # ---------------- training ----------------
    common.start_run(args, SCRIPT)
    common.print0(f"| training {args.epochs - start_epoch} epochs of {len(loader)} iterations")
    test_stats = {}
    for epoch in range(start_epoch, args.epochs):
        common.seed_everything(args.seed, epoch)
        loader.sampler.set_epoch(epoch)
        train_stats = train_one_epoch(student_ddp, teacher, vitkd_ddp, taps, loader, criterion, mixup, optimizer,
                                      scaler, schedule, epoch, device, args)
        test_stats = {}  # logged only where measured
        if (epoch + 1) % args.eval_every == 0 or epoch + 1 == args.epochs:
            test_stats = common.evaluate(HeadsApart(student), val_loader, device, args.amp, HeadsApart.heads) if token \
                else common.evaluate(student, val_loader, device, args.amp)
            common.print0(f"| epoch {epoch}: " + "  ".join(f"{k} {v:.2f}" for k, v in test_stats.items() if k != "loss"))
        common.end_epoch(args.output_dir, SCRIPT, args, epoch, train_stats, test_stats, args.save_every,
                         model_config=student.model_config, **state)
    for pair in (taps or {}).values():
        for t in pair:
            t.close()
    common.export_backbone(student, os.path.join(args.output_dir, "student_backbone.pth"))
    if not test_stats:
        test_stats = common.evaluate(student, val_loader, device, args.amp)
    common.print0(f"| final top-1 {test_stats['acc1']:.2f}  top-5 {test_stats['acc5']:.2f}; "
                  f"backbone in {os.path.join(args.output_dir, 'student_backbone.pth')}")
    return student, test_stats


def train_one_epoch(student, teacher, vitkd, taps, loader, criterion, mixup, optimizer, scaler, schedule, epoch,
                    device, args):
    student.train()
    if vitkd is not None:
        vitkd.train()
    meter = common.Meter()
    steps = len(loader)
    token = args.distill_token != "none"
    for it, batch in enumerate(meter.timed(loader)):
        lr = schedule(epoch * steps + it)
        for g in optimizer.param_groups:
            g["lr"] = lr
        images, target = common.to_device(batch, device, loader)
        if mixup is not None:
            images, target = mixup(images, target)
        hard = target.argmax(1) if target.dim() == 2 else target  # NKD's target class under Mixup / CutMix
        with common.autocast(device, args.amp):
            if teacher is not None:
                with torch.no_grad():  # the teacher sees the same (mixed) batch
                    t_out = teacher(images) if (args.nkd or args.kd_weight > 0 or token) else teacher.forward_features(images)
            logits = student(images)
            if token:  # DeiT: the class head learns the labels, the distillation head the teacher
                logits, dist_logits = logits
            losses = {"ce": args.ce_weight * (1 - args.token_weight if token else 1) * criterion(logits, target)}
            if token:
                losses["token"] = args.token_weight * common.token_loss(dist_logits, t_out, args.distill_token, args.kd_temperature)
            if vitkd is not None:
                (s_low, s_high), (t_low, t_high) = (vitkd_features(*taps[n]) for n in ("student", "teacher"))
                if t_high.shape[1] != s_high.shape[1]:  # --resample_teacher_grid (checked at start)
                    t_low, t_high = resample_grid(t_low, s_high.shape[1]), resample_grid(t_high, s_high.shape[1])
                losses["mimic"], losses["gen"] = vitkd(s_low, t_low, s_high, t_high)
            if args.nkd:
                losses["nkd"] = nkd_loss(logits, t_out, hard, args.nkd_temperature, args.nkd_gamma)
            if args.kd_weight > 0:
                losses["kd"] = args.kd_weight * kd_loss(logits, t_out, args.kd_temperature)
            loss = sum(losses.values())
        meter.log(epoch, it, steps, args.log_every, loss=loss, lr=lr, **losses)
        scaler.scale(loss).backward()
        if args.clip_grad > 0:  # over everything that learns: the student and the ViTKD modules
            scaler.unscale_(optimizer)
            nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], args.clip_grad)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
    return common.reduce_metrics(meter.averages(), device)


def vitkd_features(shallow_taps, deep_taps):
    """(B x L x P x D patch tokens of the mimicked blocks, B x P x D of the last block after the final
    norm) from a model's taps; prefix tokens (CLS, DeiT's distillation token) dropped."""
    npt = deep_taps.num_prefix_tokens
    low = torch.stack([shallow_taps.tokens[b][:, npt:] for b in shallow_taps.token_blocks], 1) if shallow_taps.token_blocks else None
    return low, deep_taps.tokens[deep_taps.token_blocks[0]][:, npt:]


def resample_grid(tokens, num_patches):
    """Bicubic resize of square patch grids (..., P_t, D) -> (..., P_s, D)."""
    if tokens is None:
        return None
    *lead, p, d = tokens.shape
    src, dst = int(round(math.sqrt(p))), int(round(math.sqrt(num_patches)))
    x = tokens.reshape(-1, src, src, d).permute(0, 3, 1, 2).float()
    x = F.interpolate(x, size=(dst, dst), mode="bicubic", align_corners=False)
    return x.permute(0, 2, 3, 1).reshape(*lead, dst * dst, d).to(tokens.dtype)


# ---------------------------------------------------------------------------------------------
# losses
# ---------------------------------------------------------------------------------------------
def nkd_loss(logits_s, logits_t, target, temperature=1.0, gamma=1.0):
    """Normalized KD (Yang et al. 2022, the corrected form). With S = softmax(student), T = softmax(teacher):
    -mean_b T_y log S_y  (T_y detached)  - gamma tau^2 mean_b sum_{i != y} T'_i log S'_i,
    where T', S' are softmax(logits / tau) over the C - 1 non-target classes only. target: (B,) indices."""
    s, t = logits_s.float(), logits_t.float().detach()
    y = target.view(-1, 1)
    first = -(t.softmax(1).gather(1, y) * s.log_softmax(1).gather(1, y)).mean()
    is_target = torch.zeros_like(s, dtype=torch.bool).scatter_(1, y, True)
    log_s = (s / temperature).masked_fill(is_target, float("-inf")).log_softmax(1)
    p_t = (t / temperature).masked_fill(is_target, float("-inf")).softmax(1)
    second = -(p_t * log_s.masked_fill(is_target, 0.0)).sum(1).mean()
    return first + gamma * temperature ** 2 * second


kd_loss = common.kd_loss  # Hinton KD: batch-mean KL(teacher || student) at temperature T, x T^2


class HeadsApart(nn.Module):
    """Evaluation of a distilled DeiT: timm's eval output (the mean of the two heads' logits) as "logits", and each
    head alone (cls_head, dist_head), for common.evaluate's one pass."""
    heads = ("cls_head", "dist_head")

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, images):
        x = self.model.forward_features(images)
        cls, dist = self.model.head(x[:, 0]), self.model.head_dist(x[:, 1])
        return {"logits": (cls + dist) / 2, "cls_head": cls, "dist_head": dist}


class ViTKDLoss(nn.Module):
    """ViTKD's two feature losses and their modules (adapters, mask token, generator).

    forward(s_low, t_low, s_high, t_high, mask=None) -> (L_lr, L_gen), both already weighted:
      s_low / t_low: B x L x P x D_s / D_t patch tokens of the mimicked blocks (None when alpha = 0);
      s_high / t_high: B x P x D_s / D_t patch tokens of the last block after the final norm;
      mask: optional B x P bool (True = replaced by the mask token); default: the official count,
      P - int(P x (1 - mask_ratio)) random tokens per sample (int(P x (1 - ratio)) kept).
    Sums of squared errors divided by the batch (and, for L_gen, by the mask ratio), computed in
    fp32, as the official code does."""

    def __init__(self, student_dim, teacher_dim, num_patches, num_mimic=2, mimic="linear", generator="conv",
                 generator_depth=6, mask_ratio=0.5, alpha=3e-5, beta=3e-6):
        super().__init__()
        self.alpha, self.beta, self.mask_ratio, self.mimic, self.kind = alpha, beta, mask_ratio, mimic, generator
        self.num_patches = num_patches
        # as the official code: int(P x (1 - mask_ratio)) tokens kept, the other P - int(P x (1 - mask_ratio)) masked
        self.num_masked = num_patches - int(num_patches * (1 - mask_ratio))
        side = int(round(math.sqrt(num_patches)))

        def adapter():
            return nn.Linear(student_dim, teacher_dim) if student_dim != teacher_dim else nn.Identity()

        if alpha > 0 and mimic == "linear":
            self.mimic_adapters = nn.ModuleList([adapter() for _ in range(num_mimic)])
        if beta > 0:
            if side * side != num_patches:
                common.fail(f"the ViTKD generator needs a square patch grid, got {num_patches} patches")
            self.side = side
            self.gen_adapter = adapter()
            self.mask_token = nn.Parameter(torch.zeros(1, 1, teacher_dim))
            if generator == "conv":
                self.generator = nn.Sequential(nn.Conv2d(teacher_dim, teacher_dim, 3, padding=1), nn.ReLU(inplace=True),
                                               nn.Conv2d(teacher_dim, teacher_dim, 3, padding=1))
            else:  # transformer blocks in the manner of MAE's decoder / CAE's regressor, fixed 2-D sin-cos positions
                from timm.models.vision_transformer import Block
                heads = max(1, teacher_dim // 64)
                block = Block if generator == "mae" else CrossBlock
                self.generator = nn.ModuleList([block(teacher_dim, heads, mlp_ratio=4.0, qkv_bias=True)
                                                for _ in range(generator_depth)])
                self.gen_norm = nn.LayerNorm(teacher_dim)
                self.register_buffer("pos", common.sincos_2d(side, side, teacher_dim, layout="mae")[None], persistent=False)

    def random_mask(self, batch, device):
        """B x P bool, True at the masked places, in random positions (MAE's shuffle): as the official code,
        int(P x (1 - mask_ratio)) tokens are kept and the other P - int(P x (1 - mask_ratio)) masked."""
        n = self.num_masked
        rank = torch.rand(batch, self.num_patches, device=device).argsort(1).argsort(1)
        return rank < n

    def forward(self, s_low, t_low, s_high, t_high, mask=None):
        zero = s_high.new_zeros((), dtype=torch.float32)
        loss_lr = loss_gen = zero
        B = s_high.shape[0]
        if self.alpha > 0:
            if self.mimic == "linear":
                diffs = [fc(s_low[:, i]).float() - t_low[:, i].float() for i, fc in enumerate(self.mimic_adapters)]
            else:  # correlation matrices F F^T / sqrt(D) of the patch tokens (Eq. 3-4): no adapter needed
                corr = lambda f: f.float() @ f.float().transpose(-1, -2) / math.sqrt(f.shape[-1])  # noqa: E731
                diffs = [corr(s_low[:, i]) - corr(t_low[:, i]) for i in range(s_low.shape[1])]
            loss_lr = self.alpha * sum(d.pow(2).sum() for d in diffs) / B
        if self.beta > 0:
            if mask is None:
                mask = self.random_mask(B, s_high.device)
            x = self.gen_adapter(s_high)
            x = torch.where(mask[..., None], self.mask_token.to(x.dtype), x)
            gen = self.generate(x, mask)
            err = (gen.float() - t_high.float()).pow(2).sum(-1)
            loss_gen = self.beta * (err * mask).sum() / B / self.mask_ratio
        return loss_lr, loss_gen

    def generate(self, x, mask):
        """B x P x D with the mask token at masked places -> B x P x D prediction of the teacher."""
        B, P, D = x.shape
        if self.kind == "conv":
            g = x.transpose(1, 2).reshape(B, D, self.side, self.side)
            return self.generator(g).flatten(2).transpose(1, 2)
        x = x + self.pos.to(x.dtype)
        if self.kind == "mae":
            for blk in self.generator:
                x = blk(x)
            return self.gen_norm(x)
        # cae: the masked places (mask token + position) query the visible tokens and themselves
        order = mask.float().argsort(dim=1, stable=True)  # visible first, then masked, each in index order
        n_vis = P - self.num_masked  # every row of the mask has that many (random_mask): no read of the mask
        x = x.gather(1, order[..., None].expand(-1, -1, D))
        visible, queries = x[:, :n_vis], x[:, n_vis:]
        for blk in self.generator:
            queries = blk(queries, torch.cat([visible, queries], 1))
        pred = self.gen_norm(queries)  # fp32 under CUDA autocast (LayerNorm), while x may be bf16: take its dtype
        return pred.new_zeros(x.shape).scatter(1, order[:, n_vis:, None].expand(-1, -1, D), pred)


class CrossBlock(nn.Module):
    """Pre-norm cross-attention block: queries attend to a key/value sequence, then an MLP."""

    def __init__(self, dim, num_heads, mlp_ratio=4.0, qkv_bias=True):
        super().__init__()
        from timm.layers import Mlp
        self.norm_q, self.norm_kv, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, num_heads, bias=qkv_bias, batch_first=True)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, q, kv):
        kv = self.norm_kv(kv)
        q = q + self.attn(self.norm_q(q), kv, kv, need_weights=False)[0]
        return q + self.mlp(self.norm2(q))


if __name__ == "__main__":
    common.run_main(main, argparse.ArgumentParser(SCRIPT, parents=[get_args_parser()]))
