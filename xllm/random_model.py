"""Write a random-weight Llama model as a Hugging Face directory (for tests, benchmarks, demos).

    python tools/random_model.py --shape tiny --out /tmp/xllm-tiny [--dtype bf16] [--seed 0]
    (or python -m xllm.random_model ...)

The directory holds config.json, model.safetensors (fp32, fp16 or bf16) and a byte-level
SentencePiece ``tokenizer.model``, so xllm and transformers both load it. Shapes are the presets
of ``xllm.config.PRESETS`` (smollm2-135m, tinyllama-1.1b, llama2-7b, tiny). Only numpy is needed.
"""
import argparse
import json
import os

import numpy as np

from xllm.config import PRESETS
from xllm.files.safetensors import write_safetensors
from xllm.tokenizers import BYTE, CONTROL, NORMAL, UNKNOWN
from xllm.tokenizers.sentencepiece_model import (BPE, NormalizerField, TrainerField,
                                                  write_model_proto)


def to_bf16_bits(a):
    """float32 -> bfloat16 bit patterns (uint16), rounding to nearest even."""
    bits = np.ascontiguousarray(a, np.float32).view(np.uint32)
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)


def write_spm_model(path, vocab_size):
    """A SentencePiece BPE ``tokenizer.model``: <unk> <s> </s>, 256 byte pieces, then letters,
    '▁'+letters and letter pairs as normal pieces (the file format is
    xllm.tokenizers.sentencepiece_model's)."""
    letters = "etaoinshrdlucmfwypvbgkjqxz"
    extra = ["▁"] + list(letters) + ["▁" + c for c in letters] + [a + b for a in letters for b in letters]
    extra += [f"▁w{i}" for i in range(vocab_size)]
    pieces = [("<unk>", 0.0, UNKNOWN), ("<s>", 0.0, CONTROL), ("</s>", 0.0, CONTROL)]
    pieces += [(f"<0x{b:02X}>", 0.0, BYTE) for b in range(256)]
    pieces += [(p, -float(i), NORMAL) for i, p in enumerate(extra[:vocab_size - len(pieces)])]
    if len(pieces) != vocab_size:
        raise ValueError(f"vocab_size must be at least 259, got {vocab_size}")
    trainer = {
        TrainerField.MODEL_TYPE: BPE,
        TrainerField.VOCAB_SIZE: vocab_size,
        TrainerField.BYTE_FALLBACK: True,
        TrainerField.UNK_ID: 0,
        TrainerField.BOS_ID: 1,
        TrainerField.EOS_ID: 2,
        TrainerField.PAD_ID: -1,  # no padding piece
    }
    normalizer = {
        NormalizerField.NAME: "identity",
        NormalizerField.ADD_DUMMY_PREFIX: True,
        NormalizerField.REMOVE_EXTRA_WHITESPACES: False,
    }
    write_model_proto(path, pieces, trainer, normalizer)


DTYPES = {"fp32": np.float32, "fp16": np.float16, "bf16": np.uint16}  # uint16: bfloat16 bits
TORCH_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
# Hugging Face names and shapes of one layer's weights: q, kv, d, f stand for the query and
# key/value widths, the hidden and the feed-forward size.
LAYER_WEIGHTS = (("self_attn.q_proj", ("q", "d")), ("self_attn.k_proj", ("kv", "d")),
                 ("self_attn.v_proj", ("kv", "d")), ("self_attn.o_proj", ("d", "q")),
                 ("mlp.gate_proj", ("f", "d")), ("mlp.up_proj", ("f", "d")),
                 ("mlp.down_proj", ("d", "f")), ("input_layernorm", ("d",)),
                 ("post_attention_layernorm", ("d",)))


def write_random_model(out, shape="tiny", dtype="fp32", seed=0, **overrides):
    """Write a random model of a preset shape to directory `out`; returns `out`."""
    cfg = dict(PRESETS[shape], **overrides)
    os.makedirs(out, exist_ok=True)
    weights = random_weights(cfg, dtype, seed)
    write_safetensors(os.path.join(out, "model.safetensors"), weights)
    with open(os.path.join(out, "config.json"), "w") as fh:
        json.dump(hf_config(cfg, dtype), fh, indent=1)
    write_spm_model(os.path.join(out, "tokenizer.model"), cfg["vocab_size"])
    return out


def random_weights(cfg, dtype, seed):
    """{Hugging Face name: array of `dtype`}: normal weights of standard deviation 0.02, norm
    weights around 1, drawn in file order from one generator seeded with `seed`."""
    rng = np.random.default_rng(seed)
    head_dim = cfg["hidden_size"] // cfg["num_heads"]
    sizes = {"d": cfg["hidden_size"], "f": cfg["intermediate_size"],
             "q": cfg["num_heads"] * head_dim, "kv": cfg["num_kv_heads"] * head_dim}
    vocab = cfg["vocab_size"]

    def tensor(*shape, std=0.02):
        a = rng.standard_normal(shape, dtype=np.float32) * np.float32(std)
        if len(shape) == 1:
            a += 1.0  # norm weights around 1
        if dtype == "bf16":
            return to_bf16_bits(a)
        return a.astype(DTYPES[dtype])

    weights = {"model.embed_tokens.weight": tensor(vocab, sizes["d"])}
    for i in range(cfg["num_layers"]):
        for name, dims in LAYER_WEIGHTS:
            weights[f"model.layers.{i}.{name}.weight"] = tensor(*(sizes[d] for d in dims))
    weights["model.norm.weight"] = tensor(sizes["d"])
    if not cfg.get("tie_word_embeddings", False):
        weights["lm_head.weight"] = tensor(vocab, sizes["d"])
    return weights


def hf_config(cfg, dtype):
    """The config.json of a random model of preset `cfg`."""
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
            "hidden_size": cfg["hidden_size"], "intermediate_size": cfg["intermediate_size"],
            "num_hidden_layers": cfg["num_layers"], "num_attention_heads": cfg["num_heads"],
            "num_key_value_heads": cfg["num_kv_heads"], "vocab_size": cfg["vocab_size"],
            "max_position_embeddings": cfg["max_seq_len"],
            "rope_theta": cfg.get("rope_theta", 10000.0), "rms_norm_eps": 1e-5,
            "tie_word_embeddings": cfg.get("tie_word_embeddings", False),
            "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu",
            "torch_dtype": TORCH_DTYPES[dtype]}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", default="tiny", choices=sorted(PRESETS))
    p.add_argument("--out", required=True)
    p.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"])
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    print(write_random_model(a.out, a.shape, a.dtype, a.seed))


if __name__ == "__main__":
    main()
