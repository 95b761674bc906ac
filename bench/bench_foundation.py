"""Benchmarks of the foundation (issue: common.py / eval_knn_linear.py).

1. Cost of the ViT taps: one training step (forward + backward) of a 12-block ViT with the attention
   maps of 3 blocks captured (and a loss on them) vs the same step without taps. Target <= 1.3x on CPU.
2. eval_knn_linear.py's 100-epoch linear probe (all learning rates at once, on cached features) vs
   one feature-extraction pass over the same images. Target: probe <= 2x one pass.

  python bench/bench_foundation.py          # CPU: deit_tiny at 224 px
  python bench/bench_foundation.py --gpu    # a GPU (bf16) = --model deit_small --batch_size 128 --images 8192 --num_workers 8
  python bench/bench_foundation.py --tiny   # a CPU smoke run in seconds (32 px, 3 blocks, batch 4, 10-epoch probe)
"""
import argparse

import torch
import torch.nn.functional as F

from harness import compare, device_and_amp, parse_args, report, timeit
import common
import eval_knn_linear

TINY = dict(input_size=32, depth=3, batch_size=4, images=32, classes=10, repeats=1, num_workers=0, probe_epochs=10)
GPU = dict(model="deit_small", batch_size=128, images=8192, num_workers=8)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="deit_tiny")
    p.add_argument("--depth", default=None, type=int, help="blocks (default: the architecture's)")
    p.add_argument("--input_size", default=224, type=int)
    p.add_argument("--batch_size", default=16, type=int, help="training-step batch")
    p.add_argument("--images", default=1024, type=int, help="images in the extraction / probe comparison")
    p.add_argument("--classes", default=1000, type=int)
    p.add_argument("--repeats", default=5, type=int)
    p.add_argument("--num_workers", default=4, type=int, help="loader workers of the extraction pass")
    p.add_argument("--probe_epochs", default=None, type=int, help="default: eval_knn_linear.py's")
    args = parse_args(p, TINY, GPU)
    device, amp = device_and_amp()
    torch.manual_seed(0)

    # 1. taps ----------------------------------------------------------------------------------
    model = common.create_model(args.model, img_size=args.input_size, num_classes=args.classes,
                                depth=args.depth).to(device).train()
    x = torch.randn(args.batch_size, 3, args.input_size, args.input_size, device=device)
    y = torch.randint(0, args.classes, (args.batch_size,), device=device)
    target = torch.softmax(torch.randn(args.batch_size, model.blocks[0].attn.num_heads, 1, 1, device=device), -1)

    def plain():
        with amp():
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        model.zero_grad(set_to_none=True)

    def with_taps(attn_loss):
        def step():
            with common.ViTTaps(model, attn_blocks=[-3, -2, -1]) as taps, amp():
                loss = F.cross_entropy(model(x), y)
                if attn_loss:  # a KL-like term on the captured maps, in fp32
                    loss = loss + sum((target * a.float().clamp_min(1e-8).log()).mean() for a in taps.attn.values())
            loss.backward()
            model.zero_grad(set_to_none=True)
        return step

    fns = {"train step, no taps": plain, f"train step, attention of 3/{len(model.blocks)} blocks captured": with_taps(False),
           "  ... and a loss on the 3 maps": with_taps(True)}
    rows = [(name, sec, args.batch_size) for name, sec in compare(fns, device, repeats=args.repeats).items()]
    report(f"ViT taps: {args.model} ({len(model.blocks)} blocks) {args.input_size}px, batch {args.batch_size}", rows,
           device, target=(2, "<=", 1.3))

    # 2. linear probe on cached features vs one extraction pass -------------------------------
    pa = argparse.ArgumentParser()
    common.add_data_args(pa, args.input_size)
    data_args = pa.parse_args(["--dataset", "fake", "--synthetic_size", str(args.images),
                               "--num_workers", str(args.num_workers)])
    ds = common.build_dataset(data_args, "train", common.build_transform(data_args, False))
    ds.num_classes = args.classes
    backbone = common.freeze(common.create_model(args.model, img_size=args.input_size, num_classes=0,
                                                 depth=args.depth).to(device))
    spec = [dict(n_last_blocks=1, avgpool=False)]
    out = {}

    def extract():
        out["f"] = eval_knn_linear.extract_features(backbone, ds, spec, 128, args.num_workers, device, "bf16")

    t_extract = timeit(extract, device, warmup=1, repeats=1)
    feats = out["f"][0]["cls"]
    labels = torch.randint(0, args.classes, (len(feats),))
    probe_args = eval_knn_linear.get_args_parser().parse_args(
        [] if args.probe_epochs is None else ["--probe_epochs", str(args.probe_epochs)])
    probe_args.probe_batch_size = min(probe_args.probe_batch_size, max(128, len(feats) // 8))

    def probe():
        eval_knn_linear.train_linear_probes(feats, labels, feats[:256], labels[:256], args.classes, probe_args, device)

    t_probe = timeit(probe, device, warmup=0, repeats=1)
    report(f"linear probe ({probe_args.probe_epochs} epochs, {len(probe_args.probe_lrs)} lrs, batch "
           f"{probe_args.probe_batch_size}, {feats.shape[1]}-d features, {args.classes} classes) vs one extraction "
           f"pass over {len(feats)} images", [("feature extraction, one pass", t_extract, len(feats)),
                                              ("linear probe on cached features", t_probe, None)], device,
           target=(1, "<=", 2.0))


if __name__ == "__main__":
    main()
