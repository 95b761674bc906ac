"""sdssl.py: cost of self-distillation (11 intermediate projectors, 12 predictors, the predictor loss).

Three training steps timed round-robin in one run, all through sdssl.train_one_epoch on the same
fixed batches of two views: plain MoCo v3 (--alpha_max 0 --no-pred_loss), SD-MoCo v3 with the
batched heads (the script), and SD-MoCo v3 with the same heads run as a Python loop of separate
per-layer MLPs (what the batching replaces). The paper reports +16.9% (naive) and +8.6% (parallel)
wall time on ViT-B/16. Time: the median of paired ratios over interleaved rounds (target: SD-MoCo v3 at most
x1.10 of MoCo v3 for ViT-S/16 on an H100/H200); ops and host syncs per step under bf16 autocast (target: ops <= 1.15
x MoCo v3's, 0 syncs).

  python bench/bench_sdssl.py          # CPU: ViT-S/16 (12 heads), 224 px, 8 images
  python bench/bench_sdssl.py --gpu    # a GPU (bf16) = --images 128 --steps 4 (the paper's 128 images per GPU)
  python bench/bench_sdssl.py --tiny   # a CPU smoke run in seconds (32 px, 3 blocks, heads of hidden 256, 4 images)
"""
import argparse

import torch
import torch.nn as nn

import statistics

from harness import count_per_step, device_and_amp, parse_args, report, report_counts, report_paired, rounds
import common
import sdssl

TINY = dict(input_size=32, depth=3, head_hidden=256, images=4, steps=1, repeats=2)
GPU = dict(images=128, steps=4)  # x 15 interleaved rounds


class LoopHeads(sdssl.SDHeads):
    """The same heads, but every layer's projector and predictor is its own module, run one by one."""

    def __init__(self, dim, n_mid, args):
        super().__init__(dim, n_mid, args)
        dims = lambda m: [m.weights[0].shape[1]] + [w.shape[2] for w in m.weights]  # noqa: E731
        last_bn = args.framework != "byol"
        self.mid_list = nn.ModuleList(sdssl.BatchedMLP(1, dims(self.mid_proj), last_bn) for _ in range(n_mid))
        self.pred_list = nn.ModuleList(sdssl.BatchedMLP(1, dims(self.pred), last_bn) for _ in range(n_mid + 1))

    def project(self, f_mid, f_last):
        h_mid = torch.stack([m(f[None].float())[0] for m, f in zip(self.mid_list, f_mid)])
        return h_mid, self.last_proj(f_last.float()[None])[0]

    def predict(self, h_mid, h_last):
        h = torch.cat([h_mid, h_last[None]])
        return torch.stack([m(x[None])[0] for m, x in zip(self.pred_list, h)])


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--arch", default="vit_small")
    p.add_argument("--patch_size", default=16, type=int)
    p.add_argument("--depth", default=None, type=int, help="blocks (default: the architecture's)")
    p.add_argument("--head_hidden", default=None, type=int,
                   help="hidden width of every projector and predictor (default: sdssl.py's 4096 / 2048)")
    p.add_argument("--input_size", default=224, type=int)
    p.add_argument("--images", default=8, type=int, help="images per step (two views each)")
    p.add_argument("--steps", default=2, type=int)
    p.add_argument("--repeats", default=15, type=int, help="interleaved timing rounds")
    opts = parse_args(p, TINY, GPU)
    device, _ = device_and_amp()
    base = ["--arch", opts.arch, "--patch_size", str(opts.patch_size), "--input_size", str(opts.input_size),
            "--log_every", "1000000", "--batch_size", str(opts.images)]
    if opts.depth is not None:
        base += ["--depth", str(opts.depth)]
    for k in ("proj", "mid_proj", "pred") if opts.head_hidden is not None else ():
        base += [f"--{k}_hidden", str(opts.head_hidden)]
    x = [torch.randn(opts.images, 3, opts.input_size, opts.input_size, device=device) for _ in range(2)]

    def setup(flags, heads_cls=sdssl.SDHeads):
        args = sdssl.framework_defaults(sdssl.get_args_parser().parse_args(base + flags))
        saved = sdssl.SDHeads
        sdssl.SDHeads = heads_cls  # build_models builds its heads through this name
        student, heads, teacher, taps, mid = sdssl.build_models(args, device)
        sdssl.SDHeads = saved
        trainable = nn.ModuleDict({"student": student, "heads": heads})
        opt = torch.optim.AdamW(common.param_groups(trainable, args.weight_decay, skip_listed=False), lr=1e-4, fused=True)  # as sdssl.main
        scaler = common.grad_scaler(device, args.amp)
        schedule = common.lr_schedule(1e-4, 0.0, 10 ** 6)

        def step(x, steps):
            batches = [(x, torch.zeros(len(x[0]), dtype=torch.long))] * steps
            return lambda: sdssl.train_one_epoch(student, heads, teacher, taps, mid, batches, opt, scaler, schedule, 10 ** 6,
                                                 0, device, args)
        return step

    setups = {"mocov3": setup(["--alpha_max", "0", "--no-pred_loss"]), "sd": setup([]), "sd_loop": setup([], LoopHeads)}
    c = {k: count_per_step(f([v[:2] for v in x], 6), 6, device) for k, f in setups.items()}  # at 2 images: ops, syncs
    title = f"SD-MoCo v3 vs MoCo v3 step: {opts.arch}/{opts.patch_size}"
    report_counts(title, [("MoCo v3 step (alpha_max 0, no predictor loss)", *c["mocov3"]),
                          ("SD-MoCo v3 step, batched heads (sdssl.py)", *c["sd"]),
                          ("SD-MoCo v3 step, per-layer loop of heads", *c["sd_loop"])], target=(1, 1.15))
    times = rounds({k: f(x, opts.steps) for k, f in setups.items()}, device, repeats=opts.repeats)
    t = {k: statistics.median(v) for k, v in times.items()}
    n = opts.images * opts.steps
    report(f"{title}, {opts.input_size}px, {opts.images} images x 2 views",
           [("MoCo v3 step (alpha_max 0, no predictor loss)", t["mocov3"], n),
            ("SD-MoCo v3 step, batched heads (sdssl.py)", t["sd"], n),
            ("SD-MoCo v3 step, per-layer loop of heads", t["sd_loop"], n)], device)
    report_paired("SD-MoCo v3 step / MoCo v3 step", times, "sd", ("mocov3",), 1.10)


if __name__ == "__main__":
    main()
