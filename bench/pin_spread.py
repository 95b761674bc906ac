#!/usr/bin/env python
"""How far the pinned values (bench/pinned_values.json) move across CPU instruction sets (#30).

Runs the suite's pinned tests (`-k pinned`) once per setting, recording what they observe into a file of its own
(PIN_RECORD=1 PIN_FILE=...), then prints the largest relative difference of every entry between the settings and
against the committed file, and the largest per kind (first_step: one step's losses; log: a short run's log lines).
test_smoke.PIN_REL is chosen from these numbers.

    python bench/pin_spread.py                          # avx2 and default (about 1 min each on 2 cores)
    python bench/pin_spread.py --settings default --keep /tmp/pins   # the recorded files kept there
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# ATen's kernels by ATEN_CPU_CAPABILITY; MKL's and oneDNN's matmuls capped to the same instruction set
SETTINGS = {
    "native": {},
    "avx2": {"ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"},
    "default": {"ATEN_CPU_CAPABILITY": "default", "MKL_ENABLE_INSTRUCTIONS": "SSE4_2", "ONEDNN_MAX_CPU_ISA": "SSE41"},
}


def leaves(x, where=""):
    """{path: number} of a nested dict / list of numbers."""
    if isinstance(x, dict):
        return {k: v for key in x for k, v in leaves(x[key], f"{where}.{key}").items()}
    if isinstance(x, list):
        return {k: v for i, y in enumerate(x) for k, v in leaves(y, f"{where}[{i}]").items()}
    return {where: x} if isinstance(x, (int, float)) and not isinstance(x, bool) else {}


def max_rel(a, b):
    """The largest relative difference between two recordings of one entry (inf if their structure differs)."""
    la, lb = leaves(a), leaves(b)
    if la.keys() != lb.keys():
        return float("inf")
    return max((abs(la[k] - lb[k]) / max(abs(la[k]), abs(lb[k]), 1e-12) for k in la), default=0.0)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--settings", nargs="+", default=["avx2", "default"], choices=list(SETTINGS))
    p.add_argument("--keep", default="", help="folder to keep the recorded files in (default: a temporary one)")
    p.add_argument("-k", default="pinned", help="pytest -k expression of the tests that pin")
    args = p.parse_args()
    folder = args.keep or tempfile.mkdtemp(prefix="pins")
    os.makedirs(folder, exist_ok=True)
    runs = {"committed": json.load(open(os.path.join(ROOT, "bench", "pinned_values.json")))}
    for name in args.settings:
        path = os.path.join(folder, f"{name}.json")
        if os.path.exists(path):
            os.remove(path)
        env = {**os.environ, **SETTINGS[name], "PIN_RECORD": "1", "PIN_FILE": path, "HF_HUB_OFFLINE": "1"}
        cmd = [sys.executable, "-c", "import torch; print('capability', torch.backends.cpu.get_cpu_capability())"]
        print(name, subprocess.run(cmd, env=env, capture_output=True, text=True).stdout.strip(), flush=True)
        r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "test_smoke.py", "-k", args.k, "-p", "no:cacheprovider"],
                           cwd=ROOT, env=env, capture_output=True, text=True)
        print("  " + (r.stdout.strip().splitlines() or ["(no output)"])[-1], flush=True)
        if r.returncode:
            sys.exit(f"the pinned tests failed under {name}:\n{r.stdout[-3000:]}")
        runs[name] = json.load(open(path))
    names = list(runs)
    pairs = [(a, b) for i, a in enumerate(names) for b in names[i + 1:]]
    entries = sorted(k for k in runs["committed"] if not k.startswith("_"))
    print(f"\nlargest relative difference per entry ({folder})")
    print(f"{'entry':40s}" + "".join(f"{a + ' / ' + b:>22s}" for a, b in pairs))
    worst = {}
    for e in entries:
        row = [max_rel(runs[a][e], runs[b][e]) if e in runs[a] and e in runs[b] else float("nan") for a, b in pairs]
        print(f"{e:40s}" + "".join(f"{x:22.2e}" for x in row))
        kind = e.split("/")[0]
        worst[kind] = max([worst.get(kind, 0.0)] + [x for x in row if x == x])
    print("\nlargest per kind: " + ", ".join(f"{k} {v:.2e}" for k, v in worst.items()))


if __name__ == "__main__":
    main()
