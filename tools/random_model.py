"""Write a random-weight Llama model as a Hugging Face directory (for tests, benchmarks, demos).

    python tools/random_model.py --shape tiny --out /tmp/xllm-tiny [--dtype bf16] [--seed 0]

The writer lives in the package (xllm/random_model.py), where tests and tools import it."""
import sys

from xllm.random_model import main

if __name__ == "__main__":
    sys.exit(main())
