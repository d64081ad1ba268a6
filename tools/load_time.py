"""How long ``import xllm`` and ``xllm.load(MODEL)`` take, each load in a fresh process.

    python tools/load_time.py smollm2-135m-instruct --runs 5
    python tools/load_time.py /models/llama2-7b.Q4_K_M.gguf --runs 5 --json

One untimed load first puts the file in the page cache (a warm load is what is measured; a cold
one depends on the disk). Then ``--runs`` processes each import xllm and load the model once;
for each of the two steps the median wall time and the median CPU time of the process (all its
threads) are reported, with every run's figures. On a busy machine the wall time waits for a
CPU as well and the CPU time is the better guide to an idle machine's wall time; the load
average during the runs is printed beside them. ``--repo DIR`` times the xllm package in DIR (a
checkout of another commit) instead of the one Python would import.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys

# One run: the figures of one fresh process, as a JSON line.
_RUN = r"""
import json, sys, time
wall0, cpu0 = time.perf_counter(), time.process_time()
import xllm
wall1, cpu1 = time.perf_counter(), time.process_time()
xllm.load(sys.argv[1])
wall2, cpu2 = time.perf_counter(), time.process_time()
print(json.dumps({"import": wall1 - wall0, "import_cpu": cpu1 - cpu0,
                  "load": wall2 - wall1, "load_cpu": cpu2 - cpu1, "xllm": xllm.__file__}))
"""
FIGURES = ("import", "import_cpu", "load", "load_cpu")


def run_once(model, repo=None) -> dict:
    """The figures of one fresh process that imports xllm and loads `model`."""
    done = subprocess.run([sys.executable, "-c", _RUN, model], capture_output=True, text=True,
                          cwd=repo)
    if done.returncode:
        raise SystemExit(f"load_time: the run failed:\n{done.stderr.strip()}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure(model, runs, repo=None) -> dict:
    """{figure: {"median": s, "runs": [s, ...]}} over `runs` warm runs, the xllm package timed
    and the load average."""
    run_once(model, repo)  # the page cache
    results = [run_once(model, repo) for _ in range(runs)]
    out = {name: {"median": statistics.median(r[name] for r in results),
                  "runs": [r[name] for r in results]} for name in FIGURES}
    out["xllm"] = results[0]["xllm"]
    out["load_average"] = os.getloadavg()
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", help="a path or a name xllm.load takes")
    p.add_argument("--runs", type=int, default=5,
                   help="timed runs, each in a fresh process (default: 5)")
    p.add_argument("--repo", help="a directory holding the xllm package to time")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    args = p.parse_args(argv)
    if args.runs < 1:
        p.error("--runs must be at least 1")
    result = measure(args.model, args.runs, args.repo)
    if args.json:
        print(json.dumps(result))
        return
    print(f"{args.model} ({result['xllm']}), load average "
          f"{' '.join(f'{x:.2f}' for x in result['load_average'])}")
    for name in FIGURES:
        runs = ", ".join(f"{x:.3f}" for x in result[name]["runs"])
        print(f"  {name:<10} median {result[name]['median']:.3f} s  [{runs}]")


if __name__ == "__main__":
    main()
