"""Memory of a batched generation run, predicted from the model (or a preset) and measured.

    python -m xllm.memory --model M --batch 16 --prompt-len 1024 --gen-len 64 [--measure]
    python -m xllm.memory --random llama2-7b --dtype fp32 --batch 64 --prompt-len 512 \\
        --gen-len 512 --kv-dtype float32

Weights per group and dtype; the KV rows generation reserves; activations: the Workspace, the
batch's logits and history, the quantized x of a prefill chunk (peak) or a decode step (normal);
runtime: the process without weights (after loading, less the weights copied, for --model)."""
import argparse
import resource
import sys

import numpy as np

from ._kernels.layout import KV_BLOCK
from .config import PRESETS, ModelConfig
from .errors import XLLMError
from .formats.qtensor import PANEL, QTensor, describe
from .formats.registry import EXPANDED_TO, FLOAT, FORMATS, PANELS
from .model.kv_cache import block_rows
from .model.weights import expected_shapes

GROUPS = (("embedding", ("tok_embeddings",)), ("head", ("output", "norm")),
          ("attention", ("wq", "wk", "wv", "wo", "attention_norm")),
          ("MLP", ("w1", "w2", "w3", "ffn_norm")))
# --dtype names: the registry's formats by their short names (int8, int4: Q8_0 and Q4_0, 32-value
# groups with float16 scales), or by the registry's own names.
DTYPE_FORMATS = {"fp32": "F32", "fp16": "F16", "bf16": "BF16", "int8": "Q8_0", "int4": "Q4_0"}
DTYPES = list(DTYPE_FORMATS) + list(FORMATS)
LABELS = {"float32": "float32", "float16": "float16", "uint16": "bfloat16"}


def _group(name):
    return next(g for g, names in GROUPS if name.split(".")[-1] in names)


def weight_table(config, weights=None, dtype="fp32"):
    """{(group, dtype label): bytes}: of loaded `weights`, or computed without allocating for
    matrices of format `dtype` (a name of DTYPES; norms are float32)."""
    table = {}
    for name, shape in expected_shapes(config).items():
        if weights is not None:
            label, nbytes = _loaded_bytes(weights[name])
        elif len(shape) == 1:
            label, nbytes = _format_bytes(FORMATS["F32"], shape)
        else:
            label, nbytes = _format_bytes(FORMATS[DTYPE_FORMATS.get(dtype, dtype)], shape)
        key = (_group(name), label)
        table[key] = table.get(key, 0) + nbytes
    return table


def _loaded_bytes(weight):
    """(label, bytes) of a loaded weight (array or QTensor)."""
    if isinstance(weight, QTensor):
        return weight.kind, weight.nbytes
    return LABELS.get(str(weight.dtype), str(weight.dtype)), weight.nbytes


def _format_bytes(weight_format, shape):
    """(label, bytes) of a weight of `shape` loaded in `weight_format`, from the registry's bytes
    per block. Packed panels round the rows up to a multiple of 16; an EXPANDED format is
    loaded as float32."""
    if weight_format.packing == PANELS:
        rows = -(-shape[0] // PANEL) * PANEL
        label = describe(weight_format.bits, weight_format.block, weight_format.asymmetric,
                         np.float16)
        return label, int(rows * shape[1] * weight_format.bytes_per_weight)
    if weight_format.packing != FLOAT:
        weight_format = EXPANDED_TO
    label = LABELS[weight_format.dtype.name]
    return label, int(np.prod(shape) * weight_format.bytes_per_weight)


def kv_capacity(config, prompt_len, gen_len, initial=256, chunk_rows=512):
    """Rows of a sequence's KVCache: generation reserves prompt + new tokens at once (rounded up
    to whole KV blocks). With a sliding window the cache never holds more than the window, a
    block and a chunk of `chunk_rows` (the Workspace's rows) at once (KVCache)."""
    rows = min(config.max_seq_len, max(prompt_len + gen_len, initial))
    if config.sliding_window is not None:
        rows = min(rows, config.sliding_window + KV_BLOCK + chunk_rows)
    return block_rows(rows)


def activation_bytes(config, batch, prompt_len, rows=512):
    """(peak, normal) bytes of activations for `batch` sequences (see the module docstring)."""
    c = config
    chunk = min(rows, config.max_seq_len)  # rows of a prefill chunk
    workspace = 4 * chunk * (2 * c.hidden_size + 2 * c.q_dim + 2 * c.kv_dim
                             + 2 * c.intermediate_size)
    workspace += 4 * c.vocab_size + 3 * 8 * chunk + 2 * 4 * c.max_seq_len * (c.head_dim // 2)
    per_sequence = 4 * c.vocab_size + 8 * (prompt_len + 1)  # logits row, token history
    widest = max(c.hidden_size, c.q_dim, c.intermediate_size)

    def quantized_x(rows):
        """Bytes of the int8 parts and scales of `rows` rows of x."""
        return rows * (3 * widest + 12 * (widest // 32))
    prefill_rows = min(chunk, batch * prompt_len)
    common = workspace + batch * per_sequence
    return common + quantized_x(prefill_rows), common + quantized_x(batch)


def model_weights(tr):
    """The canonical weight dict of a Transformer (norms as it keeps them)."""
    w = {"tok_embeddings": tr.tok_embeddings, "norm": tr.norm}
    if tr.output is not tr.tok_embeddings:
        w["output"] = tr.output
    for i, layer in enumerate(tr.layers):
        w.update({f"layers.{i}.{n}": getattr(layer, n) for n in layer.__slots__})
    return w


def _owned_bytes(a):
    """Bytes of `a` (array or QTensor) held in anonymous memory (not a view of a mapped file)."""
    if isinstance(a, QTensor):
        return sum(_owned_bytes(x) for x in a.arrays)
    base = a
    while isinstance(base, np.ndarray) and base.base is not None:
        base = base.base
    return a.nbytes if isinstance(base, np.ndarray) and not isinstance(base, np.memmap) else 0


def rss_bytes():
    """This process's resident memory now (bytes)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def report(config, weights_table, batch, prompt_len, gen_len, kv_dtype, runtime):
    """The table as text, and the predicted total (bytes)."""
    weights = sum(weights_table.values())
    cap = kv_capacity(config, prompt_len, gen_len)
    kv = batch * 2 * config.num_layers * cap * config.kv_dim * np.dtype(kv_dtype).itemsize
    peak, normal = activation_bytes(config, batch, prompt_len)
    total = weights + kv + peak + runtime
    rows = [(f"weights {g:10s} {label}", b) for (g, label), b in sorted(weights_table.items())]
    rows += [("weights total", weights), (f"KV cache ({kv_dtype}, {batch} x {cap} rows)", kv),
             ("activations, peak", peak), ("activations, normal", normal),
             ("runtime (process, tokenizer)", runtime), ("total (peak)", total)]
    lines = [f"{'':40s}{'MiB':>10s}"] + [f"{k:40s}{v / 2**20:10.1f}" for k, v in rows]
    return "\n".join(lines), total


def parse_args(argv=None):
    """The parsed command line (parser.error, exit code 2, for --measure with --random)."""
    p = _parser()
    a = p.parse_args(argv)
    if a.measure and a.random:
        p.error("--measure runs a loaded model: use it with --model, not --random")
    return a


def _parser():
    from .generate import HelpFormatter
    p = argparse.ArgumentParser(prog="python -m xllm.memory", description=__doc__,
                                formatter_class=HelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", metavar="PATH|NAME", help="a model path or name xllm loads")
    src.add_argument("--random", choices=sorted(PRESETS), metavar="SHAPE",
                     help="a preset shape, nothing loaded: " + ", ".join(sorted(PRESETS)))
    p.add_argument("--dtype", default="fp32", choices=DTYPES, metavar="FORMAT",
                   help="the format of the matrices of a --random model (int8: Q8_0, int4: "
                        "Q4_0): " + ", ".join(DTYPES))
    p.add_argument("--batch", type=int, default=1, metavar="N", help="sequences generated together")
    p.add_argument("--prompt-len", type=int, default=512, metavar="N",
                   help="prompt tokens per sequence")
    p.add_argument("--gen-len", type=int, default=512, metavar="N",
                   help="new tokens per sequence")
    p.add_argument("--kv-dtype", default="float16", choices=["float16", "float32"],
                   help="storage of the KV cache")
    p.add_argument("--threads", type=int, metavar="N",
                   help="kernel threads (default: all usable cores)")
    p.add_argument("--measure", action="store_true",
                   help="also run the workload and print the measured peak (--model only)")
    return p


def main(argv=None):
    """Entry point of ``python -m xllm.memory``; errors are one line on stderr, exit code 2."""
    a = parse_args(argv)
    try:
        return _run(a)
    except (XLLMError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def _run(a):
    """The report (and the measurement) of parsed arguments `a`."""
    runtime = rss_bytes()
    if a.random:  # computed from the preset: nothing is loaded or allocated
        config = ModelConfig(**PRESETS[a.random])
        table = weight_table(config, dtype=a.dtype)
    else:
        from . import load
        from .hub import check_exists
        check_exists(a.model)
        model = load(a.model, threads=a.threads, kv_dtype=a.kv_dtype)
        config = model.config
        weights = model_weights(model.transformer)
        table = weight_table(config, weights)
        # the process after loading, less the weights it copied: interpreter, tokenizer, heap
        runtime = rss_bytes() - sum(_owned_bytes(w) for w in weights.values())
    text, total = report(config, table, a.batch, a.prompt_len, a.gen_len, a.kv_dtype, runtime)
    print(text)
    if a.measure:
        peak = measure_peak(model, a.batch, a.prompt_len, a.gen_len)
        print(f"{'measured peak RSS':40s}{peak / 2**20:10.1f}   ({peak / total - 1:+.1%} "
              f"against the prediction)")
    return 0


def measure_peak(model, batch, prompt_len, gen_len):
    """Peak resident memory (bytes) after generating `gen_len` tokens for `batch` random
    prompts of `prompt_len` tokens."""
    from .engine.generation import generate_ids
    from .engine.sampling import Sampler, SamplingParams
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, model.config.vocab_size, prompt_len) for _ in range(batch)]
    samplers = [Sampler(SamplingParams()) for _ in prompts]
    for _ in generate_ids(model.transformer, prompts, gen_len, samplers, ()):
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


if __name__ == "__main__":
    raise SystemExit(main())
