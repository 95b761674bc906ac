"""ssta.py: costs of SSTA.

1. A distillation step (two teachers with attention taps on the distilled blocks, student with unfused
   attention there, two head-level losses) vs the sum of its parts measured in the same run: the
   student's plain step + the two teachers' plain forwards. Target: <= 1.15.
2. A step after the early stop vs the plain supervised step of vitkd.py without teacher. Target: <= 1.02.
3. Head selection: the tree over the distilled layers vs naive full forwards per combination, on a
   12-block, 6-head teacher; the selected heads must be identical. Target: >= 8x.

  python bench/bench_ssta.py                      # CPU
  python bench/bench_ssta.py --batch_size 128     # a GPU (bf16)
"""
import argparse
import itertools

import torch

from harness import compare, device_and_amp, report, timeit
import common
import ssta
import vitkd


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--student", default="deit_tiny")
    p.add_argument("--teacher", default="deit_small")
    p.add_argument("--input_size", default=224, type=int)
    p.add_argument("--batch_size", default=16, type=int)
    p.add_argument("--steps", default=2, type=int)
    p.add_argument("--repeats", default=3, type=int)
    p.add_argument("--selection_size", default=64, type=int, help="input size of the head-selection benchmark")
    p.add_argument("--selection_images", default=32, type=int)
    opts = p.parse_args()
    device, _ = device_and_amp()
    args = ssta.get_args_parser().parse_args(["--log_every", "1000000"])
    torch.manual_seed(0)
    student = common.create_model(opts.student, num_classes=1000, img_size=opts.input_size).to(device)
    teachers = {n: common.build_teacher(opts.teacher, "random", num_classes=0, img_size=opts.input_size).to(device)
                for n in ("sl", "ssl")}
    layers = [9, 10, 11]
    x = torch.randn(opts.batch_size, 3, opts.input_size, opts.input_size, device=device)
    y = torch.randint(0, 1000, (opts.batch_size,), device=device)
    batches = [(x, y)] * opts.steps
    criterion = torch.nn.CrossEntropyLoss(label_smoothing=0.1)
    schedule = common.lr_schedule(1e-4, 1e-5, 10 ** 6)
    opt = torch.optim.AdamW(common.param_groups(student, 0.05), lr=1e-4)
    scaler = common.grad_scaler(device, args.amp)
    plan = dict(layers={n: layers for n in ("student", "sl", "ssl")}, heads={"sl": [0, 1, 2], "ssl": [3, 4, 5]},
                student_heads={"sl": 0, "ssl": 1}, weights={"sl": 1.0, "ssl": 1.0})

    def ssta_step(with_teachers):
        def run():
            taps = {}
            if with_teachers:
                taps = {n: common.ViTTaps(m, attn=layers) for n, m in (("student", student), *teachers.items())}
            try:
                ssta.train_one_epoch(student, teachers if with_teachers else {}, taps, plan, batches, criterion, None,
                                     opt, scaler, schedule, 0, device, args)
            finally:
                for t in taps.values():
                    t.close()
        return run

    def plain_step():
        vargs = vitkd.get_args_parser().parse_args(["--log_every", "1000000", "--clip_grad", "0"])  # as ssta's default
        vitkd.train_one_epoch(student, None, None, None, batches, criterion, None, opt, scaler, schedule, 0, device, vargs)

    def teacher_forwards():
        for _ in range(opts.steps):
            with torch.no_grad(), common.autocast(device, args.amp):
                for t in teachers.values():
                    t.forward_features(x)

    t = compare({"plain": plain_step, "teachers": teacher_forwards, "distill": ssta_step(True),
                 "after": ssta_step(False)}, device, repeats=opts.repeats)
    t_plain, t_teachers, t_distill, t_after = t["plain"], t["teachers"], t["distill"], t["after"]
    n = opts.batch_size * opts.steps
    report(f"SSTA step: {opts.student} <- 2 x {opts.teacher}, {opts.input_size}px, batch {opts.batch_size}, layers {layers}",
           [("student step + 2 teacher forwards (sum of parts)", t_plain + t_teachers, n),
            ("SSTA distillation step", t_distill, n)], device)
    report("after the early stop", [("plain supervised step (vitkd.py, no teacher)", t_plain, n),
                                    ("SSTA step after the early stop", t_after, n)], device)

    # head selection: tree vs naive ---------------------------------------------------------
    teacher = common.build_teacher(opts.teacher, "random", num_classes=10, img_size=opts.selection_size).to(device)
    g = torch.Generator().manual_seed(0)
    images = torch.randn(opts.selection_images, 3, opts.selection_size, opts.selection_size, generator=g).to(device)
    with torch.no_grad():
        labels = teacher(images).argmax(1)
    data = [(images[i:i + 16], labels[i:i + 16]) for i in range(0, len(images), 16)]
    classify = lambda x, outs: teacher.forward_head(teacher.norm(x))  # noqa: E731
    out = {}

    def select(naive):
        def run():
            out[naive] = ssta.head_importance(teacher, classify, set(), layers, data, device, args.amp, naive=naive)
        return run

    t_tree = timeit(select(False), device, warmup=0, repeats=1)
    t_naive = timeit(select(True), device, warmup=0, repeats=1)
    combos = list(itertools.product(range(6), repeat=3))
    pick = {k: combos[max(range(len(v[1])), key=lambda i: (v[0] - v[1][i], -i))] for k, v in out.items()}
    report(f"head selection, {opts.teacher} (12 blocks, 6 heads), layers {layers}, {opts.selection_images} images at "
           f"{opts.selection_size}px; heads tree {pick[False]} naive {pick[True]} identical: {out[False] == out[True]}",
           [("naive: 216 full forwards per image", t_naive, opts.selection_images),
            ("tree: 6 + 36 + 216 block runs per image", t_tree, opts.selection_images)], device)


if __name__ == "__main__":
    main()
