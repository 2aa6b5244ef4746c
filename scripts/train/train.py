#!/usr/bin/env python3
"""Train the flashmoe tiny Qwen3.5-MoE model from scratch (issue 6), on one GPU.

Model: transformers' Qwen3_5MoeForCausalLM (both layer types: L,L,L,F,L,L,L,F), hidden 256,
32 experts (top-4, renormalised) of intermediate 64 plus a shared expert of intermediate 128,
GatedDeltaNet heads 2 (key) / 4 (value) of 64, full attention 4 query / 2 kv heads of 64 with
partial RoPE 0.25, vocab 8192, untied embeddings. Sizes were chosen so that the shipped MLX form
(4-bit experts, 8-bit everything else, group 64) stays under 16 MB.

Data: uint16 token ids written by scripts/train/train_tokenizer.py (.carry/data/{train,heldout}.bin).
Training samples random windows of SEQ+1 tokens (seeded generator), bf16 autocast, fp32 master
weights, AdamW (0.9, 0.95, wd 0.1 on matrices) with linear warmup and cosine decay to 10%,
grad clip 1.0, MoE load-balancing loss (coef 0.001, transformers' own).

Writes to --out: ckpt/model-0000N.safetensors (bf16 state dict in transformers' in-memory naming,
sharded < 16 MB), ckpt/config.json, loss.json (curve), loss.png (if matplotlib is there), and
prints a summary.

On the device machine (reads .carry/data, needs torch + transformers 5.17):

    PYTHONUNBUFFERED=1 python3 scripts/train/train.py --data .carry/data --out $OUT --steps 1400
    PYTHONUNBUFFERED=1 python3 scripts/train/train.py --data .carry/data --smoke   # throughput only
"""

import argparse
import json
import math
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import make_model_fixtures as mfx  # noqa: E402

SEED = 1234
VOCAB = 8192
EOT_ID = 8183


def text_kwargs():
    return dict(
        vocab_size=VOCAB,
        hidden_size=256,
        num_hidden_layers=8,
        layer_types=["linear_attention"] * 3 + ["full_attention"] + ["linear_attention"] * 3
        + ["full_attention"],
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        linear_num_key_heads=2,
        linear_num_value_heads=4,
        linear_key_head_dim=64,
        linear_value_head_dim=64,
        linear_conv_kernel_dim=4,
        num_experts=32,
        num_experts_per_tok=4,
        moe_intermediate_size=64,
        shared_expert_intermediate_size=128,
        rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25,
                         "mrope_section": [3, 3, 2], "mrope_interleaved": True},
        tie_word_embeddings=False,
        eos_token_id=EOT_ID,
        bos_token_id=None,
        pad_token_id=EOT_ID,
        max_position_embeddings=4096,
        router_aux_loss_coef=0.001,
        initializer_range=0.02,
    )


def make_config(attn="sdpa", experts="eager"):
    from transformers import Qwen3_5MoeTextConfig

    cfg = Qwen3_5MoeTextConfig(**text_kwargs())
    cfg._attn_implementation = attn
    cfg._experts_implementation = experts
    return cfg


def count_params(model, cfg):
    total = sum(p.numel() for p in model.parameters())
    experts = sum(p.numel() for n, p in model.named_parameters() if ".mlp.experts." in n)
    embed = model.model.embed_tokens.weight.numel()
    active = total - experts + experts * cfg.num_experts_per_tok // cfg.num_experts
    return {"total": total, "experts": experts, "non_expert": total - experts,
            "active_per_token": active, "active_excl_embedding": active - embed,
            "embedding": embed, "lm_head": model.lm_head.weight.numel()}


def save_config_json(cfg, path, dtype):
    import transformers

    c = mfx.clean_cfg(cfg.to_dict())
    c["architectures"] = ["Qwen3_5MoeForCausalLM"]
    c["model_type"] = "qwen3_5_moe_text"
    c["dtype"] = dtype
    c["transformers_version"] = transformers.__version__
    for k in ("_experts_implementation", "experts_implementation"):
        c.pop(k, None)
    mfx.write_json(path, dict(sorted(c.items())), indent=2)


def param_groups(model, wd):
    decay, no_decay = [], []
    for n, p in model.named_parameters():
        if p.dim() >= 2 and "conv1d" not in n:
            decay.append(p)
        else:
            no_decay.append(p)
    return [{"params": decay, "weight_decay": wd}, {"params": no_decay, "weight_decay": 0.0}]


def lr_at(step, total, peak, warmup, floor=0.1):
    if step < warmup:
        return peak * (step + 1) / warmup
    t = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t)))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=".carry/data")
    ap.add_argument("--out", default=os.environ.get("OUT", "/tmp/train-out"))
    ap.add_argument("--steps", type=int, default=1400)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--warmup", type=int, default=150)
    ap.add_argument("--wd", type=float, default=0.1)
    ap.add_argument("--experts-impl", default="grouped_mm")
    ap.add_argument("--time-limit", type=float, default=450.0,
                    help="stop the loop early (schedule unfinished) if training runs past this many seconds")
    ap.add_argument("--eval-every", type=int, default=200)
    ap.add_argument("--smoke", action="store_true", help="only measure throughput of a few variants")
    args = ap.parse_args()

    t_start = time.time()
    import torch
    import transformers
    from safetensors.torch import save_file
    from transformers import Qwen3_5MoeForCausalLM

    print(f"torch {torch.__version__} transformers {transformers.__version__} "
          f"device {torch.cuda.get_device_name(0)}; imports {time.time() - t_start:.1f}s", flush=True)
    dev = torch.device("cuda")
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True

    train = torch.from_numpy(np.fromfile(os.path.join(args.data, "train.bin"), dtype=np.uint16).astype(np.int64)).to(dev)
    held = torch.from_numpy(np.fromfile(os.path.join(args.data, "heldout.bin"), dtype=np.uint16).astype(np.int64)).to(dev)
    print(f"train tokens {train.numel()}, held-out tokens {held.numel()}", flush=True)
    T, B = args.seq, args.batch
    ar = torch.arange(T + 1, device=dev)

    def build(experts_impl):
        torch.manual_seed(SEED)
        cfg = make_config("sdpa", experts_impl)
        m = Qwen3_5MoeForCausalLM(cfg).to(dev)
        m.train()
        return cfg, m

    def get_batch(gen):
        idx = torch.randint(0, train.numel() - T - 1, (B,), device=dev, generator=gen)
        x = train[idx[:, None] + ar]
        return x

    def step_fn(model, opt, x, lr):
        for g in opt.param_groups:
            g["lr"] = lr
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(input_ids=x[:, :-1], output_router_logits=True, use_cache=False)
        lm = torch.nn.functional.cross_entropy(out.logits.float().reshape(-1, VOCAB), x[:, 1:].reshape(-1))
        loss = lm + model.config.router_aux_loss_coef * out.aux_loss
        loss.backward()
        gn = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return lm.detach(), out.aux_loss.detach(), gn

    @torch.no_grad()
    def evaluate(model, max_windows=None):
        model.eval()
        n = (held.numel() - 1) // T
        if max_windows:
            n = min(n, max_windows)
        tot, cnt = 0.0, 0
        for i in range(0, n, 64):
            j = min(n, i + 64)
            starts = torch.arange(i, j, device=dev) * T
            x = held[starts[:, None] + ar[:T]]
            y = held[starts[:, None] + ar[:T] + 1]
            with torch.autocast("cuda", dtype=torch.bfloat16):
                logits = model(input_ids=x, use_cache=False).logits
            l = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1),
                                                  reduction="sum")
            tot += l.item()
            cnt += y.numel()
        model.train()
        return tot / cnt

    if args.smoke:
        for impl in ("grouped_mm", "eager"):
            try:
                cfg, model = build(impl)
                if impl == "grouped_mm":
                    pc = count_params(model, cfg)
                    print("params", json.dumps(pc), flush=True)
                opt = torch.optim.AdamW(param_groups(model, args.wd), lr=args.lr, betas=(0.9, 0.95), fused=True)
                gen = torch.Generator(device=dev).manual_seed(SEED)
                for i in range(3):
                    lmv, auxv, _ = step_fn(model, opt, get_batch(gen), 1e-4)
                torch.cuda.synchronize()
                t0 = time.time()
                n = 6
                for i in range(n):
                    lmv, auxv, _ = step_fn(model, opt, get_batch(gen), 1e-4)
                torch.cuda.synchronize()
                dt = (time.time() - t0) / n
                print(f"[smoke] experts={impl} B={B} T={T}: {dt * 1000:.0f} ms/step, {B * T / dt:.0f} tok/s, "
                      f"loss {lmv.item():.3f} aux {auxv.item():.3f} peak mem {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB",
                      flush=True)
                t0 = time.time()
                ev = evaluate(model, 64)
                print(f"[smoke] eval 64 windows {time.time() - t0:.1f}s loss {ev:.3f}", flush=True)
                del model, opt
                torch.cuda.empty_cache()
            except Exception as e:  # noqa: BLE001
                print(f"[smoke] experts={impl} FAILED {type(e).__name__}: {str(e)[:400]}", flush=True)
        print(f"smoke done in {time.time() - t_start:.1f}s", flush=True)
        return

    cfg, model = build(args.experts_impl)
    pc = count_params(model, cfg)
    print("params", json.dumps(pc), flush=True)
    opt = torch.optim.AdamW(param_groups(model, args.wd), lr=args.lr, betas=(0.9, 0.95), fused=True)
    gen = torch.Generator(device=dev).manual_seed(SEED)
    curve = {"step": [], "tokens": [], "time_s": [], "loss": [], "aux_loss": [], "lr": [], "grad_norm": [],
             "eval_step": [], "eval_loss": []}
    t0 = time.time()
    step = 0
    for step in range(args.steps):
        lr = lr_at(step, args.steps, args.lr, args.warmup)
        lmv, auxv, gn = step_fn(model, opt, get_batch(gen), lr)
        if step % 10 == 0 or step == args.steps - 1:
            aux = auxv.item()
            lm = lmv.item()
            el = time.time() - t0
            curve["step"].append(step)
            curve["tokens"].append((step + 1) * B * T)
            curve["time_s"].append(round(el, 2))
            curve["loss"].append(lm)
            curve["aux_loss"].append(aux)
            curve["lr"].append(lr)
            curve["grad_norm"].append(gn.item())
            if step % 50 == 0:
                print(f"step {step} loss {lm:.4f} aux {aux:.3f} lr {lr:.2e} gn {gn.item():.2f} "
                      f"{el:.0f}s {(step + 1) * B * T / max(el, 1e-6):.0f} tok/s", flush=True)
            if el > args.time_limit:
                print(f"time limit reached at step {step}", flush=True)
                break
        if args.eval_every and step > 0 and step % args.eval_every == 0:
            ev = evaluate(model, 96)
            curve["eval_step"].append(step)
            curve["eval_loss"].append(ev)
            print(f"  eval@{step}: {ev:.4f} (ppl {math.exp(ev):.2f})", flush=True)
    train_time = time.time() - t0
    steps_done = step + 1
    # final train loss: mean of the last 5 logged points (every 10 steps: the last ~50 steps)
    final_eval = evaluate(model, None)
    curve["eval_step"].append(steps_done - 1)
    curve["eval_loss"].append(final_eval)
    last = curve["loss"][-5:]
    summary = {
        "params": pc, "steps": steps_done, "tokens": steps_done * B * T, "train_time_s": round(train_time, 1),
        "tokens_per_s": round(steps_done * B * T / train_time), "seq": T, "batch": B, "lr": args.lr,
        "warmup": args.warmup, "wd": args.wd, "seed": SEED, "experts_impl": args.experts_impl,
        "final_train_loss_last50": sum(last) / len(last), "final_heldout_loss": final_eval,
        "final_heldout_ppl": math.exp(final_eval), "heldout_tokens": int((held.numel() - 1) // T * T),
        "epochs": steps_done * B * T / train.numel(), "device": torch.cuda.get_device_name(0),
    }
    curve["summary"] = summary
    print("summary", json.dumps(summary), flush=True)

    os.makedirs(os.path.join(args.out, "ckpt"), exist_ok=True)
    sd = {k: v.detach().to(torch.bfloat16).cpu().contiguous() for k, v in model.state_dict().items()}
    shards, cur, n = [], {}, 0
    for k in sorted(sd):
        b = sd[k].numel() * 2
        if cur and n + b > 14_000_000:
            shards.append(cur)
            cur, n = {}, 0
        cur[k] = sd[k]
        n += b
    shards.append(cur)
    for i, s in enumerate(shards):
        save_file(s, os.path.join(args.out, "ckpt", f"model-{i + 1:05d}.safetensors"), metadata={"format": "pt"})
    save_config_json(cfg, os.path.join(args.out, "ckpt", "config.json"), "bfloat16")
    mfx.write_json(os.path.join(args.out, "loss.json"), curve)
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4))
        ax.plot([t / 1e6 for t in curve["tokens"]], curve["loss"], label="train (lm loss)", lw=1)
        ax.plot([(s + 1) * B * T / 1e6 for s in curve["eval_step"]], curve["eval_loss"], "o-", label="held-out")
        ax.set_xlabel("tokens (M)")
        ax.set_ylabel("cross-entropy (nats)")
        ax.set_ylim(2, 7)
        ax.grid(alpha=0.3)
        ax.legend()
        ax.set_title("flashmoe qwen35-moe-tiny-trained")
        fig.tight_layout()
        fig.savefig(os.path.join(args.out, "loss.png"), dpi=100)
    except Exception as e:  # noqa: BLE001
        print(f"no loss.png: {e}", flush=True)
    print(f"train.py done in {time.time() - t_start:.1f}s", flush=True)


if __name__ == "__main__":
    main()
