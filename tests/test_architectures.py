"""Qwen2 (q/k/v biases), Qwen3 (per-head q/k RMSNorm) and Mistral (sliding window) against
transformers, which nobody here wrote: random models saved with ``save_pretrained`` and the same
models converted to GGUF by ``tools/quantize.py --type f32``, loaded by xllm with a float32 KV
cache. Stated tolerances: logits within 1e-4 of transformers' (float32 arithmetic on both sides,
on the same weights: float32, or bfloat16 widened exactly), 64 greedy tokens identical
(transformers' own KV-cache loop). The Mistral case has a window of 32
under a 96-token prompt, so most of its positions see only part of the prompt.

Also: the windowed KV cache releases blocks (bounded memory, same logits as keeping them), and
the bad inputs of these architectures raise ModelFormatError naming the file and the field.
"""
import json
import os
import shutil

import numpy as np
import pytest

import xllm
from xllm.errors import ModelFormatError
from xllm.model.kv_cache import KVCache

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
quantize = pytest.importorskip("quantize")  # tools/ is on pytest's pythonpath

PROMPT = 96
GREEDY = 64

BASE = dict(vocab_size=1000, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
            rms_norm_eps=1e-6, tie_word_embeddings=False, initializer_range=0.1,
            bos_token_id=1, eos_token_id=2)
CASES = {
    # name: (transformers classes, config overrides)
    "qwen2": ("Qwen2", dict(rope_theta=1000000.0)),
    "qwen2-tied": ("Qwen2", dict(tie_word_embeddings=True, num_key_value_heads=4)),
    "qwen3": ("Qwen3", dict(head_dim=48, rope_theta=1000000.0)),  # q width 192 != hidden 128
    "mistral-window32": ("Mistral", dict(sliding_window=32, head_dim=32)),
    "qwen3-bf16": ("Qwen3", dict(head_dim=32, num_attention_heads=8, num_key_value_heads=2)),
}
BF16 = {"qwen3-bf16"}  # saved in bfloat16 (as the real models are)


def _random_hf(path, family, overrides, dtype="float32"):
    """A random transformers model of `family` saved in `dtype` at `path`, its norms and biases
    moved away from their initial 1 and 0 so that every one of them matters; returned as
    transformers reads it back in float32."""
    config = getattr(transformers, f"{family}Config")(**{**BASE, **overrides})
    torch.manual_seed(0)
    cls = getattr(transformers, f"{family}ForCausalLM")
    model = cls(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith(".bias"):
                p.add_(torch.randn_like(p) * 0.1)
    if dtype == "float32":
        model.save_pretrained(path)
        return model
    model.to(getattr(torch, dtype)).save_pretrained(path)
    return cls.from_pretrained(path, dtype=torch.float32).eval()


_BUILT = {}  # case name -> what _build returns, made once per session


def _build(name, tmp_path_factory):
    """(name, transformers model, HF directory, GGUF file) of the case `name`."""
    if name not in _BUILT:
        family, overrides = CASES[name]
        hf_dir = tmp_path_factory.mktemp(name)
        ref = _random_hf(hf_dir, family, overrides, "bfloat16" if name in BF16 else "float32")
        gguf_path = tmp_path_factory.mktemp("gguf") / f"{name}.gguf"
        assert quantize.main(["--model", str(hf_dir), "--out", str(gguf_path), "--type", "f32",
                              "--format", "gguf"]) in (0, None)
        _BUILT[name] = (name, ref, hf_dir, gguf_path)
    return _BUILT[name]


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request, tmp_path_factory):
    """Every case in turn."""
    return _build(request.param, tmp_path_factory)


@pytest.fixture(scope="module")
def mistral(tmp_path_factory):
    return _build("mistral-window32", tmp_path_factory)


@pytest.fixture(scope="module")
def qwen2(tmp_path_factory):
    return _build("qwen2", tmp_path_factory)


def _greedy(ref, ids, n):
    """n greedy tokens from transformers' own KV-cache loop."""
    tokens = []
    with torch.no_grad():
        out = ref(torch.tensor([ids]), use_cache=True)
        for _ in range(n):
            token = int(out.logits[0, -1].argmax())
            tokens.append(token)
            out = ref(torch.tensor([[token]]), past_key_values=out.past_key_values,
                      use_cache=True)
    return tokens


_REFERENCES = {}


def _reference(case):
    """(prompt ids, transformers' logits of the prompt, its greedy continuation)."""
    name, ref, _, _ = case
    if name not in _REFERENCES:
        ids = [int(i) for i in np.random.default_rng(1).integers(3, BASE["vocab_size"], PROMPT)]
        with torch.no_grad():
            logits = ref(torch.tensor([ids])).logits[0].numpy()
        _REFERENCES[name] = (ids, logits, _greedy(ref, ids, GREEDY))
    return _REFERENCES[name]


@pytest.fixture(scope="module")
def reference(case):
    return _reference(case)


@pytest.mark.slow
@pytest.mark.parametrize("source", ["hf", "gguf"])
def test_logits_and_greedy_match_transformers(case, reference, source):
    name, ref, hf_dir, gguf_path = case
    ids, want, want_tokens = reference
    model = xllm.load(hf_dir if source == "hf" else gguf_path, kv_dtype="float32")
    c = model.config
    assert c.attention_bias == name.startswith("qwen2")
    assert c.qk_norm == name.startswith("qwen3")
    assert c.sliding_window == (32 if name.startswith("mistral") else None)
    assert c.rope_interleaved == (source == "gguf" and name.startswith("mistral"))
    got = model.logits(ids)
    assert np.abs(got - want).max() <= 1e-4
    model.config.eos_token_id = None  # EOS is not special here
    model.generate(ids, max_new_tokens=GREEDY)
    assert model.last_stats["tokens"] == want_tokens


@pytest.mark.slow
def test_the_window_matters(case, reference):
    """Without its window (or a Qwen without its biases / q-k norms) the model gives other
    logits: the parity above could not pass by accident."""
    name, _, hf_dir, _ = case
    ids, want, _ = reference
    model = xllm.load(hf_dir, kv_dtype="float32")
    if name.startswith("mistral"):
        model.config.sliding_window = None
    elif name.startswith("qwen2"):
        for layer in model.transformer.layers:
            layer.bq = np.zeros_like(layer.bq)
    else:
        model.config.qk_norm = False
    assert np.abs(model.logits(ids) - want).max() > 1e-2


@pytest.mark.slow
def test_gguf_metadata(case):
    """The GGUF file names the architecture, its sliding window and the extra tensors as
    llama.cpp does (read back with the gguf package)."""
    from gguf import GGUFReader
    name, _, _, gguf_path = case
    reader = GGUFReader(gguf_path)
    arch = {"qwen2": "qwen2", "qwen3": "qwen3", "mistral": "llama"}[name.split("-")[0]]
    assert reader.fields["general.architecture"].contents() == arch
    tensors = {t.name for t in reader.tensors}
    assert ("blk.0.attn_q.bias" in tensors) == (arch == "qwen2")
    assert ("blk.1.attn_k_norm.weight" in tensors) == (arch == "qwen3")
    window = reader.fields.get(f"{arch}.attention.sliding_window")
    assert (window.contents() if window else None) == (32 if arch == "llama" else None)


# ---------------- the windowed KV cache ----------------

def test_windowed_cache_releases_blocks():
    """A cache with a window of 40 fed one row at a time keeps its capacity under window +
    chunk + a block and its offset at the first block a later position can see."""
    kv = KVCache(1, 8, 10000, n_kv_heads=1, initial_capacity=32, window=40, chunk_rows=16)
    for _ in range(1000):
        kv.reserve(1)
        kv.length += 1
        assert kv.capacity <= 40 + 32 + 16 + 32
        assert kv.offset <= max(0, kv.length - 40 + 1)
    assert kv.offset >= 1000 - 40 - kv.capacity
    full = KVCache(1, 8, 10000, n_kv_heads=1, initial_capacity=32)
    full.reserve(1000)
    assert kv.nbytes * 5 < full.nbytes


def test_windowed_cache_keeps_what_the_window_needs():
    """Rows written at their positions stay readable while a later position can see them;
    prefixes whose window reaches released rows are not offered for reuse."""
    kv = KVCache(1, 1, 10000, n_kv_heads=1, initial_capacity=32, window=40, chunk_rows=8)
    for position in range(500):
        kv.reserve(1)
        row = position - kv.offset
        kv.k[0][row // 32, 0, row % 32] = position
        kv.ids[position] = position
        kv.length += 1
        first = max(0, kv.length - 40)  # the next position's window: first .. length
        kept = [kv.k[0][(p - kv.offset) // 32, 0, (p - kv.offset) % 32]
                for p in range(first, kv.length)]
        assert kept == list(range(first, kv.length))
    assert kv.offset > 0
    ids = np.arange(500)
    assert kv.common_prefix(ids) == 500
    assert kv.common_prefix(ids[:kv.offset + 10]) == 0  # its window reaches released rows
    copy = KVCache(1, 1, 10000, n_kv_heads=1, initial_capacity=32, window=40, chunk_rows=8)
    copy.copy_prefix(kv, 490)
    assert copy.length == 490 and copy.offset == kv.offset
    np.testing.assert_array_equal(copy.k[0][:2], kv.k[0][:2])
    plain = KVCache(1, 1, 10000, n_kv_heads=1)  # no window (the engine's caches)
    plain.copy_prefix(kv, 490)  # kv released rows: nothing this cache could hold
    assert plain.length == 0
    young = KVCache(1, 1, 10000, n_kv_heads=1, window=40)  # nothing released yet
    young.reserve(20)
    young.length = 20
    plain.copy_prefix(young, 15)
    assert plain.length == 15 and plain.offset == 0
    kv.truncate(kv.offset + 5)  # cannot continue from there: forgets everything
    assert kv.length == 0 and kv.offset == 0


@pytest.mark.slow
def test_windowed_generation_matches_a_full_cache(mistral):
    """A long greedy run of the Mistral case through a cache that releases blocks gives the
    same logits, bit for bit, as a cache that keeps every row (the window is in the kernel
    either way)."""
    _, _, hf_dir, _ = mistral
    ids, _, _ = _reference(mistral)
    model = xllm.load(hf_dir, kv_dtype="float32")
    tr = model.transformer
    c = model.config
    windowed = KVCache(c.num_layers, c.kv_dim, c.max_seq_len, n_kv_heads=c.num_kv_heads,
                       dtype=np.float32, window=c.sliding_window, chunk_rows=8,
                       initial_capacity=32)
    full = KVCache(c.num_layers, c.kv_dim, c.max_seq_len, n_kv_heads=c.num_kv_heads,
                   dtype=np.float32)
    tokens = list(ids[:8])
    for kv in (windowed, full):
        tr.forward(tokens, kv)
    for token in ids[8:] * 2:  # 8 + 176 positions, decode steps
        a = tr.forward([token], windowed).copy()
        b = tr.forward([token], full).copy()
        np.testing.assert_array_equal(a, b)
    assert windowed.offset > 0 and windowed.capacity < full.capacity


# ---------------- bad input ----------------

def _copy_hf(case, tmp_path):
    """A copy of the case's HF directory, to spoil."""
    _, _, hf_dir, _ = case
    target = tmp_path / "model"
    shutil.copytree(hf_dir, target)
    return target


def _edit_config(directory, **changes):
    path = directory / "config.json"
    raw = json.loads(path.read_text())
    raw.update(changes)
    path.write_text(json.dumps(raw))


@pytest.mark.slow
def test_qwen2_without_biases_is_refused(qwen2, tmp_path):
    """A Qwen2 checkpoint whose q/k/v biases are missing: the file and the tensor are named."""
    from safetensors.numpy import load_file, save_file
    directory = _copy_hf(qwen2, tmp_path)
    weights = load_file(directory / "model.safetensors")
    save_file({k: v for k, v in weights.items() if not k.endswith(".bias")},
              directory / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ModelFormatError, match=r"model: missing tensor "
                                               r"'model\.layers\.0\.self_attn\.q_proj\.bias'"):
        xllm.load(directory)


@pytest.mark.slow
def test_window_larger_than_the_context_is_refused(mistral, tmp_path):
    directory = _copy_hf(mistral, tmp_path)
    _edit_config(directory, sliding_window=4096, max_position_embeddings=2048)
    with pytest.raises(ModelFormatError, match=r"config\.json: sliding_window=4096 is larger "
                                               r"than the context \(max_seq_len=2048\)"):
        xllm.load(directory)
    _edit_config(directory, sliding_window=0)
    with pytest.raises(ModelFormatError, match="config.json: sliding_window must be"):
        xllm.load(directory)


@pytest.mark.slow
def test_gguf_window_larger_than_the_context_is_refused(mistral, tmp_path):
    """The same check for a GGUF file's llama.attention.sliding_window."""
    _, _, _, gguf_path = mistral
    from gguf import GGUFReader
    reader = GGUFReader(gguf_path, "r+")
    reader.fields["llama.attention.sliding_window"].parts[-1][0] = 100000
    data = bytes(reader.data)
    del reader
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(data)
    with pytest.raises(ModelFormatError, match=r"bad\.gguf: sliding_window=100000 is larger"):
        xllm.load(bad)


def test_qwen_partial_sliding_window_is_refused(tmp_path):
    """Qwen's window on only some layers (use_sliding_window with 0 < max_window_layers <
    layers) is not supported, and says so."""
    (tmp_path / "config.json").write_text(json.dumps(
        {**BASE, "model_type": "qwen2", "use_sliding_window": True, "sliding_window": 64,
         "max_window_layers": 1}))
    with pytest.raises(ModelFormatError, match="config.json: use_sliding_window with "
                                               "max_window_layers=1"):
        xllm.load(tmp_path)


# ---------------- chat templates ----------------

# The templates these models ship, as llama.cpp's source keeps them (models/templates: copies of
# each model's tokenizer_config.json chat_template). Read where the llama-cpp-python source tree
# that the benchmarks build is (XLLM_LLAMA_CPP_TEMPLATES overrides); skipped when it is absent.
TEMPLATE_DIR = os.environ.get("XLLM_LLAMA_CPP_TEMPLATES", os.path.expanduser(
    "~/.cache/xllm-bench/src/llama_cpp_python-0.3.36/vendor/llama.cpp/models/templates"))
SHIPPED = ["Qwen-Qwen2.5-7B-Instruct", "Qwen-Qwen3-0.6B", "Qwen-QwQ-32B",
           "deepseek-ai-DeepSeek-R1-Distill-Qwen-32B", "mistralai-Mistral-Nemo-Instruct-2407",
           "Mistral-Small-3.2-24B-Instruct-2506", "unsloth-mistral-Devstral-Small-2507"]
CONVERSATION = [{"role": "system", "content": "You are terse."},
                {"role": "user", "content": "Say hé <b> & \"hi\"."},
                {"role": "assistant", "content": "hi"},
                {"role": "user", "content": "Weather in Paris?"}]
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}]


@pytest.mark.parametrize("name", SHIPPED)
@pytest.mark.parametrize("extra", [{}, {"tools": TOOLS}, {"enable_thinking": False}],
                         ids=["plain", "tools", "no-thinking"])
def test_shipped_chat_templates_render_as_transformers(name, extra):
    """xllm.chat renders each template exactly as transformers' apply_chat_template."""
    from transformers import PreTrainedTokenizerFast
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from xllm.chat import render_chat
    path = os.path.join(TEMPLATE_DIR, name + ".jinja")
    if not os.path.isfile(path):
        pytest.skip(f"no {path}")
    template = open(path, encoding="utf-8").read()
    hf = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordLevel({"<unk>": 0},
                                                                      unk_token="<unk>")))
    for gen in (True, False):
        kw = dict(add_generation_prompt=gen, bos_token="<s>", eos_token="</s>", **extra)
        want = hf.apply_chat_template(CONVERSATION, chat_template=template, tokenize=False, **kw)
        assert render_chat(template, CONVERSATION, **kw) == want


# ---------------- tokenizers of these architectures in GGUF ----------------

QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+"
               r"[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")  # Qwen2's tokenizer.json


@pytest.mark.slow
def test_qwen2_tokenizer_json_to_gguf(qwen2, tmp_path):
    """A Qwen2-style tokenizer.json (its published pre-tokenizer over a small trained
    vocabulary) next to the model: quantize.py names its pre-tokenizer "qwen2" in the GGUF,
    and the GGUF's tokenizer encodes as tokenizers does."""
    from tokenizers import Regex, Tokenizer, models, trainers
    from tokenizers import pre_tokenizers as pt
    directory = _copy_hf(qwen2, tmp_path)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pt.Sequence([pt.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
                                     pt.ByteLevel(add_prefix_space=False, use_regex=False)])
    text = ["Hello world 12345, don't", "camelCase\n\nfoo", "\u4e2d\u6587 caf\u00e9"] * 50
    tok.train_from_iterator(text, trainers.BpeTrainer(
        vocab_size=400, initial_alphabet=pt.ByteLevel.alphabet(), show_progress=False))
    tok.save(str(directory / "tokenizer.json"))
    gguf_path = tmp_path / "qwen2.gguf"
    quantize.main(["--model", str(directory), "--out", str(gguf_path), "--type", "f32"])
    from gguf import GGUFReader
    assert GGUFReader(gguf_path).fields["tokenizer.ggml.pre"].contents() == "qwen2"
    model = xllm.load(gguf_path, kv_dtype="float32")
    for sample in ("Hello world 12345, don't", "camelCase\n\nfoo 42", "\u4e2d\u6587 caf\u00e9!"):
        assert model.tokenizer.encode(sample) == tok.encode(sample).ids


# ---------------- llama.cpp reads the GGUF files as transformers' models ----------------

@pytest.fixture(scope="module")
def tokenizer_of_1000():
    """A byte-level BPE of exactly BASE's 1,000 tokens with Qwen2's pre-tokenizer (llama.cpp
    needs a vocabulary as large as the embedding)."""
    import random
    from tokenizers import Regex, Tokenizer, models, trainers
    from tokenizers import pre_tokenizers as pt
    rng = random.Random(0)
    words = ["Hello", " world", " the", "ing", "12", "3", "camel", "Case", "\n", " ", ",", ".",
             "don't", "caf\u00e9", "\u4e2d\u6587", "abc", "def", "ghi", "x", "y", "z"]
    corpus = ["".join(rng.choice(words) for _ in range(rng.randint(1, 20)))
              for _ in range(10000)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pt.Sequence([pt.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
                                     pt.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=BASE["vocab_size"], initial_alphabet=pt.ByteLevel.alphabet(),
        show_progress=False))
    tok.add_tokens([f"<extra_{i}>" for i in range(BASE["vocab_size"] - tok.get_vocab_size())])
    assert tok.get_vocab_size() == BASE["vocab_size"]
    return tok


@pytest.mark.slow
def test_llama_cpp_reads_the_gguf_files(case, reference, tokenizer_of_1000, tmp_path):
    """llama.cpp (llama-cpp-python), another reader of the files quantize.py writes, gives
    transformers' logits to 1e-2 (its own float32 arithmetic; measured 2-4e-3) and the same
    greedy tokens. llama.cpp runs the ``llama`` architecture without a sliding window, so the
    Mistral case stays inside its window of 32 there."""
    pytest.importorskip("llama_cpp")
    from compare_llama_cpp import llama_cpp_greedy  # tools/
    name, ref, _, _ = case
    directory = _copy_hf(case, tmp_path)
    tokenizer_of_1000.save(str(directory / "tokenizer.json"))
    gguf_path = tmp_path / "with-tokenizer.gguf"
    quantize.main(["--model", str(directory), "--out", str(gguf_path), "--type", "f32"])
    ids, want, want_tokens = reference
    windowed = name.startswith("mistral")
    prompt = ids[:24] if windowed else ids
    steps = 4 if windowed else 16
    tokens, logits = llama_cpp_greedy(str(gguf_path), prompt, steps, 1)
    assert np.abs(logits[0] - want[len(prompt) - 1]).max() <= 1e-2
    assert tokens == (_greedy(ref, prompt, steps) if windowed else want_tokens[:steps])


@pytest.mark.slow
def test_windowed_model_reuses_prefixes_correctly(mistral):
    """The prefix cache and a windowed cache that released rows: prompts sharing a prefix with
    an earlier one (whole, or cut where the window reaches released rows) generate what a
    model without a prefix cache generates."""
    _, _, hf_dir, _ = mistral
    ids, _, _ = _reference(mistral)
    prompts = [ids, ids, ids[:60] + [5, 6, 7], ids + [9]]
    results = []
    for prefix_cache_mb in (64, 0):
        model = xllm.load(hf_dir, kv_dtype="float32", prefix_cache_mb=prefix_cache_mb)
        model.config.eos_token_id = None
        tokens = []
        for prompt in prompts:
            model.generate(prompt, max_new_tokens=40)
            tokens.append(model.last_stats["tokens"])
        results.append(tokens)
    assert results[0] == results[1]


@pytest.mark.slow
def test_qwen2_gguf_without_biases_is_refused(qwen2, tmp_path):
    """The GGUF form of the same fault: a qwen2 file without blk.0.attn_q.bias."""
    from gguf import GGUFReader, GGUFValueType, GGUFWriter
    _, _, _, gguf_path = qwen2
    reader = GGUFReader(gguf_path)
    bad = tmp_path / "no-bias.gguf"
    writer = GGUFWriter(str(bad), "qwen2")
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        kind = field.types[0]
        item = field.types[-1] if kind == GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), kind, item)
    for tensor in reader.tensors:
        if tensor.name != "blk.0.attn_q.bias":
            writer.add_tensor(tensor.name, np.array(tensor.data))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ModelFormatError, match=r"no-bias\.gguf: missing tensor "
                                               r"'blk\.0\.attn_q\.bias'"):
        xllm.load(bad)


@pytest.mark.slow
def test_batch_invariance(case, reference):
    """Sequences of different lengths in one forward_batch (each past the Mistral window at a
    different point) give each sequence's logits bit for bit as alone: the biases, the per-head
    norms and the window are row by row."""
    _, _, hf_dir, _ = case
    ids, _, _ = reference
    model = xllm.load(hf_dir, kv_dtype="float32")
    tr = model.transformer
    prompts = [ids[:5], ids[:40], ids, ids[10:77]]
    kvs = [tr.new_cache() for _ in prompts]
    together = np.zeros((len(prompts), model.config.vocab_size), np.float32)
    tr.forward_batch([np.asarray(p, np.int64) for p in prompts], kvs, together)
    steps = [[int(t)] for t in together.argmax(-1)]
    together_next = np.zeros_like(together)
    tr.forward_batch([np.asarray(s, np.int64) for s in steps], kvs, together_next)
    for i, prompt in enumerate(prompts):
        kv = tr.new_cache()
        alone = tr.forward(prompt, kv).copy()
        np.testing.assert_array_equal(together[i], alone)
        np.testing.assert_array_equal(together_next[i], tr.forward(steps[i], kv))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["qwen2", "qwen3"])
def test_qwen_configs_as_published(name, tmp_path_factory, tmp_path):
    """Qwen2.5 and Qwen3 configs name a sliding window larger than their context with
    use_sliding_window false: no window, and no error. With use_sliding_window true on every
    layer (max_window_layers 0) the window applies."""
    directory = _copy_hf(_build(name, tmp_path_factory), tmp_path)
    _edit_config(directory, use_sliding_window=False, sliding_window=131072,
                 max_window_layers=21)
    assert xllm.load(directory).config.sliding_window is None
    _edit_config(directory, use_sliding_window=True, sliding_window=64, max_window_layers=0)
    assert xllm.load(directory).config.sliding_window == 64


@pytest.mark.slow
@pytest.mark.parametrize("value", ["32", 32.0, True, -1])
def test_bad_window_values_are_refused(mistral, tmp_path, value):
    directory = _copy_hf(mistral, tmp_path)
    _edit_config(directory, sliding_window=value)
    with pytest.raises(ModelFormatError, match="config.json: sliding_window must be a positive "
                                               "integer or null"):
        xllm.load(directory)
