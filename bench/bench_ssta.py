"""ssta.py: costs of SSTA.

1. A distillation step (the supervised teacher and the assistant with q / k taps on the distilled blocks, the
   selected heads' maps and one KL) vs the sum of its parts measured in the same run: the student's plain step + the
   two teachers' plain forwards. Time: the median of paired ratios over interleaved rounds (target <= 1.10 on a GPU);
   ops and host syncs per step under bf16 autocast (target: ops <= 1.08 x the parts', 0 syncs).
2. A step after the early stop vs the plain supervised step of vitkd.py without teacher. Target: <= 1.02 (ops: the
   same).
3. Head selection: the tree over the distilled layers vs naive full forwards per combination, on a
   12-block, 6-head teacher; the selected heads must be identical. Target: >= 8x.

  python bench/bench_ssta.py            # CPU: DeiT-Ti <- 2 x DeiT-S, 224 px, batch 16; selection 32 images at 64 px
  python bench/bench_ssta.py --gpu      # a GPU (bf16) = --batch_size 128 --steps 4 --selection_size 224 --selection_images 128
  python bench/bench_ssta.py --tiny     # a CPU smoke run in seconds (32 px, 3 blocks, batch 4)
"""
import argparse
import itertools
import statistics

import torch

from harness import (count_per_step, cpu_kernel_profile, device_and_amp, parse_args, profiled_ops, report, report_counts,
                     report_paired, rounds, timeit)
import common
import ssta
import vitkd

TINY = dict(input_size=32, depth=3, batch_size=4, steps=1, repeats=2, selection_size=32, selection_images=4,
            selection_layers=2)
GPU = dict(batch_size=128, steps=4, selection_size=224, selection_images=128)  # x 15 interleaved rounds


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--student", default="deit_tiny")
    p.add_argument("--teacher", default="deit_small", help="the supervised teacher and the assistant (random weights)")
    p.add_argument("--depth", default=None, type=int, help="blocks of every network (default: the architecture's)")
    p.add_argument("--input_size", default=224, type=int)
    p.add_argument("--batch_size", default=16, type=int)
    p.add_argument("--steps", default=2, type=int)
    p.add_argument("--repeats", default=15, type=int, help="interleaved timing rounds")
    p.add_argument("--selection_size", default=64, type=int, help="input size of the head-selection benchmark")
    p.add_argument("--selection_images", default=32, type=int)
    p.add_argument("--selection_layers", default=3, type=int, help="the selection's distilled layers: the last N blocks")
    p.add_argument("--compile", action="store_true", help="also count a --compile step (the blocks compiled as the "
                   "scripts' --compile does, the q / k taps inside them) against the eager one")
    opts = parse_args(p, TINY, GPU)
    device, _ = device_and_amp()
    args = ssta.get_args_parser().parse_args(["--log_every", "1000000"])
    torch.manual_seed(0)
    student = common.create_model(opts.student, num_classes=1000, img_size=opts.input_size, depth=opts.depth).to(device)
    # as ssta.main: the supervised teacher with its classifier, the assistant a backbone
    teachers = {n: common.build_teacher(opts.teacher, "random", num_classes=c, img_size=opts.input_size,
                                        depth=opts.depth).to(device) for n, c in (("teacher", 1000), ("ta", 0))}
    layers = {n: ssta.resolve_layers(args.distill_layers, m, n) for n, m in (("student", student), *teachers.items())}
    x = torch.randn(opts.batch_size, 3, opts.input_size, opts.input_size, device=device)
    y = torch.randint(0, 1000, (opts.batch_size,), device=device)
    criterion = torch.nn.CrossEntropyLoss(label_smoothing=0.1)
    schedule = common.lr_schedule(1e-4, 1e-5, 10 ** 6)
    opt = torch.optim.AdamW(common.param_groups(student, 0.05), lr=1e-4)
    scaler = common.grad_scaler(device, args.amp)
    H = teachers["teacher"].blocks[0].attn.num_heads
    # as ssta.main's pairs: (student block, teacher block, teacher head: 0, 1, 2 / 3, 4, 5, student head 0 / 1)
    pairs = {n: [(s, t, (i + 3 * k) % H, k) for i, (s, t) in enumerate(zip(layers["student"], layers[n]))]
             for k, n in enumerate(("teacher", "ta"))}

    def fns(x, y, steps):  # the method's step and its parts, on `steps` batches (x, y)
        batches = [(x, y)] * steps

        def ssta_step(with_teachers):
            def run():
                taps = {}
                if with_teachers:  # as ssta.main (default --teacher_loss head): q and k of the distilled blocks
                    taps = {n: common.ViTTaps(m, attn_blocks=layers[n]) for n, m in (("student", student), *teachers.items())}
                try:
                    ssta.train_one_epoch(student, teachers if with_teachers else {}, None, taps, pairs, batches, criterion,
                                         None, opt, scaler, schedule, 0, device, args)
                finally:
                    for t in taps.values():
                        t.close()
            return run

        def plain_step():
            vitkd.train_one_epoch(student, None, None, None, batches, criterion, None, opt, scaler, schedule, 0, device,
                                  vargs)

        def teacher_forwards():
            for _ in range(steps):
                with torch.no_grad(), common.autocast(device, args.amp):
                    for t in teachers.values():
                        t.forward_features(x)
        return {"plain": plain_step, "teachers": teacher_forwards, "distill": ssta_step(True), "after": ssta_step(False)}

    vargs = vitkd.get_args_parser().parse_args(["--log_every", "1000000", "--clip_grad", str(args.clip_grad)])  # as ssta's
    counts = {k: count_per_step(f, 6, device) for k, f in fns(x[:2], y[:2], 6).items()}  # at batch 2: ops, syncs
    parts = tuple(a + b for a, b in zip(counts["plain"], counts["teachers"]))
    report_counts(f"SSTA step, {opts.student} <- teacher + ta ({opts.teacher}), layers {layers['student']}",
                  [("student step + 2 teacher forwards (sum of parts)", *parts), ("  student step alone", *counts["plain"]),
                   ("  2 teacher forwards", *counts["teachers"]), ("SSTA distillation step", *counts["distill"]),
                   ("SSTA step after the early stop", *counts["after"])], target=(3, 1.08))
    times = rounds(fns(x, y, opts.steps), device, repeats=opts.repeats)
    t = {k: statistics.median(v) for k, v in times.items()}
    t_plain, t_teachers, t_distill, t_after = t["plain"], t["teachers"], t["distill"], t["after"]
    n = opts.batch_size * opts.steps
    report(f"SSTA step: {opts.student} <- teacher + ta ({opts.teacher}), {opts.input_size}px, batch {opts.batch_size}, "
           f"layers {layers['student']}",
           [("student step + 2 teacher forwards (sum of parts)", t_plain + t_teachers, n),
            ("SSTA distillation step", t_distill, n)], device)
    report_paired("SSTA step / (student step + teacher forwards)", times, "distill", ("plain", "teachers"), 1.10)
    report("after the early stop", [("plain supervised step (vitkd.py, no teacher)", t_plain, n),
                                    ("SSTA step after the early stop", t_after, n)], device)
    report_paired("SSTA after its stop / plain step", times, "after", ("plain",), 1.02)
    if opts.compile:  # the step with every block compiled (common.compile_models, as the scripts' --compile)
        small = fns(x[:2], y[:2], 3)
        names = {"plain": "student step", "teachers": "2 teacher forwards", "distill": "SSTA distillation step"}
        eager = {k: profiled_ops(small[k], 3, device) for k in names}
        cpu_kernel_profile()
        common.compile_models(argparse.Namespace(compile=True, compile_backend="inductor", compile_mode=None), student,
                              *teachers.values())
        for k in names:
            profiled_ops(small[k], 3, device)  # compiles, under the same autocast regions (a guard) as the count
        compiled = {k: profiled_ops(small[k], 3, device) for k in names}
        print("\n--compile, host dispatches per step as the profiler sees them (harness.profiled_ops: on CUDA the kernel "
              "launches; on a CPU the outermost aten ops and inductor's C++ kernel calls, a proxy of the GPU's launches: "
              "inductor fuses for Triton much as for C++)")
        for k, label in names.items():
            print(f"  {label:<46} eager {eager[k]:8.0f}  compiled {compiled[k]:8.0f}  x{compiled[k] / eager[k]:.2f}")
        ratio = {d: v["distill"] / (v["plain"] + v["teachers"]) for d, v in (("eager", eager), ("compiled", compiled))}
        print(f"  SSTA step / sum of parts: eager x{ratio['eager']:.3f}, compiled x{ratio['compiled']:.3f}")

    # head selection: tree vs naive ---------------------------------------------------------
    teacher = common.build_teacher(opts.teacher, "random", num_classes=10, img_size=opts.selection_size,
                                   depth=opts.depth).to(device)
    sel_layers = ssta.resolve_layers(list(range(-opts.selection_layers, 0)), teacher, "teacher")
    H, depth = teacher.blocks[0].attn.num_heads, len(teacher.blocks)
    g = torch.Generator().manual_seed(0)
    images = torch.randn(opts.selection_images, 3, opts.selection_size, opts.selection_size, generator=g).to(device)
    with torch.no_grad():
        labels = teacher(images).argmax(1)
    data = [(images[i:i + 16], labels[i:i + 16]) for i in range(0, len(images), 16)]
    classify = lambda x, outs: teacher.forward_head(teacher.norm(x))  # noqa: E731
    out = {}

    def select(naive):
        def run():
            search = naive_head_importance if naive else ssta.head_importance
            out[naive] = search(teacher, classify, set(), sel_layers, data, device, args.amp)
        return run

    t_tree = timeit(select(False), device, warmup=0, repeats=1)
    t_naive = timeit(select(True), device, warmup=0, repeats=1)
    combos = list(itertools.product(range(H), repeat=len(sel_layers)))
    pick = {k: combos[max(range(len(v[1])), key=lambda i: (v[0] - v[1][i], -i))] for k, v in out.items()}
    L = len(sel_layers)
    report(f"head selection, {opts.teacher} ({depth} blocks, {H} heads), layers {sel_layers}, {opts.selection_images} "
           f"images at {opts.selection_size}px; heads tree {pick[False]} naive {pick[True]} identical: "
           f"{out[False] == out[True]}",
           [(f"tree: {' + '.join(str(H ** (i + 1)) for i in range(L))} block runs per image", t_tree, opts.selection_images),
            (f"naive: {H ** L} full forwards per image", t_naive, opts.selection_images)], device, target=(1, ">=", 8))


@torch.no_grad()
def naive_head_importance(model, classify, need, layers, loader, device, amp="bf16"):
    """ssta.head_importance by brute force, its reference: one full forward per combination of zeroed heads (one
    head per distilled layer). Same return value: (accuracy with all heads, [accuracy per combination])."""
    H = model.blocks[layers[0]].attn.num_heads
    combos = [None] + list(itertools.product(range(H), repeat=len(layers)))  # None: all heads
    hits, count = [0] * len(combos), 0
    taps = common.ViTTaps(model)
    try:
        for images, target in loader:
            images, target = images.to(device), target.to(device)
            for i, combo in enumerate(combos):
                masks = {}
                for layer, head in zip(layers, combo or ()):
                    masks[layer] = torch.ones(len(images), H, device=device)
                    masks[layer][:, head] = 0
                taps.set_head_masks(masks)
                with common.autocast(device, amp):
                    x, outs = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(images)))), {}
                    for b, block in enumerate(model.blocks):
                        x = outs[b] = block(x)
                    hits[i] += (classify(x, {b: outs[b] for b in need}).argmax(-1) == target).sum().item()
            count += len(target)
    finally:
        taps.close()
    acc = [100.0 * h / max(count, 1) for h in hits]
    return acc[0], acc[1:]


if __name__ == "__main__":
    main()
