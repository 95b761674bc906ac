"""SSKD: knowledge distillation with a self-supervised auxiliary task and selective transfer (Xu et al.,
"Knowledge Distillation Meets Self-Supervision", ECCV 2020), for any timm teacher and student (the
method reads only final features and logits: ViT -> ViT, CNN -> ViT, CNN -> CNN).

Three stages, one script (defaults: the official CIFAR code, github.com/xuguodong03/SSKD):
  # 1. the teacher, supervised (no --teacher_weights: plain training on the normal view)
  python sskd.py --student resnet32x4_or_any_timm_name --data_path ... --output_dir out/teacher
  # 2. the teacher's self-supervision module: backbone and classifier frozen, 60 epochs
  python sskd.py --stage teacher_ss --teacher_weights out/teacher/checkpoint.pth --data_path ... --output_dir out/teacher_ss
  # 3. the student: CE + KD on normal views, KD on transformed views and the SS similarity loss,
  #    both with selective transfer
  torchrun --nproc_per_node=8 sskd.py --student deit_tiny --teacher_weights out/teacher_ss/checkpoint.pth ...

Each image gives 4 views, image-major: rotations 0/90/180/270 of one horizontally flipped copy, each with
its own random crop (view 0 is the "normal" one). The SS module (Linear F->F, ReLU, Linear F->F on the
pre-logit feature) scores each transformed view against every normal view of the batch by cosine
similarity; the student matches the teacher's row-softmax of those similarities. Paper (CIFAR-100):
vgg13 -> vgg8 KD 72.98 -> SSKD 75.33.
"""
import argparse
import functools
import os

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torchvision import transforms

import common

# the name checkpoints, logs and --resume checks carry: a copy of this file under another name is another script
SCRIPT = os.path.basename(__file__)


def get_args_parser():
    p = argparse.ArgumentParser("SSKD", add_help=False)
    g = p.add_argument_group("models and stage")
    g.add_argument("--stage", default="student", choices=["student", "teacher_ss"],
                   help="student: train --student (plain, KD or SSKD); teacher_ss: train the teacher's SS module")
    g.add_argument("--student", default="deit_tiny", type=str, help="any timm name or alias")
    g.add_argument("--patch_size", default=None, type=int, help="student override (ViTs)")
    g.add_argument("--depth", default=None, type=int, help="student override (ViTs)")
    g.add_argument("--embed_dim", default=None, type=int, help="student override (ViTs)")
    g.add_argument("--num_heads", default=None, type=int, help="student override (ViTs)")
    g.add_argument("--drop_path", default=0.0, type=float)
    g.add_argument("--teacher", default=None, type=str, help="teacher architecture (optional for files of this repository)")
    g.add_argument("--teacher_weights", default="", type=str, help="file, hub:NAME or 'random'; '' = no teacher")
    g.add_argument("--teacher_key", default=None, type=str)
    g.add_argument("--teacher_mean", default=None, type=float, nargs=3,
                   help="the teacher's input normalisation (default: its file's, timm's config for hub / tagged names, else ImageNet's)")
    g.add_argument("--teacher_std", default=None, type=float, nargs=3)
    common.add_shape_args(g, "teacher_", "the teacher")
    g = p.add_argument_group("optimisation (official CIFAR code: SGD, step decay)")
    g.add_argument("--epochs", default=240, type=int, help="student epochs (stage teacher_ss: --ss_epochs)")
    g.add_argument("--batch_size", default=64, type=int, help="images per process; each gives 4 views")
    g.add_argument("--blr", default=0.2, type=float, help="lr per 256 images (0.05 at batch 64)")
    g.add_argument("--lr", default=None, type=float, help="absolute lr (overrides --blr)")
    g.add_argument("--momentum", default=0.9, type=float)
    g.add_argument("--weight_decay", default=5e-4, type=float)
    g.add_argument("--decay_epochs", default=[150, 180, 210], type=int, nargs="*", help="lr x decay_rate at these epochs")
    g.add_argument("--decay_rate", default=0.1, type=float)
    g.add_argument("--ss_epochs", default=60, type=int, help="stage teacher_ss epochs")
    g.add_argument("--ss_decay_epochs", default=[30, 45], type=int, nargs="*")
    g.add_argument("--eval_every", default=1, type=int)
    g = p.add_argument_group("SSKD losses (code defaults; the arXiv paper: --ss_weight 2.7 --tf_weight 10)")
    g.add_argument("--ce_weight", default=0.1, type=float, help="lambda1 (without a teacher the CE weight is 1)")
    g.add_argument("--kd_weight", default=0.9, type=float, help="lambda2 (KD on normal views)")
    g.add_argument("--tf_weight", default=2.7, type=float, help="weight of L_T, KD on transformed views (0: off)")
    g.add_argument("--ss_weight", default=10.0, type=float, help="weight of L_ss, the SS similarity loss (0: off)")
    g.add_argument("--kd_temperature", default=4.0, type=float)
    g.add_argument("--tf_temperature", default=4.0, type=float)
    g.add_argument("--ss_temperature", default=0.5, type=float)
    g.add_argument("--ratio_tf", default=1.0, type=float, help="selective transfer: share of wrong rows kept for L_T")
    g.add_argument("--ratio_ss", default=0.75, type=float, help="selective transfer: share of wrong rows kept for L_ss")
    g.add_argument("--views", default="rotation", choices=["rotation", "paper"],
                   help="rotation: 0/90/180/270 (official code); paper: colour dropping, rotation, crop+resize, "
                        "colour distortion drawn per transformed view")
    g = p.add_argument_group("data regimes (Fig. 4)")
    g.add_argument("--train_fraction", default=1.0, type=float, help="keep this share of each class (seeded)")
    g.add_argument("--label_noise", default=0.0, type=float, help="replace this share of labels by another class (seeded)")
    common.add_data_args(p, input_size=32)
    # evaluation at the training scale: the views resize to input_size and crop it (padded), the official test
    # transform is ToTensor + Normalize at native 32 px; a crop_pct < 1 would enlarge the evaluation images
    p.set_defaults(crop_pct=1.0)
    common.add_run_args(p)
    return p


def main(args):
    device = common.init_distributed()
    # ---------------- checks, before any work ----------------
    teacher_ss = args.stage == "teacher_ss"
    kd = bool(args.teacher_weights) and not teacher_ss
    if teacher_ss and not args.teacher_weights:
        common.fail("--stage teacher_ss needs the supervised teacher: --teacher_weights")
    if args.batch_size < 2:
        common.fail("--batch_size must be at least 2: the SS task contrasts each view with the other images of the batch")
    if not (0 < args.train_fraction <= 1 and 0 <= args.label_noise < 1):
        common.fail("--train_fraction must be in (0, 1] and --label_noise in [0, 1)")
    if args.ss_epochs < 1:
        common.fail(f"--ss_epochs must be at least 1, got {args.ss_epochs}")
    ckpt = common.resume_checkpoint(args, SCRIPT)
    common.seed_everything(args.seed)

    # ---------------- data: 4 views per image ----------------
    mean_std = common.data_stats(args)  # the student's input normalisation = the data pipeline's
    views = FourViews(args.input_size, args.views, mean_std)
    train_set, loader = common.build_train_data(
        args, views, FourCrops(views), [common.Normalise(*mean_std)],
        wrap=lambda ds: data_regime(ds, args.train_fraction, args.label_noise, len(ds.classes), args.seed))
    num_classes = len(train_set.classes)
    val_set = common.build_dataset(args, "val", common.build_transform(args, False))
    val_loader = common.build_loader(val_set, 4 * args.batch_size, False, args.num_workers)

    # ---------------- models ----------------
    teacher = t_ss = None
    if args.teacher_weights:
        teacher = common.build_teacher(args.teacher, args.teacher_weights, args.teacher_key, mean_std, args.teacher_mean,
                                       args.teacher_std, num_classes=num_classes, img_size=args.input_size,
                                       trust=args.trust_checkpoint, **common.shape_args(args, "teacher_")).to(device)
        t_ss = SSHead(feature_width(teacher)).to(device)
        saved = common.read_checkpoint(args.teacher_weights, args.trust_checkpoint) if os.path.isfile(args.teacher_weights) else {}
        if "ss_head" in saved:
            t_ss.load_state_dict(saved["ss_head"])
        elif kd and args.ss_weight > 0:
            common.fail(f"{args.teacher_weights} has no trained SS module: run --stage teacher_ss first (or --ss_weight 0)")
        if not teacher_ss:
            common.freeze(t_ss)
    torch.manual_seed(args.seed)
    if teacher_ss:  # stage 2: only the teacher's SS module learns
        student, s_ss, trainable = teacher, None, t_ss
        epochs, decay = args.ss_epochs, args.ss_decay_epochs
    else:
        student = common.create_model(args.student, num_classes=num_classes, drop_path_rate=args.drop_path,
                                      img_size=args.input_size, patch_size=args.patch_size, depth=args.depth,
                                      embed_dim=args.embed_dim, num_heads=args.num_heads, mean=mean_std[0], std=mean_std[1]).to(device)
        s_ss = SSHead(feature_width(student)).to(device) if kd and args.ss_weight > 0 else None
        trainable = nn.ModuleDict({"student": student, **({"ss": s_ss} if s_ss is not None else {})})
        epochs, decay = args.epochs, args.decay_epochs
    ddp = common.get_world_size() > 1
    wrap = lambda m: DistributedDataParallel(m) if ddp and m is not None else m  # noqa: E731
    student_ddp, s_ss_ddp = (None, wrap(t_ss)) if teacher_ss else (wrap(WithFeatures(student)), wrap(s_ss))
    common.compile_models(args, student, teacher)

    # ---------------- optimizer, schedule, resume ----------------
    lr = common.resolve_lr(args)
    # the official student.py decays every parameter (BN / LayerNorm weights and biases included): one group
    params = [p for p in trainable.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=lr, momentum=args.momentum, weight_decay=args.weight_decay)
    schedule = lambda step: lr * args.decay_rate ** sum(step >= e * len(loader) for e in decay)  # noqa: E731
    scaler = common.grad_scaler(device, args.amp)
    # saved every epoch, restored here: the network (stage 2: the frozen teacher, whose file the student stage reads)
    # and its SS head (stage 2: the teacher's, 'ss_head'; student stage: the student's, 'ss')
    state = dict(model=teacher, ss_head=t_ss) if teacher_ss else dict(model=student, ss=s_ss)
    state.update(optimizer=optimizer, scaler=scaler)
    start_epoch = common.restore(ckpt, **state)

    # ---------------- training ----------------
    common.start_run(args, SCRIPT)
    test_stats = {}
    for epoch in range(start_epoch, epochs):
        common.seed_everything(args.seed, epoch)
        loader.sampler.set_epoch(epoch)
        train_stats = train_one_epoch(student_ddp, s_ss_ddp, teacher, t_ss, loader, optimizer, scaler, schedule, epoch,
                                      device, args)
        test_stats = {}  # logged only where measured
        if (epoch + 1) % args.eval_every == 0 or epoch + 1 == epochs:
            test_stats = ss_accuracy(teacher, t_ss, val_loader, device, args) if teacher_ss else \
                common.evaluate(student, val_loader, device, args.amp)
            common.print0(f"| epoch {epoch}: " + "  ".join(f"{k} {v:.2f}" for k, v in test_stats.items()))
        common.end_epoch(args.output_dir, SCRIPT, args, epoch, train_stats, test_stats, args.save_every,
                         model_config=state["model"].model_config, **state)
    if not test_stats:  # every epoch had already run (a finished run resumed)
        test_stats = ss_accuracy(teacher, t_ss, val_loader, device, args) if teacher_ss else \
            common.evaluate(student, val_loader, device, args.amp)
    if teacher_ss:
        common.print0(f"| teacher's contrastive-prediction accuracy {test_stats.get('ss_acc1', float('nan')):.2f}% "
                      f"(the paper: about 50% for vgg13); pass {os.path.join(args.output_dir, 'checkpoint.pth')} "
                      "as --teacher_weights of the student")
        return teacher, test_stats
    common.export_backbone(student, os.path.join(args.output_dir, "student_backbone.pth"))
    common.print0(f"| final top-1 {test_stats['acc1']:.2f}  top-5 {test_stats['acc5']:.2f}")
    return student, test_stats


def train_one_epoch(student, s_ss, teacher, t_ss, loader, optimizer, scaler, schedule, epoch, device, args):
    """Stage teacher_ss: CE of the teacher SS module's raw cosine similarities (temperature 1) against
    the positive column. Student stage: lambda1 CE + lambda2 KD on normal views (+ L_T + L_ss)."""
    teacher_ss = args.stage == "teacher_ss"
    (s_ss if teacher_ss else student).train()
    meter = common.Meter()
    steps = len(loader)
    all_views = teacher_ss or (teacher is not None and (args.tf_weight > 0 or args.ss_weight > 0))
    for it, batch in enumerate(meter.timed(loader)):
        lr = schedule(epoch * steps + it)
        for g in optimizer.param_groups:
            g["lr"] = lr
        images, target = common.to_device(batch, device, loader)
        x = rotate_views(images) if all_views else images[:, 0]  # 4B image-major views, or the B normal views
        normal, transformed = view_rows(len(x), all_views, device)
        with common.autocast(device, args.amp):
            if teacher is not None:
                with torch.no_grad():
                    t_feat, t_logits = features_and_logits(teacher, x)
            if teacher_ss:
                sim = similarities(s_ss(t_feat), normal, transformed)
                losses = {"ss_ce": F.cross_entropy(sim, positives(len(normal), device))}
            else:
                feat, logits = student(x)
                per_image = logits.unflatten(0, (-1, 4 if all_views else 1))  # (B, views, C): row 0 the normal view
                ce_weight = args.ce_weight if teacher is not None else 1.0  # lambda1 only next to the teacher's losses
                losses = {"ce": ce_weight * F.cross_entropy(per_image[:, 0].float(), target)}
                if teacher is not None:  # one KL per row of every view; KD reads the normal rows, L_T the others
                    kl = common.kd_loss(logits, t_logits, args.kd_temperature, rows=True).view(len(target), -1)
                    losses["kd"] = args.kd_weight * kl[:, 0].mean()
                if teacher is not None and args.tf_weight > 0:
                    y = target.repeat_interleave(3)  # transformed rows of image b: 4b+1 .. 4b+3
                    t_rows = t_logits.unflatten(0, (-1, 4))[:, 1:].flatten(0, 1)
                    keep = selective_mask(error_levels(t_rows.float(), y), args.ratio_tf)
                    if args.tf_temperature != args.kd_temperature:  # L_T at its own temperature: its own KL
                        kl = common.kd_loss(logits, t_logits, args.tf_temperature, rows=True).view(len(target), -1)
                    losses["tf"] = args.tf_weight * (kl[:, 1:] * keep.view(-1, 3)).sum() / keep.sum().clamp_min(1)
                if s_ss is not None:
                    with torch.no_grad():
                        sim_t = similarities(t_ss(t_feat), normal, transformed)
                    sim_s = similarities(s_ss(feat), normal, transformed)
                    keep = selective_mask(error_levels(sim_t, positives(len(normal), device)), args.ratio_ss)
                    losses["ss"] = args.ss_weight * sskd_ss_loss(sim_s, sim_t, args.ss_temperature, keep)
            loss = sum(losses.values())
        meter.log(epoch, it, steps, args.log_every, loss=loss, lr=lr, **losses)
        scaler.scale(loss).backward()  # the official student.py: no gradient clipping
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
    return common.reduce_metrics(meter.averages(), device)


# ---------------------------------------------------------------------------------------------
# views, features, selective transfer, losses
# ---------------------------------------------------------------------------------------------
def rotate_views(x):
    """(B, C, H, W) -> (4B, C, H, W): each image rotated by 0, 90, 180, 270 degrees, image-major
    ([x0 r0, x0 r90, x0 r180, x0 r270, x1 r0, ...]). A (B, 4, C, H, W) batch of four separately cropped
    copies gets copy k rotated by k x 90 degrees, in the same order."""
    if x.dim() == 4:
        x = x[:, None].expand(-1, 4, -1, -1, -1)
    return torch.stack([torch.rot90(x[:, k], k, dims=(-2, -1)) for k in range(4)], 1).flatten(0, 1)


class FourViews:
    """PIL image -> (4, C, H, W) un-rotated views for rotate_views: one horizontal flip shared by the four,
    an independent random crop (padding input_size / 8) for each (official code). views='paper': the
    three transformed views are each one of colour dropping, rotation, crop + resize, colour distortion
    (drawn at random; our reading of the paper), marked for rotate_views by pre-rotating them back."""

    def __init__(self, input_size, kind="rotation", stats=None):
        self.size, self.kind = input_size, kind
        norm = [transforms.ToTensor(), transforms.Normalize(*(stats or common.input_stats("")))]
        self.crop = transforms.Compose([transforms.Resize(input_size), transforms.RandomCrop(input_size, padding=input_size // 8)] + norm)
        self.others = [transforms.Compose([transforms.Resize(input_size), transforms.CenterCrop(input_size), t] + norm) for t in (
            transforms.Grayscale(3), transforms.RandomRotation((90, 270)),
            transforms.RandomResizedCrop(input_size, scale=(0.2, 1.0)), transforms.ColorJitter(0.4, 0.4, 0.4, 0.1))]

    def __call__(self, img):
        if torch.rand(()) < 0.5:
            img = transforms.functional.hflip(img)
        if self.kind == "rotation":
            return torch.stack([self.crop(img) for _ in range(4)])
        views = [self.crop(img)] + [self.others[int(torch.randint(0, 4, ()))](img) for _ in range(3)]
        # rotate_views turns view k by k x 90 degrees: pre-rotate the others back so they arrive as drawn
        return torch.stack([views[0]] + [torch.rot90(v, -k, dims=(-2, -1)) for k, v in enumerate(views[1:], 1)])


class FourCrops:
    """FourViews up to the normalisation (the device's), uint8 views, for the fast pipelines: the same draws, with one
    resize (torchvision's uint8 kernel) for the four padded crops, where the reference resizes for each; 'paper'
    views through the reference's torchvision transforms on tensors. batch: the 'rotation' views of a batch stored at
    the training size, on the device (the memory pipeline)."""

    def __init__(self, views):
        self.size, self.kind = views.size, views.kind
        self.others = [transforms.Compose(t.transforms[:-2]) for t in views.others]  # without ToTensor / Normalize
        self.batch = self.rotation_batch if views.kind == "rotation" else None

    def __call__(self, img):
        from torchvision.transforms.v2.functional import resize
        img = common.to_uint8(img)
        if torch.rand(()) < 0.5:
            img = img.flip(-1)
        s, p = self.size, self.size // 8
        x = F.pad(resize(img, [s], antialias=True), [p] * 4)  # Resize(s), RandomCrop(s, padding=s // 8)'s zero padding

        def crop():
            i, j, _, _ = transforms.RandomCrop.get_params(x, (s, s))
            return x[:, i:i + s, j:j + s]
        if self.kind == "rotation":
            return torch.stack([crop() for _ in range(4)])
        views = [crop()] + [self.others[int(torch.randint(0, 4, ()))](img) for _ in range(3)]
        return torch.stack([views[0]] + [torch.rot90(v, -k, dims=(-2, -1)) for k, v in enumerate(views[1:], 1)])

    def rotation_batch(self, x):
        B, s, p = len(x), self.size, self.size // 8
        flip, ij = common.params_to(x, torch.rand(B) < 0.5, torch.randint(0, 2 * p + 1, (B, 4, 2)))
        x = F.pad(torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x), [p] * 4)
        rows, cols = (ij[..., k, None] + torch.arange(s, device=x.device) for k in (0, 1))  # (B, 4, s) each
        b = torch.arange(B, device=x.device).view(B, 1, 1, 1)
        return x[b, :, rows[..., :, None], cols[..., None, :]].permute(0, 1, 4, 2, 3)  # (B, 4, 3, s, s)


def features_and_logits(model, x):
    """(pooled pre-logit feature, logits) of any timm model (ViT: final-norm CLS; CNN: global pool)."""
    feat = model.forward_head(model.forward_features(x), pre_logits=True)
    return feat, model.get_classifier()(feat)


def feature_width(model):
    """Width of features_and_logits' feature: timm's head_hidden_size where a layer after the pooling widens it before
    the classifier (MobileNetV3, LCNet, GhostNet, HGNetV2: e.g. lcnet_050 1280, its num_features 256), else
    num_features (ViTs, ResNets: the same number)."""
    return getattr(model, "head_hidden_size", None) or model.num_features


class WithFeatures(nn.Module):
    """The student as one module returning (feature, logits), so that DDP sees a single forward."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return features_and_logits(self.model, x)


class SSHead(nn.Module):
    """SSKD's SS module: Linear(F, F) -> ReLU -> Linear(F, F), PyTorch default init."""

    def __init__(self, dim):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(inplace=True), nn.Linear(dim, dim))

    def forward(self, x):
        # in fp32 with autocast off: an F x F MLP on 4B pooled features costs nothing next to the networks, and a step
        # then makes no low-precision copies of its weights (the official code trains in fp32 throughout)
        with torch.autocast(x.device.type, enabled=False):
            return self.net(x.float())


def similarities(z, normal, transformed):
    """3B x B cosine similarities: each transformed view against every normal view of the batch, in fp32 with
    autocast off (under bf16 autocast the matmul would round them, and ties would change the selective transfer)."""
    with torch.autocast(z.device.type, enabled=False):
        z = F.normalize(z.float(), dim=1)
        return z[transformed] @ z[normal].T


@functools.lru_cache(maxsize=None)
def view_rows(n, all_views, device):
    """(normal, transformed) row indices of n image-major views (each image's normal view, then its 3 transformed
    ones), or of n normal views; made once per batch size (no boolean indexing: no host sync)."""
    rows = torch.arange(n, device=device)
    if not all_views:
        return rows, rows[:0]
    return rows[0::4], rows.view(-1, 4)[:, 1:].reshape(-1)


@functools.lru_cache(maxsize=None)
def positives(batch, device):
    """The positive column of each transformed row: its own image, row j -> j // 3."""
    return torch.arange(batch, device=device).repeat_interleave(3)


def error_levels(scores, positive):
    """Rank of the positive in each row of scores (R x C), 0 = the top score; ties count in the
    positive's favour (rank = number of strictly higher scores)."""
    return (scores > scores.gather(1, positive[:, None])).sum(1)


def selective_mask(levels, ratio):
    """Rows kept by selective transfer: all rows with level 0, plus the int(n_wrong x ratio) wrong rows
    with the smallest levels (ties: lower row index first). On the device: no host sync."""
    wrong = levels > 0
    k = (wrong.sum().double() * ratio).floor()  # float64: Python's int(n x ratio) exactly
    order = torch.argsort(torch.where(wrong, levels, torch.full_like(levels, -1)), stable=True)
    rank = torch.empty_like(order).scatter_(0, order, torch.arange(len(order), device=order.device))
    return ~wrong | (rank - (~wrong).sum() < k)  # a wrong row's place among the wrong ones, best first


def sskd_ss_loss(sim_s, sim_t, temperature, keep):
    """KL(softmax(sim_t / T) || softmax(sim_s / T)) per kept row, mean over kept rows, x T^2."""
    return masked_kd(sim_s, sim_t, temperature, keep)


def masked_kd(logits_s, logits_t, temperature, keep):
    """KD over the kept rows only (mean over the kept rows, x T^2; 0 when no row is kept), with no host sync."""
    return common.kd_loss(logits_s, logits_t, temperature, keep)


@torch.no_grad()
def ss_accuracy(teacher, t_ss, loader, device, args):
    """The teacher's contrastive prediction: share of transformed views whose most similar normal view
    (over the evaluation batch) is their own image."""
    hits = torch.zeros(2, device=device, dtype=torch.float64)
    for images, _ in common.progress(loader, "ss accuracy"):
        if len(images) < 2:
            continue
        x = rotate_views(images.to(device))
        normal, transformed = view_rows(len(x), True, device)
        with common.autocast(device, args.amp):
            sim = similarities(t_ss(features_and_logits(teacher, x)[0]), normal, transformed)
        hits += torch.tensor([(sim.argmax(1) == positives(len(normal), device)).sum().item(), len(transformed)],
                             device=device, dtype=torch.float64)
    common.all_reduce_sum(hits)
    return {"ss_acc1": 100.0 * hits[0].item() / max(hits[1].item(), 1)}


# ---------------------------------------------------------------------------------------------
# data regimes and model options
# ---------------------------------------------------------------------------------------------
class Relabelled(torch.utils.data.Dataset):
    def __init__(self, dataset, indices, labels):
        self.dataset, self.indices, self.labels = dataset, indices, labels
        self.classes = dataset.classes

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, i):
        return self.dataset[self.indices[i]][0], self.labels[i]


def data_regime(dataset, fraction, noise, num_classes, seed):
    """A seeded per-class subset (few-shot) and/or seeded symmetric label noise (another class drawn
    uniformly), the same for every method given the seed."""
    if fraction >= 1 and noise == 0:
        return dataset
    if not hasattr(dataset, "targets"):
        common.fail(f"--train_fraction / --label_noise need a dataset with labels listed (not {type(dataset).__name__})")
    g = torch.Generator().manual_seed(seed)
    targets = torch.as_tensor(dataset.targets)
    keep = common.class_subset(targets, fraction, g)
    labels = targets[keep].clone()
    flip = torch.rand(len(keep), generator=g) < noise
    other = (labels + torch.randint(1, num_classes, (len(keep),), generator=g)) % num_classes
    labels = torch.where(flip, other, labels)
    common.print0(f"| {len(keep)} training images ({fraction:.0%} per class), {int(flip.sum())} labels flipped")
    return Relabelled(dataset, keep.tolist(), labels.tolist())


if __name__ == "__main__":
    common.run_main(main, argparse.ArgumentParser(SCRIPT, parents=[get_args_parser()]))
