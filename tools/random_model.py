"""Write a random-weight Llama model as a Hugging Face directory, or straight to a GGUF file of a
llama.cpp file type without a float32 copy (for tests, benchmarks, demos).

    python tools/random_model.py --shape tiny --out /tmp/xllm-tiny [--dtype bf16] [--seed 0]
    python tools/random_model.py --shape llama2-7b --out /tmp/7b-q4_k_m.gguf --type q4_k_m

The writer lives in the package (xllm/random_model.py), where tests and tools import it."""
import sys

from xllm.random_model import main

if __name__ == "__main__":
    sys.exit(main())
