"""Figures of the JSON records written by tools/benchmark.py and tools/benchmark_batch.py.

    python tools/plot_benchmarks.py [--results benchmarks/results] [--out DIR]

- speed: prefill and decode tok/s of xllm beside its peers (llama.cpp, transformers), one group
  of bars per model and weight format (one record of tools/benchmark.py each);
- batch: aggregate decode and overall tok/s against the batch size, xllm beside llama.cpp's
  batch API where the records have it (records of tools/benchmark_batch.py of one model).

Each figure's title names the host (CPU, threads) and the date of its records. The docs draw
them at build time (docs/performance.rst and docs/batching.rst, through matplotlib's plot
directive) from the records committed in benchmarks/results/. Needs matplotlib (the ``docs``
extra).
"""
import argparse
import json
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"
# Engines in the order their bars are drawn, and their colours.
ENGINES = {"xllm": "tab:blue", "llama.cpp": "tab:orange", "torch fp32": "tab:gray",
           "torch bf16": "tab:green"}


def load_records(folder=RESULTS, tool=None):
    """The JSON records in `folder` (sorted by file name), only those of `tool` if given."""
    records = []
    for path in sorted(Path(folder).glob("*.json")):
        record = json.loads(path.read_text(encoding="utf-8"))
        if tool is None or record.get("tool") == tool:
            records.append(record)
    return records


def host_line(records):
    """One line naming the hosts, dates and load averages (1 minute, when each record was
    written) of `records`."""
    hosts = sorted({f"{r['host']['cpu']} ({r['host']['usable_cpus']} cores)" for r in records})
    dates = sorted({r["date"][:10] for r in records})
    shared = " (shared machine)" if any("shared" in r.get("note", "") for r in records) else ""
    loads = [r["host"]["load_average"][0] for r in records if r["host"].get("load_average")]
    load = f", load average {min(loads):.1f}-{max(loads):.1f}" if loads else ""
    return ("; ".join(hosts) + ", " + " to ".join(dict.fromkeys([dates[0], dates[-1]])) + shared
            + load)


def _label(record):
    """The group label of a tools/benchmark.py record: model, weight format, threads."""
    threads = "1 thread" if record["threads"] == 1 else f"{record['threads']} threads"
    return f"{record['model']['name']}\n{record['model']['format']}, {threads}"


def speed_figure(records=None):
    """Bars of prefill and decode tok/s per engine, grouped by model and format."""
    import matplotlib.pyplot as plt
    records = load_records(tool="benchmark") if records is None else records
    if not records:
        raise ValueError("no records of tools/benchmark.py")
    fig, axes = plt.subplots(1, 2, figsize=(max(10, 3.6 * len(records)), 4.4))
    engines = [e for e in ENGINES if any(e in r["engines"] for r in records)]
    width = 0.8 / len(engines)
    for ax, key, title in ((axes[0], "prefill_tok_s", "prefill"),
                           (axes[1], "decode_tok_s", "decode (greedy)")):
        for j, engine in enumerate(engines):
            xs, ys = [], []
            for i, record in enumerate(records):
                figures = record["engines"].get(engine)
                if figures and figures[key] is not None:
                    xs.append(i + (j - (len(engines) - 1) / 2) * width)
                    ys.append(figures[key])
            bars = ax.bar(xs, ys, width, label=engine, color=ENGINES[engine])
            ax.bar_label(bars, fmt="%.0f", fontsize=7)
        ax.set_xticks(range(len(records)), [_label(r) for r in records], fontsize=8)
        ax.set_ylabel("tokens/s (median)")
        ax.set_title(f"{title}: prompt {records[0]['prompt_len']}, "
                     f"{records[0]['new_tokens']} new tokens", fontsize=10)
        ax.margins(y=0.15)
    axes[0].legend(fontsize=8)
    fig.suptitle(host_line(records), fontsize=9)
    fig.tight_layout()
    return fig


def batch_figure(records=None):
    """Aggregate decode and overall tok/s against the batch size (log scale), per engine."""
    import matplotlib.pyplot as plt
    records = load_records(tool="benchmark_batch") if records is None else records
    if not records:
        raise ValueError("no records of tools/benchmark_batch.py")
    records = sorted(records, key=lambda r: r["batch"])
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2))
    series = (("xllm", "xllm_batch"), ("llama.cpp", "llama_cpp_batch"))
    for ax, key, title in ((axes[0], "decode_tok_s", "decode"),
                           (axes[1], "overall_tok_s", "overall")):
        for engine, field in series:
            points = [(r["batch"], r[field][key]) for r in records
                      if field in r and r[field][key] is not None]
            if points:
                xs, ys = zip(*points)
                ax.plot(xs, ys, "o-", label=engine, color=ENGINES[engine])
        ax.set_xscale("log", base=2)
        ax.set_xticks([r["batch"] for r in records], [str(r["batch"]) for r in records])
        ax.set_xlabel("batch size (prompts run together)")
        ax.set_ylabel("tokens/s, all sequences together")
        ax.set_title(f"{title}: {records[0]['model']['name']}, {records[0]['threads']} threads, "
                     f"{records[0]['max_new_tokens']} new tokens", fontsize=10)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(host_line(records), fontsize=9)
    fig.tight_layout()
    return fig


FIGURES = {"speed": speed_figure, "batch": batch_figure}


def main(argv=None):
    from xllm.generate import HelpFormatter
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--results", default=str(RESULTS), metavar="DIR",
                   help="folder of the JSON records")
    p.add_argument("--out", default=".", metavar="DIR", help="where the PNG files go")
    p.add_argument("--figure", choices=sorted(FIGURES), action="append",
                   help="draw only this figure (repeatable; default: all)")
    a = p.parse_args(argv)
    import matplotlib
    matplotlib.use("Agg")
    tools = {"speed": "benchmark", "batch": "benchmark_batch"}
    for name in a.figure or sorted(FIGURES):
        fig = FIGURES[name](load_records(a.results, tools[name]))
        path = Path(a.out) / f"{name}.png"
        fig.savefig(path, dpi=100)
        print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
