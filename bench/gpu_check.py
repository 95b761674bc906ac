"""Every training script end to end on one device, through its real command line; then --compile.

  python bench/gpu_check.py                 # a GPU: 224 px, DeiT-Ti students, DeiT-S teachers, bf16, ~3 min on an H200
  python bench/gpu_check.py --tiny          # the same checks on a CPU in minutes (32 px, 3-block students, fp32)
  python bench/gpu_check.py --only vitkd_kd ssta --no-compile

Synthetic data, random teachers (`--teacher_weights random`), except SSKD's chain of three stages.
  0. first, so that a call cut short still answers it: the central configuration (the first --compile_cases case)
     timed alone, eager and compiled; the MFU; the loader on real JPEGs, pil vs fast (each described below).
  1. correctness, --jobs cases at a time: one step with --amp bf16 and one with --amp off, whose logged training
     losses (the first step's) must agree within --tol (relative; on a CPU both run in fp32: the scripts' autocast
     is CUDA-only); then 1 epoch, and the same folder resumed to 2 epochs: the log must hold both epochs, finite.
  2. timing, each case alone on the device: 1 eager epoch, its steady-state it/s (median step), warm-up seconds,
     peak memory, data wait; for --compile_cases also 1 compiled epoch: its speed-up and warm-up (compilation).
eval_knn_linear.py runs once on the backbone of the first vitkd case. The loader check of stage 0: the share of time
waiting on the loader (and the device part of the fast pipeline) on real JPEGs (bench_data.py's 500 x 375 files,
vitkd.py's DeiT recipe, --pipeline pil and fast). The MFU: the model FLOP utilisation of a DeiT-S student's training
step in bf16 (random tensors on the device, no loader; FLOPs counted by torch's FlopCounterMode, peak from
PEAK_TFLOPS). Output: a table, and OUT/gpu_check.json (rewritten after every stage).
"""
import argparse
import json
import math
import os
import re
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def get_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=None, help="run folders and gpu_check.json; a new or empty folder "
                   "(default: gpu_check_out/DATE-TIME)")
    p.add_argument("--tiny", action="store_true", help="CPU-sized: 32 px, 3-block students, small batches")
    p.add_argument("--student", default="deit_tiny")
    p.add_argument("--teacher", default="deit_small")
    p.add_argument("--input_size", default=224, type=int)
    p.add_argument("--batch_size", default=128, type=int)
    p.add_argument("--steps", default=20, type=int, help="training steps per epoch of the timed runs")
    p.add_argument("--check_steps", default=4, type=int, help="training steps per epoch of the resume check")
    p.add_argument("--num_workers", default=10, type=int)
    p.add_argument("--tol", default=0.03, type=float, help="relative tolerance, bf16 vs fp32 first-step losses")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--compile_backend", default="inductor")
    p.add_argument("--timing_cases", nargs="*", default=["vitkd_alone", "vitkd_vitkd", "vitkd_cae_nkd", "ssta",
                                                          "sskd_student", "sdssl_mocov3", "attn_distill_all"],
                   help="cases timed alone after the checks ('all': every case)")
    p.add_argument("--compile_cases", nargs="*", default=["vitkd_vitkd"],
                   help="timed cases also timed with --compile (compilation costs tens of seconds per case)")
    p.add_argument("--jpeg_steps", default=8, type=int, help="steps of the real-JPEG loader check (0: skip it)")
    p.add_argument("--only", nargs="*", default=None, help="case names (see CASES)")
    p.add_argument("--jobs", default=4, type=int, help="cases checked at a time (correctness only; timing runs alone)")
    p.add_argument("--timing", action=argparse.BooleanOptionalAction, default=True,
                   help="time each case alone afterwards (1 eager epoch; compiled for --compile_cases)")
    args = p.parse_args()
    if args.tiny:
        args.input_size, args.batch_size, args.steps, args.check_steps, args.num_workers, args.jobs = 32, 16, 4, 2, 0, 1
    return args


def cases(args):
    """name -> (script, flags); {prev} is replaced by the previous case's output folder (SSKD's stages)."""
    t = ["--teacher", args.teacher, "--teacher_weights", "random"]
    size = ["--depth", "3", "--embed_dim", "48"] if args.tiny else []  # --tiny: patch 16 at 32 px, 2 x 2 tokens
    sup = ["--randaug=", "--reprob", "0", "--mixup", "0", "--cutmix", "0", "--warmup_epochs", "1"]
    no_feat = ["--alpha_vitkd", "0", "--beta_vitkd", "0"]
    return {
        "vitkd_alone": ("vitkd.py", size + sup),
        "vitkd_kd": ("vitkd.py", size + sup + t + no_feat + ["--kd_weight", "0.5", "--ce_weight", "0.5"]),
        "vitkd_nkd": ("vitkd.py", size + sup + t + no_feat + ["--nkd"]),
        "vitkd_vitkd": ("vitkd.py", size + sup + t),
        "vitkd_cae_nkd": ("vitkd.py", size + sup + t + ["--generator", "cae", "--nkd"]),
        "vitkd_token": ("vitkd.py", ["--student", "deit_tiny_distilled_patch16_224"] + size + sup + no_feat +
                        ["--teacher", "resnet18", "--teacher_weights", "random", "--distill_token", "hard"]),
        # heads given: with random teachers the selection is a near-tie of a few images, which bf16 and fp32 break
        # differently (seen on an H200), and the first-step comparison would then compare other heads' maps
        "ssta": ("ssta.py", size + sup + t + ["--ta", args.teacher, "--ta_weights", "random", "--ta_supervised",
                                              "--heads_teacher", "0", "1", "2", "--heads_ta", "2", "1", "0",
                                              "--early_stop_epoch", "2"]),
        "ssta_selection": ("ssta.py", size + sup + t + ["--ta", args.teacher, "--ta_weights", "random", "--ta_supervised",
                                                        "--selection_images", str(2 * args.batch_size),
                                                        "--early_stop_epoch", "2"]),
        "sskd_teacher": ("sskd.py", ["--student", args.teacher]),
        "sskd_teacher_ss": ("sskd.py", ["--stage", "teacher_ss", "--teacher_weights", "{prev}/checkpoint.pth"]),
        "sskd_student": ("sskd.py", size + ["--teacher_weights", "{prev}/checkpoint.pth"]),
        **{f"sdssl_{f}": ("sdssl.py", ["--framework", f, "--arch", args.student, "--num_heads", "3"] + size)
           for f in ("simclr", "byol", "mocov3")},
        "attn_distill": ("attn_distill.py", size + t),
        "attn_distill_all": ("attn_distill.py", size + t + ["--attn_layers", "all"]),
    }


SELECTION_CASES = {"ssta_selection"}  # its bf16 / fp32 losses may differ by choosing other heads: reported, not judged


def run(script, flags, out, log):
    """Run `python script flags`; (seconds, [(arrival time, line), ...]), each output line timestamped as it
    arrives (steady rates from these, not from the 2-decimal rates printed). Fails loudly with the output's tail."""
    cmd = [sys.executable, os.path.join(ROOT, script), *flags, "--output_dir", out]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    t = time.time()
    lines = []
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env) as p:
        for line in p.stdout:
            lines.append((time.perf_counter(), line.rstrip("\n")))
    text = "\n".join(l for _, l in lines)
    with open(log, "a") as f:
        f.write(" ".join(cmd) + "\n" + text + "\n\n")
    if p.returncode:
        raise RuntimeError(f"{script} failed ({p.returncode}):\n{text[-3000:]}")
    return time.time() - t, lines


def epochs_of(out):
    return [json.loads(line) for line in open(os.path.join(out, "log.txt")) if line.strip()]


LINE = re.compile(r"^epoch (\d+) \[(\d+)/(\d+)\].*?([\d.]+) it/s  data (\d+)%(?:  mem ([\d.]+)G)?")


def timing(lines, epoch):
    """(warm-up seconds, steady it/s, peak GB, % of the epoch waiting on data) from the training lines of `epoch`
    (--log_every 1: a line per step). Steady: 1 / the median interval between the lines' arrivals. Warm-up
    (compilation, allocator, cuDNN): the epoch's training time beyond its steps at that rate; the epoch's time is
    the first step's (from the rate Meter printed after it, counted from the epoch's start) plus the intervals."""
    steps = []
    for t, text in lines:
        m = LINE.match(text)
        if m and int(m.group(1)) == epoch:
            steps.append((t, int(m.group(2)), float(m.group(4)), int(m.group(5)), float(m.group(6) or "nan")))
    if len(steps) < 2:
        return (float("nan"),) * 4
    gaps = sorted((b[0] - a[0]) / (b[1] - a[1]) for a, b in zip(steps, steps[1:]))
    step = gaps[len(gaps) // 2] if len(gaps) % 2 else (gaps[len(gaps) // 2 - 1] + gaps[len(gaps) // 2]) / 2
    (t0, i0, r0, _, _), (t1, i1, _, wait, mem) = steps[0], steps[-1]
    return (i0 + 1) / r0 + (t1 - t0) - (i1 + 1) * step, 1 / max(step, 1e-9), mem, wait


PEAK_TFLOPS = {"H100 PCIe": 756.0, "H100": 989.4, "H200": 989.4, "A100": 312.0}  # dense bf16, NVIDIA's data sheets


def mfu_check(args, compile_backend=None):
    """Images/s and model FLOP utilisation of a DeiT-S training step (AdamW, bf16 autocast) on random tensors."""
    sys.path.insert(0, ROOT)
    import common
    from torch.utils.flop_counter import FlopCounterMode
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    model = common.create_model("deit_small", num_classes=1000, img_size=args.input_size).to(device)
    if compile_backend:
        common.compile_models(argparse.Namespace(compile=True, compile_backend=compile_backend, compile_mode=None), model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    x = torch.randn(args.batch_size, 3, args.input_size, args.input_size, device=device)
    y = torch.randint(0, 1000, (args.batch_size,), device=device)

    def step():
        with common.autocast(device, "bf16"):
            loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()  # warm-up (and compilation)
    with FlopCounterMode(display=False) as counter:
        step()
    flops = counter.get_total_flops()
    n = max(args.steps, 3)
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    sec = (time.perf_counter() - t) / n
    name = torch.cuda.get_device_name() if device.type == "cuda" else ""
    peak = next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
    achieved = flops / sec / 1e12
    return {"images_s": args.batch_size / sec, "tflops": achieved, "gflop_per_image": flops / args.batch_size / 1e9,
            "mfu": achieved / peak if peak else None, "peak_tflops": peak, "compile": compile_backend}


def check(name, script, flags, args, common_flags, log, prev=None):
    """Correctness of one case (a GPU that other cases share: no timing read here): the first step in bf16 against
    fp32, and 1 epoch then resumed to 2. {prev}: the previous SSKD stage's folder."""
    flags = [f.replace("{prev}", prev or "") for f in flags]
    epochs = ["--ss_epochs"] if "teacher_ss" in flags else ["--epochs"]
    if script == "sskd.py":
        flags += ["--decay_epochs", "--ss_decay_epochs"]  # no step decay inside 2 epochs
    one = ["--synthetic_size", str(args.batch_size)]
    many = ["--synthetic_size", str(args.batch_size * args.check_steps)]
    d = lambda k: os.path.join(args.out, f"{name}_{k}")  # noqa: E731
    r = {"script": script, "flags": flags, "first_step": {}}
    for amp in ("bf16", "off"):
        run(script, common_flags + flags + one + epochs + ["1", "--amp", amp], d(f"step_{amp}"), log)
        r["first_step"][amp] = {k: v for k, v in epochs_of(d(f"step_{amp}"))[0].items()
                                if k.startswith("train_") and k != "train_lr"}
    first = r["first_step"]
    r["first_step_max_rel_diff"] = max(abs(first["bf16"][k] - v) / max(abs(v), 1e-6) for k, v in first["off"].items())
    run(script, common_flags + flags + many + epochs + ["1"], d("eager"), log)
    _, out = run(script, common_flags + flags + many + epochs + ["2", "--resume", os.path.join(d("eager"), "checkpoint.pth")],
                 d("eager"), log)
    logged = epochs_of(d("eager"))
    r["resume_ok"] = any("resuming from" in line for _, line in out) and [e["epoch"] for e in logged] == [0, 1] and \
        all(math.isfinite(v) for e in logged for v in e.values() if isinstance(v, float))
    r["flags_used"], r["epochs_flag"] = flags, epochs
    return r


def measure(name, r, args, common_flags, log):
    """Alone on the GPU: 1 eager epoch (steady it/s from the median step, warm-up, peak memory, data wait), and with
    --compile where asked."""
    many = ["--synthetic_size", str(args.batch_size * args.steps)]
    base = common_flags + r["flags_used"] + many + r["epochs_flag"] + ["1"]
    _, out = run(r["script"], base, os.path.join(args.out, f"{name}_timed"), log)
    r["warmup_s"], r["eager_it_s"], r["peak_gb"], r["data_wait_pct"] = timing(out, 0)
    r["images_s"] = r["eager_it_s"] * args.batch_size
    if args.compile and name in args.compile_cases:
        _, out = run(r["script"], base + ["--compile", "--compile_backend", args.compile_backend],
                     os.path.join(args.out, f"{name}_compiled"), log)
        r["compiled_warmup_s"], r["compiled_it_s"], _, _ = timing(out, 0)
        r["compile_speedup"] = r["compiled_it_s"] / r["eager_it_s"]


def jpeg_wait(args, log):
    """The loader-wait share on real JPEGs (synthetic tensors cost the workers nothing): bench_data.py's ImageNet-like
    files (500 x 375, quality 90; --tiny: 120 x 90), one epoch of vitkd.py's DeiT recipe (RandAugment, erasing, Mixup /
    CutMix) per --pipeline, the student alone. {pipeline: {images_s, data_wait_pct}}."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from bench_data import write_jpegs
    root, n = os.path.join(args.out, "jpegs"), args.batch_size * args.jpeg_steps
    if not os.path.isdir(root):
        write_jpegs(root, n, *((120, 90) if args.tiny else (500, 375)))
        os.symlink("train", os.path.join(root, "val"))  # evaluated on the same files: only the loader is measured
    res = {}
    for pipeline in ("pil", "fast"):
        flags = ["--dataset", "imagefolder", "--data_path", root, "--input_size", str(args.input_size), "--batch_size",
                 str(args.batch_size), "--num_workers", str(args.num_workers), "--log_every", "1", "--epochs", "1",
                 "--pipeline", pipeline] + (["--depth", "3", "--embed_dim", "48"] if args.tiny else [])
        _, out = run("vitkd.py", flags, os.path.join(args.out, f"jpeg_{pipeline}"), log)
        _, rate, _, wait = timing(out, 0)
        res[pipeline] = {"images_s": rate * args.batch_size, "data_wait_pct": wait}
    return res


def main():
    args = get_args()
    args.out = args.out or os.path.join("gpu_check_out", time.strftime("%Y%m%d-%H%M%S"))
    if os.path.exists(args.out) and (not os.path.isdir(args.out) or os.listdir(args.out)):
        sys.exit(f"error: --out {args.out} exists and is not an empty folder (nothing was touched); pick another")
    log = os.path.join(args.out, "commands.log")
    dev = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    common_flags = ["--dataset", "synthetic", "--input_size", str(args.input_size), "--batch_size", str(args.batch_size),
                    "--num_workers", str(args.num_workers), "--log_every", "1"]
    all_cases = cases(args)
    names = args.only or list(all_cases)
    if args.timing_cases == ["all"]:
        args.timing_cases = list(all_cases)
    unknown = [n for n in names + args.compile_cases + args.timing_cases if n not in all_cases]
    if unknown:
        sys.exit(f"error: unknown case(s) {unknown}; choose from {list(all_cases)}")
    chained = [n for i, n in enumerate(names) if "{prev}" in " ".join(all_cases[n][1])
               and (i == 0 or not names[i - 1].startswith("sskd"))]
    if chained:
        sys.exit(f"error: {chained} need(s) the SSKD stage before it in --only (the stages run chained)")
    os.makedirs(args.out, exist_ok=True)
    report = {"device": dev, "torch": torch.__version__, "command": " ".join(sys.argv), "args": vars(args), "results": {}}
    results = report["results"]

    import threading
    lock = threading.Lock()

    def save():  # after every case and stage: a run cut short still leaves what finished
        with lock:
            with open(os.path.join(args.out, "gpu_check.json.tmp"), "w") as f:
                json.dump(report, f, indent=1)
            os.replace(os.path.join(args.out, "gpu_check.json.tmp"), os.path.join(args.out, "gpu_check.json"))

    # 0. the central configuration first, so that a call cut short still answers it: the first --compile case (vitkd's
    #    ViTKD step) timed alone, eager and compiled; the MFU of a DeiT-S step, eager and compiled; the loader on real
    #    JPEGs, pil vs fast
    central = next((n for n in args.compile_cases if n in names and "{prev}" not in " ".join(all_cases[n][1])), None)

    def timed(n):  # one case alone on the device (its results[n] holds the flags to run)
        print(f"[{n}] timing" + (" + --compile" if args.compile and n in args.compile_cases else ""), flush=True)
        try:
            measure(n, results[n], args, common_flags, log)
        except Exception as e:  # noqa: BLE001
            results[n]["timing_error"] = str(e)[-2000:]
            print(f"[{n}] timing FAILED: {str(e)[-600:]}", flush=True)
        save()
    if args.timing and central:
        script, flags = all_cases[central]
        results[central] = {"script": script, "flags_used": flags, "epochs_flag": ["--epochs"]}
        timed(central)
    print("[mfu] DeiT-S training step, bf16", flush=True)
    results["mfu_eager"] = mfu_check(args)
    save()
    if args.compile:
        results["mfu_compiled"] = mfu_check(args, args.compile_backend)
        save()
    if args.jpeg_steps:
        print("[jpeg] loader wait on real JPEGs, --pipeline pil and fast", flush=True)
        try:
            results["jpeg_loader"] = jpeg_wait(args, log)
        except Exception as e:  # noqa: BLE001
            results["jpeg_loader"] = {"error": str(e)[-2000:]}
        save()

    # 1. correctness, --jobs cases at a time; SSKD's stages are one chain
    chains, t0 = [], time.time()
    for n in names:
        if "{prev}" in " ".join(all_cases[n][1]):
            chains[-1].append(n)
        else:
            chains.append([n])

    def run_chain(chain):
        prev = None
        for n in chain:
            try:
                results[n] = {**results.get(n, {}),  # the central case's timing is kept
                              **check(n, *all_cases[n], args, common_flags, os.path.join(args.out, f"{n}.log"), prev)}
            except Exception as e:  # noqa: BLE001 (reported in the table and the JSON)
                results[n] = {"error": str(e)[-2000:]}
                print(f"[{n}] FAILED: {str(e)[-600:]}", flush=True)
                return
            finally:
                save()
            print(f"[{n}] first step bf16/fp32 {results[n]['first_step_max_rel_diff']:.1e}, resume "
                  f"{results[n]['resume_ok']} ({time.time() - t0:.0f} s)", flush=True)
            prev = os.path.join(args.out, f"{n}_eager")

    from concurrent.futures import ThreadPoolExecutor
    with ThreadPoolExecutor(args.jobs) as pool:
        list(pool.map(run_chain, chains))
    save()
    # 2. timing, one case at a time
    if args.timing:
        for n in names:
            if "error" not in results.get(n, {"error": "not run"}) and n in args.timing_cases and n != central:
                timed(n)
    eval_src = next((n for n in names if n.startswith("vitkd") and "error" not in results.get(n, {"error": 1})), None)
    if eval_src:
        print("[eval_knn_linear] k-NN and linear probe of the first vitkd student", flush=True)
        try:
            sec, _ = run("eval_knn_linear.py", ["--weights", os.path.join(args.out, f"{eval_src}_eager", "student_backbone.pth"),
                                                "--dataset", "synthetic", "--synthetic_size", str(args.batch_size * args.steps),
                                                "--input_size", str(args.input_size), "--num_workers", str(args.num_workers),
                                                "--probe_epochs", "5"], os.path.join(args.out, "eval"), log)
            results["eval_knn_linear"] = {"seconds": sec}
        except Exception as e:  # noqa: BLE001
            results["eval_knn_linear"] = {"error": str(e)[-2000:]}
        save()
    print(f"\n{dev}, torch {torch.__version__}, {args.input_size} px, batch {args.batch_size}")
    print(f"{'case':<16} {'bf16/fp32':>9} {'resume':>6} {'img/s':>8} {'data %':>6} {'peak GB':>7} {'compile x':>9} "
          f"{'warm-up s':>15}")
    nan = float("nan")
    for name, r in results.items():
        if "error" in r and name != "eval_knn_linear":
            print(f"{name:<16} FAILED")
        elif "first_step" in r:
            steps = f"{r.get('warmup_s', nan):6.1f} -> {r.get('compiled_warmup_s', nan):5.1f}"
            print(f"{name:<16} {r['first_step_max_rel_diff']:9.1e} {str(r['resume_ok']):>6} {r.get('images_s', nan):8.0f} "
                  f"{r.get('data_wait_pct', nan):6.0f} {r.get('peak_gb', nan):7.2f} {r.get('compile_speedup', nan):9.2f} "
                  f"{steps:>15}")
    for k, v in results.get("jpeg_loader", {}).items():
        if isinstance(v, dict):
            print(f"real JPEGs, --pipeline {k}: {v['images_s']:.0f} img/s, {v['data_wait_pct']:.0f}% of the time waiting "
                  f"on the loader ({args.num_workers} workers)")
    for k in ("mfu_eager", "mfu_compiled"):
        if k in results:
            m = results[k]
            util = f"{100 * m['mfu']:.1f}% of {m['peak_tflops']} TFLOPS" if m["mfu"] else "no peak known for this device"
            print(f"DeiT-S step ({k[4:]}): {m['images_s']:.0f} img/s, {m['tflops']:.2f} TFLOPS achieved "
                  f"({m['gflop_per_image']:.1f} GFLOP per image), {util}")
    bad = [n for n, r in results.items() if "error" in r or "timing_error" in r
           or ("first_step" in r and (not r["resume_ok"] or (r["first_step_max_rel_diff"] > args.tol
                                                              and n not in SELECTION_CASES)))]
    print("all checks passed" if not bad else f"FAILED: {bad}")
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
