"""Greedy tokens of xllm and llama.cpp (llama-cpp-python) on the same GGUF file, side by side.

    python tools/compare_llama_cpp.py --model model-q8_0.gguf --tokens 32
    python tools/compare_llama_cpp.py --model m.gguf --prompt "Once upon a time" --raw

Both engines get the same prompt token ids (xllm's tokenizer; by default the model's chat
template around --prompt). At the first position where the greedy tokens differ, the top two
logits of each engine are printed: a difference at a near-tie (a top-2 gap smaller than the two
engines' logit difference) is explained by rounding, anything else is a bug.
"""
import argparse
import sys

import numpy as np

import xllm


def llama_cpp_greedy(path, ids, n, threads):
    """Greedy continuation of `ids` by llama.cpp: (tokens, the logits before each token)."""
    import llama_cpp
    llm = llama_cpp.Llama(path, n_ctx=len(ids) + n + 8, n_threads=threads,
                          n_threads_batch=threads, verbose=False)
    out, logits = [], []
    llm.eval(ids)
    for _ in range(n):
        row = np.ctypeslib.as_array(llama_cpp.llama_get_logits(llm._ctx.ctx),
                                    (llm.n_vocab(),)).copy()
        logits.append(row)
        out.append(int(row.argmax()))
        llm.eval([out[-1]])
    return out, logits


def xllm_greedy(model, ids, n):
    """The same for xllm: (tokens, logits before each token)."""
    tr = model.transformer
    kv = tr.new_cache()
    row = tr.forward(np.asarray(ids, np.int64), kv)
    out, logits = [], []
    for _ in range(n):
        logits.append(row.copy())
        out.append(int(row.argmax()))
        row = tr.forward(np.asarray(out[-1:], np.int64), kv)
    return out, logits


def top2(row, tok):
    i = np.argsort(-row)[:2]
    return ", ".join(f"{tok.decode([int(t)])!r} {row[t]:.3f}" for t in i)


def main(argv=None):
    from xllm.generate import HelpFormatter
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--model", required=True, help="a GGUF file")
    p.add_argument("--prompt", default="What is the capital of France?",
                   help="the prompt, in the chat template unless --raw")
    p.add_argument("--raw", action="store_true", help="no chat template")
    p.add_argument("--tokens", type=int, default=32, help="greedy tokens to compare")
    p.add_argument("--threads", type=int, default=2, help="threads of both engines")
    a = p.parse_args(argv)
    model = xllm.load(a.model, threads=a.threads)
    tok = model.tokenizer
    if a.raw or model.chat_template is None:
        ids = tok.encode(a.prompt)
    else:
        from xllm.api import _piece
        from xllm.chat import render_chat
        text = render_chat(model.chat_template, [{"role": "user", "content": a.prompt}],
                           add_generation_prompt=True, bos_token=_piece(tok, tok.bos_id),
                           eos_token=_piece(tok, tok.eos_id))
        ids = tok.encode(text, add_bos=False, parse_special=True)
    mine, my_logits = xllm_greedy(model, ids, a.tokens)
    theirs, their_logits = llama_cpp_greedy(a.model, ids, a.tokens, a.threads)
    print(f"prompt: {len(ids)} tokens; {a.tokens} greedy tokens")
    print(f"  xllm     : {tok.decode(mine)!r}")
    print(f"  llama.cpp: {tok.decode(theirs)!r}")
    diff = next((i for i, (x, y) in enumerate(zip(mine, theirs)) if x != y), None)
    if diff is None:
        print("  identical tokens")
        return 0
    d = np.abs(my_logits[diff] - their_logits[diff]).max()
    print(f"  first difference at token {diff}: max |logit difference| there {d:.3f}")
    print(f"    xllm top 2     : {top2(my_logits[diff], tok)}")
    print(f"    llama.cpp top 2: {top2(their_logits[diff], tok)}")
    return 1


if __name__ == "__main__":
    sys.exit(main())
