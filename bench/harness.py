"""Tiny timing harness shared by the benchmarks in bench/ (not used by the training scripts).

Everything a benchmark compares is measured in one process and one run, with warm-up and
repeats, and reported as a ratio, so that the machine's speed cancels out.

Every bench_*.py has three sizes: its defaults (a CPU measurement), --gpu (the sizes of a GPU measurement;
bf16 autocast on CUDA) and --tiny (a CPU smoke run in seconds: 32 px, 2-3 blocks, tiny batches, 1 repeat;
its ratios mean nothing). bench/run_benches.py runs them all; test_smoke.py runs them all with --tiny.
"""
import contextlib
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


def rounds(fns, device, warmup=1, repeats=15):
    """{name: [seconds of each round]} of several functions timed round-robin (a, b, c, a, b, c, ...), after
    warming each up, so that drifts of the machine and allocator warm-up hit them alike and round r of one can be
    paired with round r of another (paired_ratio)."""
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
    return times


def compare(fns, device, warmup=1, repeats=3):
    """{name: median seconds} of rounds(...)."""
    return {name: statistics.median(v) for name, v in rounds(fns, device, warmup, repeats).items()}


def paired_ratio(times, num, parts):
    """(median, lower quartile, upper quartile) over the rounds of times[num][r] / sum(times[p][r] for p in parts):
    the ratio of a method's step to the sum of its parts measured in the same round (rounds(...)), which a drift
    of the machine over the run does not bias."""
    r = sorted(a / sum(times[p][i] for p in parts) for i, a in enumerate(times[num]))
    q = statistics.quantiles(r, n=4) if len(r) > 1 else [r[0]] * 3
    return statistics.median(r), q[0], q[2]


def report_paired(label, times, num, parts, bound):
    """One line: the paired ratio of `num` over the sum of `parts`, its quartiles, and the target."""
    med, lo, hi = paired_ratio(times, num, parts)
    n = len(times[num])
    print(f"  paired ratio, {label}: x{med:.3f} (quartiles {lo:.3f}-{hi:.3f}, {n} interleaved rounds); target <= "
          f"{bound}: {'met' if med <= bound else 'MISSED'}")
    sys.stdout.flush()
    return med


# ---- ops and host syncs per step: the CPU proxy of a launch-bound GPU step -------------------------------------
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402


class OpCounter(TorchDispatchMode):
    """Counts the aten ops dispatched (what a GPU step pays about 30 us of host time for, each) and the host syncs:
    a tensor read as a Python number (item, bool, int, float: aten._local_scalar_dense), tolist (counted by
    count_per_step), and ops whose output size depends on the values (nonzero, masked_select, unique, a boolean-mask
    index). Nothing is counted while an optimizer steps: on the CPU it loops over the parameters where CUDA's
    default (foreach) makes a few ops of them all, the same for a method and its parts; its step counters live on
    the host."""
    SIZED = {"nonzero", "masked_select", "unique", "_unique2", "repeat_interleave"}
    MARKERS = {"_record_function_enter", "_record_function_enter_new", "_record_function_exit"}  # the profiler's

    def __init__(self):
        super().__init__()
        self.ops, self.syncs, self.in_optimizer, self.seen = 0, 0, False, []
        self.names = None  # {op name: count} when set to a dict (to see where a step's ops go)

    def sync(self, name):
        if not self.in_optimizer:
            self.syncs += 1
            self.seen.append(name)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__.split(".")[0]
        counted = not self.in_optimizer and name not in self.MARKERS
        self.ops += counted
        if self.names is not None and counted:
            self.names[name] = self.names.get(name, 0) + 1
        flat = [a for x in list(args) + list((kwargs or {}).values()) for a in (x if isinstance(x, (list, tuple)) else [x])]
        if name == "_local_scalar_dense" or name in self.SIZED and not (name == "repeat_interleave" and isinstance(
                args[1] if len(args) > 1 else None, int)) or name in ("index", "index_put", "index_put_") and any(
                torch.is_tensor(a) and a.dtype == torch.bool for a in flat[1:]):
            self.sync(name)
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def bf16_regions():
    """The regions the scripts (and the benches' parts) autocast with common.autocast run under bf16 autocast, on the
    CPU too (where common.autocast is a no-op); everything else, backward passes included, runs outside it, as in a
    CUDA bf16 step. (Wrapping a whole step in autocast would also cast inside the backward of fp32 regions, which CUDA
    does not do.)"""
    import common
    saved = common.autocast
    common.autocast = lambda device, amp="bf16": contextlib.nullcontext() if amp == "off" else torch.autocast(
        device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)
    try:
        yield
    finally:
        common.autocast = saved


def count_per_step(fn, steps, device):
    """(ops, host syncs) per step of fn(), which runs `steps` steps, with bf16 autocast where the scripts autocast
    (bf16_regions; on the CPU too: the op stream of a CUDA bf16 step, casts included). A training loop
    (common.Meter.log every step) is counted in its steady state, from its second log call to its second-to-last
    (whole steps: backward, optimizer, the next forwards; its meter prints, and reads, only at the first and the last
    step: steps >= 4); anything else as the whole call / steps."""
    import common
    from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook
    mode, marks = OpCounter(), []
    log, tolist = common.Meter.log, torch.Tensor.tolist

    def marked_log(self, epoch, it, steps, every, **values):  # a line (a read) only at the first and last step
        marks.append((mode.ops, mode.syncs))
        return log(self, epoch, it, steps, 10 ** 6, **values)

    def counted_tolist(t):
        mode.sync("tolist")
        return tolist(t)

    def optimizer_flag(on):
        def hook(*a):
            mode.in_optimizer = on
        return hook

    hooks = [register_optimizer_step_pre_hook(optimizer_flag(True)), register_optimizer_step_post_hook(optimizer_flag(False))]
    common.Meter.log, torch.Tensor.tolist = marked_log, counted_tolist
    try:
        with bf16_regions(), mode:
            fn()
    finally:
        common.Meter.log, torch.Tensor.tolist = log, tolist
        for h in hooks:
            h.remove()
    if len(marks) >= 4:
        (o1, s1), (o2, s2) = marks[1], marks[-2]
        return (o2 - o1) / (len(marks) - 3), (s2 - s1) / (len(marks) - 3)
    return mode.ops / steps, mode.syncs / steps


def profiled_ops(fn, steps, device):
    """Host dispatches per step as the profiler sees them, which works under torch.compile too (a dispatch mode makes
    dynamo run eagerly): on CUDA the kernel launches and copies; elsewhere the outermost aten ops (an op's own
    sub-ops not counted again; an extern kernel or an allocation inside a compiled graph counted) plus every call of
    one of inductor's C++ kernels (visible to the profiler with inductor's config.cpp.enable_kernel_profile, which
    cpu_kernel_profile() sets before compiling: the CPU proxy of a compiled GPU step's launches). With bf16 autocast
    where the scripts autocast, as count_per_step; the whole call / steps."""
    from torch.profiler import ProfilerActivity, profile
    with bf16_regions(), profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    events = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CPU]
    if device.type == "cuda":
        n = sum(e.name.startswith(("cudaLaunchKernel", "cuLaunchKernel", "cudaMemcpyAsync")) for e in events)
    else:
        def outermost_aten(e):
            p = e.cpu_parent
            while p is not None:
                if p.name.startswith("aten::"):
                    return False
                p = p.cpu_parent
            return True
        n = sum(e.name.startswith("aten::") and outermost_aten(e) or "cpp_fused" in e.name for e in events)
    return n / steps


def cpu_kernel_profile():
    """Inductor's C++ kernels compiled from now on appear in the profiler (each call one event), for profiled_ops."""
    import torch._inductor.config
    torch._inductor.config.cpp.enable_kernel_profile = True


def report_counts(title, rows, target=None):
    """rows: (name, ops per step, host syncs per step); the first row is the reference of the ratios (the parts).
    target: (row index, bound) on that row's ops ratio."""
    print(f"\n{title}  [ops and host syncs per step, bf16 autocast: the host's work of a launch-bound GPU step]")
    ref = rows[0][1]
    for name, ops, syncs in rows:
        print(f"  {name:<46} {ops:8.0f} ops  {syncs:5.1f} syncs  x{ops / ref:.3f}")
    if target is not None:
        i, bound = target
        r = rows[i][1] / ref
        print(f"  target: {rows[i][0].strip()} ops x{r:.3f} <= {bound}, 0 syncs: "
              f"{'met' if r <= bound and rows[i][2] == 0 else 'MISSED'}")
    sys.stdout.flush()


def optimizer_step(loss, optimizer, scaler):
    """The end of a plain training step, as the scripts end theirs: scaled backward, step, scaler update, zero_grad."""
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)


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
