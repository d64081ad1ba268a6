"""Model-level correctness against references nobody here wrote.

- llama2.c: run.c's greedy generations and the NumPy float64 logits in ../shared/data
  (stated tolerance 1e-4 absolute, see MANIFEST.md 2.5);
- transformers: random LlamaForCausalLM checkpoints (fp32 and bf16 weights; MHA/GQA; tied and
  untied; rope theta 1e4/5e5; hidden 200) — logits within 1e-4 for fp32 weights and 1e-2 for
  bf16 weights (transformers runs in float32 on the same weights), 64 greedy tokens identical.

Qwen2, Qwen3 and Mistral (sliding window) in the same style: tests/test_architectures.py.
"""
import json

import numpy as np
import pytest

import xllm

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.slow


def _jsonl(path):
    return [json.loads(line) for line in open(path, encoding="utf-8") if line.strip()]


@pytest.fixture(scope="module")
def stories(data_dir):
    d = data_dir / "llama2c"
    return xllm.load(d / "stories260K.bin", tokenizer=d / "tok512.bin", kv_dtype="float32")


def test_stories260k_logits(stories, data_dir):
    d = data_dir / "llama2c"
    tokens = json.load(open(d / "stories260K_logits_tokens.json"))["tokens"]
    ref = np.load(d / "stories260K_logits_all.npy")
    got = stories.logits(tokens)
    assert got.shape == ref.shape and got.dtype == np.float32
    assert np.abs(got - ref).max() <= 1e-4


def test_stories260k_hf_dir_matches_bin(stories, data_dir):
    hf = xllm.load(data_dir / "llama2c" / "stories260K_hf", kv_dtype="float32")
    tokens = json.load(open(data_dir / "llama2c" / "stories260K_logits_tokens.json"))["tokens"]
    ref = np.load(data_dir / "llama2c" / "stories260K_logits_all.npy")
    assert np.abs(hf.logits(tokens) - ref).max() <= 1e-4


@pytest.mark.parametrize("name,tok", [("stories260K", "tok512.bin"),
                                      ("aidreams260K", "aidreams260K_tok512.bin")])
def test_llama2c_greedy(name, tok, data_dir):
    d = data_dir / "llama2c"
    model = xllm.load(d / f"{name}.bin", tokenizer=d / tok, kv_dtype="float32")
    for case in _jsonl(d / f"{name}_greedy.jsonl"):
        ids = model.tokenizer.encode(case["prompt"], add_bos=True)
        assert ids == case["prompt_tokens"]
        n = case["steps"] + 1 - len(ids)
        text = model.generate(case["prompt"], max_new_tokens=n)
        assert model.last_stats["tokens"] == case["generated_tokens"], case["prompt"]
        assert case["stdout"].startswith(case["prompt"])
        assert case["prompt"] + text + "\n" == case["stdout"]


def _hf_from_llama2c(model):
    """A transformers model with the llama2.c weights, q/k rows permuted to rotate_half."""
    c, tr = model.config, model.transformer
    cfg = transformers.LlamaConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_layers, num_attention_heads=c.num_heads,
        num_key_value_heads=c.num_kv_heads, max_position_embeddings=c.max_seq_len,
        rms_norm_eps=c.rms_norm_eps, tie_word_embeddings=True)
    hf = transformers.LlamaForCausalLM(cfg).eval()

    def perm(w, heads):
        return w.reshape(heads, -1, 2, w.shape[1]).transpose(0, 2, 1, 3).reshape(w.shape)

    sd = {"model.embed_tokens.weight": tr.tok_embeddings, "model.norm.weight": tr.norm}
    for i, L in enumerate(tr.layers):
        p = f"model.layers.{i}."
        sd.update({p + "self_attn.q_proj.weight": perm(L.wq, c.num_heads),
                   p + "self_attn.k_proj.weight": perm(L.wk, c.num_kv_heads),
                   p + "self_attn.v_proj.weight": L.wv, p + "self_attn.o_proj.weight": L.wo,
                   p + "mlp.gate_proj.weight": L.w1, p + "mlp.down_proj.weight": L.w2,
                   p + "mlp.up_proj.weight": L.w3, p + "input_layernorm.weight": L.attention_norm,
                   p + "post_attention_layernorm.weight": L.ffn_norm})
    hf.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in sd.items()}, strict=False)
    hf.tie_weights()
    return hf


def test_aidreams260k_logits_vs_transformers(data_dir):
    d = data_dir / "llama2c"
    model = xllm.load(d / "aidreams260K.bin", tokenizer=d / "aidreams260K_tok512.bin",
                      kv_dtype="float32")
    tokens = [1] + _jsonl(d / "aidreams260K_greedy.jsonl")[0]["generated_tokens"][:100]
    with torch.no_grad():
        ref = _hf_from_llama2c(model)(torch.tensor([tokens])).logits[0].numpy()
    assert np.abs(model.logits(tokens) - ref).max() <= 1e-4


CASES = {
    # name: (LlamaConfig overrides, weight dtype)
    "mha-tied-fp32": (dict(hidden_size=200, num_attention_heads=4, num_key_value_heads=4,
                           tie_word_embeddings=True), "float32"),
    "gqa-untied-fp32-theta5e5": (dict(hidden_size=200, num_attention_heads=4,
                                      num_key_value_heads=2, rope_theta=500000.0), "float32"),
    "gqa-untied-bf16": (dict(hidden_size=200, num_attention_heads=4, num_key_value_heads=2),
                        "bfloat16"),
    "mha-tied-bf16-theta5e5": (dict(hidden_size=120, num_attention_heads=6, num_key_value_heads=6,
                                    tie_word_embeddings=True, rope_theta=500000.0), "bfloat16"),
    "4layers-vocab32000-gqa": (dict(hidden_size=256, num_attention_heads=8, num_key_value_heads=2,
                                    num_hidden_layers=4, vocab_size=32000), "float32"),
}


def _random_hf(tmp_path_factory, overrides, dtype):
    base = dict(vocab_size=1000, hidden_size=200, intermediate_size=300, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
                rms_norm_eps=1e-5, tie_word_embeddings=False, initializer_range=0.1,
                bos_token_id=1, eos_token_id=2)
    base.update(overrides)
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**base)).eval()
    with torch.no_grad():  # norms away from exactly 1 so their weights matter
        for n, p in hf.named_parameters():
            if "norm" in n:
                p.add_(torch.randn_like(p) * 0.1)
    path = tmp_path_factory.mktemp("hf")
    hf.to(getattr(torch, dtype)).save_pretrained(path)
    ref = transformers.LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return path, ref


@pytest.mark.parametrize("case", sorted(CASES))
def test_transformers_parity(case, tmp_path_factory):
    overrides, dtype = CASES[case]
    path, ref = _random_hf(tmp_path_factory, overrides, dtype)
    model = xllm.load(path, kv_dtype="float32")
    assert model.transformer.layers[0].wq.dtype == (np.float32 if dtype == "float32" else np.uint16)
    rng = np.random.default_rng(1)
    ids = [int(i) for i in rng.integers(0, model.config.vocab_size, 48)]
    with torch.no_grad():
        want = ref(torch.tensor([ids])).logits[0].numpy()
    got = model.logits(ids)
    tol = 1e-4 if dtype == "float32" else 1e-2
    assert np.abs(got - want).max() <= tol
    assert (got.argmax(-1) == want.argmax(-1)).all()
    # 64 greedy tokens: transformers' own KV-cache loop vs xllm.generate (EOS not special here)
    model.config.eos_token_id = None
    with torch.no_grad():
        out = ref(torch.tensor([ids[:8]]), use_cache=True)
        want_tokens = []
        for _ in range(64):
            tok = int(out.logits[0, -1].argmax())
            want_tokens.append(tok)
            out = ref(torch.tensor([[tok]]), past_key_values=out.past_key_values, use_cache=True)
    model.generate(ids[:8], max_new_tokens=64)
    assert model.last_stats["tokens"] == want_tokens


def test_meta_checkpoint_matches_transformers(tmp_path_factory):
    """Meta's layout (params.json + consolidated.00.pth, interleaved q/k rows) through the
    interleaved RoPE path gives transformers' logits for the same weights."""
    path, ref = _random_hf(tmp_path_factory, dict(hidden_size=128, num_attention_heads=4,
                                                  num_key_value_heads=2), "float32")
    c = ref.config
    hd = c.hidden_size // c.num_attention_heads

    def unperm(w, heads):  # HF rotate_half rows -> Meta's interleaved pairs
        return w.reshape(heads, 2, hd // 2, -1).transpose(1, 2).reshape(w.shape).contiguous()

    sd = {"tok_embeddings.weight": ref.model.embed_tokens.weight, "norm.weight": ref.model.norm.weight,
          "output.weight": ref.lm_head.weight}
    for i, L in enumerate(ref.model.layers):
        p, a, f = f"layers.{i}.", L.self_attn, L.mlp
        sd.update({p + "attention.wq.weight": unperm(a.q_proj.weight, c.num_attention_heads),
                   p + "attention.wk.weight": unperm(a.k_proj.weight, c.num_key_value_heads),
                   p + "attention.wv.weight": a.v_proj.weight, p + "attention.wo.weight": a.o_proj.weight,
                   p + "feed_forward.w1.weight": f.gate_proj.weight,
                   p + "feed_forward.w2.weight": f.down_proj.weight,
                   p + "feed_forward.w3.weight": f.up_proj.weight,
                   p + "attention_norm.weight": L.input_layernorm.weight,
                   p + "ffn_norm.weight": L.post_attention_layernorm.weight})
    meta = tmp_path_factory.mktemp("meta")
    torch.save({k: v.detach().clone() for k, v in sd.items()}, meta / "consolidated.00.pth")
    (meta / "params.json").write_text(json.dumps(
        {"dim": c.hidden_size, "n_layers": c.num_hidden_layers, "n_heads": c.num_attention_heads,
         "n_kv_heads": c.num_key_value_heads, "vocab_size": c.vocab_size,
         "norm_eps": c.rms_norm_eps, "rope_theta": 10000.0}))
    model = xllm.load(meta, kv_dtype="float32")
    assert model.config.rope_interleaved
    ids = [int(i) for i in np.random.default_rng(2).integers(0, c.vocab_size, 40)]
    with torch.no_grad():
        want = ref(torch.tensor([ids])).logits[0].numpy()
    assert np.abs(model.logits(ids) - want).max() <= 1e-4
