"""AttnDistill: self-supervised distillation of a ViT student from a frozen self-supervised ViT teacher
(Wang et al., BMVC 2022), reconstructed from the official code (github.com/wangkai930418/attndistill,
engine/engine_dino_transfer.py) and the paper's supplement (Table 7).

No labels: the student's last-block tokens go through a projector P (LayerNorm, k Linear layers) and a
LayerNorm of the teacher's width, and the CLS result regresses the teacher's final-norm CLS (MSE, L_c);
the CLS-query attention row of the student's last block learns the teacher's (KL, L_a, per head by index
when the head counts match, else both sides' heads aggregated as softmax(sum_h log a_h / T); a finer
teacher grid is resized bicubically to the student's with its mass kept). L = L_c + lambda L_a.
The student is judged by k-NN and linear probe (eval_knn_linear.py) of its backbone before P.

  torchrun --nproc_per_node=8 attn_distill.py --student vit_tiny --teacher vit_small_patch16_224.dino \
      --teacher_weights dino_deitsmall16_pretrain.pth --data_path /imagenet --output_dir out/attn_distill
  # CPU smoke run with a teacher of this repository (it knows its architecture)
  python attn_distill.py --teacher_weights qs/teacher/student_backbone.pth --student deit_tiny --depth 2 \
      --embed_dim 48 --patch_size 8 --dataset synthetic --input_size 32 --epochs 2 --num_workers 0
"""
import argparse
import os
from contextlib import nullcontext

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torchvision import transforms

import common

# the name checkpoints, logs and --resume checks carry: a copy of this file under another name is another script
SCRIPT = os.path.basename(__file__)


def get_args_parser():
    p = argparse.ArgumentParser("AttnDistill", add_help=False)
    g = p.add_argument_group("student and teacher")
    g.add_argument("--student", default="vit_tiny", type=str, help="timm ViT name or alias (vit_tiny: D 192, 3 heads)")
    g.add_argument("--patch_size", default=None, type=int, help="student patch size (supplement: 16, 28, 32)")
    g.add_argument("--depth", default=None, type=int, help="student blocks (supplement: 12 or 8)")
    g.add_argument("--embed_dim", default=None, type=int)
    g.add_argument("--num_heads", default=None, type=int, help="student heads (supplement: 3 or 6)")
    g.add_argument("--drop_path", default=0.0, type=float)
    g.add_argument("--teacher", default=None, type=str,
                   help="teacher timm name (e.g. vit_small_patch16_224.dino); not needed for this repository's files")
    g.add_argument("--teacher_weights", default="", type=str, help="file, hub:<timm name>, or 'random' (smoke tests)")
    g.add_argument("--teacher_key", default=None, type=str, help="checkpoint key holding the teacher (e.g. teacher)")
    g.add_argument("--teacher_mean", default=None, type=float, nargs=3,
                   help="the teacher's input normalisation (default: its file's, timm's config for hub / tagged names, else ImageNet's)")
    g.add_argument("--teacher_std", default=None, type=float, nargs=3)
    common.add_shape_args(g, "teacher_", "the teacher")
    g = p.add_argument_group("AttnDistill (the objective of engine_dino_transfer.py)")
    g.add_argument("--proj_layers", default=4, type=int, help="Linear layers of the projector P (Table 10: 1, 2, 4, 8)")
    g.add_argument("--projector", action=argparse.BooleanOptionalAction, default=True,
                   help="--no-projector: align the student's own final-norm CLS with the teacher's directly (the official "
                        "code's no-projector mode; equal widths needed; the student's final norm is then trained)")
    g.add_argument("--cls_weight", default=1.0, type=float, help="weight of L_c (CLS alignment through P)")
    g.add_argument("--lambda_attn", default=0.1, type=float,
                   help="weight of L_a (paper 0.1; the official argparse default 20 is not what the paper ran; 0: 'PA only')")
    g.add_argument("--attn_temperature", default=10.0, type=float, help="T of the head aggregation (paper 10; argparse 20)")
    g.add_argument("--aggregate", default="auto", choices=["auto", "none", "logsum", "max", "mean", "min"],
                   help="auto: per head by index when head counts match, else logsum = softmax(sum_h log a_h / T); "
                        "max / mean / min: Table 10 ablations")
    g.add_argument("--attn_layers", default="last", choices=["last", "all"],
                   help="all: every student block against an evenly spaced teacher block, averaged (Table 10)")
    g.add_argument("--attn_distance", default="kl", choices=["kl", "mse"], help="mse: Table 10 ablation")
    g.add_argument("--value_norm", action="store_true", help="weight the CLS rows by the value-vector norms (Table 10)")
    g.add_argument("--patch_align", default=0.0, type=float,
                   help="weight of an MSE of all patch tokens through P against the teacher's (Table 10; same grid only)")
    g = p.add_argument_group("optimisation (the official dino_teacher.sh / mugs_teacher.sh)")
    g.add_argument("--epochs", default=800, type=int, help="official scripts 800; supplement: 500 for ViT-T on ImageNet")
    g.add_argument("--batch_size", default=128, type=int, help="per process")
    g.add_argument("--accum_iter", default=1, type=int,
                   help="gradient accumulation (the paper's 4096: 8 GPUs x 128 x 4); never forced, the effective batch is printed")
    g.add_argument("--blr", default=1.5e-4, type=float, help="lr per 256 images (effective batch)")
    g.add_argument("--lr", default=None, type=float)
    g.add_argument("--min_lr", default=0.0, type=float)
    g.add_argument("--warmup_epochs", default=40, type=int)
    g.add_argument("--weight_decay", default=0.05, type=float)
    g.add_argument("--clip_grad", default=0.0, type=float)
    g.add_argument("--crop_min_scale", default=0.2, type=float, help="RandomResizedCrop scale (0.2, 1)")
    g.add_argument("--knn_every", default=0, type=int, help="k-NN monitor (k = 20) every N epochs on the labelled splits (0: off)")
    common.add_data_args(p)
    common.add_run_args(p)
    return p


def main(args):
    device = common.init_distributed()
    # ---------------- checks, before any work ----------------
    if args.proj_layers < 1 or args.accum_iter < 1:
        common.fail("--proj_layers and --accum_iter must be at least 1")
    if not args.teacher_weights:
        common.fail("AttnDistill needs a teacher: --teacher_weights (a file, hub:NAME, or 'random' for smoke tests)")
    torch.manual_seed(args.seed)  # the same initial student, projector and norm on every rank
    mean_std = common.data_stats(args)  # the student's input normalisation = the data pipeline's
    backbone = common.create_model(args.student, num_classes=0, img_size=args.input_size, patch_size=args.patch_size,
                                   depth=args.depth, embed_dim=args.embed_dim, num_heads=args.num_heads,
                                   drop_path_rate=args.drop_path, mean=mean_std[0], std=mean_std[1]).to(device)
    teacher = common.build_teacher(args.teacher, args.teacher_weights, args.teacher_key, mean_std, args.teacher_mean,
                                   args.teacher_std, num_classes=0, img_size=args.input_size, trust=args.trust_checkpoint,
                                   **common.shape_args(args, "teacher_")).to(device)
    if not args.projector and backbone.embed_dim != teacher.embed_dim:
        common.fail(f"--no-projector aligns the CLS tokens directly: the student's width {backbone.embed_dim} must equal "
                    f"the teacher's {teacher.embed_dim}")
    s_grid, t_grid = check_vit(backbone, "student"), check_vit(teacher, "teacher")
    h_s, h_t = backbone.blocks[-1].attn.num_heads, teacher.blocks[-1].attn.num_heads
    aggregate = {"auto": None if h_s == h_t else "logsum", "none": None}.get(args.aggregate, args.aggregate)
    if args.lambda_attn > 0 and aggregate is None and h_s != h_t:
        common.fail(f"--aggregate none compares heads by index, but the student has {h_s} heads and the teacher {h_t}")
    if args.patch_align > 0 and s_grid != t_grid:
        common.fail(f"--patch_align needs the same patch grid (student {s_grid}x{s_grid}, teacher {t_grid}x{t_grid})")
    ckpt = common.resume_checkpoint(args, SCRIPT)
    common.seed_everything(args.seed)

    # ---------------- data: one view, the same for student and teacher; no labels ----------------
    crop = transforms.RandomResizedCrop(args.input_size, scale=(args.crop_min_scale, 1.0),
                                        interpolation=transforms.InterpolationMode.BICUBIC)
    flip = transforms.RandomHorizontalFlip()
    transform = transforms.Compose([crop, flip, transforms.ToTensor(), transforms.Normalize(*mean_std)])
    train_set, loader = common.build_train_data(args, transform, common.CropFlip.like(crop, flip),
                                                [common.Normalise(*mean_std)])  # the fast pipelines' two halves

    # ---------------- student with P, taps ----------------
    # The student's own final LayerNorm gets no gradient here (L_c goes through P and a new LayerNorm): it
    # stays at its init, as in the official code, and only the evaluation features pass through it.
    # Without P (--no-projector) the loss reads the final-norm CLS, so that norm is trained.
    backbone.norm.requires_grad_(not args.projector)
    model = StudentWithProjector(backbone, teacher.embed_dim, args.proj_layers if args.projector else 0).to(device)
    model_ddp = DistributedDataParallel(model) if common.get_world_size() > 1 else model
    common.compile_models(args, backbone, teacher)
    depth_s, depth_t = len(backbone.blocks), len(teacher.blocks)
    pairs = [(depth_s - 1, depth_t - 1)] if args.attn_layers == "last" else \
        [(i, round((i + 1) * depth_t / depth_s) - 1) for i in range(depth_s)]
    attn = args.lambda_attn > 0
    taps = {"student": common.ViTTaps(backbone, attn_blocks=[s for s, _ in pairs] if attn else []),  # q and k: the CLS
            "teacher": common.ViTTaps(teacher, attn_blocks=[t for _, t in pairs] if attn else [])}  # rows are made from them
    values = {"student": ValueNorms(backbone, [s for s, _ in pairs]),
              "teacher": ValueNorms(teacher, [t for _, t in pairs])} if attn and args.value_norm else None
    how = "heads by index" if aggregate is None else f"{aggregate} aggregation"
    common.print0(f"| student {args.student}: {depth_s} blocks, {h_s} heads, grid {s_grid}x{s_grid}; teacher: {depth_t} "
                  f"blocks, {h_t} heads, grid {t_grid}x{t_grid}; " + (f"L_a on (student, teacher) blocks {pairs}, {how}"
                                                                      if attn else "L_a off (PA only)"))

    # ---------------- optimizer, schedule, resume ----------------
    lr = common.resolve_lr(args, args.accum_iter)  # prints the effective batch (processes x batch x accum_iter)
    # MAE's weight-decay groups as in the official code: pos_embed and cls_token are decayed
    optimizer = torch.optim.AdamW(common.param_groups(model, args.weight_decay, skip_listed=False), lr=lr, betas=(0.9, 0.95))
    scaler = common.grad_scaler(device, args.amp)
    schedule = common.lr_schedule(lr, args.min_lr, args.epochs * len(loader), args.warmup_epochs * len(loader))
    # saved every epoch, restored here: the backbone as 'model' (loadable as a network), P and its norm apart
    state = dict(model=backbone, projector=model.projector, projector_norm=getattr(model, "norm", None),
                 optimizer=optimizer, scaler=scaler)
    start_epoch = common.restore(ckpt, **state)

    # ---------------- training ----------------
    common.start_run(args, SCRIPT)
    knn = {}
    for epoch in range(start_epoch, args.epochs):
        common.seed_everything(args.seed, epoch)
        loader.sampler.set_epoch(epoch)
        train_stats = train_one_epoch(model_ddp, teacher, taps, values, pairs, (s_grid, t_grid), aggregate, loader,
                                      optimizer, scaler, schedule, epoch, device, args)
        knn = {}  # logged only where measured
        if args.knn_every and ((epoch + 1) % args.knn_every == 0 or epoch + 1 == args.epochs):
            knn = common.knn_monitor(backbone, args, device)
            common.print0(f"| epoch {epoch}: k-NN top-1 {knn['knn_acc1']:.2f}")
        common.end_epoch(args.output_dir, SCRIPT, args, epoch, train_stats, knn, args.save_every,
                         model_config=backbone.model_config, **state)
    for t in list(taps.values()) + list((values or {}).values()):
        t.close()
    common.export_backbone(backbone, os.path.join(args.output_dir, "student_backbone.pth"))
    common.print0(f"| backbone (before P, with its final norm) in {os.path.join(args.output_dir, 'student_backbone.pth')}")
    return model, knn


def check_vit(model, name):
    """The side of the model's square patch grid; a clear error for non-ViTs, no CLS token, non-square grids."""
    if not hasattr(model, "blocks") or not hasattr(model, "patch_embed") or getattr(model, "cls_token", None) is None:
        common.fail(f"AttnDistill needs ViTs with a CLS token; the {name} is a {type(model).__name__} without one")
    gh, gw = model.patch_embed.grid_size
    if gh != gw:
        common.fail(f"the {name}'s patch grid is {gh}x{gw}: attention rows can only be resized between square grids")
    return gh


def train_one_epoch(model, teacher, taps, values, pairs, grids, aggregate, loader, optimizer, scaler, schedule, epoch,
                    device, args):
    model.train()
    meter = common.Meter()
    steps = len(loader)
    npt = (common.unwrap(model).backbone.num_prefix_tokens, teacher.num_prefix_tokens)
    # logsum reads each head's log-row only up to a constant per head (the softmax over keys drops it): the maps'
    # logits themselves serve, no softmax and no log; not where rows are weighted by value norms or resized
    logits = {"student": aggregate == "logsum" and not values}
    logits["teacher"] = logits["student"] and grids[0] == grids[1]
    for it, batch in enumerate(meter.timed(loader)):
        lr = schedule(epoch * steps + it)
        for g in optimizer.param_groups:
            g["lr"] = lr
        images, _ = common.to_device(batch, device, loader)
        update = (it + 1) % args.accum_iter == 0 or it + 1 == steps
        sync = nullcontext() if update or not hasattr(model, "no_sync") else model.no_sync()
        with sync:
            with common.autocast(device, args.amp):
                with torch.no_grad():
                    t_tokens = teacher.forward_features(images)  # final-norm tokens; taps keep the attention
                out = model(images, all_tokens=args.patch_align > 0)  # B x D_t (the CLS) or B x N x D_t
            losses = {"cls": F.mse_loss((out[:, 0] if out.dim() == 3 else out).float(), t_tokens[:, 0].float())}
            if args.lambda_attn > 0:  # the CLS rows of every pair, one batched map per network: (pairs x B) x H x N
                rows, one = {}, len(pairs) == 1  # one pair (the default): its block's map, nothing stacked
                for who, blocks in (("student", [s for s, _ in pairs]), ("teacher", [t for _, t in pairs])):
                    a = taps[who].maps(blocks[0] if one else blocks, rows="cls", logits=logits[who])
                    a = a if one else a.flatten(0, 1)
                    norms = torch.cat([values[who].norms[b] for b in blocks]) if values else None
                    rows[who] = cls_rows(a, npt[who == "teacher"], norms, logits[who])
                rows_t = resize_cls_attention(rows["teacher"], grids[1], grids[0])  # equal grids (logits too): as they are
                # attn_distill_loss divides by the rows: (pairs x B) rows give the mean over pairs of each pair's loss
                losses["attn"] = attn_distill_loss(rows["student"], rows_t, args.attn_temperature, aggregate,
                                                   args.attn_distance, (logits["student"], logits["teacher"]))
            if args.patch_align > 0:
                losses["patch"] = F.mse_loss(out[:, npt[0]:].float(), t_tokens[:, npt[1]:].float())
            loss = args.cls_weight * losses["cls"] + args.lambda_attn * losses.get("attn", 0.0) + \
                args.patch_align * losses.get("patch", 0.0)
            meter.log(epoch, it, steps, args.log_every, loss=loss, lr=lr, **losses)
            scaler.scale(loss / args.accum_iter).backward()  # gradients accumulate over accum_iter steps
        if update:
            if args.clip_grad > 0:
                scaler.unscale_(optimizer)
                nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
    return common.reduce_metrics(meter.averages(), device)


# ---------------------------------------------------------------------------------------------
# the student with its projector
# ---------------------------------------------------------------------------------------------
class StudentWithProjector(nn.Module):
    """backbone -> last block's tokens (before the backbone's final norm) -> P -> LayerNorm(D_t).
    proj_layers 0 (--no-projector): the backbone's own final-norm tokens, nothing added."""

    def __init__(self, backbone, teacher_dim, proj_layers):
        super().__init__()
        self.backbone = backbone
        if proj_layers > 0:
            self.projector = build_projector(backbone.embed_dim, teacher_dim, proj_layers)
            self.norm = nn.LayerNorm(teacher_dim, eps=1e-6)
        else:
            self.projector = None

    def forward(self, x, all_tokens=False):
        """(B, D_t) from the CLS token, or (B, N, D_t) from all tokens. P works per token, so projecting
        only the CLS gives the official values for L_c at a fraction of the cost."""
        if self.projector is None:
            tokens = self.backbone.forward_features(x)
            return tokens if all_tokens else tokens[:, 0]
        # forward_features without its final norm (P starts with its own LayerNorm): nothing computed and dropped
        tokens = self.backbone.blocks(common.vit_embed(self.backbone, x))
        if all_tokens:
            return self.norm(self.projector(tokens))
        # the CLS alone is B rows: P runs in fp32, outside autocast, at no cost in time, and a step dispatches no
        # low-precision copies of its weights (4 ops fewer per Linear, forward and backward)
        with torch.autocast(x.device.type, enabled=False):
            return self.norm(self.projector(tokens[:, 0].float()))


def build_projector(d_s, d_t, layers):
    """P: LayerNorm(d_s, eps 1e-6, as the official code), then `layers` Linear layers with GELU between,
    widths alternating 2 d_s, d_s, ... and the last one to d_t (the official code gets the last width wrong
    for 1-3 layers: we take the teacher's width, which the loss needs). Linear init trunc-normal std 0.02, bias 0."""
    mods, width = [nn.LayerNorm(d_s, eps=1e-6)], d_s
    for i in range(layers):
        out = d_t if i == layers - 1 else (2 * d_s if i % 2 == 0 else d_s)
        mods.append(nn.Linear(width, out))
        if i < layers - 1:
            mods.append(nn.GELU())
        width = out
    for m in mods:
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            nn.init.zeros_(m.bias)
    return nn.Sequential(*mods)


class ValueNorms:
    """Per-head L2 norms of the value vectors of chosen blocks (B x H x N), read from the qkv Linear's
    output during the normal forward (the Table 10 'weight by value' ablation)."""

    def __init__(self, model, blocks):
        self.norms, self._handles = {}, []
        for i in sorted({b % len(model.blocks) for b in blocks}):
            a = model.blocks[i].attn
            if not hasattr(a, "qkv"):
                common.fail("--value_norm needs timm Attention blocks with a fused qkv Linear")
            self._handles.append(a.qkv.register_forward_hook(self._hook(i, a.num_heads)))

    def _hook(self, i, heads):
        def hook(module, inputs, out):
            B, N, _ = out.shape
            self.norms[i] = out.reshape(B, N, 3, heads, -1)[:, :, 2].float().norm(dim=-1).transpose(1, 2)
        return hook

    def close(self):
        for h in self._handles:
            h.remove()


# ---------------------------------------------------------------------------------------------
# attention rows and the loss
# ---------------------------------------------------------------------------------------------
def cls_rows(attn, num_prefix_tokens=1, value_norms=None, logits=False):
    """The CLS query's attention row (B x H x N) of a B x H x N x N map (or of its first rows), fp32,
    keys = [CLS, patches] (other prefix tokens, e.g. registers or a distillation token, dropped and the row
    renormalised); optionally weighted by the value norms (B x H x N) and L1-normalised. logits: `attn` holds the
    scores before the softmax; the prefix keys are dropped, the softmax that follows renormalises."""
    rows = (attn if attn.dim() == 3 else attn[:, :, 0]).float()  # B x H x N: the rows already
    if logits:
        if value_norms is not None:
            raise ValueError("value norms weigh probabilities, not logits")
        return torch.cat([rows[..., :1], rows[..., num_prefix_tokens:]], -1) if num_prefix_tokens > 1 else rows
    if value_norms is not None:
        rows = rows * value_norms
    if num_prefix_tokens > 1 or value_norms is not None:
        rows = torch.cat([rows[..., :1], rows[..., num_prefix_tokens:]], -1)
        rows = rows / rows.sum(-1, keepdim=True)
    return rows


def resize_cls_attention(rows, src_grid, dst_grid):
    """B x H x (1 + src^2) -> B x H x (1 + dst^2): the patch part resized bicubically (align_corners
    False) from a src x src to a dst x dst grid and rescaled so that its mass stays 1 - (CLS->CLS entry);
    the CLS entry is kept. Rows still sum to 1."""
    if rows.shape[-1] != 1 + src_grid ** 2:
        raise ValueError(f"rows have {rows.shape[-1]} keys, expected 1 + {src_grid}^2")
    if src_grid == dst_grid:
        return rows
    B, H, _ = rows.shape
    a0, patches = rows[..., :1].float(), rows[..., 1:].float()
    patches = F.interpolate(patches.reshape(B * H, 1, src_grid, src_grid), size=(dst_grid, dst_grid), mode="bicubic",
                            align_corners=False).reshape(B, H, dst_grid * dst_grid)
    patches = patches * (1 - a0) / patches.sum(-1, keepdim=True)
    return torch.cat([a0, patches], -1)


def aggregate_heads(rows, temperature, mode="logsum", logits=False):
    """B x H x N -> B x N. logsum: softmax over keys of (sum_h log a_h) / T (a product of the heads, then a
    tempered softmax; logs in fp32 with a floor at the smallest normal float so that a 0 gives no -inf).
    mean: the mean row; max / min: the key-wise max / min over heads, L1-normalised. logits (logsum only): `rows`
    are the heads' logits z_h, and log a_h = z_h - logsumexp(z_h) differs from z_h by a constant over the keys,
    which the softmax drops: softmax(sum_h z_h / T), the same distribution without a softmax and a log per head."""
    rows = rows.float()
    if logits and mode != "logsum":
        raise ValueError(f"{mode} aggregation needs probabilities, not logits")
    if mode == "logsum":
        logs = rows if logits else rows.clamp_min(torch.finfo(torch.float32).tiny).log()
        return (logs.sum(1) / temperature).softmax(-1)
    if mode == "mean":
        return rows.mean(1)
    if mode in ("max", "min"):
        g = rows.amax(1) if mode == "max" else rows.amin(1)
        return g / g.sum(-1, keepdim=True)
    raise ValueError(f"unknown aggregation {mode!r}")


def attn_distill_loss(student_rows, teacher_rows, temperature=10.0, aggregate=None, distance="kl", logits=(False, False)):
    """L_a: with `aggregate` (logsum / max / mean / min) each side's heads are combined first, otherwise
    head h is compared with head h (equal head counts). Both distributions clamped to [1e-5, 0.996] and
    L1-renormalised; KL(teacher || student) (or the squared error) summed over keys and heads, divided by
    the batch. fp32; the teacher carries no gradient. logits: (student, teacher) rows given as logits (logsum)."""
    s, t = student_rows.float(), teacher_rows.float()
    t = t.detach() if t.requires_grad else t  # rows made under no_grad need no detach op
    if any(logits) and aggregate != "logsum":
        raise ValueError("rows given as logits need the logsum aggregation")
    if aggregate:
        s, t = (aggregate_heads(x, temperature, aggregate, lg) for x, lg in zip((s, t), logits))
    elif s.shape != t.shape:
        raise ValueError(f"heads compared by index need equal shapes, got {tuple(s.shape)} and {tuple(t.shape)}")
    s, t = (x.clamp(1e-5, 0.996) for x in (s, t))
    s, t = s / s.sum(-1, keepdim=True), t / t.sum(-1, keepdim=True)
    d = (t * (t.log() - s.log())) if distance == "kl" else (s - t).pow(2)
    return d.sum() / len(s)


if __name__ == "__main__":
    common.run_main(main, argparse.ArgumentParser(SCRIPT, parents=[get_args_parser()]))
