"""k-NN and linear-probe evaluation of a frozen backbone (DINO's protocol, with cached features).

The backbone can be a checkpoint or exported backbone of any script here, a DINO / MAE / MoCo v3 /
DeiT / timm file, or a timm name (hub:NAME when online). Its architecture is what the file says (this
repository's config, MoCo v3's 'arch': its vit_small has 12 heads; an MAE global-pool finetune: its
pooled fc_norm feature), --arch in place of the name, then --patch_size / --depth / --embed_dim /
--num_heads. Features are extracted once (evaluation transform: resize + centre crop, no augmentation), then
  - k-NN: L2-normalised features, the k nearest training features vote with weight exp(sim / T),
    T = 0.07, k in 10 20 100 200 (DINO eval_knn.py);
  - linear probe: several learning rates trained together in one pass over the cached features
    (SGD, momentum 0.9, cosine, 100 epochs), the best reported; optional BatchNorm head (MAE).
    Unlike DINO's eval_linear.py the backbone does not run again each epoch and there is no crop
    augmentation.

  # one GPU or CPU
  python eval_knn_linear.py --arch vit_small --weights dino_deitsmall16_pretrain.pth --data_path /imagenet
  # 8 GPUs (extraction is sharded; every image counted once)
  torchrun --nproc_per_node=8 eval_knn_linear.py --weights output/checkpoint.pth --data_path /imagenet
  # a run of this repository knows its architecture; DINO's last-4-blocks feature; multi-exit
  python eval_knn_linear.py --weights output/student_backbone.pth --n_last_blocks 4 --layers 3 7 11 ...
  # offline smoke test
  python eval_knn_linear.py --arch deit_tiny --weights random --patch_size 4 --dataset synthetic --input_size 32
  # look inside, without k-NN / probe: attention maps, attention distance, CKA and attention KL against the teacher
  python eval_knn_linear.py --weights out/student_backbone.pth --attention_maps 8 --attention_distance \
      --compare_with teacher/student_backbone.pth --no-knn --no-linear --data_path /imagenet --output_dir look

Writes output_dir/eval_results.json and output_dir/linear_probe[_FEATURE].pth: the probe with its
feature spec (common.save_probe), which ssta.py loads as the classifier of a self-supervised teacher
(DINO's released *_linearweights.pth files load the same way through common.load_probe). Images are
normalised with the evaluated backbone's own statistics (common.input_stats; --mean / --std override).
The look-inside modes (ViTs) write PNG + JSON files after k-NN and probe, or alone with --no-knn --no-linear.
"""
import argparse
import json
import os

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision import transforms

import common

# the name checkpoints, logs and --resume checks carry: a copy of this file under another name is another script
SCRIPT = os.path.basename(__file__)


def get_args_parser():
    p = argparse.ArgumentParser("k-NN and linear-probe evaluation", add_help=False)
    p.add_argument("--weights", required=False, default="", type=str,
                   help="checkpoint / exported backbone / foreign file, hub:<timm name>, or 'random' (smoke tests)")
    p.add_argument("--checkpoint_key", default=None, type=str, help="top-level key of the file to load (default: auto)")
    p.add_argument("--trust_checkpoint", action="store_true",
                   help="load files that hold Python objects beyond tensors (full unpickling runs code from the file)")
    p.add_argument("--arch", default=None, type=str,
                   help="timm name or alias; optional where the file says (this repository's files, MoCo v3's and timm "
                        "train.py's checkpoints: their 'arch'); with a file that says, it replaces the name only")
    p.add_argument("--patch_size", default=None, type=int, help="override the architecture's patch size")
    for k in ("depth", "embed_dim", "num_heads"):
        p.add_argument(f"--{k}", default=None, type=int, help=f"override the architecture's {k.replace('_', ' ')} (default: "
                       "the file's, else the name's)" + ("; ViT-S: MoCo v3 / SDSSL 12, timm / DeiT / DINO 6" if k[0] == "n" else ""))
    p.add_argument("--batch_size", default=128, type=int, help="extraction batch per process")
    p.add_argument("--amp", default="bf16", choices=["bf16", "fp16", "off"], help="autocast for extraction on CUDA")
    # features
    p.add_argument("--n_last_blocks", default=1, type=int, help="concatenate the final-norm CLS of the last n blocks (DINO: 4 for ViT-S)")
    p.add_argument("--avgpool_patchtokens", action=argparse.BooleanOptionalAction, default=False,
                   help="add the mean patch token of the last block (DINO's ViT-B recipe; needs --n_last_blocks 1)")
    p.add_argument("--layers", default=[], type=int, nargs="*",
                   help="also evaluate the final-norm CLS token of these blocks (0-indexed; multi-exit)")
    p.add_argument("--dump_features", default="", type=str, help="save the extracted features to this file")
    p.add_argument("--load_features", default="", type=str, help="skip the backbone: use features saved by --dump_features")
    # k-NN
    p.add_argument("--knn", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--nb_knn", default=[10, 20, 100, 200], type=int, nargs="+", help="k values")
    p.add_argument("--knn_temperature", default=0.07, type=float)
    p.add_argument("--knn_device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="where the training feature bank lives (cpu when the GPU is short of memory)")
    # linear probe
    p.add_argument("--linear", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--probe_epochs", default=100, type=int)
    p.add_argument("--probe_lrs", default=[1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0], type=float, nargs="+",
                   help="base learning rates per 256 samples, all trained together")
    p.add_argument("--probe_batch_size", default=1024, type=int)
    p.add_argument("--probe_weight_decay", default=0.0, type=float)
    p.add_argument("--probe_bn", action=argparse.BooleanOptionalAction, default=False,
                   help="BatchNorm1d without affine before the linear layer (MAE's linear probe)")
    p.add_argument("--train_fraction", default=1.0, type=float, help="labelled fraction per class for the probe and k-NN (1%%: 0.01)")
    p.add_argument("--probe_holdout", default=0.0, type=float,
                   help="choose the probe's lr on this share of the training images (per class, seeded), then train that "
                        "lr on all of them; 0: DINO's sweep, best lr read on the evaluation split itself")
    p.add_argument("--output_dir", default="eval_output", type=str)
    p.add_argument("--seed", default=0, type=int)
    # look inside (ViTs); they run after k-NN and probe, alone with --no-knn --no-linear (no feature extraction)
    g = p.add_argument_group("look inside: attention maps, attention distance, CKA against another model")
    g.add_argument("--attention_maps", default=0, type=int,
                   help="PNGs of each head's CLS attention (and their mean) on the first N evaluation images")
    g.add_argument("--images", default=[], type=str, nargs="+", help="draw the attention maps of these image files instead")
    g.add_argument("--attention_blocks", default=[-1], type=int, nargs="+", help="blocks of the maps (negative: from the end)")
    g.add_argument("--attention_threshold", default=None, type=float,
                   help="show only the smallest set of patches holding this share of each map's mass (DINO: 0.6)")
    g.add_argument("--attention_distance", action="store_true", help="mean attention distance (px) per head and block")
    g.add_argument("--attention_images", default=256, type=int, help="evaluation images of the distance and --compare_with")
    g.add_argument("--compare_with", default="", type=str,
                   help="a second backbone (file, hub:NAME, random), e.g. the teacher: CKA of all block pairs, attention KL")
    g.add_argument("--compare_arch", default=None, type=str, help="its architecture, when its file does not say (as --arch)")
    common.add_shape_args(g, "compare_", "the --compare_with network")
    common.add_data_args(p)
    return p


def main(args):
    # ---------------- checks, before any work ----------------
    device = common.init_distributed()
    common.seed_everything(args.seed)
    results_path = os.path.join(args.output_dir, "eval_results.json")
    look = bool(args.attention_maps or args.images or args.attention_distance or args.compare_with)
    only_look = look and not (args.knn or args.linear)  # --no-knn --no-linear: no features, only the look-inside files
    if os.path.exists(results_path) and not only_look:
        common.fail(f"{results_path} exists; pick another --output_dir (nothing was overwritten)")
    if args.dump_features and os.path.exists(args.dump_features):
        common.fail(f"--dump_features {args.dump_features} exists (nothing was overwritten)")
    if args.avgpool_patchtokens and args.n_last_blocks != 1:
        common.fail("--avgpool_patchtokens goes with --n_last_blocks 1 (DINO's feature layout)")
    if not (0 < args.train_fraction <= 1) or not (0 <= args.probe_holdout < 1):
        common.fail("--train_fraction must be in (0, 1] and --probe_holdout in [0, 1)")
    specs = feature_specs(args)
    model, other = prepare_look_inside(args, device) if look else (None, None)  # checks, before any work
    if only_look:  # on rank 0
        common.start_run(args, SCRIPT)
        return look_inside(args, model, other, device) if common.is_main_process() else None

    # ---------------- features ----------------
    if args.load_features:
        cache = common.read_checkpoint(args.load_features, args.trust_checkpoint)
        if "train" not in cache or "val" not in cache:
            common.fail(f"{args.load_features} was not written by --dump_features")
        specs = cache["specs"]
    else:
        model = model if model is not None else build_backbone(args).to(device).eval()
        if not hasattr(model, "blocks") and specs != [dict(n_last_blocks=1, avgpool=False)]:
            common.fail("--n_last_blocks / --avgpool_patchtokens / --layers need a ViT backbone")
        if hasattr(model, "blocks") and getattr(model, "global_pool", "token") != "token":  # e.g. MAE's finetunes
            if specs != [dict(n_last_blocks=1, avgpool=False)]:
                common.fail(f"{args.weights} is a global-pool ViT ({model.global_pool}: no final norm on the CLS token): "
                            "its feature is its pooled one; --n_last_blocks / --avgpool_patchtokens / --layers do not apply")
            specs = [dict(pool=True)]
            common.print0(f"| feature: the network's own pooling ({model.global_pool}) and fc_norm, as MAE evaluates it")
        depth = len(getattr(model, "blocks", [None]))
        if not 1 <= args.n_last_blocks <= depth or any(not -depth <= l < depth for l in args.layers):
            common.fail(f"the backbone has {depth} blocks: --n_last_blocks must be in [1, {depth}] and --layers in "
                        f"[{-depth}, {depth - 1}] (got {args.n_last_blocks} and {args.layers})")
        bad = [k for k, v in model.state_dict().items() if v.is_floating_point() and not torch.isfinite(v).all()]
        if bad:
            common.fail(f"{args.weights} holds non-finite weights ({', '.join(bad[:4])}): nothing to evaluate")
        stats = (tuple(model.model_config["mean"]), tuple(model.model_config["std"]))  # the backbone's own
        common.print0(f"| input normalisation: mean {stats[0]} std {stats[1]}")
        transform = common.build_transform(args, is_train=False, stats=stats)
        train_set = common.build_dataset(args, "train", transform)
        val_set = common.build_dataset(args, "val", transform)
        common.start_run(args, SCRIPT)  # output_dir writable, before the extraction
        cache = {"specs": specs, "weights": args.weights,
                 "num_classes": len(getattr(train_set, "classes", [])) or 10}
        for split, ds in (("train", train_set), ("val", val_set)):
            cache[split] = extract_features(model, ds, specs, args.batch_size, args.num_workers, device, args.amp, split)
        if args.dump_features:
            common.atomic_save(cache, args.dump_features)
            common.print0(f"| features saved to {args.dump_features}")
    if not common.is_main_process():
        return
    train_feats, train_y = cache["train"]
    val_feats, val_y = cache["val"]
    num_classes = int(max(cache["num_classes"], train_y.max().item() + 1, val_y.max().item() + 1))
    keep = common.class_subset(train_y, args.train_fraction, torch.Generator().manual_seed(args.seed))

    # ---------------- k-NN and linear probes ----------------
    os.makedirs(args.output_dir, exist_ok=True)
    knn_dev = device if args.knn_device == "auto" else torch.device(args.knn_device)
    results = {"weights": cache["weights"], "train_images": int(keep.numel()), "val_images": int(val_y.numel()),
               "knn": {}, "linear": {}, "args": vars(args)}
    for spec in specs:
        name = common.spec_name(spec)
        xtr, ytr, xva = train_feats[name][keep], train_y[keep], val_feats[name]
        if args.knn:
            results["knn"][name] = common.knn_classify(xtr, ytr, xva, val_y, num_classes, args.nb_knn,
                                                args.knn_temperature, knn_dev)
        if args.linear:
            if args.probe_holdout > 0:  # the lr is chosen without the evaluation split (a paper's discipline)
                res, probe = probe_with_holdout(xtr, ytr, xva, val_y, num_classes, args, device)
            else:
                res, probe = train_linear_probes(xtr, ytr, xva, val_y, num_classes, args, device)
            results["linear"][name] = res
            path = os.path.join(args.output_dir, "linear_probe.pth" if name == "cls" else f"linear_probe_{name}.pth")
            common.save_probe(probe, spec, path, lr=res["best_lr"], acc1=res["acc1"], weights=cache["weights"])
    print_table(results)
    if look:
        results["look_inside"] = look_inside(args, model, other, device)
    with open(results_path, "w") as f:
        json.dump(results, f, indent=1, default=str)
    print(f"| results in {results_path}", flush=True)
    return results


def build_backbone(args, flag="--arch", prefix=""):
    """The model to evaluate, without classifier. The architecture is what the file says (this repository's
    'model_config' or the .json beside an exported backbone, MoCo v3's 'arch', MAE's global pool), --arch in place
    of its name, then --patch_size / --depth / --embed_dim / --num_heads."""
    if not args.weights:
        common.fail("--weights is required: a file, hub:<timm name>, or 'random' (smoke tests)")
    config, ckpt = common.pretrained_config(args.arch, args.weights, args.checkpoint_key, flag, prefix,
                                            args.trust_checkpoint, num_classes=0, **common.shape_args(args))
    config["mean"], config["std"] = common.input_stats(config["name"], args.weights, args.mean or config.get("mean"),
                                                       args.std or config.get("std"))
    model = common.create_model(**config)
    grid = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if grid is not None and tuple(grid) != (args.input_size, args.input_size) and not getattr(model, "dynamic_img_size", False):
        model = common.create_model(**{**config, "img_size": args.input_size})
    common.load_weights(model, args.weights, args.checkpoint_key, ckpt=ckpt, trust=args.trust_checkpoint)
    return common.freeze(model)


def feature_specs(args):
    specs = [dict(n_last_blocks=args.n_last_blocks, avgpool=args.avgpool_patchtokens)]
    return specs + [dict(layer=layer) for layer in args.layers]


def backbone_features(model, x, specs):
    """{spec name: B x F} for a ViT (final-norm CLS of chosen blocks, DINO's last-n concatenation,
    DINO's interleaved CLS / mean-patch layout) or, for other models, timm's pre-logits feature."""
    if not hasattr(model, "blocks"):
        return {"cls": model.forward_head(model.forward_features(x), pre_logits=True)}
    with common.ViTTaps(model, token_blocks=common.feature_blocks(model, specs), norm=True) as taps:
        model.forward_features(x)
    return {common.spec_name(s): common.features_from_tokens(model, taps.tokens, s) for s in specs}


@torch.no_grad()
def extract_features(model, dataset, specs, batch_size, num_workers, device, amp="bf16", desc="features"):
    """({name: N x F float32 on CPU}, labels N) in dataset order on rank 0, (None, None) on the others: each process
    extracts its shard (build_loader), gathered onto rank 0 alone (one copy of the bank, as DINO's eval_knn)."""
    loader = common.build_loader(dataset, batch_size, train=False, num_workers=num_workers)
    feats, labels = {}, []
    for images, target in common.progress(loader, desc):
        with common.autocast(device, amp):
            out = backbone_features(model, images.to(device, non_blocking=True), specs)
        for k, v in out.items():
            feats.setdefault(k, []).append(v.float())
        labels.append(target.to(device))
    to_cpu = lambda t: None if t is None else t.cpu()  # noqa: E731  (one gathered bank at a time on the device)
    feats = {k: to_cpu(common.gather_shards(torch.cat(v))) for k, v in feats.items()}
    y = to_cpu(common.gather_shards(torch.cat(labels)))
    return (feats, y) if y is not None else (None, None)


def train_linear_probes(train_x, train_y, test_x, test_y, num_classes, args, device):
    """Train one linear probe per learning rate in args.probe_lrs at once: the weights are one
    (L, C, F) tensor, each step is one batched matmul, and plain SGD with momentum applies each
    probe's own lr (x batch / 256) on a per-iteration cosine. Returns (results, best LinearProbe)."""
    g = torch.Generator().manual_seed(args.seed)
    L, dim = len(args.probe_lrs), train_x.shape[1]
    x, y = train_x.to(device), train_y.to(device)
    bn = nn.BatchNorm1d(dim, affine=False, eps=1e-6).to(device) if args.probe_bn else None
    weight = torch.zeros(L, num_classes, dim, device=device)  # zero init: a probe does not depend on the others
    bias = torch.zeros(L, 1, num_classes, device=device)
    params = [weight, bias]
    bufs = [torch.zeros_like(p) for p in params]
    bs = min(args.probe_batch_size, len(x))
    lrs = torch.tensor(args.probe_lrs, device=device) * bs / 256
    steps_per_epoch = max(1, len(x) // bs)
    total = args.probe_epochs * steps_per_epoch
    step = 0
    for epoch in common.progress(range(args.probe_epochs), "linear probe"):
        perm = torch.randperm(len(x), generator=g).to(device)
        for i in range(steps_per_epoch):
            idx = perm[i * bs:(i + 1) * bs]
            xb = bn(x[idx]) if bn is not None else x[idx]
            w, b = weight.requires_grad_(), bias.requires_grad_()
            logits = torch.baddbmm(b, xb.expand(L, -1, -1), w.transpose(1, 2))  # L x B x C
            loss = F.cross_entropy(logits.flatten(0, 1), y[idx].repeat(L)) * L  # sum of the L mean losses
            gw, gb = torch.autograd.grad(loss, [w, b])
            scale = common.cosine_schedule(step, total, 1.0)
            with torch.no_grad():
                for p, gp, buf in zip(params, (gw, gb), bufs):
                    if args.probe_weight_decay and p is weight:
                        gp = gp + args.probe_weight_decay * p
                    buf.mul_(0.9).add_(gp)
                    p.sub_(scale * lrs.view(L, 1, 1) * buf)
            step += 1
    weight.requires_grad_(False)
    bias.requires_grad_(False)
    with torch.no_grad():
        xt = test_x.to(device)
        if bn is not None:
            bn.eval()
            xt = bn(xt)
        logits = torch.baddbmm(bias, xt.expand(L, -1, -1), weight.transpose(1, 2))
        accs = [common.accuracy(lg, test_y.to(device)) for lg in logits]
    n = len(test_y)
    per_lr = {f"{lr:g}": {"acc1": 100 * a[0] / n, "acc5": 100 * a[1] / n} for lr, a in zip(args.probe_lrs, accs)}
    best = max(range(L), key=lambda i: accs[i][0])
    probe = common.LinearProbe(dim, num_classes, bn=args.probe_bn)
    probe.linear.weight.data.copy_(weight[best].cpu())
    probe.linear.bias.data.copy_(bias[best, 0].cpu())
    if bn is not None:
        probe.bn.load_state_dict({k: v.cpu() for k, v in bn.state_dict().items()})
    res = {"best_lr": args.probe_lrs[best], **per_lr[f"{args.probe_lrs[best]:g}"], "per_lr": per_lr}
    return res, probe.eval()


def probe_with_holdout(train_x, train_y, test_x, test_y, num_classes, args, device):
    """--probe_holdout: every lr trained on the training rows minus a per-class held-out share, the best one chosen
    there, then that lr alone trained on all training rows and measured on the evaluation split."""
    hold = common.class_subset(train_y, args.probe_holdout, torch.Generator().manual_seed(args.seed + 1))
    fit = torch.ones(len(train_y), dtype=torch.bool)
    fit[hold] = False
    chosen, _ = train_linear_probes(train_x[fit], train_y[fit], train_x[hold], train_y[hold], num_classes, args, device)
    one = argparse.Namespace(**{**vars(args), "probe_lrs": [chosen["best_lr"]]})
    res, probe = train_linear_probes(train_x, train_y, test_x, test_y, num_classes, one, device)
    return {**res, "chosen_on": f"{len(hold)} held-out training images ({chosen['acc1']:.2f}% there)"}, probe


def print_table(results):
    rows = sorted(set(results["knn"]) | set(results["linear"]))
    ks = sorted({k for r in results["knn"].values() for k in r})
    head = f"{'feature':<14}" + "".join(f"{'k-NN@' + str(k):>10}" for k in ks) + f"{'linear':>10}{'(lr)':>9}"
    print(head)
    for name in rows:
        knn = results["knn"].get(name, {})
        lin = results["linear"].get(name)
        line = f"{name:<14}" + "".join(f"{knn[k]['acc1']:>10.2f}" if k in knn else f"{'-':>10}" for k in ks)
        line += f"{lin['acc1']:>10.2f}{lin['best_lr']:>9g}" if lin else f"{'-':>10}{'':>9}"
        print(line, flush=True)


# ---- look inside: attention maps, attention distance, CKA ----
VIRIDIS = torch.tensor([[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]]) / 255.0


def prepare_look_inside(args, device):
    """The evaluated model and the --compare_with one (or None), after every check of the look-inside flags."""
    model = build_backbone(args).to(device).eval()
    vit = lambda m: all(hasattr(m, a) for a in ("blocks", "patch_embed")) and getattr(m, "cls_token", None) is not None  # noqa
    if not vit(model):
        common.fail("--attention_maps / --attention_distance / --compare_with need a ViT with a CLS token; "
                    f"{args.weights} ({args.arch or 'its file'}) gives a {type(model).__name__}")
    depth = len(model.blocks)
    if any(not -depth <= b < depth for b in args.attention_blocks):
        common.fail(f"the backbone has {depth} blocks: --attention_blocks must be in [{-depth}, {depth - 1}], "
                    f"got {args.attention_blocks}")
    if args.attention_maps < 0 or args.attention_images < 4 or not 0 < (args.attention_threshold or 1) <= 1:
        common.fail("--attention_maps must be >= 0, --attention_images >= 4, --attention_threshold in (0, 1]")
    for f in args.images:
        if not os.path.isfile(f):
            common.fail(f"--images: no such file {f}")
    other = None
    if args.compare_with:
        try:
            other = build_backbone(argparse.Namespace(**{**vars(args), "weights": args.compare_with, "arch": args.compare_arch,
                                                         "checkpoint_key": None, "mean": None, "std": None,
                                                         **common.shape_args(args, "compare_")}), "--compare_arch", "compare_")
        except common.UserError as e:
            common.fail(f"--compare_with {args.compare_with}: {e}")
        if not vit(other):
            common.fail(f"--compare_with {args.compare_with}: a {type(other).__name__}, whose blocks / CLS token cannot be read")
        other = other.to(device).eval()
    files = [f"attention/img{i:04d}_block{b % depth}.png" for i in range(len(args.images) or args.attention_maps)
             for b in args.attention_blocks] + ["attention_distance.json", "attention_distance.png"] * args.attention_distance
    for f in files + ["compare.json", "cka_cls.png", "cka_patch.png"] * bool(args.compare_with):
        if os.path.exists(os.path.join(args.output_dir, f)):
            common.fail(f"{os.path.join(args.output_dir, f)} exists; pick another --output_dir (nothing was overwritten)")
    return model, other


def look_inside(args, model, other, device):
    """The requested modes (rank 0) on images in [0, 1] that each model normalises with its own statistics."""
    tf = common.build_transform(args, False, stats=((0.0,) * 3, (1.0,) * 3))  # the evaluation transform, no normalisation
    need_val = (args.attention_maps and not args.images) or args.attention_distance or other is not None
    val, out = common.build_dataset(args, "val", tf) if need_val else None, {}
    if args.attention_maps or args.images:
        images = [tf(common.load_rgb(f)) for f in args.images] or [val[i][0] for i in range(min(args.attention_maps, len(val)))]
        out["attention_maps"] = save_attention_maps(model, torch.stack(images), args, device)
    if args.attention_distance or other is not None:
        out.update(attention_statistics(model, other, val, args, device))
    return out


def normalized(model, x):
    mean, std = (torch.tensor(model.model_config[k], device=x.device).view(1, 3, 1, 1) for k in ("mean", "std"))
    return (x - mean) / std


def patch_grid(model, size):  # (grid rows, grid columns, patch height, patch width) for size x size images
    ph, pw = model.patch_embed.patch_size
    return size // ph, size // pw, ph, pw


def cls_patch_rows(attn, num_prefix_tokens):
    """B x H x N x N -> B x H x P: the CLS query's row over the patch keys (prefix tokens dropped), renormalised."""
    rows = attn[:, :, 0, num_prefix_tokens:].float()
    return rows / rows.sum(-1, keepdim=True).clamp_min(1e-12)


def keep_mass(rows, share):
    """0/1 mask of the smallest set of keys (largest first) holding `share` of each row's mass."""
    val, idx = rows.sort(-1, descending=True)
    before = (val.cumsum(-1) - val) / val.sum(-1, keepdim=True).clamp_min(1e-12)
    return torch.zeros_like(rows).scatter_(-1, idx, (before < share).to(rows))


def colorize(x):
    """Values in [0, 1] (... x h x w) -> RGB (... x 3 x h x w), piecewise linear in a 5-stop viridis-like table."""
    t = x.float().clamp(0, 1) * (len(VIRIDIS) - 1)
    i = t.floor().long().clamp(max=len(VIRIDIS) - 2)
    w = (t - i).unsqueeze(-1)
    return (VIRIDIS[i] * (1 - w) + VIRIDIS[i + 1] * w).movedim(-1, -3)


@torch.no_grad()
def save_attention_maps(model, images, args, device):
    """One PNG per image and block: the image, each head's CLS attention over the patches (nearest-upsampled, optionally
    thresholded, each scaled to its own range), their mean. Returns the paths."""
    from torchvision.utils import make_grid, save_image
    blocks, folder = sorted({b % len(model.blocks) for b in args.attention_blocks}), os.path.join(args.output_dir, "attention")
    gh, gw, _, _ = patch_grid(model, images.shape[-1])
    os.makedirs(folder, exist_ok=True)
    paths = []
    for s in range(0, len(images), args.batch_size):
        x = images[s:s + args.batch_size]
        with common.ViTTaps(model, attn_blocks=blocks) as taps, common.autocast(device, args.amp):
            model.forward_features(normalized(model, x.to(device)))
            cls = taps.maps(blocks, rows=1)  # L x B x H x 1 x N: only the CLS rows, from q and k
        for b, a in zip(blocks, cls):
            rows = cls_patch_rows(a, model.num_prefix_tokens)
            rows = torch.cat([rows, rows.mean(1, keepdim=True)], 1)  # heads 1..H, their mean
            rows = rows * keep_mass(rows, args.attention_threshold) if args.attention_threshold else rows
            maps = F.interpolate(rows.unflatten(-1, (gh, gw)), size=x.shape[-2:], mode="nearest").cpu()
            lo, hi = maps.amin((-2, -1), keepdim=True), maps.amax((-2, -1), keepdim=True)
            tiles = colorize((maps - lo) / (hi - lo).clamp_min(1e-12))  # B x (H + 1) x 3 x S x S
            for k in range(len(x)):
                paths.append(os.path.join(folder, f"img{s + k:04d}_block{b}.png"))
                save_image(make_grid(torch.cat([x[k:k + 1], tiles[k]]), nrow=len(tiles[k]) + 1, pad_value=1.0), paths[-1])
    common.print0(f"| {len(paths)} attention maps in {folder}")
    return paths


def mean_attention_distance(attn, num_prefix_tokens, grid):
    """B x H x N x N -> B x H, pixels: per query patch, attention over the patch keys (renormalised) times the distance
    between the patch centres, averaged over the query patches. grid: patch_grid()."""
    gh, gw, ph, pw = grid
    a = attn[:, :, num_prefix_tokens:, num_prefix_tokens:].float()
    yx = torch.stack(torch.meshgrid(torch.arange(gh) * ph, torch.arange(gw) * pw, indexing="ij"), -1).flatten(0, 1).float()
    return (a / a.sum(-1, keepdim=True).clamp_min(1e-12) * torch.cdist(yx, yx).to(a.device)).sum(-1).mean(-1)


def hsic1(K, L):
    """Unbiased HSIC (Song et al. 2012) of each of I kernels K (I x n x n) with each of J kernels L (J x n x n): I x J."""
    n = K.shape[-1]
    K, L = (M * (1 - torch.eye(n, dtype=M.dtype, device=M.device)) for M in (K, L))
    rk, rl = K.sum(-1), L.sum(-1)
    trace = torch.einsum("inm,jnm->ij", K, L)
    return (trace + rk.sum(-1)[:, None] * rl.sum(-1)[None] / ((n - 1) * (n - 2)) - 2 / (n - 2) * rk @ rl.T) / (n * (n - 3))


class MinibatchCKA:
    """Linear CKA of every block pair of two models from minibatches (Nguyen, Raghu, Kornblith 2021):
    sum_b HSIC_1(K_b, L_b) / sqrt(sum_b HSIC_1(K_b, K_b) sum_b HSIC_1(L_b, L_b)), K = X X^T of one minibatch."""
    xy = xx = yy = 0.0

    def update(self, x, y):
        """x: I x n x d1, y: J x n x d2: blocks' features of the same n images (a batch of n < 4 is skipped)."""
        if x.shape[1] >= 4:
            K, L = (f.double() @ f.double().transpose(1, 2) for f in (x, y))
            self.xy, self.xx, self.yy = self.xy + hsic1(K, L), self.xx + hsic1(K, K).diag(), self.yy + hsic1(L, L).diag()

    def value(self):
        return (self.xy / (self.xx[:, None] * self.yy[None]).clamp_min(1e-300).sqrt()).float().cpu()


@torch.no_grad()
def attention_statistics(model, other, dataset, args, device):
    """On the first --attention_images evaluation images: the mean attention distance per block and head; against
    `other`, the CKA of every block pair (CLS and mean patch token after the final norm) and the attention KL."""
    n = min(args.attention_images, len(dataset))
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, range(n)), args.batch_size,
                                         num_workers=args.num_workers)
    models = [model] + ([other] if other is not None else [])
    d1, d2, grid = len(model.blocks), len(models[-1].blocks), patch_grid(model, args.input_size)
    same_grid = other is not None and patch_grid(other, args.input_size)[:2] == grid[:2]
    pairs = {i: round((i + 1) * d2 / d1) - 1 for i in range(d1)}  # the same relative depth
    dist, kl, cka = 0.0, torch.zeros(d1), {"cls": MinibatchCKA(), "patch": MinibatchCKA()}
    pick = {"cls": lambda t, m: t[:, 0], "patch": lambda t, m: t[:, m.num_prefix_tokens:].mean(1)}
    for x, _ in common.progress(loader, "look inside"):
        taps, maps = [], []  # maps: L x B x H x r x N of every block (r: all rows for the distance, else the CLS row)
        for m in models:
            attn = list(range(len(m.blocks))) if same_grid or (args.attention_distance and m is model) else []
            with common.ViTTaps(m, token_blocks=range(len(m.blocks)) if other else [], attn_blocks=attn, norm=True) as t, \
                    common.autocast(device, args.amp):
                m.forward_features(normalized(m, x.to(device)))
                maps.append(t.maps(attn, rows=None if args.attention_distance and m is model else 1) if attn else None)
            taps.append(t)
        if args.attention_distance:
            dist = dist + torch.stack([mean_attention_distance(maps[0][b], model.num_prefix_tokens, grid).sum(0)
                                       for b in range(d1)]).cpu()
        for name in cka if other is not None else ():
            cka[name].update(*(torch.stack([pick[name](t.tokens[b].float(), m) for b in range(len(m.blocks))])
                               for t, m in zip(taps, models)))
        for i, j in pairs.items() if same_grid else ():  # KL(other || evaluated) of the head-mean CLS rows
            p, q = (cls_patch_rows(a[b], m.num_prefix_tokens).mean(1).clamp_min(1e-12)
                    for a, m, b in zip(maps, models, (i, j)))
            kl[i] += (q * (q.log() - p.log())).sum().cpu()
    out, path = {}, lambda f: os.path.join(args.output_dir, f)  # noqa: E731
    if args.attention_distance:
        out["attention_distance"] = {str(b): [round(v, 3) for v in row] for b, row in enumerate((dist / n).tolist())}
        save_scatter(dist / n, path("attention_distance.png"))
    if other is not None:
        out["compare"] = {"weights": args.weights, "compare_with": args.compare_with, "images": n}
        for name in cka:
            out["compare"][f"cka_{name}"] = [[round(v, 4) for v in row] for row in cka[name].value().tolist()]
            save_heatmap(cka[name].value(), path(f"cka_{name}.png"), f"linear CKA ({name}): rows this model, cols the other")
        if same_grid:
            out["compare"]["attention_kl"] = {str(i): round(v, 5) for i, v in enumerate((kl / n).tolist())}
            out["compare"]["attention_kl_pairs"] = {str(i): j for i, j in pairs.items()}
    for key in out:
        with open(path(f"{key}.json"), "w") as f:
            json.dump(out[key], f, indent=1)
        common.print0(f"| {key.replace('_', ' ')} ({n} images): {path(key + '.json')} and PNG")
    return out


def save_scatter(dist, path):
    """Mean attention distance (blocks x heads): block on x, pixels on y, one dot per head; PIL only."""
    from PIL import Image, ImageDraw
    W, H, m, top = 480, 320, 44, max(float(dist.max()), 1e-6)
    img = Image.new("RGB", (W, H), "white")
    draw = ImageDraw.Draw(img)
    X, Y = lambda b: m + (b + 0.5) * (W - 1.5 * m) / len(dist), lambda v: H - m - v / top * (H - 2 * m)  # noqa: E731
    draw.line([(m, m / 2), (m, H - m), (W - m / 2, H - m)], fill="black")
    for b in range(0, len(dist), max(1, len(dist) // 12)):
        draw.text((X(b) - 3, H - m + 5), str(b), fill="black")
    for v in (0, top / 2, top):
        draw.text((4, Y(v) - 6), f"{v:.1f}", fill="black")
    for b, row in enumerate(dist.tolist()):
        for v in row:
            draw.ellipse([X(b) - 3, Y(v) - 3, X(b) + 3, Y(v) + 3], fill=(59, 82, 139))
    draw.text((W / 2 - 15, H - 18), "block", fill="black")
    draw.text((m + 6, 6), "mean attention distance (px), one dot per head", fill="black")
    img.save(path)


def save_heatmap(mat, path, title):
    """A matrix in [0, 1] as coloured cells (row 0 at the top), with a title and the first / last indices; PIL only."""
    from PIL import Image, ImageDraw
    (R, C), m = mat.shape, 30
    cell = max(8, 320 // max(R, C))
    img = Image.new("RGB", (max(C * cell + m + 10, 340), R * cell + m + 24), "white")
    img.paste(transforms.functional.to_pil_image(colorize(mat)).resize((C * cell, R * cell), Image.NEAREST), (m, 20))
    draw = ImageDraw.Draw(img)
    draw.text((4, 4), title, fill="black")
    for i, j in ((0, 0), (R - 1, C - 1)):
        draw.text((6, 20 + i * cell + cell / 2 - 6), str(i), fill="black")
        draw.text((m + j * cell + cell / 2 - 3, 24 + R * cell), str(j), fill="black")
    img.save(path)

if __name__ == "__main__":
    common.run_main(main, argparse.ArgumentParser(SCRIPT, parents=[get_args_parser()]))
