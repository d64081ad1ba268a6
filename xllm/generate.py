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
# The generation options: (default, one-line help). The defaults are Model.generate's.
_SAMPLING = {
    "max_new_tokens": (256, "stop after this many new tokens"),
    "temperature": (0.0, "sampling temperature; 0 is greedy (always the likeliest token)"),
    "top_k": (0, "sample among the k likeliest tokens only; 0 is no limit"),
    "top_p": (1.0, "sample among the likeliest tokens whose probabilities sum to p"),
    "min_p": (0.0, "drop tokens less likely than min_p x the likeliest one's probability"),
    "repetition_penalty": (1.0, "divide the logits of tokens already seen by this; 1 is off"),
}


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The help of xllm's commands and tools: the description as written (a module docstring),
    and every option's help line ends with its default, unless the default is None or False
    (nothing to show) or the help already names it."""

    def _get_help_string(self, action):
        help = action.help or ""
        default = action.default
        shown = not (default is None or default is False or default == argparse.SUPPRESS
                     or default == [])
        if shown and "default" not in help and action.option_strings:
            help += " (default: %(default)s)"
        return help


def _parser():
    from .formats.qtensor import add_activation_parts_option
    from .hub import DEFAULT_MODEL
    p = argparse.ArgumentParser(prog="python -m xllm.generate", formatter_class=HelpFormatter,
                                description="Generate text with xllm: one prompt (the reply "
                                "streams to stdout,\na summary line to stderr), an interactive "
                                "chat, or a file of prompts as one batch.")
    p.add_argument("--model", default=DEFAULT_MODEL, metavar="PATH|NAME",
                   help="GGUF file, HF directory, llama2.c .bin, Meta directory or a known "
                        "model name")
    p.add_argument("--tokenizer", metavar="PATH",
                   help="tokenizer file if the model has none next to it")
    what = p.add_mutually_exclusive_group()
    what.add_argument("--prompt", metavar="TEXT",
                      help=f"the prompt (default: {DEFAULT_PROMPT!r})")
    what.add_argument("--chat", action="store_true",
                      help="interactive multi-turn chat (/reset starts over, /exit quits)")
    what.add_argument("--batch-file", metavar="FILE",
                      help="generate every non-blank line of FILE as one batch; the outputs "
                           "are printed in order, separated by blank lines")
    p.add_argument("--raw", action="store_true",
                   help="continue the prompt as plain text, without the chat template")
    p.add_argument("--system", metavar="TEXT",
                   help="system message for chat-formatted prompts")
    for name, (default, text) in _SAMPLING.items():
        metavar = "N" if isinstance(default, int) else "X"
        p.add_argument("--" + name.replace("_", "-"), type=type(default), default=default,
                       metavar=metavar, help=text)
    p.add_argument("--seed", type=int, metavar="N",
                   help="random seed of sampling (default: a fresh one each run)")
    p.add_argument("--stop", action="append", default=[], metavar="STR",
                   help="stop before this string; repeat the flag for several")
    p.add_argument("--threads", type=int, metavar="N",
                   help="kernel threads (default: all usable cores)")
    add_activation_parts_option(p)
    p.add_argument("--echo", action="store_true",
                   help="print the prompt before its continuation (one --prompt only)")
    return p


def _check_flags(parser, args):
    """Reject flags that the chosen mode would ignore (parser.error: usage, exit code 2)."""
    if args.echo and (args.chat or args.batch_file):
        parser.error("--echo prints a single --prompt: not with --chat or --batch-file")
    if args.chat and args.raw:
        parser.error("--chat always uses the chat template: not with --raw")
    if args.system is not None and args.raw:
        parser.error("--system is a message of the chat template: not with --raw")


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
            print("(conversation cleared)", file=sys.stderr)
        elif line.strip():
            history.append({"role": "user", "content": line})
            reply = _stream(session.chat(history, stream=True, **kwargs))
            history.append({"role": "assistant", "content": reply})
            _summary(session.last_stats, model.threads)


def main(argv=None):
    """Entry point of ``python -m xllm.generate``."""
    parser = _parser()
    args = parser.parse_args(argv)
    _check_flags(parser, args)
    from . import load
    from .hub import check_exists
    kwargs = {k: getattr(args, k) for k in (*_SAMPLING, "seed", "stop")}
    try:
        check_exists(args.model)
        model = load(args.model, tokenizer=args.tokenizer, threads=args.threads,
                     activation_parts=args.activation_parts)
        if args.chat:
            _chat_loop(model, args.system, kwargs)
            return 0
        if args.batch_file:
            return _batch(model, args, kwargs)
        prompt = DEFAULT_PROMPT if args.prompt is None else args.prompt
        if args.echo:
            sys.stdout.write(prompt)
        _stream(model.generate(_prompt(model, args, prompt), stream=True, **kwargs))
    except (XLLMError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    _summary(model.last_stats, model.threads)
    return 0


def _batch(model, args, kwargs):
    """--batch-file: every non-blank line is a prompt; outputs in order on stdout, separated by
    blank lines; one summary line on stderr."""
    with open(args.batch_file, encoding="utf-8") as f:
        lines = [line.rstrip("\n") for line in f if line.strip()]
    if not lines:
        raise ValueError(f"{args.batch_file}: no prompts (every line is blank)")
    texts = model.generate_batch([_prompt(model, args, line) for line in lines], **kwargs)
    print("\n\n".join(texts))
    _batch_summary(model.last_stats, len(lines), model.threads)
    return 0


def _batch_summary(s, prompts, threads):
    """One line on stderr from a batch's stats dict: aggregate rates over all sequences (the
    decode rate counts the tokens after each sequence's first, which the prefill yields)."""
    pre = s["prompt_tokens"] / max(s["prefill_seconds"], 1e-9)
    decoded = max(s["generated"] - prompts, 0)
    dec = decoded / s["decode_seconds"] if s["decode_seconds"] else 0.0
    print(f"batch: {prompts} prompts | prompt: {s['prompt_tokens']} tokens, {pre:.1f} tok/s | "
          f"generated: {s['generated']} tokens, {dec:.1f} tok/s | threads: {threads}",
          file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
