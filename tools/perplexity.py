"""Perplexity of a model on a text file, the way llama.cpp's ``llama-perplexity`` measures it.

    python tools/perplexity.py --model smollm2-135m-instruct --text benchmarks/texts/alice.txt
    python tools/perplexity.py --model q6_k.gguf --text benchmarks/texts/alice.txt --vs-llama-cpp
    python tools/perplexity.py --model stories260K.bin --tokenizer tok512.bin --text FILE \\
        --ctx 256 --max-chunks 4 --json

Method (llama.cpp's default ``perplexity`` convention, so figures are comparable):

1. The whole text is tokenized once, without BOS.
2. The ids are cut into consecutive, non-overlapping chunks of ``ctx`` tokens; a last partial
   chunk is dropped (``--max-chunks K`` keeps only the first K).
3. Each chunk is evaluated on its own, from an empty KV cache. When the model asks for a BOS
   token (its tokenizer's ``add_bos_default``: Llama/SentencePiece models do, SmolLM2 does
   not), the chunk's first token is replaced by BOS.
4. Only the second half of each chunk is scored: with ``first = ctx // 2``, the logits at
   positions ``first .. ctx-2`` predict the tokens at ``first+1 .. ctx-1``, so each chunk
   scores ``ctx - 1 - first`` tokens (255 for ctx=512), every one with more than ctx/2 tokens
   of context.
5. The negative log-likelihood of each scored token is computed with a log-softmax in float64.
   ``ppl = exp(mean NLL)``; its uncertainty is ``ppl * stderr(NLL)``, where
   ``stderr = std(NLL, ddof=1) / sqrt(N)`` over the N scored tokens (the same estimate as
   llama.cpp's ``PPL = X +/- S``).

One difference from ``llama-perplexity``: it tokenizes the text with a leading BOS when the model
asks for one, which shifts its chunk boundaries by one token; here the text is tokenized without
it (step 1), so for such models the figures can differ slightly.

A running perplexity is printed to stderr after each chunk, the result to stdout (``--json``:
one JSON object). Errors (text shorter than ctx tokens, ctx above the model's max_seq_len,
ctx < 3) exit with status 2 and one line on stderr.
"""
import argparse
import json
import math
import sys
import time

import numpy as np


def default_add_bos(model) -> bool:
    """Whether chunks start with BOS: the tokenizer's choice, else whether the config has one."""
    bos = model.config.bos_token_id
    if bos is None or bos < 0:
        return False
    tok = model.tokenizer
    return bool(getattr(tok, "add_bos_default", True)) if tok is not None else True


def token_nll(logits, targets) -> np.ndarray:
    """-log softmax(logits)[target] per row, in float64. logits [n, vocab], targets [n]."""
    x = np.asarray(logits, np.float64)
    m = x.max(axis=1, keepdims=True)
    lse = np.log(np.exp(x - m).sum(axis=1)) + m[:, 0]
    return lse - x[np.arange(len(x)), np.asarray(targets)]


def summarize(nll, ctx, chunks) -> dict:
    """ppl, its standard error and the counts, from the per-token NLLs."""
    nll = np.asarray(nll, np.float64)
    mean = float(nll.mean())
    ppl = math.exp(mean)
    se = float(nll.std(ddof=1) / math.sqrt(nll.size)) if nll.size > 1 else float("nan")
    return {"ppl": ppl, "stderr": ppl * se, "nll": mean, "tokens": int(nll.size),
            "chunks": int(chunks), "ctx": int(ctx)}


def perplexity(model, ids, ctx, *, max_chunks=None, add_bos=None, progress=None) -> dict:
    """Perplexity of `model` on token ids `ids` with windows of `ctx` tokens (see module doc).

    `model` needs ``.logits(ids) -> [len(ids), vocab]`` and ``.config``; add_bos=None follows
    :func:`default_add_bos`. `progress(chunk_index, n_chunks, running_ppl)` is called after each
    chunk. Returns {"ppl", "stderr", "nll", "tokens", "chunks", "ctx", "add_bos"}, where
    "tokens" counts the scored tokens. Raises ValueError when ctx is out of range or `ids`
    holds fewer than ctx tokens.
    """
    ids = np.asarray(ids, np.int64).reshape(-1)
    ctx = int(ctx)
    if ctx < 3:
        raise ValueError(f"ctx must be at least 3 (a chunk scores ctx - 1 - ctx//2 tokens), "
                         f"got {ctx}")
    max_len = model.config.max_seq_len
    if ctx > max_len:
        raise ValueError(f"ctx {ctx} is above the model's max_seq_len {max_len}")
    n_chunks = len(ids) // ctx
    if n_chunks == 0:
        raise ValueError(f"the text has {len(ids)} tokens, fewer than ctx={ctx}")
    if max_chunks is not None:
        if max_chunks < 1:
            raise ValueError(f"max_chunks must be >= 1, got {max_chunks}")
        n_chunks = min(n_chunks, int(max_chunks))
    if add_bos is None:
        add_bos = default_add_bos(model)
    bos = model.config.bos_token_id
    first = ctx // 2
    nlls = []
    for c in range(n_chunks):
        chunk = ids[c * ctx:(c + 1) * ctx].copy()
        if add_bos:
            chunk[0] = bos
        logits = model.logits(chunk)
        nlls.append(token_nll(logits[first:ctx - 1], chunk[first + 1:ctx]))
        if progress is not None:
            progress(c, n_chunks, math.exp(np.concatenate(nlls).mean()))
    out = summarize(np.concatenate(nlls), ctx, n_chunks)
    out["add_bos"] = bool(add_bos)
    return out


class LlamaCppLogits:
    """llama.cpp (llama-cpp-python) on a GGUF file, with the ``.logits(ids)`` and ``.config``
    that :func:`perplexity` needs: every row's logits of one chunk evaluated from an empty KV
    cache, on the ids xllm's tokenizer gave (so both engines score the same tokens)."""

    def __init__(self, path, ctx, threads, config):
        from llama_cpp import Llama
        self.config = config
        self.llm = Llama(model_path=path, n_ctx=ctx, n_batch=ctx, n_ubatch=ctx,
                         logits_all=True, n_threads=threads, verbose=False)

    def logits(self, ids):
        self.llm.reset()
        self.llm.eval([int(i) for i in ids])
        return np.array(self.llm.scores[:len(ids)], np.float32)


def compare_llama_cpp(model, path, ids, ctx, threads, max_chunks, add_bos) -> dict:
    """llama.cpp's perplexity on the same ids and chunks, and the largest difference between
    its logits and xllm's on the first chunk."""
    other = LlamaCppLogits(path, ctx, threads or 2, model.config)
    res = perplexity(other, ids, ctx, max_chunks=max_chunks, add_bos=add_bos)
    chunk = np.asarray(ids[:ctx], np.int64).copy()
    if add_bos:
        chunk[0] = model.config.bos_token_id
    diff = np.abs(model.logits(chunk) - other.logits(chunk))
    return {"ppl": res["ppl"], "stderr": res["stderr"], "max_logit_diff": float(diff.max()),
            "mean_logit_diff": float(diff.mean())}


def _fail(msg):
    print(f"perplexity: error: {msg}", file=sys.stderr)
    return 2


def main(argv=None) -> int:
    from xllm.formats.qtensor import add_activation_parts_option
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="anything xllm.load accepts (path or name)")
    p.add_argument("--tokenizer", help="tokenizer file, for checkpoints that carry none")
    p.add_argument("--text", required=True, help="UTF-8 text file")
    p.add_argument("--ctx", type=int, default=512, help="tokens per chunk (default 512)")
    p.add_argument("--threads", type=int, default=None, help="kernel threads (default: all)")
    p.add_argument("--max-chunks", type=int, default=None, help="score only the first K chunks")
    p.add_argument("--json", action="store_true", help="print a JSON object")
    add_activation_parts_option(p)
    p.add_argument("--kv-dtype", default="float32", choices=["float32", "float16"],
                   help="KV cache storage (default float32: the figure measures the weights)")
    p.add_argument("--vs-llama-cpp", action="store_true",
                   help="also llama.cpp's perplexity of the same GGUF on the same ids, and the "
                        "largest logit difference on the first chunk (needs llama-cpp-python)")
    args = p.parse_args(argv)

    import xllm
    try:
        with open(args.text, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        return _fail(f"cannot read {args.text}: {e}")
    try:
        model = xllm.load(args.model, tokenizer=args.tokenizer, threads=args.threads,
                          kv_dtype=args.kv_dtype, activation_parts=args.activation_parts)
    except Exception as e:  # noqa: BLE001 - one clear line for any load failure
        return _fail(f"cannot load {args.model}: {e}")
    if model.tokenizer is None:
        return _fail(f"{args.model} has no tokenizer: pass --tokenizer PATH")
    if args.ctx < 3 or args.ctx > model.config.max_seq_len:
        return _fail(f"--ctx must be in [3, {model.config.max_seq_len}] (the model's "
                     f"max_seq_len), got {args.ctx}")
    ids = model.tokenizer.encode(text, add_bos=False)
    if len(ids) < args.ctx:
        return _fail(f"{args.text} has {len(ids)} tokens, fewer than --ctx {args.ctx}")

    def progress(i, n, ppl):
        print(f"[{i + 1}/{n}] running ppl {ppl:.4f}", file=sys.stderr, flush=True)

    t0 = time.perf_counter()
    try:
        res = perplexity(model, ids, args.ctx, max_chunks=args.max_chunks, progress=progress)
    except ValueError as e:
        return _fail(str(e))
    seconds = time.perf_counter() - t0
    if args.vs_llama_cpp:
        res["llama_cpp"] = compare_llama_cpp(model, args.model, ids, args.ctx, args.threads,
                                             args.max_chunks, res["add_bos"])
    if args.json:
        stderr = res["stderr"] if math.isfinite(res["stderr"]) else None
        print(json.dumps({"ppl": res["ppl"], "stderr": stderr, "tokens": res["tokens"],
                          "chunks": res["chunks"], "ctx": res["ctx"], "seconds": seconds,
                          "model": args.model, "text_tokens": len(ids),
                          "add_bos": res["add_bos"], "llama_cpp": res.get("llama_cpp")}))
    else:
        print(f"perplexity: {res['ppl']:.4f} ± {res['stderr']:.4f} ({res['tokens']} tokens "
              f"scored, {res['chunks']} chunks of {res['ctx']}, model {args.model}, "
              f"{seconds:.1f} s)")
        if args.vs_llama_cpp:
            other = res["llama_cpp"]
            print(f"llama.cpp:  {other['ppl']:.4f} ± {other['stderr']:.4f} (same tokens); "
                  f"first chunk's logits differ by at most {other['max_logit_diff']:.4f} "
                  f"(mean {other['mean_logit_diff']:.5f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
