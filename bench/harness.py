"""Tiny timing harness shared by the benchmarks in bench/ (not used by the training scripts).

Everything a benchmark compares is measured in one process and one run, with warm-up and
repeats, and reported as a ratio, so that the machine's speed cancels out.

Every bench_*.py has three sizes: its defaults (a CPU measurement), --gpu (the sizes of a GPU measurement;
bf16 autocast on CUDA) and --tiny (a CPU smoke run in seconds: 32 px, 2-3 blocks, tiny batches, 1 repeat;
its ratios mean nothing). bench/run_benches.py runs them all; test_smoke.py runs them all with --tiny.
"""
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root


def parse_args(parser, tiny, gpu, argv=None):
    """The bench's flags, with --tiny and --gpu as presets of their defaults (dicts: dest -> value); a flag given
    explicitly wins over the preset. Without either, the defaults are the CPU measurement's."""
    def show(preset):
        return " ".join(f"--{k} {' '.join(map(str, v)) if isinstance(v, (list, tuple)) else v}"
                        for k, v in preset.items())

    known = {a.dest for a in parser._actions}
    unknown = sorted((set(tiny) | set(gpu)) - known)
    assert not unknown, f"presets name unknown flags: {unknown}"
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--tiny", action="store_true", help=f"CPU smoke size, seconds (= {show(tiny)})")
    size.add_argument("--gpu", action="store_true", help=f"GPU measurement size (= {show(gpu)})")
    pre, _ = parser.parse_known_args(argv)
    parser.set_defaults(**(tiny if pre.tiny else gpu if pre.gpu else {}))
    return parser.parse_args(argv)


def device_and_amp():
    """(device, autocast context factory): CUDA with bf16 when present, else CPU in fp32."""
    import common
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return device, (lambda: common.autocast(device, "bf16"))


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timeit(fn, device, warmup=2, repeats=5):
    """Median wall time of fn() in seconds, after warm-up calls."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def compare(fns, device, warmup=1, repeats=3):
    """{name: median seconds} of several functions timed round-robin (a, b, c, a, b, c, ...), after
    warming each up, so that drifts of the machine and allocator warm-up hit them alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            sync(device)
            t = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - t)
    return {name: statistics.median(v) for name, v in times.items()}


def machine(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name()
    return f"CPU, {torch.get_num_threads()} threads"


def report(title, rows, device, target=None):
    """rows: (name, seconds, images or None); the first row is the reference of the ratios.
    target: (row index, "<=" or ">=", bound) on that row's ratio: a line saying whether it is met (never an error:
    a --tiny run misses targets freely)."""
    print(f"\n{title}  [{machine(device)}, torch {torch.__version__}]")
    ref = rows[0][1]
    for name, sec, images in rows:
        ips = f"{images / sec:10.1f} img/s" if images else " " * 16
        print(f"  {name:<46} {sec * 1000:10.1f} ms  {ips}  x{sec / ref:.2f}")
    if target is not None:
        i, op, bound = target
        r = rows[i][1] / ref
        met = r <= bound if op == "<=" else r >= bound
        print(f"  target: {rows[i][0].strip()} x{r:.2f} {op} {bound}: {'met' if met else 'MISSED'}")
    sys.stdout.flush()
