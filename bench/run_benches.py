"""Every bench/bench_*.py in one go: each in its own process, with a time limit, all output in one text file.

  python bench/run_benches.py --out bench_gpu.txt              # a GPU: every bench at its --gpu size, 60 s each
  python bench/run_benches.py --cpu --timeout 900 --out f.txt  # the CPU measurement sizes (the benches' defaults)
  python bench/run_benches.py --tiny --out /tmp/tiny.txt       # a CPU smoke run, seconds per bench
  python bench/run_benches.py --only ssta vitkd --out f.txt    # some of them

A bench that fails (an exception: non-zero exit; its time limit; no ratio line printed) is recorded in the file
and in the summary, and the next one runs; the exit status is 1 when any failed. The benches are found by
glob, so a new bench_*.py is run (and tested: test_smoke.py runs this with --tiny) without being listed.
Standard library only.
"""
import argparse
import glob
import os
import re
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

HERE = os.path.dirname(os.path.abspath(__file__))
RATIO = re.compile(r"  x\d+\.\d\d$", re.M)  # the end of a harness.report row: "  x1.04"
SIZES = {"gpu": ["--gpu"], "cpu": [], "tiny": ["--tiny"]}


def benches(only=None):
    """Sorted names of bench/bench_*.py ('ssta' for bench_ssta.py); `only`: a subset, unknown names refused."""
    names = sorted(os.path.basename(p)[len("bench_"):-len(".py")] for p in glob.glob(os.path.join(HERE, "bench_*.py")))
    unknown = sorted(set(only or ()) - set(names))
    if unknown:
        raise SystemExit(f"unknown bench(es) {unknown}; there are {names}")
    return [n for n in names if not only or n in only]


def run_one(name, size="gpu", timeout=60.0, env=None):
    """Run bench_<name>.py at `size` (gpu / cpu / tiny) in a new process group, killed whole after `timeout`
    seconds. -> dict(name, cmd, rc (124: time limit), seconds, ratios (rows printed), ok, output: stdout + stderr)."""
    cmd = [sys.executable, os.path.join(HERE, f"bench_{name}.py"), *SIZES[size]]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", **(env or {})}  # never a download
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=os.path.dirname(HERE), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, errors="replace", start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=timeout)
        rc = proc.returncode
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the bench and its loader workers
        output, _ = proc.communicate()
        output += f"\n[run_benches] killed after the time limit of {timeout:g} s\n"
        rc = 124
    ratios = len(RATIO.findall(output))
    return dict(name=name, cmd=" ".join(cmd), rc=rc, seconds=time.perf_counter() - t, ratios=ratios,
                ok=rc == 0 and ratios > 0, output=output)


def status(r):
    why = ("ok" if r["ok"] else "TIME LIMIT" if r["rc"] == 124 else f"FAILED (exit {r['rc']})" if r["rc"]
           else "FAILED (no ratio line printed)")
    return f"bench_{r['name']}.py: {why}, {r['seconds']:.1f} s, {r['ratios']} ratio rows"


def run_all(names, size="gpu", timeout=60.0, jobs=1, env=None, out=None, echo=print):
    """run_one for every name, `jobs` at a time (1 for measurements: parallel benches disturb each other's timings);
    never stops on a failure. `out`: a text file with every bench's command, status and output, written as they
    finish. -> the results in the order of `names`."""
    results = {}
    f = open(out, "w") if out else None
    try:
        if f:
            f.write(f"# run_benches: {len(names)} bench(es) at size {size}, time limit {timeout:g} s each, "
                    f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        with ThreadPoolExecutor(max(1, jobs)) as pool:
            futures = [pool.submit(run_one, n, size, timeout, env) for n in names]
            for n, fut in zip(names, futures):  # in order; the file gets each as soon as it and those before are done
                try:
                    r = fut.result()
                except Exception as e:  # noqa: BLE001  (the runner itself failed, e.g. no such file: recorded)
                    r = dict(name=n, cmd="", rc=-1, seconds=0.0, ratios=0, ok=False, output=f"[run_benches] {e!r}\n")
                results[n] = r
                echo(status(r))
                if f:
                    f.write(f"\n===== {status(r)}\n$ {r['cmd']}\n{r['output']}")
                    f.flush()
        if f:
            f.write("\n# summary\n" + "".join(f"{status(results[n])}\n" for n in names))
    finally:
        if f:
            f.close()
    return [results[n] for n in names]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="the text file of all the benches' output")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--tiny", action="store_true", help="each bench's --tiny (CPU smoke size) instead of --gpu")
    size.add_argument("--cpu", action="store_true", help="each bench's defaults (CPU measurement) instead of --gpu")
    p.add_argument("--timeout", default=60.0, type=float, help="seconds per bench")
    p.add_argument("--only", nargs="+", default=None, help="bench names, e.g. ssta vitkd")
    p.add_argument("--jobs", default=1, type=int, help="benches at a time (1 for measurements)")
    args = p.parse_args(argv)
    size = "tiny" if args.tiny else "cpu" if args.cpu else "gpu"
    results = run_all(benches(args.only), size, args.timeout, args.jobs, out=args.out)
    failed = [r["name"] for r in results if not r["ok"]]
    print(f"{len(results) - len(failed)} of {len(results)} benches ok" + (f"; failed: {failed}" if failed else "")
          + f"; output in {args.out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
