#!/usr/bin/env python3
"""Generate the tiny reference-model fixtures under testdata/models/.

What it writes (each model folder has config.json, safetensors weights, tokenizer.json,
tokenizer_config.json and reference.json):

  qwen35-moe-tiny/       Qwen3.5-MoE, official ConditionalGeneration layout: nested config
                         (text_config/vision_config), `model.language_model.*` names, fused experts
                         (`mlp.experts.gate_up_proj` [E,2I,H], `mlp.experts.down_proj` [E,H,I]),
                         2 shards + model.safetensors.index.json, dummy `model.visual.*`/`mtp.*` tensors.
  qwen35-moe-tiny-flat/  the same weights; flat text config with the old RoPE form
                         (rope_theta/partial_rotary_factor at top level) and full_attention_interval
                         instead of layer_types; `model.*` names; per-expert expert tensors;
                         single model.safetensors. Same reference as qwen35-moe-tiny.
  qwen3-next-tiny/       Qwen3-Next, real checkpoint layout: flat config, grouped
                         `in_proj_qkvz`/`in_proj_ba`, per-expert expert tensors, single file.
  qwen35-moe-tiny-mlx4/  MLX affine 4-bit (group 32) copy of qwen35-moe-tiny
                         (`language_model.*` names, switch_mlp, conv1d [C,K,1], norms stored 1+w,
                         8-bit mlp.gate / shared_expert_gate, bf16 scales/biases and plain tensors).
                         Its reference comes from transformers run on the DEQUANTIZED weights.
  tokenizer_check.json   a few encodings and chat-template renderings of the tiny tokenizer.

reference.json holds: prompt_ids (13 ids), logits [13][V] of a full forward, decode
(prefill 5 ids with the cache, then one id at a time) logits [13][V], a 32-token greedy
continuation of the first 6 prompt ids (computed with the cache, EOS not honoured), and meta.
All numbers are float32 values written in their shortest round-trip decimal form.

The models are run by HF transformers (5.17 was used) in float32 on the CPU.

How to run (on the device machine; needs torch, transformers>=5.17, safetensors, tokenizers,
numpy and jinja2; no network):

    CUDA_VISIBLE_DEVICES= PYTHONUNBUFFERED=1 python3 scripts/make_model_fixtures.py --out /tmp/models

then copy /tmp/models/* into testdata/models/. `CUDA_VISIBLE_DEVICES=` keeps everything on the CPU
(no TF32). Expected runtime: ~17 s of compute plus ~13 s of imports on the device machine (16 cores);
~45-90 s on a 2-core CPU box. No GPU is needed: the same torch 2.11 / transformers 5.17 on another
x86-64 CPU machine gave byte-identical output files.

Seeds: Qwen3.5 weights use SEED, Qwen3-Next weights SEED+1. SEED was picked (among 1..40) so that
the top1-top2 logit gap stays >= 0.015 at every greedy step of all three references.

The chat template is read from scripts/qwen3_chat_template.jinja (a verbatim copy of the Qwen3
template) next to this file.
"""

import argparse
import json
import os
import shutil
import sys
import time

import numpy as np

SEED = 2  # chosen so that no greedy step of any model is a near-tie (top1-top2 gap >= 0.015)
VOCAB = 320  # model rows; >= tokenizer size (the extra rows are padding)
TOK_REGULAR = 300  # byte-level BPE vocabulary (256 bytes + merges)

PROMPT_IDS = [5, 31, 64, 97, 120, 158, 187, 203, 226, 244, 261, 283, 299]
PREFILL_LEN = 5
GREEDY_PROMPT_LEN = 6
GREEDY_STEPS = 32

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # special=True
ADDED_TOKENS = [  # added, special=False (as in Qwen3)
    "<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>", "<think>", "</think>",
]

TRAIN_TEXT = """\
The quick brown fox jumps over the lazy dog. The dog was not amused, and the fox ran into the forest.
A mixture of experts model routes every token to a small number of experts. Each expert is a small
feed forward network, and a router decides which experts are used for the token. The shared expert
is always used. This makes the model large but the work for one token small.
Linear attention keeps a state of fixed size instead of a cache that grows with the sequence. The state
is decayed, read and written once for every token. Full attention layers keep the keys and the values
of all the tokens that came before, and every new token looks at all of them.
The user asked the assistant a question, and the assistant answered the user. The system message told
the assistant to be helpful, honest and short. Then the user asked for the weather in the city, and the
assistant called a tool to find the answer. The tool returned the weather, and the assistant wrote it down.
In the morning the sun rises in the east, and in the evening it sets in the west. The river runs to the
sea, the rain falls on the hills, and the wind moves the clouds over the land. There are seven days in a
week, twelve months in a year, and sixty minutes in an hour. One, two, three, four, five, six, seven.
She said: "It is the best of times; it is the worst of times." He answered that he would think about it.
What is the answer? Where is the station? When does the train leave? How much does the ticket cost?
def main():
    print("hello, world")
    return 0
"""

TEXT_CHECKS = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    "  leading spaces and\ttabs\nnew lines\n\n",
    "numbers 12345 and 3.14159",
    "unicode: caf\u00e9, na\u00efve, \u65e5\u672c\u8a9e, \U0001f600",
    "<|im_start|>user\nhi there<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n",
    "<tool_call>\n{\"name\": \"f\"}\n</tool_call>",
]


def log(*a):
    print(*a, flush=True)


# ----------------------------------------------------------------------------------------------
# Tokenizer


def build_tokenizer(template_path):
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers
    from tokenizers import processors, trainers

    tok = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    trainer = trainers.BpeTrainer(
        vocab_size=TOK_REGULAR,
        min_frequency=2,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
    )
    tok.train_from_iterator(TRAIN_TEXT.splitlines(keepends=True), trainer=trainer)
    n_regular = tok.get_vocab_size(with_added_tokens=True)
    tok.add_special_tokens(
        [AddedToken(t, single_word=False, lstrip=False, rstrip=False, normalized=False, special=True)
         for t in SPECIAL_TOKENS])
    tok.add_tokens(
        [AddedToken(t, single_word=False, lstrip=False, rstrip=False, normalized=False, special=False)
         for t in ADDED_TOKENS])
    # The python ByteLevel decoder takes no options; write Qwen's flags (no effect on decoding).
    spec = json.loads(tok.to_str())
    spec["decoder"] = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False,
                       "use_regex": False}
    tok = Tokenizer.from_str(json.dumps(spec, ensure_ascii=False))
    size = tok.get_vocab_size(with_added_tokens=True)
    assert size <= VOCAB, size
    ids = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS + ADDED_TOKENS}

    with open(template_path, "r", encoding="utf-8") as f:
        template = f.read()
    added_dec = {}
    for t in SPECIAL_TOKENS + ADDED_TOKENS:
        added_dec[str(ids[t])] = {
            "content": t, "lstrip": False, "normalized": False, "rstrip": False,
            "single_word": False, "special": t in SPECIAL_TOKENS,
        }
    tok_config = {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": added_dec,
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
        "bos_token": None,
        "chat_template": template,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": 4096,
        "pad_token": "<|endoftext|>",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }
    return tok, tok_config, ids, n_regular, size


def save_tokenizer(tok, tok_config, folder):
    tok.save(os.path.join(folder, "tokenizer.json"))
    write_json(os.path.join(folder, "tokenizer_config.json"), tok_config, indent=2)


# ----------------------------------------------------------------------------------------------
# JSON / numbers


NOISE_KEYS = {"output_hidden_states", "return_dict", "chunk_size_feed_forward", "is_encoder_decoder",
              "id2label", "label2id", "problem_type", "_name_or_path", "output_attentions",
              "_attn_implementation_autoset", "_attn_implementation"}


def clean_cfg(d):
    """Drop transformers' generic PreTrainedConfig bookkeeping keys (absent from real checkpoints)."""
    out = {}
    for k, v in d.items():
        if k in NOISE_KEYS or (k == "architectures" and v is None):
            continue
        out[k] = clean_cfg(v) if isinstance(v, dict) and k.endswith("_config") else v
    return out


def write_json(path, obj, indent=None):
    with open(path, "w", encoding="utf-8") as f:
        if indent is None:
            json.dump(obj, f, separators=(",", ":"), ensure_ascii=False)
        else:
            json.dump(obj, f, indent=indent, ensure_ascii=False)
        f.write("\n")


def f32_list(x):
    """Nested lists of Python floats; each value is the shortest decimal that round-trips float32."""
    a = np.asarray(x, dtype=np.float32)
    if a.ndim == 0:
        return float(str(a[()]))
    return [f32_list(r) for r in a] if a.ndim > 1 else [float(str(v)) for v in a]


# ----------------------------------------------------------------------------------------------
# Models


def rerandomise(model, seed):
    """Spec section 6: every parameter except A_log ~ N(0, 0.3) (1-D) or N(0, 0.15) (>=2-D)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("A_log"):
                continue
            std = 0.3 if p.dim() == 1 else 0.15
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float32) * std)


def qwen35_text_kwargs(eos_id):
    return dict(
        vocab_size=VOCAB,
        hidden_size=64,
        num_hidden_layers=8,
        layer_types=["linear_attention"] * 3 + ["full_attention"] + ["linear_attention"] * 3
        + ["full_attention"],
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        linear_num_key_heads=2,
        linear_num_value_heads=4,
        linear_key_head_dim=16,
        linear_value_head_dim=32,
        linear_conv_kernel_dim=4,
        num_experts=8,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        shared_expert_intermediate_size=48,
        rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25,
                         "mrope_section": [3, 3, 2], "mrope_interleaved": True},
        tie_word_embeddings=False,
        eos_token_id=eos_id,
        max_position_embeddings=4096,
    )


def qwen3_next_kwargs(eos_id, bos_id):
    return dict(
        vocab_size=VOCAB,
        hidden_size=64,
        num_hidden_layers=6,
        layer_types=["linear_attention", "full_attention", "linear_attention", "linear_attention",
                     "full_attention", "linear_attention"],
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        linear_num_key_heads=2,
        linear_num_value_heads=4,
        linear_key_head_dim=16,
        linear_value_head_dim=32,
        linear_conv_kernel_dim=4,
        num_experts=10,
        num_experts_per_tok=3,
        moe_intermediate_size=32,
        shared_expert_intermediate_size=48,
        norm_topk_prob=True,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        intermediate_size=96,
        rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25},
        tie_word_embeddings=False,
        eos_token_id=eos_id,
        bos_token_id=bos_id,
        max_position_embeddings=4096,
    )


def run_reference(model, prompt_ids):
    """Full forward, prefill+decode, greedy. Returns (dict for reference.json, stats)."""
    import torch

    with torch.no_grad():
        ids = torch.tensor([prompt_ids], dtype=torch.long)
        full = model(input_ids=ids, use_cache=False).logits[0].float()

        out = model(input_ids=ids[:, :PREFILL_LEN], use_cache=True)
        rows = [out.logits[0].float()]
        pkv = out.past_key_values
        for t in range(PREFILL_LEN, len(prompt_ids)):
            out = model(input_ids=ids[:, t:t + 1], past_key_values=pkv, use_cache=True)
            pkv = out.past_key_values
            rows.append(out.logits[0].float())
        dec = torch.cat(rows, dim=0)
        max_diff = (full - dec).abs().max().item()

        gp = prompt_ids[:GREEDY_PROMPT_LEN]
        out = model(input_ids=torch.tensor([gp], dtype=torch.long), use_cache=True)
        pkv = out.past_key_values
        last = out.logits[0, -1].float()
        toks, min_gap, gaps = [], float("inf"), []
        for _ in range(GREEDY_STEPS):
            top2 = torch.topk(last, 2)
            gap = (top2.values[0] - top2.values[1]).item()
            gaps.append(gap)
            min_gap = min(min_gap, gap)
            nxt = int(torch.argmax(last).item())
            toks.append(nxt)
            out = model(input_ids=torch.tensor([[nxt]], dtype=torch.long), past_key_values=pkv,
                        use_cache=True)
            pkv = out.past_key_values
            last = out.logits[0, -1].float()

        # Greedy self-check without the cache (full recompute of the growing sequence).
        seq = list(gp)
        for i in range(GREEDY_STEPS):
            lg = model(input_ids=torch.tensor([seq], dtype=torch.long), use_cache=False).logits[0, -1]
            seq.append(int(torch.argmax(lg).item()))
        nocache_agree = seq[len(gp):] == toks

    ref = {
        "prompt_ids": list(prompt_ids),
        "logits": f32_list(full.numpy()),
        "decode": {"prefill_len": PREFILL_LEN, "logits": f32_list(dec.numpy())},
        "greedy": {"prompt_ids": list(gp), "tokens": toks},
    }
    stats = {"max_full_vs_decode": max_diff, "greedy_min_gap": min_gap,
             "greedy_nocache_agree": nocache_agree, "max_abs_logit": full.abs().max().item(),
             "greedy_gaps_lt_0.01": sum(1 for g in gaps if g < 0.01)}
    return ref, stats


def save_st(tensors, path, fmt="pt"):
    import torch
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in tensors.items()}, path, metadata={"format": fmt})
    return sum(v.numel() * v.element_size() for v in tensors.values())


def write_index(folder, shards):
    """shards: list of (filename, dict name->tensor)."""
    total = 0
    wm = {}
    for fn, t in shards:
        for k, v in t.items():
            wm[k] = fn
            total += v.numel() * v.element_size()
    write_json(os.path.join(folder, "model.safetensors.index.json"),
               {"metadata": {"total_size": total}, "weight_map": dict(sorted(wm.items()))}, indent=2)


def split_experts(sd, prefix_in, prefix_out, n_layers, n_experts, inter):
    """Fused gate_up_proj/down_proj -> per-expert {gate,up,down}_proj.weight. Renames prefix."""
    out = {}
    for k, v in sd.items():
        nk = prefix_out + k[len(prefix_in):] if k.startswith(prefix_in) else k
        if k.endswith("mlp.experts.gate_up_proj"):
            base = nk[: -len("gate_up_proj")]
            assert v.shape[0] == n_experts and v.shape[1] == 2 * inter
            for e in range(n_experts):
                out[f"{base}{e}.gate_proj.weight"] = v[e, :inter, :].clone()
                out[f"{base}{e}.up_proj.weight"] = v[e, inter:, :].clone()
        elif k.endswith("mlp.experts.down_proj"):
            base = nk[: -len("down_proj")]
            for e in range(n_experts):
                out[f"{base}{e}.down_proj.weight"] = v[e].clone()
        else:
            out[nk] = v.clone()
    return out


# ----------------------------------------------------------------------------------------------
# MLX affine quantization


def to_bf16_f32(t):
    """Round to bf16 (nearest-even) and return as f32."""
    import torch

    return t.to(torch.bfloat16).to(torch.float32)


def quantize_affine(w, group_size, bits):
    """w [..., in] f32 -> (packed U32 [..., in*bits/32], scales bf16, biases bf16)."""
    import torch

    *lead, n_in = w.shape
    assert n_in % group_size == 0 and 32 % bits == 0
    g = w.reshape(*lead, n_in // group_size, group_size).to(torch.float32)
    wmin = g.min(dim=-1, keepdim=True).values
    wmax = g.max(dim=-1, keepdim=True).values
    qmax = (1 << bits) - 1
    scale = to_bf16_f32((wmax - wmin) / qmax)
    bias = to_bf16_f32(wmin)
    div = torch.where(scale == 0, torch.ones_like(scale), scale)
    q = torch.clamp(torch.round((g - bias) / div), 0, qmax).to(torch.int64)
    q = torch.where(scale == 0, torch.zeros_like(q), q)
    q = q.reshape(*lead, n_in)
    per = 32 // bits
    qw = q.reshape(*lead, n_in // per, per)
    shifts = (torch.arange(per, dtype=torch.int64) * bits)
    packed = (qw << shifts).sum(dim=-1)  # < 2^32, fits int64
    packed = packed.to(torch.uint32)
    return packed, scale.squeeze(-1).to(torch.bfloat16), bias.squeeze(-1).to(torch.bfloat16)


def dequantize_affine(packed, scales, biases, group_size, bits):
    import torch

    *lead, n_words = packed.shape
    per = 32 // bits
    n_in = n_words * per
    p = packed.to(torch.int64)
    shifts = torch.arange(per, dtype=torch.int64) * bits
    q = ((p.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)).reshape(*lead, n_in // group_size, group_size)
    s = scales.to(torch.float32).unsqueeze(-1)
    b = biases.to(torch.float32).unsqueeze(-1)
    return (q.to(torch.float32) * s + b).reshape(*lead, n_in)


ZC_NORM_SUFFIXES = ("input_layernorm.weight", "post_attention_layernorm.weight", "q_norm.weight",
                    "k_norm.weight")


def is_zero_centred_norm(name):
    # name in HF in-memory form (model.*)
    return name.endswith(ZC_NORM_SUFFIXES) or name == "model.norm.weight"


def make_mlx(sd, cfg, n_layers, group_size=32, bits=4):
    """sd: HF CausalLM state dict (model.*, fused experts). Returns (mlx tensors, quant dict, report)."""
    import torch

    inter = cfg.moe_intermediate_size
    out, qinfo = {}, {}

    def put_linear(name_out, w, qbits):
        if qbits is not None and w.shape[-1] % group_size == 0:
            p, s, b = quantize_affine(w, group_size, qbits)
            out[name_out + ".weight"] = p
            out[name_out + ".scales"] = s
            out[name_out + ".biases"] = b
            qinfo[name_out] = qbits
        else:
            out[name_out + ".weight"] = w.to(torch.bfloat16)
            qinfo[name_out] = None

    for k, v in sd.items():
        v = v.detach().to(torch.float32)
        if k == "lm_head.weight":
            put_linear("language_model.lm_head", v, bits)
            continue
        assert k.startswith("model."), k
        nk = "language_model." + k
        if k.endswith("mlp.experts.gate_up_proj"):
            base = nk[: -len("experts.gate_up_proj")] + "switch_mlp."
            put_linear(base + "gate_proj", v[:, :inter, :], bits)
            put_linear(base + "up_proj", v[:, inter:, :], bits)
        elif k.endswith("mlp.experts.down_proj"):
            base = nk[: -len("experts.down_proj")] + "switch_mlp."
            put_linear(base + "down_proj", v, bits)
        elif k.endswith("mlp.gate.weight") or k.endswith("mlp.shared_expert_gate.weight"):
            put_linear(nk[: -len(".weight")], v, 8)
        elif k.endswith("conv1d.weight"):
            out[nk] = v.permute(0, 2, 1).contiguous().to(torch.bfloat16)  # [C,1,K] -> [C,K,1]
        elif k.endswith("A_log"):
            out[nk] = v.clone()
        elif k.endswith("dt_bias"):
            out[nk] = v.to(torch.bfloat16)
        elif is_zero_centred_norm(k):
            out[nk] = (1.0 + v).to(torch.bfloat16)
        elif k.endswith("linear_attn.norm.weight"):
            out[nk] = v.to(torch.bfloat16)
        elif k.endswith(".weight") and v.dim() == 2:
            put_linear(nk[: -len(".weight")], v, bits)
        else:
            raise ValueError(f"unhandled tensor {k} {tuple(v.shape)}")
    quant = {"group_size": group_size, "bits": bits, "mode": "affine"}
    for i in range(n_layers):
        for m in ("mlp.gate", "mlp.shared_expert_gate"):
            quant[f"language_model.model.layers.{i}.{m}"] = {"group_size": group_size, "bits": 8}
    for name, qb in qinfo.items():
        if qb == 8:
            assert name.endswith(("mlp.gate", "mlp.shared_expert_gate")), name
    return out, quant, qinfo


def mlx_to_hf(mt, cfg, group_size):
    """Inverse of make_mlx from the STORED tensors: dequantize to an HF f32 state dict."""
    import torch

    inter = cfg.moe_intermediate_size
    sd = {}
    deq = {}
    for k in mt:
        if k.endswith(".scales"):
            base = k[: -len(".scales")]
            p, s, b = mt[base + ".weight"], mt[base + ".scales"], mt[base + ".biases"]
            bits = 32 * p.shape[-1] // (s.shape[-1] * group_size)
            deq[base] = dequantize_affine(p, s, b, group_size, bits)
    for k, v in mt.items():
        if k.endswith((".scales", ".biases")):
            continue
        if k.startswith("vision_tower."):
            continue
        base = k[: -len(".weight")] if k.endswith(".weight") else None
        w = deq[base] if base in deq else v.to(torch.float32)
        assert k.startswith("language_model."), k
        hk = k[len("language_model."):]
        if ".switch_mlp." in hk:
            continue
        if hk.endswith("conv1d.weight"):
            w = w.permute(0, 2, 1).contiguous()
        elif is_zero_centred_norm(hk):
            w = w - 1.0
        sd[hk] = w
    for i in range(cfg.num_hidden_layers):
        b = f"language_model.model.layers.{i}.mlp.switch_mlp."
        g, u, d = deq[b + "gate_proj"], deq[b + "up_proj"], deq[b + "down_proj"]
        assert g.shape[1] == inter
        sd[f"model.layers.{i}.mlp.experts.gate_up_proj"] = torch.cat([g, u], dim=1)
        sd[f"model.layers.{i}.mlp.experts.down_proj"] = d
    return sd


# ----------------------------------------------------------------------------------------------


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="output folder (becomes testdata/models)")
    ap.add_argument("--template", default=os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                        "qwen3_chat_template.jinja"))
    ap.add_argument("--skip-reload", action="store_true", help="skip from_pretrained sanity checks")
    args = ap.parse_args()

    t0 = time.time()
    import torch
    import transformers
    from safetensors.torch import load_file
    from transformers import (Qwen3_5MoeConfig, Qwen3_5MoeForCausalLM, Qwen3_5MoeTextConfig,
                              Qwen3NextConfig, Qwen3NextForCausalLM)
    import tokenizers

    torch.set_default_dtype(torch.float32)
    torch.set_num_threads(min(8, os.cpu_count() or 1))
    log(f"python {sys.version.split()[0]} torch {torch.__version__} transformers {transformers.__version__} "
        f"tokenizers {tokenizers.__version__} numpy {np.__version__}; cuda visible: {torch.cuda.is_available()}")
    log(f"imports took {time.time() - t0:.1f}s")

    out_root = os.path.abspath(args.out)
    os.makedirs(out_root, exist_ok=True)
    d1 = os.path.join(out_root, "qwen35-moe-tiny")
    d2 = os.path.join(out_root, "qwen35-moe-tiny-flat")
    d3 = os.path.join(out_root, "qwen3-next-tiny")
    d4 = os.path.join(out_root, "qwen35-moe-tiny-mlx4")
    for d in (d1, d2, d3, d4):
        if os.path.isdir(d):
            shutil.rmtree(d)
        os.makedirs(d)

    # ---------------- tokenizer
    tok, tok_config, tok_ids, n_regular, tok_size = build_tokenizer(args.template)
    log(f"tokenizer: {n_regular} regular tokens, {tok_size} total; ids {tok_ids}")
    assert max(PROMPT_IDS) < tok_size
    for d in (d1, d2, d3, d4):
        save_tokenizer(tok, tok_config, d)
    eot, im_end = tok_ids["<|endoftext|>"], tok_ids["<|im_end|>"]

    meta_common = {
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "seed": SEED,
        "dtype": "float32",
        "device": "cpu",
        "generator": "scripts/make_model_fixtures.py",
    }

    # ---------------- model 1 / 2: Qwen3.5-MoE
    tkw = qwen35_text_kwargs(eot)
    tcfg = Qwen3_5MoeTextConfig(**tkw)
    tcfg._attn_implementation = "eager"
    torch.manual_seed(SEED)
    m1 = Qwen3_5MoeForCausalLM(tcfg).float().eval()
    rerandomise(m1, SEED)
    log(f"qwen3.5 layer_types {tcfg.layer_types}")
    sd1 = {k: v.detach().clone() for k, v in m1.state_dict().items()}
    log("qwen3.5 state_dict (layers 0 and 3 + globals):")
    for k, v in sd1.items():
        if ".layers." in k and not (".layers.0." in k or ".layers.3." in k):
            continue
        log(f"  {k} {tuple(v.shape)} {v.dtype}")
    ref1, st1 = run_reference(m1, PROMPT_IDS)
    log(f"[qwen35-moe-tiny] {st1}")
    ref1["meta"] = dict(meta_common, model_type="qwen3_5_moe", hf_class="Qwen3_5MoeForCausalLM")

    # folder 1: ConditionalGeneration layout
    vision_cfg = {
        "model_type": "qwen3_5_moe_vision", "depth": 1, "hidden_size": 32, "intermediate_size": 64,
        "num_heads": 2, "in_channels": 3, "patch_size": 16, "spatial_merge_size": 2,
        "temporal_patch_size": 2, "out_hidden_size": 64, "num_position_embeddings": 16,
        "hidden_act": "gelu_pytorch_tanh", "initializer_range": 0.02,
    }
    full_cfg = Qwen3_5MoeConfig(text_config=tcfg.to_dict(), vision_config=vision_cfg,
                                tie_word_embeddings=False)
    c1 = clean_cfg(full_cfg.to_dict())
    c1["architectures"] = ["Qwen3_5MoeForConditionalGeneration"]
    c1["model_type"] = "qwen3_5_moe"
    c1["text_config"]["model_type"] = "qwen3_5_moe_text"
    c1["text_config"]["dtype"] = "float32"
    c1["text_config"].pop("architectures", None)
    c1["text_config"]["eos_token_id"] = eot
    c1["text_config"]["bos_token_id"] = None
    c1["tie_word_embeddings"] = False
    c1["dtype"] = "float32"
    write_json(os.path.join(d1, "config.json"), c1, indent=2)

    t1 = {}
    for k, v in sd1.items():
        t1[("model.language_model." + k[len("model."):]) if k.startswith("model.") else k] = v
    g = torch.Generator().manual_seed(SEED + 7)
    dummy = {
        "model.visual.blocks.0.attn.qkv.weight": torch.randn(96, 32, generator=g) * 0.02,
        "mtp.fc.weight": torch.randn(64, 128, generator=g) * 0.02,
    }
    keys = sorted(t1)
    half = [k for k in keys if ".layers." in k and int(k.split(".layers.")[1].split(".")[0]) < 4]
    shard_a = {k: t1[k] for k in keys if k in set(half) or "embed_tokens" in k}
    shard_a.update({k: dummy[k] for k in ("model.visual.blocks.0.attn.qkv.weight",)})
    shard_b = {k: t1[k] for k in keys if k not in shard_a}
    shard_b["mtp.fc.weight"] = dummy["mtp.fc.weight"]
    fa, fb = "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"
    save_st(shard_a, os.path.join(d1, fa))
    save_st(shard_b, os.path.join(d1, fb))
    write_index(d1, [(fa, shard_a), (fb, shard_b)])
    write_json(os.path.join(d1, "reference.json"), ref1)

    # folder 2: flat config, old rope form, per-expert tensors
    c2 = dict(c1["text_config"])
    c2["architectures"] = ["Qwen3_5MoeForCausalLM"]
    c2["model_type"] = "qwen3_5_moe_text"
    c2.pop("layer_types")
    c2["full_attention_interval"] = 4
    c2.pop("rope_parameters")
    c2["rope_theta"] = 10000.0
    c2["partial_rotary_factor"] = 0.25
    c2["tie_word_embeddings"] = False
    c2["dtype"] = "float32"
    c2["transformers_version"] = transformers.__version__
    write_json(os.path.join(d2, "config.json"), dict(sorted(c2.items())), indent=2)
    t2 = split_experts(sd1, "model.", "model.", tcfg.num_hidden_layers, tcfg.num_experts,
                       tcfg.moe_intermediate_size)
    save_st(dict(sorted(t2.items())), os.path.join(d2, "model.safetensors"))
    write_json(os.path.join(d2, "reference.json"), dict(ref1, meta=dict(ref1["meta"], note=(
        "same weights and reference as qwen35-moe-tiny"))))

    # ---------------- model 4: MLX 4-bit
    mt, quant, qinfo = make_mlx(sd1, tcfg, tcfg.num_hidden_layers, group_size=32, bits=4)
    mt["vision_tower.blocks.0.attn.qkv.weight"] = dummy["model.visual.blocks.0.attn.qkv.weight"].to(
        torch.bfloat16)
    log("mlx quantization per module: " + ", ".join(
        f"{k.split('language_model.')[1]}={v}" for k, v in qinfo.items()
        if ".layers." not in k or ".layers.0." in k or ".layers.3." in k))
    c4 = json.loads(json.dumps(c1))
    c4["text_config"]["dtype"] = "bfloat16"
    c4["dtype"] = "bfloat16"
    c4["quantization"] = quant
    c4["quantization_config"] = quant
    write_json(os.path.join(d4, "config.json"), c4, indent=2)
    save_st(dict(sorted(mt.items())), os.path.join(d4, "model.safetensors"), fmt="mlx")
    write_index(d4, [("model.safetensors", mt)])
    mt_back = load_file(os.path.join(d4, "model.safetensors"))
    log("mlx tensors (layers 0 and 3 + globals):")
    for k in sorted(mt_back):
        if ".layers." in k and not (".layers.0." in k or ".layers.3." in k):
            continue
        v = mt_back[k]
        log(f"  {k} {tuple(v.shape)} {v.dtype}")
    sd4 = mlx_to_hf(mt_back, tcfg, 32)
    assert set(sd4) == set(sd1), (set(sd4) ^ set(sd1))
    qerr = max((sd4[k] - sd1[k]).abs().max().item() for k in sd1)
    log(f"mlx: max |dequant - original| over all tensors {qerr:.4g}")
    torch.manual_seed(SEED)
    m4 = Qwen3_5MoeForCausalLM(tcfg).float().eval()
    m4.load_state_dict(sd4, strict=True)
    ref4, st4 = run_reference(m4, PROMPT_IDS)
    log(f"[qwen35-moe-tiny-mlx4] {st4}")
    log(f"mlx4 vs f32 model: max |logit diff| {max(abs(a - b) for ra, rb in zip(ref4['logits'], ref1['logits']) for a, b in zip(ra, rb)):.4g}")
    ref4["meta"] = dict(meta_common, model_type="qwen3_5_moe", hf_class="Qwen3_5MoeForCausalLM",
                        note="transformers on the dequantized MLX weights (q*scale+bias, bf16 tensors as f32, norms = stored-1)")
    write_json(os.path.join(d4, "reference.json"), ref4)

    # ---------------- model 3: Qwen3-Next
    nkw = qwen3_next_kwargs(im_end, eot)
    ncfg = Qwen3NextConfig(**nkw)
    ncfg._attn_implementation = "eager"
    torch.manual_seed(SEED + 1)
    m3 = Qwen3NextForCausalLM(ncfg).float().eval()
    rerandomise(m3, SEED + 1)
    log(f"qwen3-next layer_types {ncfg.layer_types}")
    sd3 = {k: v.detach().clone() for k, v in m3.state_dict().items()}
    log("qwen3-next in-memory state_dict (layers 0 and 1 + globals):")
    for k, v in sd3.items():
        if ".layers." in k and not (".layers.0." in k or ".layers.1." in k):
            continue
        log(f"  {k} {tuple(v.shape)} {v.dtype}")
    ref3, st3 = run_reference(m3, PROMPT_IDS)
    log(f"[qwen3-next-tiny] {st3}")
    ref3["meta"] = dict(meta_common, seed=SEED + 1, model_type="qwen3_next",
                       hf_class="Qwen3NextForCausalLM")
    c3 = clean_cfg(ncfg.to_dict())
    c3["architectures"] = ["Qwen3NextForCausalLM"]
    c3["model_type"] = "qwen3_next"
    c3["dtype"] = "float32"
    write_json(os.path.join(d3, "config.json"), c3, indent=2)
    t3 = split_experts(sd3, "model.", "model.", ncfg.num_hidden_layers, ncfg.num_experts,
                       ncfg.moe_intermediate_size)
    save_st(dict(sorted(t3.items())), os.path.join(d3, "model.safetensors"))
    write_json(os.path.join(d3, "reference.json"), ref3)
    log("qwen3-next saved tensors (layer 0, experts 0 and 9):")
    for k in sorted(t3):
        if k.startswith("model.layers.0.") and (".experts." not in k or ".experts.0." in k
                                                 or ".experts.9." in k):
            log(f"  {k} {tuple(t3[k].shape)}")

    # ---------------- tokenizer check file
    try:
        from transformers import AutoTokenizer

        at = AutoTokenizer.from_pretrained(d1)
        checks = []
        for s in TEXT_CHECKS:
            ids = tok.encode(s).ids
            checks.append({"text": s, "ids": ids, "decoded": tok.decode(ids, skip_special_tokens=False),
                           "hf_ids_equal": at(s)["input_ids"] == ids})
        msgs = [{"role": "system", "content": "You are a helpful assistant."},
                {"role": "user", "content": "What is the weather?"}]
        tools = [{"type": "function", "function": {"name": "get_weather", "description": "Weather",
                  "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                 "required": ["city"]}}}]
        msgs_tool = msgs + [
            {"role": "assistant", "content": "",
             "tool_calls": [{"type": "function", "function": {"name": "get_weather",
                                                              "arguments": {"city": "Paris"}}}]},
            {"role": "tool", "content": "sunny, 21 C"}]
        chats = []
        for name, kw in [("plain", dict(conversation=msgs)),
                         ("no_think", dict(conversation=msgs, enable_thinking=False)),
                         ("tools", dict(conversation=msgs_tool, tools=tools))]:
            text = at.apply_chat_template(tokenize=False, add_generation_prompt=True, **kw)
            ids = tok.encode(text).ids
            chats.append({"name": name, "args": {k: v for k, v in kw.items()},
                          "add_generation_prompt": True, "rendered": text, "ids": ids})
        write_json(os.path.join(out_root, "tokenizer_check.json"),
                   {"encode": checks, "chat": chats}, indent=1)
        log(f"tokenizer check: hf_ids_equal all {all(c['hf_ids_equal'] for c in checks)}; "
            f"'Hello world' -> {checks[0]['ids']}")
    except Exception as e:  # noqa: BLE001
        log(f"tokenizer check FAILED: {type(e).__name__}: {e}")

    # ---------------- reload sanity checks
    if not args.skip_reload:
        ids = torch.tensor([PROMPT_IDS], dtype=torch.long)
        ref_full = {d1: torch.tensor(ref1["logits"]), d2: torch.tensor(ref1["logits"]),
                    d3: torch.tensor(ref3["logits"])}
        attempts = [
            ("qwen3-next-tiny via Qwen3NextForCausalLM", d3, lambda: Qwen3NextForCausalLM.from_pretrained(
                d3, dtype=torch.float32, attn_implementation="eager")),
            ("qwen35-moe-tiny-flat via Qwen3_5MoeForCausalLM", d2, lambda: Qwen3_5MoeForCausalLM.from_pretrained(
                d2, dtype=torch.float32, attn_implementation="eager")),
            ("qwen35-moe-tiny via AutoModelForCausalLM", d1, lambda: transformers.AutoModelForCausalLM.from_pretrained(
                d1, dtype=torch.float32, attn_implementation="eager")),
            ("qwen35-moe-tiny via Qwen3_5MoeForConditionalGeneration", d1,
             lambda: transformers.Qwen3_5MoeForConditionalGeneration.from_pretrained(
                 d1, dtype=torch.float32, attn_implementation="eager")),
        ]
        for label, d, fn in attempts:
            try:
                m = fn().float().eval()
                with torch.no_grad():
                    lg = m(input_ids=ids, use_cache=False).logits[0].float()
                diff = (lg - ref_full[d]).abs().max().item()
                log(f"reload {label}: {type(m).__name__} layer_types={m.config.get_text_config().layer_types}"
                    f" max |logits - in-memory| = {diff:.3g}")
            except Exception as e:  # noqa: BLE001
                log(f"reload {label}: FAILED {type(e).__name__}: {str(e)[:500]}")

    # ---------------- summary
    for d in (d1, d2, d3, d4):
        files = sorted(os.listdir(d))
        log(f"{os.path.basename(d)}: " + ", ".join(f"{f} {os.path.getsize(os.path.join(d, f))}" for f in files))
    log(f"done in {time.time() - t0:.1f}s")


if __name__ == "__main__":
    main()
