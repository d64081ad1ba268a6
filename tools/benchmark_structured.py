"""The cost of constrained decoding: decode tok/s under a JSON schema against unconstrained, at
each batch size (docs/structured.rst).

    python tools/benchmark_structured.py --batch 1 16 --tokens 128 --repeat 3

Each run decodes --tokens tokens for every prompt of the batch, with no stop token, through the
library's generation loop (``xllm.engine.generation.generate_ids``): unconstrained, then under
a JSON schema that cannot finish sooner (an array of 200 small objects). The rate is the tokens
after each prompt's first over the wall time from the first token to the last, so sampling and
the masks count and the prefill does not. Unconstrained and constrained runs alternate, and the
best of --repeat runs of each is kept: on a shared machine the best is the least disturbed.
"""
import argparse
import os
import time

SCHEMA = {"type": "array", "minItems": 200, "maxItems": 200,
          "items": {"type": "object",
                    "properties": {"name": {"type": "string", "maxLength": 12},
                                   "n": {"type": "integer", "minimum": 0, "maximum": 999}},
                    "required": ["name", "n"], "additionalProperties": False}}


def decode_rate(model, batch, tokens, constrained) -> float:
    """Tokens per second after the first of each prompt, `batch` prompts together."""
    from xllm.engine.constraints import Constraint
    from xllm.engine.generation import generate_ids
    from xllm.engine.sampling import Sampler, SamplingParams
    prompts = []
    samplers = []
    matchers = []
    for i in range(batch):
        chat = [{"role": "user", "content": f"List people as JSON, list number {i}."}]
        prompts.append(model.chat_ids(chat))
        samplers.append(Sampler(SamplingParams()))
        constraint = Constraint.json_schema(SCHEMA) if constrained else None
        matchers.append(model.matcher(constraint, tokens))
    count = 0
    first = None
    for _ in generate_ids(model.transformer, prompts, tokens, samplers, frozenset(),
                          vocab_limit=model.vocab_limit, constraints=matchers):
        if first is None:
            first = time.perf_counter()
        count += 1
    return (count - batch) / (time.perf_counter() - first)


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct",
                        help="a model path or a name xllm knows")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 16],
                        help="batch sizes to measure")
    parser.add_argument("--tokens", type=int, default=128, help="tokens decoded per prompt")
    parser.add_argument("--repeat", type=int, default=3,
                        help="runs of each kind; the best is reported")
    parser.add_argument("--threads", type=int, default=None,
                        help="kernel threads (default: all usable cores)")
    args = parser.parse_args(argv)
    import xllm
    model = xllm.load(args.model, threads=args.threads)
    print(f"{args.model}, {model.threads} threads, {args.tokens} tokens per prompt, "
          f"load average {os.getloadavg()[0]:.1f}")
    for batch in args.batch:
        best = {False: 0.0, True: 0.0}
        for _ in range(args.repeat):
            for constrained in (False, True):
                rate = decode_rate(model, batch, args.tokens, constrained)
                best[constrained] = max(best[constrained], rate)
        print(f"batch {batch:3d}: unconstrained {best[False]:7.1f} tok/s, JSON schema "
              f"{best[True]:7.1f} tok/s, ratio {best[True] / best[False]:.3f}")


if __name__ == "__main__":
    main()
