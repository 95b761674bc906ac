"""sskd.py: cost of SSKD's own machinery (SS modules, similarity matrices, selective transfer, losses).

One SSKD student step on 4B views (sskd.train_one_epoch on fixed batches) vs the sum of its parts
measured in the same run: a plain student step on the same 4B views + the teacher's forward on them.
Time: the median of paired ratios over interleaved rounds (target <= 1.05 on a GPU); ops and host syncs per step
under bf16 autocast (target: ops <= 1.03 x the parts', 0 syncs).

  python bench/bench_sskd.py                                  # CPU: DeiT-Ti <- DeiT-S, 224 px, 4 x 4 views
  python bench/bench_sskd.py --teacher test_resnet --input_size 32 --images 64   # CNN -> ViT at CIFAR size
  python bench/bench_sskd.py --gpu    # a GPU (bf16) = --images 64 --steps 4 (256 views per step)
  python bench/bench_sskd.py --tiny   # a CPU smoke run in seconds (32 px, 2 blocks, 2 x 4 views)
"""
import argparse

import torch
import torch.nn.functional as F

import statistics

from harness import (count_per_step, device_and_amp, optimizer_step, parse_args, report, report_counts, report_paired,
                     rounds)
import common
import sskd

TINY = dict(input_size=32, depth=2, images=2, steps=1, repeats=2)
GPU = dict(images=64, steps=4)  # x 15 interleaved rounds


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--student", default="deit_tiny")
    p.add_argument("--teacher", default="deit_small")
    p.add_argument("--depth", default=None, type=int, help="blocks of both networks, ViTs only (default: the architecture's)")
    p.add_argument("--input_size", default=224, type=int)
    p.add_argument("--images", default=4, type=int, help="images per step (4 views each)")
    p.add_argument("--steps", default=3, type=int)
    p.add_argument("--repeats", default=15, type=int, help="interleaved timing rounds")
    opts = parse_args(p, TINY, GPU)
    device, _ = device_and_amp()
    args = sskd.get_args_parser().parse_args(["--log_every", "1000000"])
    torch.manual_seed(0)
    student = common.create_model(opts.student, num_classes=100, img_size=opts.input_size, depth=opts.depth).to(device)
    teacher = common.build_teacher(opts.teacher, "random", num_classes=100, img_size=opts.input_size,
                                   depth=opts.depth).to(device)
    s_ss = sskd.SSHead(sskd.feature_width(student)).to(device)
    t_ss = common.freeze(sskd.SSHead(sskd.feature_width(teacher)).to(device))
    x = torch.randn(opts.images, 4, 3, opts.input_size, opts.input_size, device=device)
    y = torch.randint(0, 100, (opts.images,), device=device)
    mods = torch.nn.ModuleDict({"student": student, "ss": s_ss})
    opt = torch.optim.SGD(mods.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)  # as sskd.main: every parameter
    scaler = common.grad_scaler(device, args.amp)
    schedule = common.lr_schedule(0.01, 0.01, 10 ** 6)
    wrapped = sskd.WithFeatures(student)

    def fns(x, y, steps):  # the method's step and its parts on `steps` batches of B images x 4 views
        batches, y4 = [(x, y)] * steps, y.repeat_interleave(4)

        def sskd_step():
            sskd.train_one_epoch(wrapped, s_ss, teacher, t_ss, batches, opt, scaler, schedule, 0, device, args)

        def student_step():  # the plain supervised step on the same 4B views
            for _ in range(steps):
                with common.autocast(device, args.amp):
                    loss = F.cross_entropy(wrapped(sskd.rotate_views(x))[1].float(), y4)
                optimizer_step(loss, opt, scaler)

        def teacher_forward():
            for _ in range(steps):
                with torch.no_grad(), common.autocast(device, args.amp):
                    sskd.features_and_logits(teacher, sskd.rotate_views(x))
        return {"student": student_step, "teacher": teacher_forward, "sskd": sskd_step}

    c = {k: count_per_step(f, 6, device) for k, f in fns(x[:2], y[:2], 6).items()}  # at 2 images: ops, syncs
    title = f"SSKD step: {opts.student} <- {opts.teacher}"
    report_counts(title, [("student step + teacher forward on 4B views (sum of parts)",
                           *(a + b for a, b in zip(c["student"], c["teacher"]))),
                          ("  student step alone", *c["student"]), ("  teacher forward alone", *c["teacher"]),
                          ("SSKD step", *c["sskd"])], target=(3, 1.03))
    times = rounds(fns(x, y, opts.steps), device, repeats=opts.repeats)
    t = {k: statistics.median(v) for k, v in times.items()}
    n = 4 * opts.images * opts.steps
    report(f"{title}, {opts.input_size}px, {opts.images} images x 4 views",
           [("student step + teacher forward on 4B views (sum of parts)", t["student"] + t["teacher"], n),
            ("  student step alone", t["student"], n), ("  teacher forward alone", t["teacher"], n),
            ("SSKD step", t["sskd"], n)], device)
    report_paired("SSKD step / (student step + teacher forward)", times, "sskd", ("student", "teacher"), 1.05)


if __name__ == "__main__":
    main()
