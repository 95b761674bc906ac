"""vitkd.py: cost of ViTKD's own machinery (taps, adapters, mask token, generator, losses).

One training step of ViTKD + NKD (vitkd.train_one_epoch on fixed batches) vs the sum of its parts
measured in the same run: the student's supervised step alone (the same function without a teacher)
plus the teacher's forward alone. Time: the median of paired ratios over interleaved rounds (target <= 1.10);
ops and host syncs per step under bf16 autocast.

  python bench/bench_vitkd.py          # CPU, DeiT-Ti <- DeiT-S, 224 px, batch 16
  python bench/bench_vitkd.py --gpu    # a GPU (bf16) = --batch_size 128 --steps 4
  python bench/bench_vitkd.py --tiny   # a CPU smoke run in seconds (32 px, 2 blocks, batch 4)
"""
import argparse

import torch

import statistics

from harness import count_per_step, device_and_amp, parse_args, report, report_counts, report_paired, rounds
import common
import vitkd

TINY = dict(input_size=32, depth=2, batch_size=4, steps=1, repeats=2)
GPU = dict(batch_size=128, steps=4)  # x 15 interleaved rounds


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--student", default="deit_tiny")
    p.add_argument("--teacher", default="deit_small")
    p.add_argument("--depth", default=None, type=int, help="blocks of both networks (default: the architecture's)")
    p.add_argument("--input_size", default=224, type=int)
    p.add_argument("--batch_size", default=16, type=int)
    p.add_argument("--steps", default=3, type=int, help="steps per timed call")
    p.add_argument("--repeats", default=15, type=int, help="interleaved timing rounds")
    p.add_argument("--generator", default="conv")
    opts = parse_args(p, TINY, GPU)
    device, _ = device_and_amp()
    args = vitkd.get_args_parser().parse_args(["--nkd", "--log_every", "1000000", "--generator", opts.generator,
                                               "--input_size", str(opts.input_size)])
    torch.manual_seed(0)
    student = common.create_model(opts.student, num_classes=1000, img_size=opts.input_size, depth=opts.depth).to(device)
    teacher = common.build_teacher(opts.teacher, "random", num_classes=1000, img_size=opts.input_size,
                                   depth=opts.depth).to(device)
    num_patches = student.patch_embed.num_patches
    scale = 196 / num_patches if args.vitkd_rescale else 1.0  # as vitkd.main

    def vitkd_loss(beta):
        return vitkd.ViTKDLoss(student.embed_dim, teacher.embed_dim, num_patches, len(args.mimic_layers), args.mimic_type,
                               args.generator, args.generator_depth, args.mask_ratio, args.alpha_vitkd * scale,
                               beta * scale).to(device)

    loss = vitkd_loss(args.beta_vitkd)
    x = torch.randn(opts.batch_size, 3, opts.input_size, opts.input_size, device=device)
    y = torch.randint(0, 1000, (opts.batch_size,), device=device)
    criterion = torch.nn.CrossEntropyLoss(label_smoothing=0.1)
    schedule = common.lr_schedule(1e-4, 1e-5, 10 ** 6)
    mods = torch.nn.ModuleDict({"student": student, "vitkd": loss})
    opt = torch.optim.AdamW(common.param_groups(mods, 0.05), lr=1e-4)
    scaler = common.grad_scaler(device, args.amp)

    plain_args = argparse.Namespace(**{**vars(args), "nkd": False})  # the student's supervised step alone
    no_gen = vitkd_loss(0.0)

    def fns(x, y, steps):  # the method's step and its parts on `steps` batches
        batches = [(x, y)] * steps

        def step(with_teacher, module=loss):
            def run():
                taps = {}
                if with_teacher:  # as vitkd.main sets them up; only for the ViTKD step
                    taps = {n: (common.ViTTaps(m, token_blocks=args.mimic_layers, where=args.mimic_where),
                                common.ViTTaps(m, token_blocks=[-1], norm=True))
                            for n, m in (("student", student), ("teacher", teacher))}
                try:
                    vitkd.train_one_epoch(student, teacher if with_teacher else None, module if with_teacher else None,
                                          taps, batches, criterion, None, opt, scaler, schedule, 0, device,
                                          args if with_teacher else plain_args)
                finally:
                    for t in (t for pair in taps.values() for t in pair):
                        t.close()
            return run

        def teacher_forward():
            for _ in range(steps):
                with torch.no_grad(), common.autocast(device, args.amp):
                    teacher(x)
        return {"student": step(False), "teacher": teacher_forward, "vitkd": step(True), "no_gen": step(True, no_gen)}

    c = {k: count_per_step(f, 6, device) for k, f in fns(x[:2], y[:2], 6).items()}  # at batch 2: ops, syncs
    title = f"ViTKD ({opts.generator} generator) + NKD step: {opts.student} <- {opts.teacher}"
    report_counts(title, [("student step + teacher forward (sum of parts)",
                           *(a + b for a, b in zip(c["student"], c["teacher"]))),
                          ("  student step alone", *c["student"]), ("  teacher forward alone", *c["teacher"]),
                          ("ViTKD + NKD step", *c["vitkd"]), ("  the same without the generator (beta 0)", *c["no_gen"])])
    times = rounds(fns(x, y, opts.steps), device, repeats=opts.repeats)
    t = {k: statistics.median(v) for k, v in times.items()}
    t_student, t_teacher, t_vitkd = t["student"], t["teacher"], t["vitkd"]
    n = opts.batch_size * opts.steps
    report(f"{title}, {opts.input_size}px, batch {opts.batch_size}",
           [("student step + teacher forward (sum of parts)", t_student + t_teacher, n),
            ("  student step alone", t_student, n), ("  teacher forward alone", t_teacher, n),
            ("ViTKD + NKD step", t_vitkd, n), ("  the same without the generator (beta 0)", t["no_gen"], n)], device)
    report_paired("ViTKD + NKD step / (student step + teacher forward)", times, "vitkd", ("student", "teacher"), 1.10)
    gen = teacher.embed_dim ** 2 * 9 * 2 * num_patches * 3 / 1e9  # 2 convs, forward + backward
    print(f"  the {opts.generator} generator is {gen:.2f} GMAC per image (forward + backward)")


if __name__ == "__main__":
    main()
