"""Record tests/data/kquant_golden.npz: blocks and tensor types written by llama.cpp's own
quantizer, so that tests check xllm's quantizers and type mixes without llama.cpp.

    python tests/data/make_kquant_golden.py [--out tests/data/kquant_golden.npz]

Needs llama-cpp-python (0.3.36 recorded the committed file). The script writes two small
float32 GGUF files of the llama architecture (12 layers, hidden size 256, feed-forward size 64,
2 heads sharing 1 KV head; one with an output matrix, one with tied embeddings), runs
``llama_model_quantize`` on them for each file type below (no importance matrix: llama.cpp then
uses its reference quantizers) and stores:

``input``
    float32 [64, 256]: the rows of ``blk.0.ffn_gate.weight``, chosen to reach the corners of
    the quantizers (zeros, constants, one sign, outliers, tiny and huge values, ties).
``blocks_<TYPE>``
    uint8 rows of blocks of that tensor as llama.cpp wrote it, for Q4_K (from Q4_K_M), Q5_K
    (Q5_K_M), Q6_K, Q5_0, Q5_1, Q4_0 and Q8_0.
``types_<ftype>_<untied|tied>``
    [name, GGML type name] of every tensor of the file llama.cpp wrote for that file type.
``config``
    int64 [hidden, ffn, layers, heads, kv heads, vocab] of the two models.
"""
import argparse
import ctypes
import os
import tempfile

import numpy as np

HIDDEN = 256
FFN = 64
LAYERS = 12
HEADS = 2
KV_HEADS = 1
VOCAB = 64
HEAD_DIM = HIDDEN // HEADS

# llama.cpp file type name -> (the type blk.0.ffn_gate.weight gets in it, its ftype constant).
FILE_TYPES = {"Q4_K_M": "Q4_K", "Q5_K_M": "Q5_K", "Q6_K": "Q6_K", "Q5_0": "Q5_0",
              "Q5_1": "Q5_1", "Q4_0": "Q4_0", "Q8_0": "Q8_0"}


def golden_rows(rng):
    """float32 [64, 256]: rows that reach the corners of the quantizers."""
    rows = []
    for std in (0.02, 0.02, 0.02, 0.02, 1.0, 1.0, 1e-3, 100.0):
        for _ in range(4):
            rows.append(rng.standard_normal(HIDDEN) * std)
    rows.append(np.zeros(HIDDEN))
    rows.append(np.full(HIDDEN, 0.5))
    rows.append(np.full(HIDDEN, -0.25))
    rows.append(rng.uniform(0.1, 1.0, HIDDEN))  # one sign: the minimum is clipped to 0
    rows.append(-rng.uniform(0.1, 1.0, HIDDEN))
    outlier = rng.standard_normal(HIDDEN) * 0.01
    outlier[[3, 77, 200]] = [2.0, -3.0, 1.5]
    rows.append(outlier)
    rows.append(rng.standard_normal(HIDDEN) * 1e-6)  # float16 subnormal scales
    rows.append(rng.standard_normal(HIDDEN) * 1e-20)  # below llama.cpp's GROUP_MAX_EPS
    half_zero = rng.standard_normal(HIDDEN) * 0.05
    half_zero[:128] = 0.0
    rows.append(half_zero)
    sparse_zero = rng.standard_normal(HIDDEN) * 0.05
    sparse_zero[16:32] = 0.0  # one Q6_K sub-block of zeros
    sparse_zero[64:96] = 0.0  # one Q4_K/Q5_K sub-block of zeros
    rows.append(sparse_zero)
    rows.append(rng.integers(-8, 8, HIDDEN) * 0.125)  # a grid: ties in the rounding
    rows.append(rng.integers(0, 16, HIDDEN) * 0.0625)
    rows.append(rng.laplace(0, 0.05, HIDDEN))
    rows.append(np.where(np.arange(HIDDEN) % 2, 1.0, -1.0) * rng.uniform(0.5, 1, HIDDEN))
    rows.append(np.linspace(-1, 1, HIDDEN))
    rows.append(np.linspace(0, 3, HIDDEN) ** 2)
    while len(rows) < 64:
        rows.append(rng.standard_normal(HIDDEN) * rng.uniform(0.001, 0.5))
    return np.array(rows[:64], np.float32)


def tensors(rng, tied):
    """{GGUF name: float32 array} of the model."""
    def normal(*shape):
        return (rng.standard_normal(shape) * 0.02).astype(np.float32)

    out = {"token_embd.weight": normal(VOCAB, HIDDEN)}
    for i in range(LAYERS):
        p = f"blk.{i}."
        out[p + "attn_norm.weight"] = np.ones(HIDDEN, np.float32)
        out[p + "attn_q.weight"] = normal(HEADS * HEAD_DIM, HIDDEN)
        out[p + "attn_k.weight"] = normal(KV_HEADS * HEAD_DIM, HIDDEN)
        out[p + "attn_v.weight"] = normal(KV_HEADS * HEAD_DIM, HIDDEN)
        out[p + "attn_output.weight"] = normal(HIDDEN, HEADS * HEAD_DIM)
        out[p + "ffn_norm.weight"] = np.ones(HIDDEN, np.float32)
        out[p + "ffn_gate.weight"] = normal(FFN, HIDDEN)
        out[p + "ffn_up.weight"] = normal(FFN, HIDDEN)
        out[p + "ffn_down.weight"] = normal(HIDDEN, FFN)
    out["blk.0.ffn_gate.weight"] = golden_rows(rng)
    out["output_norm.weight"] = np.ones(HIDDEN, np.float32)
    if not tied:
        out["output.weight"] = normal(VOCAB, HIDDEN)
    return out


def write_f32_gguf(path, weights):
    import gguf
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_context_length(256)
    writer.add_embedding_length(HIDDEN)
    writer.add_block_count(LAYERS)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_rope_dimension_count(HEAD_DIM)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(VOCAB)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    for name, array in weights.items():
        writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def llama_cpp_quantize(src, dst, ftype_name):
    import llama_cpp
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype_name}")
    params.nthread = 1
    status = llama_cpp.llama_model_quantize(src.encode(), dst.encode(), ctypes.byref(params))
    if status != 0:
        raise RuntimeError(f"llama_model_quantize({ftype_name}) returned {status}")


def main(argv=None):
    import gguf
    import llama_cpp
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__),
                                                 "kquant_golden.npz"))
    a = p.parse_args(argv)
    record = {"config": np.array([HIDDEN, FFN, LAYERS, HEADS, KV_HEADS, VOCAB], np.int64)}
    with tempfile.TemporaryDirectory() as tmp:
        for tied in (False, True):
            rng = np.random.default_rng(2026)
            weights = tensors(rng, tied)
            record["input"] = weights["blk.0.ffn_gate.weight"]
            src = os.path.join(tmp, "f32.gguf")
            write_f32_gguf(src, weights)
            for ftype, kind in FILE_TYPES.items():
                dst = os.path.join(tmp, f"{ftype}.gguf")
                llama_cpp_quantize(src, dst, ftype)
                reader = gguf.GGUFReader(dst)
                types = [(t.name, t.tensor_type.name) for t in reader.tensors]
                record[f"types_{ftype}_{'tied' if tied else 'untied'}"] = np.array(types)
                if not tied:
                    gate = next(t for t in reader.tensors if t.name == "blk.0.ffn_gate.weight")
                    if gate.tensor_type.name != kind:
                        raise RuntimeError(f"{ftype}: blk.0.ffn_gate.weight is "
                                           f"{gate.tensor_type.name}, expected {kind}")
                    record[f"blocks_{kind}"] = np.array(gate.data, np.uint8).reshape(64, -1)
                del reader
                os.unlink(dst)
    np.savez_compressed(a.out, **record)
    print(f"{a.out}: {os.path.getsize(a.out)} bytes (llama-cpp-python {llama_cpp.__version__})")


if __name__ == "__main__":
    main()
