"""SDSSL: self-distilled self-supervised learning (Jang et al., WACV 2023): every intermediate layer of the
ViT learns, through its own projector (and predictor), from the final layer's target; plus the plain
baselines MoCo v3, BYOL, SimCLR (--alpha_max 0 --no-pred_loss). Reconstructed from the official code
(github.com/hagiss/SDSSL, branch master: pl_train_moco.py, byol_pytorch/byol_pytorch.py).

  torchrun --nproc_per_node=8 sdssl.py --framework mocov3 --arch vit_small --data_path /imagenet --output_dir out/sd_mocov3
  torchrun --nproc_per_node=8 sdssl.py --framework mocov3 --alpha_max 0 --no-pred_loss ... --output_dir out/mocov3
  # CPU smoke run
  python sdssl.py --arch vit_small --depth 4 --patch_size 8 --dataset synthetic --input_size 32 --epochs 2 --num_workers 0

Per-layer representation: the shared final LayerNorm on the CLS token after each block. Heads: a
3-layer projector per layer (hidden 4096 for the last, 2048 for the others, output 256) and a predictor
per layer (256 -> 4096 -> 256) for MoCo v3 and BYOL; the intermediate projectors and all predictors run
as one batched computation each (stacked weights, batched matmuls, BatchNorm over stacked channels).
The momentum teacher is the backbone plus the last projector. Loss: L_ssl (last layer) + alpha(t) L_isd
(layers 1..L-1 against the stop-gradient teacher target, alpha ramped by cosine from 0) + L x L_pred
(predictors on detached projections). Paper (ImageNet, ViT-S/16, 300 epochs, k-NN / linear): MoCo v3
66.5 / 70.0 -> SD-MoCo v3 68.0 / 71.5.
"""
import argparse
import copy
import math
import os

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from PIL import ImageFilter
from torch.nn.parallel import DistributedDataParallel
from torchvision import transforms

import common

# the name checkpoints, logs and --resume checks carry: a copy of this file under another name is another script
SCRIPT = os.path.basename(__file__)

DEFAULTS = {"mocov3": dict(alpha_max=1.0, blr=1.5e-4), "byol": dict(alpha_max=0.8, blr=1.5e-4),
            "simclr": dict(alpha_max=0.8, blr=1.3e-4)}


def get_args_parser():
    p = argparse.ArgumentParser("SDSSL / MoCo v3 / BYOL / SimCLR", add_help=False)
    g = p.add_argument_group("framework and backbone")
    g.add_argument("--framework", default="mocov3", choices=["mocov3", "byol", "simclr"])
    g.add_argument("--arch", default="vit_small", type=str)
    g.add_argument("--patch_size", default=None, type=int)
    g.add_argument("--depth", default=None, type=int)
    g.add_argument("--embed_dim", default=None, type=int)
    g.add_argument("--num_heads", default=12, type=int, help="MoCo v3 ViT-S has 12 heads (DeiT-S: 6)")
    g.add_argument("--sincos_pos_embed", action=argparse.BooleanOptionalAction, default=True,
                   help="MoCo v3's fixed 2-D sin-cos position embedding (not trained)")
    g.add_argument("--frozen_patch_embed", action=argparse.BooleanOptionalAction, default=True,
                   help="MoCo v3's random patch projection, not trained")
    g = p.add_argument_group("SDSSL (heads: byol_pytorch.py; losses: pl_train_moco.py)")
    g.add_argument("--alpha_max", default=None, type=float, help="end of the alpha ramp (default 1.0 MoCo v3, 0.8 BYOL/SimCLR; 0: baseline)")
    g.add_argument("--alpha_const", action=argparse.BooleanOptionalAction, default=False, help="no ramp: alpha = alpha_max throughout")
    g.add_argument("--pred_loss", action=argparse.BooleanOptionalAction, default=True, help="L x predictor loss (MoCo v3, BYOL)")
    g.add_argument("--distill_every", default=1, type=int, help="distil every n-th intermediate layer (Table 6)")
    g.add_argument("--mid_proj_layers", default=3, type=int, choices=[1, 2, 3],
                   help="intermediate projector depth (2: Table 6; 1: a single Linear, our reading of 'no MLP')")
    g.add_argument("--proj_hidden", default=4096, type=int)
    g.add_argument("--mid_proj_hidden", default=2048, type=int)
    g.add_argument("--pred_hidden", default=4096, type=int)
    g.add_argument("--out_dim", default=256, type=int)
    g.add_argument("--tau", default=0.2, type=float, help="temperature (MoCo v3, SimCLR)")
    g.add_argument("--momentum", default=0.996, type=float, help="EMA momentum, cosine-scheduled to 1")
    g = p.add_argument_group("optimisation (the official configs)")
    g.add_argument("--epochs", default=300, type=int)
    g.add_argument("--batch_size", default=128, type=int, help="per process")
    g.add_argument("--blr", default=None, type=float, help="lr per 256 images (default 1.5e-4; SimCLR 1.3e-4)")
    g.add_argument("--lr", default=None, type=float)
    g.add_argument("--min_lr", default=0.0, type=float)
    g.add_argument("--warmup_epochs", default=40, type=int)
    g.add_argument("--weight_decay", default=0.1, type=float)
    g.add_argument("--clip_grad", default=0.0, type=float)
    g.add_argument("--crop_min_scale", default=0.08, type=float, help="RandomResizedCrop scale (BYOL / MoCo v3: 0.08)")
    g.add_argument("--color_jitter", default=[0.4, 0.4, 0.2, 0.1], type=float, nargs=4, metavar=("B", "C", "S", "H"),
                   help="colour jitter strengths (brightness, contrast, saturation, hue), applied with p 0.8")
    g.add_argument("--knn_every", default=0, type=int, help="k-NN monitor (k = 20) every N epochs on the labelled splits (0: off)")
    common.add_data_args(p)
    common.add_run_args(p)
    return p


def main(args):
    device = common.init_distributed()
    # ---------------- checks, before any work ----------------
    framework_defaults(args)
    if args.batch_size < 2:
        common.fail("--batch_size must be at least 2 per process: the heads' BatchNorm and the contrastive losses need several images")

    ckpt = common.resume_checkpoint(args, SCRIPT)  # the run's own checks (epochs, compile, output_dir) before building

    # ---------------- backbone, heads, momentum teacher (checks the depth) ----------------
    student, heads, teacher, taps, mid = build_models(args, device)
    common.seed_everything(args.seed)

    # ---------------- data ----------------
    views = TwoViews(args.input_size, (args.crop_min_scale, 1.0), args.color_jitter, common.data_stats(args))
    train_set, loader = common.build_train_data(args, views, views.crops, [views.on_device])
    ddp = common.get_world_size() > 1
    student_ddp = DistributedDataParallel(student) if ddp else student
    heads_ddp = DistributedDataParallel(heads) if ddp else heads
    common.compile_models(args, student, teacher["backbone"] if teacher is not None else None)

    # ---------------- optimizer, schedules, resume ----------------
    lr = common.resolve_lr(args)
    trainable = nn.ModuleDict({"student": student, "heads": heads})
    # fused: one pass per tensor, no temporaries (the stacked heads hold ~5x the backbone's parameters). The official
    # groups (DINO's get_params_groups): no decay on biases and 1-D parameters only, so cls_token is decayed
    optimizer = torch.optim.AdamW(common.param_groups(trainable, args.weight_decay, skip_listed=False), lr=lr, fused=True)
    scaler = common.grad_scaler(device, args.amp)
    total = args.epochs * len(loader)
    schedule = common.lr_schedule(lr, args.min_lr, total, args.warmup_epochs * len(loader))
    # saved every epoch, restored here: the student backbone ('model'), its heads, the momentum teacher's backbone
    # ('teacher': what load_weights takes from this file, as from DINO's) and projector
    state = dict(model=student, heads=heads, optimizer=optimizer, scaler=scaler)
    if teacher is not None:
        state.update(teacher=teacher["backbone"], teacher_proj=teacher["proj"])
    start_epoch = common.restore(ckpt, **state)
    common.print0(f"| {args.framework}: {len(mid)} distilled intermediate layers, alpha_max {args.alpha_max}, "
                  f"pred loss {args.pred_loss and args.framework != 'simclr'}")

    # ---------------- training ----------------
    common.start_run(args, SCRIPT)
    knn = {}
    for epoch in range(start_epoch, args.epochs):
        common.seed_everything(args.seed, epoch)
        loader.sampler.set_epoch(epoch)
        train_stats = train_one_epoch(student_ddp, heads_ddp, teacher, taps, mid, loader, optimizer, scaler, schedule,
                                      total, epoch, device, args)
        knn = {}  # logged only where measured
        if args.knn_every and ((epoch + 1) % args.knn_every == 0 or epoch + 1 == args.epochs):
            knn = common.knn_monitor(teacher["backbone"] if teacher is not None else student, args, device)
            common.print0(f"| epoch {epoch}: k-NN top-1 {knn['knn_acc1']:.2f}")
        common.end_epoch(args.output_dir, SCRIPT, args, epoch, train_stats, knn, args.save_every,
                         model_config=student.model_config, **state)
    taps.close()
    common.export_backbone(student, os.path.join(args.output_dir, "student_backbone.pth"))
    return student, teacher, knn


def framework_defaults(args):
    """Fill --alpha_max and --blr left unset with the framework's values (official configs)."""
    for k, v in DEFAULTS[args.framework].items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    return args


def build_models(args, device):
    """(student backbone, heads, momentum teacher or None, taps reading the per-layer CLS, distilled
    intermediate blocks). Same initial weights on every process (seeded)."""
    torch.manual_seed(args.seed)
    mean, std = common.data_stats(args)
    student = common.create_model(args.arch, num_classes=0, img_size=args.input_size, patch_size=args.patch_size,
                                  depth=args.depth, embed_dim=args.embed_dim, num_heads=args.num_heads,
                                  weight_init="moco", global_pool="token", mean=mean, std=std)  # output: final-norm CLS
    student = mocov3_vit(student, args.sincos_pos_embed, args.frozen_patch_embed).to(device)
    depth = len(student.blocks)
    if depth < 2:
        common.fail("SDSSL needs a backbone of at least 2 blocks")
    mid = [l for l in range(depth - 1) if (l + 1) % args.distill_every == 0] if args.alpha_max > 0 else []
    heads = SDHeads(student.embed_dim, len(mid), args).to(device)
    teacher = None
    if args.framework != "simclr":
        # no gradient, moved only by EMA; kept in train mode like MoCo v3's momentum encoder (projector BN on batch stats)
        teacher = nn.ModuleDict({"backbone": copy.deepcopy(student), "proj": copy.deepcopy(heads.last_proj)})
        teacher.requires_grad_(False)
    taps = common.ViTTaps(student, token_blocks=mid)  # the distilled blocks' outputs (their CLS rows are normed here)
    return student, heads, teacher, taps, mid


def train_one_epoch(student, heads, teacher, taps, mid, loader, optimizer, scaler, schedule, total, epoch, device, args):
    student.train()
    heads.train()
    meter = common.Meter()
    steps = len(loader)
    for it, batch in enumerate(meter.timed(loader)):
        step = epoch * steps + it
        lr = schedule(step)
        for g in optimizer.param_groups:
            g["lr"] = lr
        views, _ = common.to_device(batch, device, loader)
        # the ratio annealing: cosine from 0 to alpha_max over the whole run (no warm-up)
        alpha = args.alpha_max if args.alpha_const else common.cosine_schedule(step, total, 0.0, args.alpha_max)
        with common.autocast(device, args.amp):
            losses = sdssl_losses(student, heads, teacher, taps, mid, views, alpha, args)
            loss = sum(losses.values())
        meter.log(epoch, it, steps, args.log_every, loss=loss, lr=lr, alpha=alpha, **losses)
        scaler.scale(loss).backward()
        if args.clip_grad > 0:
            scaler.unscale_(optimizer)
            nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], args.clip_grad)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        if teacher is not None:  # EMA, momentum cosine-scheduled from args.momentum to 1
            m = common.cosine_schedule(step + 1, total, args.momentum, 1.0)
            ema_update(teacher["backbone"], student, m)
            ema_update(teacher["proj"], common.unwrap(heads).last_proj, m)
    return common.reduce_metrics(meter.averages(), device)


def sdssl_losses(student, heads, teacher, taps, mid, views, alpha, args):
    """{'ssl', 'isd', 'pred'} for one batch of two views (pl_train_moco.py's training step). One backbone forward on both views
    and one heads forward, so that DDP sees each module once per step."""
    x1, x2 = views
    B = len(x1)
    f_last = student(torch.cat([x1, x2]))  # the final-norm CLS (global_pool token, no head); the taps keep the blocks'
    # the intermediate blocks' CLS through the same final norm: one LayerNorm over the stacked CLS rows only
    f_mid = common.unwrap(student).norm(torch.stack([taps.tokens[l][:, 0] for l in mid])) if mid else None
    losses = {}
    if args.framework == "simclr":
        # the official SimCLR runs the network once on both views: every BatchNorm normalises the 2B rows together
        out = heads([(f_mid, f_last)], pred_loss=False)[0]
        z = out["h_last"]  # [view 1; view 2]
        losses["ssl"] = nt_xent(z, z, args.tau)
        if mid:
            anchors = out["h_mid"].flatten(0, 1)  # per layer: [view 1 rows; view 2 rows]
            losses["isd"] = alpha * nt_xent(anchors, z, args.tau, detach_columns=True)
        return losses
    # MoCo v3 and BYOL run the network once per view: BatchNorm statistics per view
    feats = [(f_mid[:, v * B:(v + 1) * B] if mid else None, f_last[v * B:(v + 1) * B]) for v in (0, 1)]
    out = heads(feats, pred_loss=args.pred_loss)  # per view: projections, predictions, predictions of detached projections
    with torch.no_grad():  # the momentum teacher's targets, one per view (its BN sees each view's batch)
        z = [teacher["proj"](teacher["backbone"](x).float()[None])[0] for x in (x1, x2)]
    if args.framework == "mocov3":  # per-row losses
        loss_fn = lambda q, k: ctr_loss(q, k, args.tau, reduction="none")  # noqa: E731
    else:
        loss_fn = lambda q, k: byol_loss(q, k.repeat(len(q) // len(k), 1), reduction="none")  # noqa: E731
    L = len(mid) + 1
    ssl = isd = pred = 0.0
    for v, o in enumerate(out):  # view v's predictions against the other view's target (symmetric)
        # every row of view v in one loss: its predictions (L layers, the last one last) and, for L_pred, the
        # predictions of its detached projections; then each term's mean over its own rows
        q = torch.cat([o["q"], o["p"]]) if args.pred_loss else o["q"]  # (L or 2L, B, out)
        per_layer = loss_fn(q.flatten(0, 1), z[1 - v]).view(len(q), -1).mean(1)
        ssl = ssl + per_layer[L - 1]
        if mid:
            isd = isd + per_layer[:L - 1].mean()
        if args.pred_loss:  # a sum over layers, as the official step (the mean over all rows x L)
            pred = pred + per_layer[L:].sum()
    losses["ssl"] = ssl
    if mid:
        losses["isd"] = alpha * isd
    if args.pred_loss:
        losses["pred"] = pred
    return losses


# ---------------------------------------------------------------------------------------------
# losses and schedules
# ---------------------------------------------------------------------------------------------
def ctr_loss(q, k, tau, reduction="mean"):
    """MoCo v3 contrastive loss: L2-normalised q (rows: any multiple of the local batch) against the keys of
    all processes (no gradient), labels = row index mod local batch + rank x local batch; CE x 2 tau (its
    mean over rows, or per row with reduction "none")."""
    q, k = F.normalize(q.float(), dim=1), F.normalize(k.float(), dim=1)
    keys = common.concat_all_gather(k.detach())
    labels = torch.arange(len(q), device=q.device) % len(k) + len(k) * common.get_rank()
    return F.cross_entropy(q @ keys.T / tau, labels, reduction=reduction) * 2 * tau


def byol_loss(p, z, reduction="mean"):
    """BYOL: 2 - 2 cos(p, z) (z without gradient), its mean over rows or per row (reduction "none")."""
    d = 2 - 2 * F.cosine_similarity(p.float(), z.float().detach(), dim=-1)
    return d.mean() if reduction == "mean" else d


def nt_xent(anchors, z, tau, detach_columns=False):
    """SimCLR NT-Xent. z: (2B, d) local projections [view 1; view 2]; anchors: copies of that layout
    stacked (L x 2B rows). Columns: z of all processes (gathered with gradient unless detach_columns);
    each anchor's positive is the other view of its image, its own position is excluded."""
    n = len(z)
    cols = common.concat_all_gather(z.detach()) if detach_columns else all_gather_grad(z)
    a, c = F.normalize(anchors.float(), dim=1), F.normalize(cols.float(), dim=1)
    logits = a @ c.T / tau
    i = torch.arange(len(anchors), device=z.device) % n
    own, pos = i + n * common.get_rank(), (i + n // 2) % n + n * common.get_rank()
    logits = logits.scatter(1, own[:, None], float("-inf"))  # not F.one_hot: it reads its input's range (a sync)
    return F.cross_entropy(logits, pos)


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sums the incoming gradients over ranks and returns this rank's
    slice, so every rank's loss back-propagates into every rank's input."""

    @staticmethod
    def forward(ctx, x):
        out = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(out, x.contiguous())
        return tuple(out)

    @staticmethod
    def backward(ctx, *grads):
        g = torch.stack(grads)
        dist.all_reduce(g)
        return g[dist.get_rank()]


def all_gather_grad(x):
    """Concatenate x over ranks along dim 0, keeping the graph (SimCLR's negatives). Identity in one process."""
    if common.get_world_size() == 1:
        return x
    return torch.cat(_GatherWithGrad.apply(x), 0)


@torch.no_grad()
def ema_update(teacher, student, momentum):
    """teacher <- momentum * teacher + (1 - momentum) * student, parameters and float buffers."""
    tp = [p for p in teacher.parameters()]
    sp = [p.detach() for p in common.unwrap(student).parameters()]
    torch._foreach_mul_(tp, momentum)
    torch._foreach_add_(tp, sp, alpha=1.0 - momentum)
    for tb, sb in zip(teacher.buffers(), common.unwrap(student).buffers()):
        tb.copy_(sb)


# ---------------------------------------------------------------------------------------------
# heads
# ---------------------------------------------------------------------------------------------
class BatchedMLP(nn.Module):
    """n parallel MLPs of the same shape as one computation: x (n, B, d_in) -> (n, B, d_out). Per layer a
    bias-free Linear (one batched matmul over weights stacked as (n, in, out), a layout whose backward
    needs no transposed gradient copy: ~2.5x faster on CPU than (n, out, in)) then, except after the last
    layer, BatchNorm over the n x width stacked channels (= a BatchNorm per MLP) and ReLU; after the last
    layer a BatchNorm without affine when last_bn."""

    def __init__(self, n, dims, last_bn):
        super().__init__()
        self.n, self.dims = n, dims
        self.weights = nn.ParameterList()
        self.norms = nn.ModuleList()
        for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
            w = torch.empty(n, b, a)
            for j in range(n):  # nn.Linear's default init, per MLP
                nn.init.kaiming_uniform_(w[j], a=math.sqrt(5))
            self.weights.append(nn.Parameter(w.transpose(1, 2).contiguous()))
            last = i == len(dims) - 2
            self.norms.append(GlobalBatchNorm(n * b, affine=not last) if (not last or last_bn) else nn.Identity())

    def forward(self, x):
        for i, (w, bn) in enumerate(zip(self.weights, self.norms)):
            x = torch.bmm(x, w)  # (n, B, width)
            n, B, c = x.shape
            x = bn(x.transpose(0, 1).reshape(B, n * c)).reshape(B, n, c).transpose(0, 1)
            if i < len(self.weights) - 1:
                x = F.relu(x)
        return x


class _AllReduceSum(torch.autograd.Function):
    """Sum over processes; each process's output depends on every input, so the gradient is summed too."""

    @staticmethod
    def forward(ctx, x):
        x = x.clone()
        dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, g):
        g = g.clone()
        dist.all_reduce(g)
        return g


class GlobalBatchNorm(nn.BatchNorm1d):
    """BatchNorm1d whose training statistics cover the global batch of all processes (the official code's
    SyncBN, which PyTorch only runs on GPUs; this one also runs on CPU with gloo). One process: plain BN."""

    def forward(self, x):
        if not (self.training and common.get_world_size() > 1):
            return super().forward(x)
        stats = _AllReduceSum.apply(torch.cat([x.float().sum(0), x.float().pow(2).sum(0),
                                               x.new_full((1,), x.shape[0], dtype=torch.float32)]))
        c = x.shape[1]
        n = stats[-1]
        mean = stats[:c] / n
        var = (stats[c:2 * c] / n - mean.pow(2)).clamp_min(0)
        with torch.no_grad():
            self.running_mean.lerp_(mean.detach(), self.momentum)
            self.running_var.lerp_(var.detach() * n / (n - 1), self.momentum)
            self.num_batches_tracked += 1
        y = (x.float() - mean) / (var + self.eps).sqrt()
        if self.affine:
            y = y * self.weight + self.bias
        return y.to(x.dtype)


class SDHeads(nn.Module):
    """Projectors for the distilled intermediate layers (batched) and the last layer, predictors for all
    (batched; MoCo v3 and BYOL). BYOL: no BatchNorm after the output layers."""

    def __init__(self, dim, n_mid, args):
        super().__init__()
        last_bn = args.framework != "byol"
        mid_dims = {3: [dim, args.mid_proj_hidden, args.mid_proj_hidden, args.out_dim],
                    2: [dim, args.mid_proj_hidden, args.out_dim], 1: [dim, args.out_dim]}[args.mid_proj_layers]
        self.mid_proj = BatchedMLP(n_mid, mid_dims, last_bn) if n_mid else None
        self.last_proj = BatchedMLP(1, [dim, args.proj_hidden, args.proj_hidden, args.out_dim], last_bn)
        self.pred = None
        if args.framework != "simclr":
            self.pred = BatchedMLP(n_mid + 1, [args.out_dim, args.pred_hidden, args.out_dim], last_bn)

    def project(self, f_mid, f_last):
        """(n_mid, B, D) or None, (B, D) -> projections (n_mid, B, out) or None, (B, out)."""
        h_mid = self.mid_proj(f_mid.float()) if self.mid_proj is not None else None
        return h_mid, self.last_proj(f_last.float()[None])[0]

    def predict(self, h_mid, h_last):
        """All predictors in one batched computation -> (n_mid + 1, B, out), the last layer last."""
        return self.pred(torch.cat([h_mid, h_last[None]]) if h_mid is not None else h_last[None])

    def forward(self, feats, pred_loss=True):
        """feats: per view (f_mid, f_last). Per view: h_mid, h_last (projections), q (predictions, (n_mid + 1, B,
        out), the last layer last) and p (predictions of the detached projections, the same layout, for L_pred)."""
        out = []
        for f_mid, f_last in feats:
            h_mid, h_last = self.project(f_mid, f_last)
            o = {"h_mid": h_mid, "h_last": h_last}
            if self.pred is not None:
                o["q"] = self.predict(h_mid, h_last)
                if pred_loss:
                    o["p"] = self.predict(h_mid.detach() if h_mid is not None else None, h_last.detach())
            out.append(o)
        return out


# ---------------------------------------------------------------------------------------------
# MoCo v3's ViT and augmentation
# ---------------------------------------------------------------------------------------------
def mocov3_vit(model, sincos_pos_embed=True, frozen_patch_embed=True):
    """MoCo v3's ViT from a timm ViT built with weight_init='moco' (qkv initialised uniformly as three
    matrices, other Linear layers xavier-uniform, CLS normal std 1e-6): the patch projection xavier-uniform
    over (out, in x p x p), bias 0, frozen on request; the fixed 2-D sin-cos position embedding in MoCo
    v3's channel layout (zeros for the prefix tokens), not trained, on request."""
    w = model.patch_embed.proj.weight
    nn.init.xavier_uniform_(w.data.view(w.shape[0], -1))
    nn.init.zeros_(model.patch_embed.proj.bias)
    if frozen_patch_embed:
        model.patch_embed.requires_grad_(False)
    if sincos_pos_embed:
        gh, gw = model.patch_embed.grid_size
        pe = common.sincos_2d(gh, gw, model.embed_dim, layout="moco")
        npt = 0 if model.no_embed_class else model.num_prefix_tokens
        model.pos_embed.data.copy_(torch.cat([torch.zeros(npt, model.embed_dim), pe], 0)[None])
        model.pos_embed.requires_grad_(False)
    return model


class TwoViews:
    """The asymmetric two-view augmentation of BYOL, used by MoCo v3 (and SDSSL): random resized crop
    (scale 0.08-1), flip, colour jitter (brightness, contrast, saturation, hue: 0.4, 0.4, 0.2, 0.1) with
    p 0.8, grayscale p 0.2, Gaussian blur p 1.0 / 0.1, solarisation p 0 / 0.2. Returns [view1, view2].
    The fast pipelines (common.build_train_data): `crops` (the same crop and flip, uint8) in the workers or
    batched, `on_device` (the rest, per sample) on the device."""

    def __init__(self, input_size=224, scale=(0.08, 1.0), jitter=(0.4, 0.4, 0.2, 0.1), stats=None):
        mean, std = stats or common.input_stats("")
        crop = transforms.RandomResizedCrop(input_size, scale=scale, interpolation=transforms.InterpolationMode.BICUBIC)
        flip, colour = transforms.RandomHorizontalFlip(), transforms.ColorJitter(*jitter)
        blur = PILGaussianBlur(0.1, 2.0, input_size)
        def view(blur_p, solarize_p):
            return transforms.Compose([
                crop, flip,
                transforms.RandomApply([colour], p=0.8),
                transforms.RandomGrayscale(p=0.2),
                transforms.RandomApply([blur], p=blur_p),
                transforms.RandomSolarize(128, p=solarize_p),
                transforms.ToTensor(),
                transforms.Normalize(mean, std),
            ])
        self.t1, self.t2 = view(1.0, 0.0), view(0.1, 0.2)
        self.crops = TwoCrops(common.CropFlip.like(crop, flip))
        self.colours = [ViewColours(colour, blur, blur_p, solarize_p, (mean, std))
                        for blur_p, solarize_p in ((1.0, 0.0), (0.1, 0.2))]

    def __call__(self, img):
        return [self.t1(img), self.t2(img)]

    def on_device(self, views):
        return [colours(v) for colours, v in zip(self.colours, views)]


class TwoCrops:
    """TwoViews' crop and flip of uint8 images, twice: an image in a worker, or batch(x) on the device."""

    def __init__(self, crop):
        self.crop = crop

    def __call__(self, img):
        img = common.to_uint8(img)
        return [self.crop(img), self.crop(img)]

    def batch(self, x):
        return [self.crop.batch(x), self.crop.batch(x)]


class ViewColours:
    """The rest of one TwoViews view on a batch, on the device, drawn per image: colour jitter (p 0.8, random
    order), grayscale (p 0.2), Gaussian blur (p; an exact Gaussian by one grouped convolution per direction;
    PIL: three box blurs of the same variance), solarisation (p), normalisation."""

    def __init__(self, jitter, blur, blur_p, solarize_p, stats):
        self.jitter, self.normalise = common.ColorJitter.like(jitter, p=0.8), common.Normalise(*stats)
        self.blur, self.blur_p, self.solarize_p = blur, blur_p, solarize_p

    def __call__(self, x):
        x, n = self.jitter(x.float()), len(x)
        gray, blur, solarize = torch.rand(n) < 0.2, torch.rand(n) < self.blur_p, torch.rand(n) < self.solarize_p
        sigma = (self.blur.lo + (self.blur.hi - self.blur.lo) * torch.rand(n)[blur]) * self.blur.scale
        g, b, s, sigma_b = common.params_to(x, *(m.nonzero()[:, 0] for m in (gray, blur, solarize)), sigma)
        x[g] = common.luma(x[g]).expand(-1, 3, -1, -1)
        if len(sigma):
            x[b] = gaussian_blur(x[b], sigma_b, radius=math.ceil(3 * sigma.max().item()))
        x[s] = torch.where(x[s] >= 128, 255 - x[s], x[s])
        return self.normalise(x)


def gaussian_blur(x, sigma, radius):
    """Per-image Gaussian blur of integer-valued (n, 3, H, W) images with standard deviations `sigma` (n,): a
    (2 radius + 1)-tap kernel per image, one grouped convolution per direction, edges replicated (as PIL's)."""
    n, c, H, W = x.shape
    t = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    k = torch.exp(-t ** 2 / (2 * sigma.view(-1, 1).float() ** 2))
    k = (k / k.sum(1, keepdim=True)).repeat_interleave(c, 0)
    y = F.pad(x.reshape(1, n * c, H, W), (radius, radius, 0, 0), mode="replicate")
    y = F.conv2d(y, k.view(n * c, 1, 1, -1), groups=n * c)  # along rows, then along columns
    y = F.conv2d(F.pad(y, (0, 0, radius, radius), mode="replicate"), k.view(n * c, 1, -1, 1), groups=n * c)
    return y.view(n, c, H, W).round().clamp(0, 255)


class PILGaussianBlur:
    """Gaussian blur with sigma drawn uniformly from [lo, hi] (torch RNG, so seeded like the other
    transforms), done by PIL as in the MoCo v3 / DINO code (about 10x faster than torchvision's blur of a
    PIL image). Below 224 px the sigma range shrinks with the image, so the blur covers the same share of
    the picture as at 224 px."""

    def __init__(self, lo, hi, input_size=224):
        self.lo, self.hi, self.scale = lo, hi, min(1.0, input_size / 224)

    def __call__(self, img):
        sigma = self.lo + (self.hi - self.lo) * torch.rand(()).item()
        return img.filter(ImageFilter.GaussianBlur(radius=sigma * self.scale))


if __name__ == "__main__":
    common.run_main(main, argparse.ArgumentParser(SCRIPT, parents=[get_args_parser()]))
