#!/usr/bin/env python3
"""Quantize the trained model to the shipped MLX form and write its transformers reference (issue 6).

Input: the bf16 checkpoint written by scripts/train/train.py (ckpt/model-*.safetensors, transformers'
in-memory naming) and the tokenizer folder written by scripts/train/train_tokenizer.py.

Shipped model (--model-out, becomes models/qwen35-moe-tiny-trained/): MLX affine layout made with
scripts/make_model_fixtures.py's functions: `language_model.*` names, experts stacked as
`mlp.switch_mlp.{gate,up,down}_proj` at 4 bits, every other Linear/Embedding whose input dim is a
multiple of 64 (embed_tokens, lm_head, attention and GatedDeltaNet projections, router, shared expert,
shared expert gate) at 8 bits, group size 64, bf16 scales/biases; norms (stored 1+w), conv1d
([C,K,1]), A_log (f32), dt_bias unquantized. config.json carries `quantization` (default 4 bits,
per-module 8-bit overrides) and `quantization_config`.

Reference (--ref-out, becomes testdata/trained/reference.json), all transformers float32 on the CPU
(run with CUDA_VISIBLE_DEVICES=), on the DEQUANTIZED shipped weights:
  prompt_ids / logits: the first 16 tokens of testdata/trained/heldout-sample.txt, full forward;
  decode: prefill 5 then one token at a time with the cache (as scripts/make_model_fixtures.py);
  greedy: 32 greedy tokens after the first 6 prompt ids (cache; EOS not honoured);
  greedy_text: 32 greedy tokens after the prompt "The history of";
  perplexity: on the first 4096 tokens of heldout-sample.txt, 8 non-overlapping windows of 512
    tokens, each scored independently with no cache (511 predictions per window, 4088 in all),
    for the bf16 trained checkpoint (bf16 weights computed in f32) and the dequantized shipped model.

    CUDA_VISIBLE_DEVICES= python3 scripts/train/make_reference.py --ckpt $OUT/ckpt \
        --tok .carry/tokenizer --model-out $OUT/ship --ref-out $OUT/ship/reference.json
"""

import argparse
import glob
import json
import math
import os
import shutil
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, HERE)
import make_model_fixtures as mfx  # noqa: E402
import train as tr  # noqa: E402

GROUP = 64
EXPERT_BITS = 4
OTHER_BITS = 8
REF_PROMPT_LEN = 16
PPL_TOKENS = 4096
PPL_WINDOW = 512
GREEDY_PROMPT = "The history of"
SAMPLE_PROMPTS = ["The history of", "In the morning", "A dictionary is", "The Python language",
                  "Debian is"]


def load_ckpt(folder):
    from safetensors.torch import load_file

    sd = {}
    for f in sorted(glob.glob(os.path.join(folder, "model-*.safetensors"))):
        sd.update(load_file(f))
    return sd


def make_shipped(sd, cfg):
    """Experts 4-bit, every other quantizable module 8-bit (group 64). Returns (tensors, quant)."""
    import torch

    mt, _, qinfo = mfx.make_mlx(sd, cfg, cfg.num_hidden_layers, group_size=GROUP, bits=EXPERT_BITS)
    quant = {"group_size": GROUP, "bits": EXPERT_BITS, "mode": "affine"}
    for name, qb in sorted(qinfo.items()):
        if qb is None or ".switch_mlp." in name:
            continue
        hf = name[len("language_model."):] + ".weight"
        w = sd[hf].to(torch.float32)
        p, s, b = mfx.quantize_affine(w, GROUP, OTHER_BITS)
        mt[name + ".weight"], mt[name + ".scales"], mt[name + ".biases"] = p, s, b
        quant[name] = {"group_size": GROUP, "bits": OTHER_BITS}
    return mt, quant


def perplexity(model, ids, window=PPL_WINDOW):
    import torch

    nll, cnt = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(ids), window):
            w = ids[i:i + window]
            if len(w) < 2:
                break
            x = torch.tensor([w], dtype=torch.long)
            lg = model(input_ids=x, use_cache=False).logits[0].float()
            nll += torch.nn.functional.cross_entropy(lg[:-1], x[0, 1:], reduction="sum").item()
            cnt += len(w) - 1
    return math.exp(nll / cnt), nll / cnt, cnt


def greedy(model, ids, steps):
    import torch

    with torch.no_grad():
        out = model(input_ids=torch.tensor([ids], dtype=torch.long), use_cache=True)
        pkv, last = out.past_key_values, out.logits[0, -1].float()
        toks, gaps = [], []
        for _ in range(steps):
            top2 = torch.topk(last, 2)
            gaps.append((top2.values[0] - top2.values[1]).item())
            nxt = int(torch.argmax(last).item())
            toks.append(nxt)
            out = model(input_ids=torch.tensor([[nxt]], dtype=torch.long), past_key_values=pkv, use_cache=True)
            pkv, last = out.past_key_values, out.logits[0, -1].float()
    return toks, gaps


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", required=True)
    ap.add_argument("--tok", default=".carry/tokenizer")
    ap.add_argument("--sample", default="testdata/trained/heldout-sample.txt")
    ap.add_argument("--model-out", required=True)
    ap.add_argument("--ref-out", required=True)
    args = ap.parse_args()

    t0 = time.time()
    import torch
    import transformers
    from safetensors.torch import load_file
    from tokenizers import Tokenizer
    from transformers import Qwen3_5MoeForCausalLM

    torch.set_num_threads(min(16, os.cpu_count() or 1))
    cfg = tr.make_config("eager", "eager")
    tok = Tokenizer.from_file(os.path.join(args.tok, "tokenizer.json"))
    with open(args.sample, "r", encoding="utf-8") as f:
        sample_ids = tok.encode(f.read()).ids
    assert len(sample_ids) >= PPL_TOKENS, len(sample_ids)
    ppl_ids = sample_ids[:PPL_TOKENS]
    prompt = sample_ids[:REF_PROMPT_LEN]

    sd = {k: v.to(torch.float32) for k, v in load_ckpt(args.ckpt).items()}
    model = Qwen3_5MoeForCausalLM(cfg).float().eval()
    model.load_state_dict(sd, strict=True)
    ppl_bf16 = perplexity(model, ppl_ids)
    print(f"bf16 checkpoint: held-out sample ppl {ppl_bf16[0]:.3f} (nll {ppl_bf16[1]:.4f}, {ppl_bf16[2]} preds)",
          flush=True)

    # ---- shipped MLX model
    os.makedirs(args.model_out, exist_ok=True)
    mt, quant = make_shipped(sd, cfg)
    path = os.path.join(args.model_out, "model.safetensors")
    mfx.save_st(dict(sorted(mt.items())), path, fmt="mlx")
    tr.save_config_json(cfg, os.path.join(args.model_out, "config.json"), "bfloat16")
    with open(os.path.join(args.model_out, "config.json")) as f:
        c = json.load(f)
    c["quantization"] = quant
    c["quantization_config"] = quant
    mfx.write_json(os.path.join(args.model_out, "config.json"), c, indent=2)
    for fn in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(os.path.join(args.tok, fn), os.path.join(args.model_out, fn))
    print(f"shipped model.safetensors {os.path.getsize(path)} bytes", flush=True)

    mt_back = load_file(path)
    sdq = mfx.mlx_to_hf(mt_back, cfg, GROUP)
    assert set(sdq) == set(sd), set(sdq) ^ set(sd)
    qerr = {k: (sdq[k] - sd[k]).abs().max().item() for k in sd}
    worst = sorted(qerr.items(), key=lambda kv: -kv[1])[:3]
    print(f"max |dequant - bf16| worst tensors: {worst}", flush=True)
    model.load_state_dict(sdq, strict=True)
    ppl_q = perplexity(model, ppl_ids)
    print(f"shipped (dequantized): held-out sample ppl {ppl_q[0]:.3f} (nll {ppl_q[1]:.4f})", flush=True)

    ref, stats = mfx.run_reference(model, prompt)
    print(f"reference stats {stats}", flush=True)
    gp = tok.encode(GREEDY_PROMPT).ids
    toks, gaps = greedy(model, gp, mfx.GREEDY_STEPS)
    ref["greedy_text"] = {"prompt": GREEDY_PROMPT, "prompt_ids": gp, "tokens": toks,
                          "text": tok.decode(toks, skip_special_tokens=False),
                          "min_top2_gap": min(gaps)}
    ref["prompt_text"] = tok.decode(prompt, skip_special_tokens=False)
    ref["perplexity"] = {
        "file": "testdata/trained/heldout-sample.txt",
        "method": (f"first {PPL_TOKENS} tokens of the file encoded with the model's tokenizer as one string; "
                   f"{PPL_TOKENS // PPL_WINDOW} non-overlapping windows of {PPL_WINDOW} tokens, each run "
                   f"from an empty state (no cache carried between windows); ppl = exp(mean NLL over the "
                   f"{ppl_q[2]} next-token predictions inside the windows); transformers f32 on CPU"),
        "tokens": PPL_TOKENS, "window": PPL_WINDOW, "predictions": ppl_q[2],
        "bf16_checkpoint": {"ppl": ppl_bf16[0], "nll": ppl_bf16[1]},
        "shipped_dequantized": {"ppl": ppl_q[0], "nll": ppl_q[1]},
    }
    ref["meta"] = {"transformers": transformers.__version__, "torch": torch.__version__, "dtype": "float32",
                   "device": "cpu", "generator": "scripts/train/make_reference.py",
                   "model": "models/qwen35-moe-tiny-trained (dequantized: q*scale+bias, bf16 tensors as f32, "
                            "norms = stored-1)",
                   "quantization": "experts 4-bit, other quantized modules 8-bit, group 64", "stats": stats}
    mfx.write_json(args.ref_out, ref)

    samples = {}
    for p in SAMPLE_PROMPTS:
        ids = tok.encode(p).ids
        t, _ = greedy(model, ids, 48)
        samples[p] = p + tok.decode(t, skip_special_tokens=False)
        print(f"--- greedy [{p}]: {samples[p]!r}", flush=True)
    mfx.write_json(os.path.join(os.path.dirname(args.ref_out), "samples.json"), samples, indent=1)
    print(f"greedy_text: {GREEDY_PROMPT!r} -> {ref['greedy_text']['text']!r}", flush=True)
    print(f"make_reference done in {time.time() - t0:.1f}s", flush=True)


if __name__ == "__main__":
    main()
