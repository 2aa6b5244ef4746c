#!/usr/bin/env python3
"""A random-weight qwen35moe GGUF at a real geometry, written directly (no HF checkpoint, no
llama.cpp): every matrix in one GGML block type, blocks of random codes with sane scales.

    python3 scripts/bench/gguf_synth.py --geometry qwen3.5-35b-a3b --layers 8 --type Q4_0 --out m.gguf

For benchmarks of the GGUF path where the peer harness (scripts/bench/peer/peer.py model: HF
checkpoint → convert_hf_to_gguf → llama-quantize, minutes and ~30 GB) is too slow: an 8-layer
35B-A3B file takes about a minute. Tensor names, dims and metadata are those of llama.cpp's
converter (as in scripts/fixtures/gguf_files.py); norms and the GatedDeltaNet vectors are F32.
The values mean nothing (no text comes out), but every block decodes to finite weights of about
the spread of a trained model's, so the arithmetic is that of a real file. Needs numpy and gguf
(scripts/ci_python_deps.sh). The Qwen3.5 tokenizer.json is written beside the file.
"""

from __future__ import annotations

import argparse
import gzip
import shutil
import sys
from pathlib import Path

import numpy as np
import gguf
from gguf import GGMLQuantizationType as T

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts/bench/peer"))
from peer import GEOMETRIES, hf_config  # noqa: E402

# Where each block type keeps its f16 scale(s) (byte offset) and the scale written there: chosen
# so that weights come out with a spread of roughly 0.02 to 0.07.
SCALES = {
    T.Q4_0: [(0, 0.005)],
    T.Q8_0: [(0, 0.0004)],
    T.IQ4_NL: [(0, 0.0004)],
    T.IQ4_XS: [(0, 6.2e-5)],  # times (ls − 32) ≤ 32 and a level ≤ 127
    T.Q2_K: [(80, 0.003), (82, 0.003)],  # d·sc·q − dmin·m, 4-bit sc and m, q ≤ 3
    T.Q3_K: [(108, 0.0005)],  # d·(sc − 32)·q, q in −4 .. 3
    T.Q4_K: [(0, 0.0001), (2, 0.0001)],  # d·sc·q − dmin·m, 6-bit sc and m, q ≤ 15
    T.Q5_K: [(0, 5e-5), (2, 5e-5)],  # q ≤ 31
    T.Q6_K: [(208, 3e-5)],  # d·sc·(q − 32), int8 sc
}


def blocks(rng, rows: int, cols: int, qtype) -> np.ndarray:
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    if cols % block:
        sys.exit(f"{qtype.name} needs columns in multiples of {block}, this matrix has {cols}")
    raw = rng.integers(0, 256, size=(rows, cols // block, size), dtype=np.uint8)
    for off, scale in SCALES[qtype]:
        raw[:, :, off:off + 2] = np.frombuffer(np.float16(scale).tobytes(), np.uint8)
    return raw.reshape(rows, -1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--geometry", default="qwen3.5-35b-a3b", choices=sorted(GEOMETRIES))
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--type", default="Q4_0", choices=sorted(q.name for q in SCALES))
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args()
    qt = T[a.type]
    c = hf_config(a.geometry, a.layers, 248320)
    rng = np.random.default_rng(a.seed)
    H, V, L = c["hidden_size"], c["vocab_size"], c["num_hidden_layers"]
    E, I, Is = c["num_experts"], c["moe_intermediate_size"], c["shared_expert_intermediate_size"]
    nh, nkv, D = c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"]
    Hk, Dk, Hv, Dv, Kc = (c["linear_num_key_heads"], c["linear_key_head_dim"], c["linear_num_value_heads"],
                          c["linear_value_head_dim"], c["linear_conv_kernel_dim"])
    key_dim, value_dim = Hk * Dk, Hv * Dv
    conv_dim = 2 * key_dim + value_dim

    a.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = a.out.with_name(a.out.name + ".partial")
    w = gguf.GGUFWriter(tmp, "qwen35moe")
    w.add_name(f"random {a.geometry} {L} layers {a.type}")
    w.add_type("model")
    w.add_block_count(L)
    w.add_context_length(262144)
    w.add_embedding_length(H)
    w.add_head_count(nh)
    w.add_head_count_kv(nkv)
    w.add_rope_freq_base(c["rope_parameters"]["rope_theta"])
    w.add_layer_norm_rms_eps(1e-6)
    w.add_expert_count(E)
    w.add_expert_used_count(c["num_experts_per_tok"])
    w.add_key_length(D)
    w.add_value_length(D)
    w.add_expert_feed_forward_length(I)
    w.add_expert_shared_feed_forward_length(Is)
    w.add_ssm_conv_kernel(Kc)
    w.add_ssm_state_size(Dk)
    w.add_ssm_group_count(Hk)
    w.add_ssm_time_step_rank(Hv)
    w.add_ssm_inner_size(value_dim)
    w.add_full_attention_interval(4)
    w.add_rope_dimension_count(int(D * 0.25))
    w.add_rope_dimension_sections(c["rope_parameters"]["mrope_section"] + [0])
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)

    def mat(name, rows, cols, experts=0):
        if experts:
            data = np.stack([blocks(rng, rows, cols, qt) for _ in range(experts)])
            w.add_tensor(name, data, raw_dtype=qt)
        else:
            w.add_tensor(name, blocks(rng, rows, cols, qt), raw_dtype=qt)

    def vec(name, n, value=None, dims=None):
        v = np.full(n, value, np.float32) if value is not None else (0.02 * rng.standard_normal(n)).astype(np.float32)
        w.add_tensor(name, v.reshape(dims) if dims else v)

    mat("token_embd.weight", V, H)
    vec("output_norm.weight", H, 1.0)
    mat("output.weight", V, H)
    for i in range(L):
        b = f"blk.{i}."
        vec(b + "attn_norm.weight", H, 1.0)
        vec(b + "post_attention_norm.weight", H, 1.0)
        if (i + 1) % 4 == 0:
            mat(b + "attn_q.weight", 2 * nh * D, H)
            mat(b + "attn_k.weight", nkv * D, H)
            mat(b + "attn_v.weight", nkv * D, H)
            mat(b + "attn_output.weight", H, nh * D)
            vec(b + "attn_q_norm.weight", D, 1.0)
            vec(b + "attn_k_norm.weight", D, 1.0)
        else:
            mat(b + "attn_qkv.weight", conv_dim, H)
            mat(b + "attn_gate.weight", value_dim, H)
            mat(b + "ssm_beta.weight", Hv, H)
            mat(b + "ssm_alpha.weight", Hv, H)
            vec(b + "ssm_conv1d.weight", conv_dim * Kc, dims=(conv_dim, Kc))
            vec(b + "ssm_dt.bias", Hv, 1.0)
            vec(b + "ssm_a", Hv, -1.0)
            vec(b + "ssm_norm.weight", Dv, 1.0)
            mat(b + "ssm_out.weight", H, value_dim)
        vec(b + "ffn_gate_inp.weight", E * H, dims=(E, H))
        mat(b + "ffn_gate_exps.weight", I, H, E)
        mat(b + "ffn_up_exps.weight", I, H, E)
        mat(b + "ffn_down_exps.weight", H, I, E)
        vec(b + "ffn_gate_inp_shexp.weight", H)
        mat(b + "ffn_gate_shexp.weight", Is, H)
        mat(b + "ffn_up_shexp.weight", Is, H)
        mat(b + "ffn_down_shexp.weight", H, Is)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    tmp.rename(a.out)
    with gzip.open(ROOT / "testdata/text/qwen3.5-tokenizer.json.gz") as src, open(a.out.with_name("tokenizer.json"), "wb") as dst:
        shutil.copyfileobj(src, dst)
    print(f"wrote {a.out} ({a.out.stat().st_size / 2**30:.2f} GiB)")


if __name__ == "__main__":
    main()
