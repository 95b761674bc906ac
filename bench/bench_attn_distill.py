"""attn_distill.py: cost of AttnDistill's own machinery (projector P on the CLS, q / k taps on the last block of
each network, the CLS attention rows made from them, head handling, resize, losses).

One AttnDistill step (attn_distill.train_one_epoch on fixed batches) vs the sum of its parts measured
in the same run: a plain student step (its final-norm CLS, a loss on it) + the teacher's forward.
Time: the median of paired ratios over interleaved rounds (targets on a GPU: <= 1.10; with the ViT-S/8 teacher,
785 tokens and rows resized 28 -> 14, <= 1.00: without a host sync the student's host work overlaps the teacher's
GPU work); ops and host syncs per step under bf16 autocast (target: ops <= 1.08 x the parts', 0 syncs).

  python bench/bench_attn_distill.py          # CPU: ViT-T/16 <- ViT-S/16 and ViT-S/8, 224 px, batch 8
  python bench/bench_attn_distill.py --gpu    # a GPU (bf16) = --batch_size 128 --steps 4
  python bench/bench_attn_distill.py --tiny   # a CPU smoke run in seconds (32 px, 2 blocks, batch 4)
"""
import argparse

import torch

import statistics

from harness import (count_per_step, device_and_amp, optimizer_step, parse_args, report, report_counts, report_paired,
                     rounds)
import attn_distill
import common

TINY = dict(input_size=32, depth=2, batch_size=4, steps=1, repeats=2)
GPU = dict(batch_size=128, steps=4)  # x 15 interleaved rounds


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--student", default="vit_tiny")
    p.add_argument("--teachers", default=["vit_small_patch16_224", "vit_small_patch8_224"], nargs="+")
    p.add_argument("--depth", default=None, type=int, help="blocks of every network (default: the architecture's)")
    p.add_argument("--input_size", default=224, type=int)
    p.add_argument("--batch_size", default=8, type=int)
    p.add_argument("--steps", default=2, type=int)
    p.add_argument("--repeats", default=15, type=int, help="interleaved timing rounds")
    opts = parse_args(p, TINY, GPU)
    device, _ = device_and_amp()
    args = attn_distill.get_args_parser().parse_args(["--log_every", "1000000"])
    x = torch.randn(opts.batch_size, 3, opts.input_size, opts.input_size, device=device)
    for name in opts.teachers:
        torch.manual_seed(0)
        backbone = common.create_model(opts.student, num_classes=0, img_size=opts.input_size, depth=opts.depth).to(device)
        backbone.norm.requires_grad_(False)
        teacher = common.build_teacher(name, "random", num_classes=0, img_size=opts.input_size, depth=opts.depth).to(device)
        s_grid, t_grid = attn_distill.check_vit(backbone, "student"), attn_distill.check_vit(teacher, "teacher")
        model = attn_distill.StudentWithProjector(backbone, teacher.embed_dim, args.proj_layers).to(device)
        h_s, h_t = backbone.blocks[-1].attn.num_heads, teacher.blocks[-1].attn.num_heads
        aggregate = None if h_s == h_t else "logsum"
        opt = torch.optim.AdamW(common.param_groups(model, 0.05, skip_listed=False), lr=1e-4, betas=(0.9, 0.95))
        scaler = common.grad_scaler(device, args.amp)
        schedule = common.lr_schedule(1e-4, 0.0, 10 ** 6)
        pairs = [(len(backbone.blocks) - 1, len(teacher.blocks) - 1)]  # the default --attn_layers last

        def fns(x, steps):  # the method's step and its parts on `steps` batches x
            batches = [(x, torch.zeros(len(x), dtype=torch.long))] * steps

            def distill_step():  # taps exist only inside the method's step; as attn_distill.main: q and k
                taps = {"student": common.ViTTaps(backbone, attn_blocks=[s for s, _ in pairs]),
                        "teacher": common.ViTTaps(teacher, attn_blocks=[t for _, t in pairs])}
                try:
                    attn_distill.train_one_epoch(model, teacher, taps, None, pairs, (s_grid, t_grid), aggregate, batches,
                                                 opt, scaler, schedule, 0, device, args)
                finally:
                    for t in taps.values():
                        t.close()

            def student_step():  # the plain student: its final-norm CLS and a loss on it
                for _ in range(steps):
                    with common.autocast(device, args.amp):
                        loss = backbone.forward_features(x)[:, 0].float().square().mean()
                    optimizer_step(loss, opt, scaler)

            def teacher_forward():
                for _ in range(steps):
                    with torch.no_grad(), common.autocast(device, args.amp):
                        teacher.forward_features(x)
            return {"student": student_step, "teacher": teacher_forward, "distill": distill_step}

        c = {k: count_per_step(f, 6, device) for k, f in fns(x[:2], 6).items()}  # at batch 2: ops, syncs
        title = (f"AttnDistill step: {opts.student} ({h_s} heads, {s_grid}x{s_grid}) <- {name} ({h_t} heads, "
                 f"{t_grid}x{t_grid})")
        report_counts(title, [("student step + teacher forward (sum of parts)",
                               *(a + b for a, b in zip(c["student"], c["teacher"]))),
                              ("  student step alone", *c["student"]), ("  teacher forward alone", *c["teacher"]),
                              ("AttnDistill step", *c["distill"])], target=(3, 1.08))
        times = rounds(fns(x, opts.steps), device, repeats=opts.repeats)
        t = {k: statistics.median(v) for k, v in times.items()}
        n = opts.batch_size * opts.steps
        report(f"{title}, {opts.input_size}px, batch {opts.batch_size}",
               [("student step + teacher forward (sum of parts)", t["student"] + t["teacher"], n),
                ("  student step alone", t["student"], n), ("  teacher forward alone", t["teacher"], n),
                ("AttnDistill step", t["distill"], n)], device)
        report_paired("AttnDistill step / (student step + teacher forward)", times, "distill", ("student", "teacher"),
                      1.10 if t_grid == s_grid else 1.00)


if __name__ == "__main__":
    main()
