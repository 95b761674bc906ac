"""k-NN and linear-probe evaluation of a frozen backbone (DINO's protocol, with cached features).

The backbone can be a checkpoint or exported backbone of any script here, a DINO / MAE / MoCo v3 /
DeiT / timm file, or a timm name (hub:NAME when online). Features are extracted once (evaluation
transform: resize + centre crop, no augmentation), then
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

Writes output_dir/eval_results.json and output_dir/linear_probe[_FEATURE].pth: the probe with its
feature spec (common.save_probe), which ssta.py loads as the classifier of a self-supervised teacher
(DINO's released *_linearweights.pth files load the same way through common.load_probe). Images are
normalised with the evaluated backbone's own statistics (common.input_stats; --mean / --std override).
"""
import argparse
import json
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

import common


def get_args_parser():
    p = argparse.ArgumentParser("k-NN and linear-probe evaluation", add_help=False)
    p.add_argument("--weights", required=False, default="", type=str,
                   help="checkpoint / exported backbone / foreign file, hub:<timm name>, or 'random' (smoke tests)")
    p.add_argument("--checkpoint_key", default=None, type=str, help="top-level key of the file to load (default: auto)")
    p.add_argument("--trust_checkpoint", action="store_true",
                   help="load files that hold Python objects beyond tensors (full unpickling runs code from the file)")
    p.add_argument("--arch", default=None, type=str,
                   help="timm name or alias; optional for checkpoints and exported backbones of this repository")
    p.add_argument("--patch_size", default=None, type=int, help="override the architecture's patch size")
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
    p.add_argument("--output_dir", default="eval_output", type=str)
    p.add_argument("--seed", default=0, type=int)
    common.add_data_args(p)
    return p


def main(args):
    # ---------------- checks, before any work ----------------
    device = common.init_distributed()
    common.seed_everything(args.seed)
    results_path = os.path.join(args.output_dir, "eval_results.json")
    if os.path.exists(results_path):
        common.fail(f"{results_path} exists; pick another --output_dir (nothing was overwritten)")
    if args.dump_features and os.path.exists(args.dump_features):
        common.fail(f"--dump_features {args.dump_features} exists (nothing was overwritten)")
    if args.avgpool_patchtokens and args.n_last_blocks != 1:
        common.fail("--avgpool_patchtokens goes with --n_last_blocks 1 (DINO's feature layout)")
    if not (0 < args.train_fraction <= 1):
        common.fail("--train_fraction must be in (0, 1]")
    specs = feature_specs(args)

    # ---------------- features ----------------
    if args.load_features:
        cache = common.read_checkpoint(args.load_features)
        if "train" not in cache or "val" not in cache:
            common.fail(f"{args.load_features} was not written by --dump_features")
        specs = cache["specs"]
    else:
        model = build_backbone(args).to(device).eval()
        if not hasattr(model, "blocks") and specs != [dict(n_last_blocks=1, avgpool=False)]:
            common.fail("--n_last_blocks / --avgpool_patchtokens / --layers need a ViT backbone")
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
        common.start_run(args, "eval_knn_linear.py")  # output_dir writable, before the extraction
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
            res, probe = train_linear_probes(xtr, ytr, xva, val_y, num_classes, args, device)
            results["linear"][name] = res
            path = os.path.join(args.output_dir, "linear_probe.pth" if name == "cls" else f"linear_probe_{name}.pth")
            common.save_probe(probe, spec, path, lr=res["best_lr"], acc1=res["acc1"], weights=cache["weights"])
    print_table(results)
    with open(results_path, "w") as f:
        json.dump(results, f, indent=1, default=str)
    print(f"| results in {results_path}", flush=True)
    return results


def build_backbone(args):
    """The model to evaluate, without classifier. The architecture comes from --arch, or from a
    checkpoint of this repository ('model_config'), or from the .json beside an exported backbone."""
    config, ckpt = common.saved_model_config(args.weights)
    if not args.weights:
        common.fail("--weights is required: a file, hub:<timm name>, or 'random' (smoke tests)")
    if args.arch:
        config = {"name": args.arch}
    elif args.weights.startswith("hub:"):
        config = {"name": args.weights[4:]}
    if config is None:
        common.fail(f"cannot tell the architecture of {args.weights or 'the model'}: pass --arch")
    config["num_classes"] = 0
    if args.patch_size:
        config["patch_size"] = args.patch_size
    config["mean"], config["std"] = common.input_stats(config["name"], args.weights, args.mean or config.get("mean"),
                                                       args.std or config.get("std"))
    model = common.create_model(**config)
    grid = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if grid is not None and tuple(grid) != (args.input_size, args.input_size) and not getattr(model, "dynamic_img_size", False):
        model = common.create_model(**{**config, "img_size": args.input_size})
    common.load_weights(model, args.weights, args.checkpoint_key, ckpt=ckpt)
    return common.freeze(model)


def feature_specs(args):
    specs = [dict(n_last_blocks=args.n_last_blocks, avgpool=args.avgpool_patchtokens)]
    return specs + [dict(layer=layer) for layer in args.layers]


def backbone_features(model, x, specs):
    """{spec name: B x F} for a ViT (final-norm CLS of chosen blocks, DINO's last-n concatenation,
    DINO's interleaved CLS / mean-patch layout) or, for other models, timm's pre-logits feature."""
    if not hasattr(model, "blocks"):
        return {"cls": model.forward_head(model.forward_features(x), pre_logits=True)}
    with common.ViTTaps(model, blocks=common.feature_blocks(model, specs), norm=True) as taps:
        model.forward_features(x)
    return {common.spec_name(s): common.features_from_tokens(model, taps.tokens, s) for s in specs}


@torch.no_grad()
def extract_features(model, dataset, specs, batch_size, num_workers, device, amp="bf16", desc="features"):
    """({name: N x F float32 on CPU}, labels N) in dataset order, on every rank. Each process
    extracts its shard (build_loader); the shards are gathered and put back in order by index."""
    loader = common.build_loader(dataset, batch_size, train=False, num_workers=num_workers)
    feats, labels = {}, []
    for images, target in common.progress(loader, desc):
        with common.autocast(device, amp):
            out = backbone_features(model, images.to(device, non_blocking=True), specs)
        for k, v in out.items():
            feats.setdefault(k, []).append(v.float())
        labels.append(target.to(device))
    index = torch.arange(common.get_rank(), len(dataset), common.get_world_size(), device=device)
    index = common.gather_uneven(index)
    ordered = {}
    for k, v in feats.items():
        v = common.gather_uneven(torch.cat(v))
        ordered[k] = torch.empty_like(v).index_copy_(0, index, v).cpu()
    y = common.gather_uneven(torch.cat(labels))
    return ordered, torch.empty_like(y).index_copy_(0, index, y).cpu()


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


if __name__ == "__main__":
    common.run_main(main, argparse.ArgumentParser("eval_knn_linear", parents=[get_args_parser()]))
