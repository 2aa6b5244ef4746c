#!/usr/bin/env python3
"""Fine-tune the built-in model into the tiny chat model (issue 14), on one GPU.

Starts from the SHIPPED weights of models/qwen35-moe-tiny-trained (MLX affine: 4-bit experts, 8-bit
rest, group 64), dequantized (w = q * scale + bias per group; norms stored as 1 + w) with
scripts/make_model_fixtures.py's `mlx_to_hf`: the bf16 training checkpoint is not in the repository.

Data: the output of scripts/train/make_chat_data.py (.carry/chat): rendered, tokenized conversations
with a mask of the assistant's tokens, and a slice of the base pretraining corpus.

Training: one conversation per row (no packing, so every conversation starts from an empty state at
position 0, as at inference), rows grouped by length into batches of about --batch-tokens tokens
(padding included), right-padded (causal: padding after a row's end cannot change it); the loss is
the mean cross-entropy over the assistant's tokens only (their content, tool calls and <|im_end|>).
Every step also takes a batch of --base-rows windows of 512 tokens of the base corpus, weighted
--base-weight, so that the model keeps its language modelling. AdamW (0.9, 0.95), wd 0.1 on matrices,
linear warmup, cosine to 10% over the run (progress = the larger of steps and time used), grad clip
1.0, MoE load-balancing loss 0.001, bf16 autocast with fp32 master weights, seed 1234.

Then: held-out losses (chat assistant tokens; base corpus) before and after, for the fine-tuned
weights and for the re-quantized shipped form (dequantized), a few greedy samples, and the export:

  $OUT/ship/model.safetensors, $OUT/ship/config.json   the MLX form (as scripts/train/make_reference.py)
  $OUT/ckpt/model-0000N.safetensors, config.json      bf16 checkpoint (transformers naming)
  $OUT/summary.json                                    losses, curve, samples, settings

On the device machine (torch + transformers 5.17):

    PYTHONUNBUFFERED=1 python3 scripts/train/finetune_chat.py --data .carry/chat --out $OUT
"""

import argparse
import json
import math
import os
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.abspath(os.path.join(HERE, "..", ".."))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, HERE)
import make_model_fixtures as mfx  # noqa: E402

SEED = 1234
GROUP = 64
PAD = 8183
IM_END = 8185
SAMPLE_REQUESTS = [
    ("Hello!", True),
    ("What can you do?", True),
    ("Show me the package curl.", True),
    ("Which files does jq install?", True),
    ("Search for packages about sudoku.", True),
    ("What is rsync?", True),
    ("What is git?", False),
]


def read_array(path, dtype):
    """A raw array file, or its .xz (what travels to the device machine: the repeated system
    prompt makes the token files compress ~10x)."""
    if os.path.exists(path):
        return np.fromfile(path, dtype=dtype)
    import lzma

    with lzma.open(path + ".xz") as f:
        return np.frombuffer(f.read(), dtype=dtype).copy()


def load_split(data, name):
    ids = read_array(os.path.join(data, f"{name}_ids.bin"), np.uint16)
    off = np.load(os.path.join(data, f"{name}_off.npy"))
    mask = np.unpackbits(read_array(os.path.join(data, f"{name}_mask.bin"), np.uint8), count=int(off[-1]))
    assert ids.size == mask.size == off[-1], (ids.size, mask.size, off[-1])
    return ids, mask, off


def make_batches(off, batch_tokens, rng, round_to=64):
    """Lists of conversation indices, each with (rows * longest row rounded up) <= batch_tokens."""
    lens = np.diff(off)
    order = np.argsort(lens, kind="stable")
    batches, cur, cur_max = [], [], 0
    for i in order:
        m = max(cur_max, int(-(-lens[i] // round_to) * round_to))
        if cur and m * (len(cur) + 1) > batch_tokens:
            batches.append(cur)
            cur, m = [], int(-(-lens[i] // round_to) * round_to)
        cur.append(int(i))
        cur_max = m
    if cur:
        batches.append(cur)
    rng.shuffle(batches)
    return batches


def pad_batch(ids, mask, off, rows):
    """(x [B, T] int64, m [B, T] uint8): tokens right-padded with PAD, mask 0 on padding."""
    T = max(int(off[i + 1] - off[i]) for i in rows)
    x = np.full((len(rows), T), PAD, dtype=np.int64)
    m = np.zeros((len(rows), T), dtype=np.uint8)
    for r, i in enumerate(rows):
        a, b = int(off[i]), int(off[i + 1])
        x[r, :b - a] = ids[a:b]
        m[r, :b - a] = mask[a:b]
    return x, m


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base-model", default=os.path.join(ROOT, "models/qwen35-moe-tiny-trained"))
    ap.add_argument("--data", default=".carry/chat")
    ap.add_argument("--out", default=os.environ.get("OUT", "/tmp/chat-out"))
    ap.add_argument("--epochs", type=float, default=2.0)
    ap.add_argument("--batch-tokens", type=int, default=65536)
    ap.add_argument("--base-rows", type=int, default=16)
    ap.add_argument("--base-weight", type=float, default=0.3)
    ap.add_argument("--lr", type=float, default=6e-4)
    ap.add_argument("--warmup", type=int, default=40)
    ap.add_argument("--wd", type=float, default=0.1)
    ap.add_argument("--time-limit", type=float, default=300.0, help="training seconds (the schedule anneals by then)")
    ap.add_argument("--dry", action="store_true", help="check data and batching only (no torch)")
    args = ap.parse_args()

    t_start = time.time()
    ids, mask, off = load_split(args.data, "train")
    hids, hmask, hoff = load_split(args.data, "heldout")
    base_tr = read_array(os.path.join(args.data, "base_train.bin"), np.uint16)
    base_ho = read_array(os.path.join(args.data, "base_heldout.bin"), np.uint16)
    rng = np.random.default_rng(SEED)
    batches = make_batches(off, args.batch_tokens, rng)
    hbatches = make_batches(hoff, args.batch_tokens, np.random.default_rng(SEED))
    padded = sum(len(b) * max(int(off[i + 1] - off[i]) for i in b) for b in batches)
    print(f"train: {len(off) - 1} conversations, {off[-1]} tokens ({int(mask.sum())} supervised), "
          f"{len(batches)} batches/epoch, padding {1 - off[-1] / padded:.1%}; held-out {len(hoff) - 1} "
          f"conversations ({int(hmask.sum())} supervised); base {base_tr.size} + {base_ho.size} tokens",
          flush=True)
    x, m = pad_batch(ids, mask, off, batches[0])
    assert x.max() < 8192 and m.sum() > 0
    if args.dry:
        return

    import torch
    import transformers
    from safetensors.torch import load_file, save_file
    from transformers import Qwen3_5MoeForCausalLM

    import make_reference as mr
    import train as tr

    print(f"torch {torch.__version__} transformers {transformers.__version__} "
          f"device {torch.cuda.get_device_name(0)}", flush=True)
    dev = torch.device("cuda")
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.manual_seed(SEED)
    cfg = tr.make_config("sdpa", "grouped_mm")
    mt = load_file(os.path.join(args.base_model, "model.safetensors"))
    sd0 = mfx.mlx_to_hf(mt, cfg, GROUP)
    model = Qwen3_5MoeForCausalLM(cfg)
    model.load_state_dict(sd0, strict=True)
    model = model.float().to(dev)
    V = cfg.vocab_size

    def chat_loss(model, x, m, reduction="mean"):
        xt = torch.from_numpy(x).to(dev)
        mt_ = torch.from_numpy(m[:, 1:].astype(np.float32)).to(dev)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(input_ids=xt[:, :-1], output_router_logits=model.training, use_cache=False)
        ce = torch.nn.functional.cross_entropy(out.logits.float().reshape(-1, V), xt[:, 1:].reshape(-1),
                                               reduction="none").reshape(mt_.shape)
        s = (ce * mt_).sum()
        if reduction == "sum":
            return s, mt_.sum(), out
        return s / mt_.sum().clamp(min=1), out

    T_BASE = 512
    ar = torch.arange(T_BASE + 1, device=dev)
    base_tr_t = torch.from_numpy(base_tr.astype(np.int64)).to(dev)
    base_ho_t = torch.from_numpy(base_ho.astype(np.int64)).to(dev)
    gen = torch.Generator(device=dev).manual_seed(SEED)

    def base_loss(model, x):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(input_ids=x[:, :-1], output_router_logits=model.training, use_cache=False)
        return torch.nn.functional.cross_entropy(out.logits.float().reshape(-1, V), x[:, 1:].reshape(-1)), out

    @torch.no_grad()
    def evaluate(model):
        model.eval()
        tot, cnt = 0.0, 0.0
        for b in hbatches:
            x, m = pad_batch(hids, hmask, hoff, b)
            s, c, _ = chat_loss(model, x, m, reduction="sum")
            tot += s.item()
            cnt += c.item()
        n = min(96, (base_ho_t.numel() - 1) // T_BASE)
        starts = torch.arange(n, device=dev) * T_BASE
        bl = base_loss(model, base_ho_t[starts[:, None] + ar])[0].item()
        model.train()
        return {"chat_nll": tot / cnt, "chat_ppl": math.exp(tot / cnt), "chat_tokens": int(cnt),
                "base_nll": bl, "base_ppl": math.exp(bl)}

    ev0 = evaluate(model)
    print(f"before: {json.dumps(ev0)}", flush=True)

    model.train()
    opt = torch.optim.AdamW(tr.param_groups(model, args.wd), lr=args.lr, betas=(0.9, 0.95), fused=True)
    total = int(args.epochs * len(batches))
    curve = {"step": [], "time_s": [], "chat_loss": [], "base_loss": [], "lr": []}
    t0 = time.time()
    step, epoch_rng = 0, np.random.default_rng(SEED + 1)
    order = list(batches)
    while step < total:
        if step and step % len(batches) == 0:
            order = list(batches)
            epoch_rng.shuffle(order)
        el = time.time() - t0
        progress = max(step / total, el / args.time_limit)
        if progress >= 1.0:
            print(f"time limit reached at step {step}", flush=True)
            break
        if step < args.warmup:
            lr = args.lr * (step + 1) / args.warmup
        else:
            lr = args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))
        for g in opt.param_groups:
            g["lr"] = lr
        x, m = pad_batch(ids, mask, off, order[step % len(batches)])
        cl, out = chat_loss(model, x, m)
        loss = cl + cfg.router_aux_loss_coef * out.aux_loss
        if args.base_rows:
            idx = torch.randint(0, base_tr_t.numel() - T_BASE - 1, (args.base_rows,), device=dev, generator=gen)
            bl, bout = base_loss(model, base_tr_t[idx[:, None] + ar])
            loss = loss + args.base_weight * (bl + cfg.router_aux_loss_coef * bout.aux_loss)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % 10 == 0:
            curve["step"].append(step)
            curve["time_s"].append(round(time.time() - t0, 1))
            curve["chat_loss"].append(cl.item())
            curve["base_loss"].append(bl.item() if args.base_rows else None)
            curve["lr"].append(lr)
            if step % 50 == 0:
                print(f"step {step}/{total} chat {cl.item():.4f} base {curve['base_loss'][-1]} lr {lr:.2e} "
                      f"{time.time() - t0:.0f}s", flush=True)
        step += 1
    train_time = time.time() - t0
    ev1 = evaluate(model)
    print(f"after ({step} steps, {train_time:.0f}s): {json.dumps(ev1)}", flush=True)

    # ---- export: bf16 checkpoint, then the shipped MLX form and its own held-out losses
    sd = {k: v.detach().to(torch.float32).cpu() for k, v in model.state_dict().items()}
    os.makedirs(os.path.join(args.out, "ckpt"), exist_ok=True)
    shards, cur, n = [], {}, 0
    for k in sorted(sd):
        b = sd[k].numel() * 2
        if cur and n + b > 14_000_000:
            shards.append(cur)
            cur, n = {}, 0
        cur[k] = sd[k].to(torch.bfloat16).contiguous()
        n += b
    shards.append(cur)
    for i, s in enumerate(shards):
        save_file(s, os.path.join(args.out, "ckpt", f"model-{i + 1:05d}.safetensors"), metadata={"format": "pt"})
    tr.save_config_json(cfg, os.path.join(args.out, "ckpt", "config.json"), "bfloat16")

    ship = os.path.join(args.out, "ship")
    os.makedirs(ship, exist_ok=True)
    mts, quant = mr.make_shipped(sd, cfg)
    path = os.path.join(ship, "model.safetensors")
    mfx.save_st(dict(sorted(mts.items())), path, fmt="mlx")
    tr.save_config_json(cfg, os.path.join(ship, "config.json"), "bfloat16")
    with open(os.path.join(ship, "config.json")) as f:
        c = json.load(f)
    c["quantization"] = quant
    c["quantization_config"] = quant
    mfx.write_json(os.path.join(ship, "config.json"), c, indent=2)
    print(f"shipped model.safetensors {os.path.getsize(path)} bytes", flush=True)
    sdq = mfx.mlx_to_hf(load_file(path), cfg, GROUP)
    model.load_state_dict({k: v.to(dev) for k, v in sdq.items()}, strict=True)
    evq = evaluate(model)
    print(f"shipped (re-quantized): {json.dumps(evq)}", flush=True)

    # ---- greedy samples of the shipped form
    try:
        samples = greedy_samples(model, args, dev)
    except Exception as e:  # noqa: BLE001 (the export above is what matters)
        print(f"no samples: {type(e).__name__}: {e}", flush=True)
        samples = []

    summary = {"before": ev0, "after_bf16": ev1, "after_shipped": evq, "steps": step, "planned_steps": total,
               "train_time_s": round(train_time, 1), "batches_per_epoch": len(batches),
               "epochs": step / len(batches), "args": vars(args), "seed": SEED,
               "shipped_bytes": os.path.getsize(path), "device": torch.cuda.get_device_name(0),
               "torch": torch.__version__, "transformers": transformers.__version__,
               "samples": samples, "curve": curve}
    mfx.write_json(os.path.join(args.out, "summary.json"), summary, indent=1)
    print(f"finetune_chat.py done in {time.time() - t_start:.1f}s", flush=True)


def greedy_samples(model, args, dev):
    import torch
    from tokenizers import Tokenizer

    import make_chat_data as mcd

    tok = Tokenizer.from_file(os.path.join(args.base_model, "tokenizer.json"))
    with open(os.path.join(ROOT, "models/qwen35-moe-tiny-chat/chat_template.jinja"), encoding="utf-8") as f:
        tpl = mcd.make_env().from_string(f.read())
    model.eval()
    samples = []
    with torch.no_grad():
        for text, tools in SAMPLE_REQUESTS:
            prompt = mcd.render(tpl, [{"role": "user", "content": text}], tools, add_generation_prompt=True)
            seq = tok.encode(prompt, add_special_tokens=False).ids
            n0 = len(seq)
            for _ in range(96):
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    lg = model(input_ids=torch.tensor([seq], device=dev), use_cache=False).logits[0, -1]
                t = int(lg.argmax().item())
                seq.append(t)
                if t == IM_END:
                    break
            reply = tok.decode(seq[n0:], skip_special_tokens=False)
            samples.append({"user": text, "tools": tools, "greedy": reply})
            print(f"--- [{'tools' if tools else 'no tools'}] {text!r} -> {reply!r}", flush=True)
    return samples


if __name__ == "__main__":
    main()
