"""Command line: ``python -m xllm.generate --model PATH --prompt TEXT``.

Streams the continuation to stdout and prints one summary line to stderr (prompt tokens and
prefill tok/s, generated tokens and decode tok/s). Errors are one line on stderr, exit code 2.
"""
import argparse
import sys

from .errors import XLLMError


def _parser():
    p = argparse.ArgumentParser(prog="python -m xllm.generate", description="Generate text with xllm.")
    p.add_argument("--model", required=True, help="HF directory, llama2.c .bin or Meta directory")
    p.add_argument("--tokenizer", help="tokenizer file (.model or llama2.c .bin) if not found "
                                       "next to the model")
    p.add_argument("--prompt", default="", help="text to continue")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--threads", type=int, help="kernel threads (default: all usable cores)")
    p.add_argument("--echo", action="store_true", help="print the prompt before the continuation")
    return p


def main(argv=None):
    """Entry point of ``python -m xllm.generate``."""
    args = _parser().parse_args(argv)
    from . import load
    try:
        model = load(args.model, tokenizer=args.tokenizer, threads=args.threads)
        if args.echo:
            sys.stdout.write(args.prompt)
        for piece in model.generate(
                args.prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                repetition_penalty=args.repetition_penalty, seed=args.seed, stop=args.stop,
                stream=True):
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
    except (XLLMError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    s = model.last_stats
    pre = s["prompt_tokens"] / max(s["prefill_seconds"], 1e-9)
    dec = s["decode_steps"] / s["decode_seconds"] if s["decode_seconds"] else 0.0
    print(f"prompt: {s['prompt_tokens']} tokens, {pre:.1f} tok/s | generated: {s['generated']} "
          f"tokens, {dec:.1f} tok/s | threads: {model.threads}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
