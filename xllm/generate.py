"""Command line: ``python -m xllm.generate [--model PATH] [--prompt TEXT] [--chat]``.

With no model it uses the default model (SmolLM2-135M-Instruct, fetched once and cached); with
no prompt it answers a default question. A prompt goes through the model's chat template when it
has one (``--raw`` continues the text as given). The reply streams to stdout and one summary
line goes to stderr (prompt tokens and prefill tok/s, generated tokens and decode tok/s).
Errors are one line on stderr, exit code 2. ``--chat`` is an interactive multi-turn chat."""
import argparse
import sys

from .errors import XLLMError

DEFAULT_PROMPT = "What is the capital of France?"
_SAMPLING = dict(max_new_tokens=256, temperature=0.0, top_k=0, top_p=1.0, min_p=0.0,
                 repetition_penalty=1.0)  # generation options and their defaults


def _parser():
    from .hub import DEFAULT_MODEL
    p = argparse.ArgumentParser(prog="python -m xllm.generate",
                                description="Generate text with xllm.")
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"GGUF file, HF directory, llama2.c .bin, Meta directory or a known model "
                        f"name (default: {DEFAULT_MODEL})")
    p.add_argument("--tokenizer", help="tokenizer file if the model has none next to it")
    p.add_argument("--prompt", help=f"the prompt (default: {DEFAULT_PROMPT!r})")
    p.add_argument("--raw", action="store_true", help="continue the prompt as plain text, "
                                                      "without the chat template")
    p.add_argument("--chat", action="store_true", help="interactive chat (/reset, /exit)")
    p.add_argument("--system", help="system message for chat-formatted prompts")
    for name, default in _SAMPLING.items():
        p.add_argument("--" + name.replace("_", "-"), type=type(default), default=default)
    p.add_argument("--seed", type=int)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--threads", type=int, help="kernel threads (default: all usable cores)")
    p.add_argument("--echo", action="store_true", help="print the prompt before the continuation")
    p.add_argument("--batch-file", help="generate for every line of this file as one batch; "
                   "the outputs are printed in order, separated by blank lines")
    return p


def _summary(s, threads):
    """One line on stderr from a generation's stats dict."""
    pre = (s["prompt_tokens"] - s.get("cached_tokens", 0)) / max(s["prefill_seconds"], 1e-9)
    dec = s["decode_steps"] / s["decode_seconds"] if s["decode_seconds"] else 0.0
    cached = f" ({s['cached_tokens']} cached)" if s.get("cached_tokens") else ""
    print(f"prompt: {s['prompt_tokens']} tokens{cached}, {pre:.1f} tok/s | generated: {s['generated']} "
          f"tokens, {dec:.1f} tok/s | threads: {threads}", file=sys.stderr)


def _stream(pieces):
    """Print pieces as they come; Ctrl-C ends the reply early. Returns the text printed."""
    out = []
    try:
        for piece in pieces:
            print(piece, end="", flush=True)
            out.append(piece)
    except KeyboardInterrupt:
        sys.stdout.write(" [interrupted]")
    finally:
        pieces.close()  # an interrupted reply frees its session for the next turn
    print(flush=True)
    return "".join(out)


def _prompt(model, args, text):
    """`text` as given (with --raw or no chat template), else its ids in the chat template."""
    if model.chat_template is None or args.raw:
        return text
    system = [{"role": "system", "content": args.system}] if args.system else []
    return model.chat_ids(system + [{"role": "user", "content": text}])


def _chat_loop(model, system, kwargs):
    """Multi-turn chat in one session: earlier turns stay in its KV cache (prefix reuse)."""
    session = model.session()
    history = [{"role": "system", "content": system}] if system else []
    print("xllm chat: /reset starts over, /exit quits", file=sys.stderr)
    while True:
        try:
            line = input("> ")
        except (EOFError, KeyboardInterrupt):
            print()
            return
        if line.strip() == "/exit":
            return
        if line.strip() == "/reset":
            history = history[:1] if system else []
            session.reset()
        elif line.strip():
            history.append({"role": "user", "content": line})
            reply = _stream(session.chat(history, stream=True, **kwargs))
            history.append({"role": "assistant", "content": reply})
            _summary(session.last_stats, model.threads)


def main(argv=None):
    """Entry point of ``python -m xllm.generate``."""
    args = _parser().parse_args(argv)
    from . import load
    kwargs = {k: getattr(args, k) for k in (*_SAMPLING, "seed", "stop")}
    try:
        model = load(args.model, tokenizer=args.tokenizer, threads=args.threads)
        if args.chat:
            _chat_loop(model, args.system, kwargs)
            return 0
        if args.batch_file:
            with open(args.batch_file, encoding="utf-8") as f:
                prompts = [_prompt(model, args, line.rstrip("\n")) for line in f if line.strip()]
            print("\n\n".join(model.generate_batch(prompts, **kwargs)))
            return 0
        prompt = DEFAULT_PROMPT if args.prompt is None else args.prompt
        if args.echo:
            sys.stdout.write(prompt)
        _stream(model.generate(_prompt(model, args, prompt), stream=True, **kwargs))
    except (XLLMError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    _summary(model.last_stats, model.threads)
    return 0


if __name__ == "__main__":
    sys.exit(main())
