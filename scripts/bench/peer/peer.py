#!/usr/bin/env python3
"""flashmoe side by side with llama.cpp on the same model and the same bytes (issue 12).

Steps (each a subcommand; README.md in this folder has the whole recipe):
  source   fetch llama.cpp from the pinned llama-cpp-python sdist (PyPI) and write a trimmed
           source tarball that a machine without network can build from (the GPU machine)
  build    configure and build llama.cpp (CPU, or --cuda for sm_90) plus logits.cpp
  model    a random-weight Hugging Face checkpoint at a real Qwen3.5-MoE geometry with N layers,
           converted by llama.cpp's own convert_hf_to_gguf.py (F16 → Q4_0 --pure and Q4_K_M with
           llama-quantize) and by `flashmoe convert` (packed affine 4-bit, group 64)
  bench    both engines alternated, R repetitions, in one regime (gpu, gpu2: split over two GPUs, gpu-ram, cpu); prints a
           table: median and spread of decode and prefill tok/s, bytes per token, peak RSS
  logits   a small f32 checkpoint: llama.cpp's logits (CPU, f32 GGUF) against `flashmoe logits`
           on the HF folder, prefill and token by token; max |diff|, logit std, greedy agreement

Nothing here runs in CI (minutes to hours); numbers go to docs/performance.md with the command.
Needs: python3 with numpy; `model` also torch, transformers, sentencepiece-free tokenizers (the
converter's imports); `build` cmake (pip install cmake) and a C++ compiler (nvcc for --cuda).
"""
from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import os
import re
import shutil
import statistics
import struct
import subprocess
import sys
import tarfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]
SDIST_NAME = "llama_cpp_python-0.3.36.tar.gz"
SDIST_URL = (
    "https://files.pythonhosted.org/packages/ec/e9/"
    "e7de2b0463ea3ffbf0ede6cb21b58c1258a8f6521aae45ca773a59fe7cf3/" + SDIST_NAME
)
SDIST_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
# What the build and the converter need from the vendored tree (the rest is docs, test models, UI).
TRIM_EXCLUDE = ("models/", "docs/", "media/", "tests/", "benches/", "tools/ui/", "examples/", "pocs/")


def home() -> Path:
    return Path(os.environ.get("PEER_HOME", Path.home() / ".cache" / "flashmoe-peer"))


def log(msg: str) -> None:
    print(f"[peer] {msg}", file=sys.stderr, flush=True)


def run(cmd, **kw) -> subprocess.CompletedProcess:
    log("$ " + " ".join(str(c) for c in cmd))
    return subprocess.run([str(c) for c in cmd], check=True, **kw)


# ------------------------------------------------------------------------------------------
# source / build


def src_dir() -> Path:
    return home() / "llama.cpp"


def cmd_source(a) -> None:
    """Unpack llama.cpp (vendored in the sdist) into PEER_HOME/llama.cpp; write a trimmed tarball."""
    dst = src_dir()
    if a.tarball_in:
        dst.mkdir(parents=True, exist_ok=True)
        with tarfile.open(a.tarball_in) as t:
            t.extractall(dst, filter="data")
        log(f"llama.cpp source from {a.tarball_in} in {dst}")
        return
    sdist = home() / SDIST_NAME
    if not sdist.exists():
        home().mkdir(parents=True, exist_ok=True)
        log(f"downloading {SDIST_URL}")
        tmp = sdist.with_suffix(".partial")
        urllib.request.urlretrieve(SDIST_URL, tmp)
        tmp.rename(sdist)
    digest = hashlib.sha256(sdist.read_bytes()).hexdigest()
    if digest != SDIST_SHA256:
        sys.exit(f"{sdist}: sha256 {digest}, expected {SDIST_SHA256}")
    prefix = "llama_cpp_python-0.3.36/vendor/llama.cpp/"
    if dst.exists():
        shutil.rmtree(dst)
    dst.mkdir(parents=True)
    with tarfile.open(sdist) as t:
        members = []
        for m in t.getmembers():
            if not m.name.startswith(prefix):
                continue
            rel = m.name[len(prefix):]
            if not rel or any(rel.startswith(x) for x in TRIM_EXCLUDE):
                continue
            m.name = rel
            members.append(m)
        t.extractall(dst, members=members, filter="data")
    log(f"llama.cpp ({len(members)} files) in {dst}")
    if a.tarball_out:
        with tarfile.open(a.tarball_out, "w:xz") as t:
            t.add(dst, arcname=".")
        log(f"trimmed source: {a.tarball_out} ({os.path.getsize(a.tarball_out) / 2**20:.1f} MiB)")


def build_dir(cuda: bool) -> Path:
    return home() / ("build-cuda" if cuda else "build-cpu")


def cmd_build(a) -> None:
    src, bdir = src_dir(), build_dir(a.cuda)
    if not (src / "CMakeLists.txt").exists():
        sys.exit(f"no llama.cpp source in {src}: run `peer.py source` first")
    cfg = [
        "cmake", "-S", src, "-B", bdir, "-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_BUILD_TESTS=OFF",
        "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF", "-DLLAMA_BUILD_APP=OFF",
        "-DLLAMA_CURL=OFF", "-DGGML_NATIVE=ON", "-DBUILD_SHARED_LIBS=ON",
    ]
    if a.cuda:
        cfg += ["-DGGML_CUDA=ON", f"-DCMAKE_CUDA_ARCHITECTURES={a.cuda_arch}"]
    if a.no_amx:
        cfg = [c for c in cfg if c != "-DGGML_NATIVE=ON"] + [
            "-DGGML_NATIVE=OFF", "-DGGML_AVX2=ON", "-DGGML_FMA=ON", "-DGGML_F16C=ON", "-DGGML_AVX512=ON",
            "-DGGML_AVX512_VBMI=ON", "-DGGML_AVX512_VNNI=ON", "-DGGML_AVX512_BF16=ON",
        ]
    # A build that was killed part way (a device call's end) can leave truncated objects that
    # make no longer rebuilds: without the stamp of a finished build, start from an empty folder.
    done = bdir / ".peer-build-complete"
    if bdir.exists() and not done.exists():
        log(f"{bdir} has no finished build (interrupted?): starting over")
        shutil.rmtree(bdir)
    done.unlink(missing_ok=True)  # until this build finishes
    run(cfg)
    jobs = str(a.jobs or os.cpu_count() or 2)
    run(["cmake", "--build", bdir, "-j", jobs, "--target", "llama-bench", "llama-quantize"])
    lib = bdir / "bin"
    run([
        os.environ.get("CXX", "g++"), "-O2", "-std=c++17", REPO / "scripts/bench/peer/logits.cpp",
        "-I", src / "include", "-I", src / "ggml/include", "-L", lib, "-lllama", "-lggml",
        "-lggml-base", f"-Wl,-rpath,{lib}", "-o", lib / "peer-logits",
    ])
    done.touch()
    log(f"built {lib}/llama-bench, llama-quantize, peer-logits")


def tool(name: str, cuda: bool) -> Path:
    p = build_dir(cuda) / "bin" / name
    if not p.exists():
        sys.exit(f"{p} missing: run `peer.py build{' --cuda' if cuda else ''}`")
    return p


# ------------------------------------------------------------------------------------------
# model

GEOMETRIES = {
    # hidden, layers, heads, linear value heads, experts, top-k, expert intermediate
    "qwen3.5-35b-a3b": (2048, 40, 16, 32, 256, 8, 512),
    "qwen3.5-122b-a10b": (3072, 48, 32, 64, 256, 8, 1024),
    "qwen3.5-397b-a17b": (4096, 60, 32, 64, 512, 10, 1024),
    "tiny": (64, 4, 4, 4, 16, 4, 64),
}


def hf_config(geometry: str, layers: int, vocab: int) -> dict:
    hidden, full_layers, heads, lvh, experts, top_k, inter = GEOMETRIES[geometry]
    tiny = geometry == "tiny"
    n = layers or full_layers
    return {
        "architectures": ["Qwen3_5MoeForCausalLM"],
        "model_type": "qwen3_5_moe_text",
        "hidden_size": hidden,
        "num_hidden_layers": n,
        "num_attention_heads": heads,
        "num_key_value_heads": 2,
        "head_dim": 64 if tiny else 256,
        "linear_num_key_heads": 2 if tiny else 16,
        "linear_num_value_heads": lvh,
        "linear_key_head_dim": 16 if tiny else 128,
        "linear_value_head_dim": 16 if tiny else 128,
        "linear_conv_kernel_dim": 4,
        "num_experts": experts,
        "num_experts_per_tok": top_k,
        "moe_intermediate_size": inter,
        "shared_expert_intermediate_size": inter,
        "vocab_size": vocab,
        "full_attention_interval": 4,
        "layer_types": ["full_attention" if (i + 1) % 4 == 0 else "linear_attention" for i in range(n)],
        "rope_parameters": {
            "rope_type": "default", "rope_theta": 1e4 if tiny else 1e7, "partial_rotary_factor": 0.25,
            "mrope_section": [3, 3, 2] if tiny else [11, 11, 10], "mrope_interleaved": True,
        },
        "rms_norm_eps": 1e-6,
        "hidden_act": "silu",
        "attention_bias": False,
        "tie_word_embeddings": False,
        "max_position_embeddings": 262144,
        "eos_token_id": 248044,
        "torch_dtype": "bfloat16",
    }


def hf_tensors(c: dict):
    """(name, shape, kind) of every tensor, HF names of a `Qwen3_5MoeForCausalLM` text model with
    one tensor per expert (the layout both converters read)."""
    h, v = c["hidden_size"], c["vocab_size"]
    yield "model.embed_tokens.weight", (v, h), "w"
    for i, kind in enumerate(c["layer_types"]):
        p = f"model.layers.{i}."
        yield p + "input_layernorm.weight", (h,), "norm"
        yield p + "post_attention_layernorm.weight", (h,), "norm"
        if kind == "full_attention":
            hd, nh, kv = c["head_dim"], c["num_attention_heads"], c["num_key_value_heads"]
            yield p + "self_attn.q_proj.weight", (2 * nh * hd, h), "w"
            yield p + "self_attn.k_proj.weight", (kv * hd, h), "w"
            yield p + "self_attn.v_proj.weight", (kv * hd, h), "w"
            yield p + "self_attn.o_proj.weight", (h, nh * hd), "w"
            yield p + "self_attn.q_norm.weight", (hd,), "norm"
            yield p + "self_attn.k_norm.weight", (hd,), "norm"
        else:
            hk, dk = c["linear_num_key_heads"], c["linear_key_head_dim"]
            hv, dv = c["linear_num_value_heads"], c["linear_value_head_dim"]
            conv = 2 * hk * dk + hv * dv
            yield p + "linear_attn.in_proj_qkv.weight", (conv, h), "w"
            yield p + "linear_attn.in_proj_z.weight", (hv * dv, h), "w"
            yield p + "linear_attn.in_proj_a.weight", (hv, h), "w"
            yield p + "linear_attn.in_proj_b.weight", (hv, h), "w"
            yield p + "linear_attn.conv1d.weight", (conv, 1, c["linear_conv_kernel_dim"]), "w"
            yield p + "linear_attn.A_log", (hv,), "alog"
            yield p + "linear_attn.dt_bias", (hv,), "ones"
            yield p + "linear_attn.norm.weight", (dv,), "ones"
            yield p + "linear_attn.out_proj.weight", (h, hv * dv), "w"
        e, inter, sh = c["num_experts"], c["moe_intermediate_size"], c["shared_expert_intermediate_size"]
        yield p + "mlp.gate.weight", (e, h), "w"
        for x in range(e):
            q = f"{p}mlp.experts.{x}."
            yield q + "gate_proj.weight", (inter, h), "w"
            yield q + "up_proj.weight", (inter, h), "w"
            yield q + "down_proj.weight", (h, inter), "w"
        yield p + "mlp.shared_expert.gate_proj.weight", (sh, h), "w"
        yield p + "mlp.shared_expert.up_proj.weight", (sh, h), "w"
        yield p + "mlp.shared_expert.down_proj.weight", (h, sh), "w"
        yield p + "mlp.shared_expert_gate.weight", (1, h), "w"
    yield "model.norm.weight", (h,), "norm"
    yield "lm_head.weight", (v, h), "w"


def write_safetensors(out: Path, c: dict, dtype: str, seed: int, shard_bytes: int = 4 << 30) -> None:
    """Random weights (N(0, 0.02) matrices; zero-centred norms near 0; A_log ~ log U(1,16)),
    written in safetensors shards with an index, as save_pretrained does."""
    import numpy as np

    rng = np.random.default_rng(seed)
    # Large tensors are cut from one pool of normals at random offsets: fresh numbers for every
    # tensor would take minutes at real geometries, and the benchmark needs sizes, not entropy.
    pool = rng.standard_normal(1 << 24, dtype=np.float32)
    item = {"bf16": 2, "f32": 4}[dtype]
    st_dtype = {"bf16": "BF16", "f32": "F32"}[dtype]
    shards, cur, size = [], [], 0
    for name, shape, kind in hf_tensors(c):
        n = int(np.prod(shape)) * item
        if cur and size + n > shard_bytes:
            shards.append(cur)
            cur, size = [], 0
        cur.append((name, shape, kind))
        size += n
    shards.append(cur)
    weight_map = {}
    for s, tensors in enumerate(shards):
        fname = f"model-{s + 1:05d}-of-{len(shards):05d}.safetensors"
        header, off = {}, 0
        for name, shape, _ in tensors:
            n = int(np.prod(shape)) * item
            header[name] = {"dtype": st_dtype, "shape": list(shape), "data_offsets": [off, off + n]}
            off += n
            weight_map[name] = fname
        hb = json.dumps(header, separators=(",", ":")).encode()
        hb += b" " * (-len(hb) % 8)
        tmp = out / (fname + ".partial")
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(hb)) + hb)
            for name, shape, kind in tensors:
                count = int(np.prod(shape))
                if kind == "w":
                    std = 0.02 if "conv1d" not in name else 0.2
                    if count <= 1 << 16:
                        x = rng.standard_normal(count, dtype=np.float32) * std
                    else:
                        x = np.resize(pool[rng.integers(0, len(pool) // 2):], count) * std
                elif kind == "norm":
                    x = rng.standard_normal(count, dtype=np.float32) * 0.05
                elif kind == "alog":
                    x = np.log(rng.uniform(1, 16, count)).astype(np.float32)
                else:
                    x = np.ones(count, dtype=np.float32)
                if dtype == "bf16":
                    # round to nearest even bf16
                    u = x.view(np.uint32)
                    u = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
                    f.write(u.tobytes())
                else:
                    f.write(x.tobytes())
        tmp.rename(out / fname)
    total = sum(int(np.prod(s)) * item for _, s, _ in hf_tensors(c))
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1)
    )


def cmd_model(a) -> None:
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    hf = out / "hf"
    tok_src = REPO / "testdata/text/qwen3.5-tokenizer.json.gz"
    if not (hf / "config.json").exists():
        hf.mkdir(exist_ok=True)
        with gzip.open(tok_src) as f:
            tok = json.load(f)
        vocab = 248320  # the real models' embedding rows (the tokenizer has fewer ids)
        c = hf_config(a.geometry, a.layers, vocab)
        (hf / "tokenizer.json").write_text(json.dumps(tok))
        (hf / "tokenizer_config.json").write_text(json.dumps({
            "tokenizer_class": "Qwen2Tokenizer", "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
            "model_max_length": 262144, "add_prefix_space": False,
        }))
        (hf / "generation_config.json").write_text(json.dumps({"eos_token_id": [248046, 248044]}))
        log(f"writing random {a.dtype} weights: {a.geometry}, {c['num_hidden_layers']} layers, vocab {vocab}")
        write_safetensors(hf, c, a.dtype, a.seed)
        (hf / "config.json").write_text(json.dumps(c, indent=1))
    src = src_dir()
    conv_out = "f32" if a.dtype == "f32" else "f16"
    base = out / f"model-{conv_out.upper()}.gguf"
    if not base.exists():
        env = dict(os.environ, PYTHONPATH=str(src / "gguf-py"))
        run([sys.executable, src / "convert_hf_to_gguf.py", hf, "--outtype", conv_out, "--outfile",
             str(base) + ".partial", "--no-mtp"], env=env)
        os.rename(str(base) + ".partial", base)
    # `--quants ""` stops after the F16 file: the conversion needs no llama.cpp build, so a script
    # can run it while llama.cpp compiles and call `model` again for the rest.
    quants = [q for q in a.quants.split(",") if q]
    if a.dtype != "f32" and quants:
        quant = tool("llama-quantize", a.cuda)
        for qtype in quants:
            # Q4_0 is made pure (every tensor Q4_0): the same bytes per token as packed 4-bit.
            extra = ["--pure"] if qtype == "Q4_0" else []
            dst = out / f"model-{qtype}.gguf"
            if not dst.exists():
                run([quant, *extra, base, str(dst) + ".partial", qtype, str(os.cpu_count() or 2)])
                os.rename(str(dst) + ".partial", dst)
        packed = out / "packed-4bit"
        if not packed.exists():
            run([flashmoe(), "convert", hf, packed, "--expert-bits", "4", "--bits", "4"])
    log(f"model ready in {out}")


def flashmoe() -> Path:
    p = os.environ.get("FLASHMOE_BIN") or shutil.which("flashmoe") or REPO / "target/release/flashmoe"
    if not Path(p).exists():
        sys.exit("flashmoe binary not found: set FLASHMOE_BIN or build target/release/flashmoe")
    return Path(p)


# ------------------------------------------------------------------------------------------
# bytes per token


def gguf_bytes_per_token(path: Path) -> tuple[int, int]:
    """(bytes read per decoded token, file bytes): every tensor but the embedding table, routed
    expert tensors scaled by k/E."""
    sys.path.insert(0, str(src_dir() / "gguf-py"))
    from gguf import GGUFReader  # noqa: E402

    r = GGUFReader(str(path))
    arch = r.fields["general.architecture"].contents()
    k = int(r.fields[f"{arch}.expert_used_count"].contents())
    e = int(r.fields[f"{arch}.expert_count"].contents())
    total = 0
    for t in r.tensors:
        if t.name == "token_embd.weight":
            continue
        n = int(t.n_bytes)
        total += n * k // e if "_exps" in t.name else n
    return total, path.stat().st_size


def packed_bytes_per_token(d: Path) -> tuple[int, int]:
    m = json.loads((d / "manifest.json").read_text())
    k = m["config"].get("num_experts_per_tok") or m["config"]["text_config"]["num_experts_per_tok"]
    total = sum(t["nbytes"] for t in m["tensors"] if not t["name"].startswith("model.embed_tokens"))
    total += sum(k * layer["blob_bytes"] for layer in m["experts"])
    size = sum(f.stat().st_size for f in d.rglob("*") if f.is_file())
    return total, size


# ------------------------------------------------------------------------------------------
# bench


def timed(cmd, env=None, stderr=subprocess.STDOUT) -> tuple[str, int]:
    """Runs cmd; returns (stdout, with stderr unless told otherwise; peak RSS in bytes of the child)."""
    log("$ " + " ".join(str(c) for c in cmd))
    p = subprocess.Popen([str(c) for c in cmd], stdout=subprocess.PIPE, stderr=stderr, env=env)
    out = p.stdout.read().decode(errors="replace")
    _, status, ru = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status)
    if p.returncode != 0:
        sys.stderr.write(out[-4000:])
        sys.exit(f"failed ({p.returncode}): {cmd[0]}")
    return out, ru.ru_maxrss * 1024


def llama_run(a, gguf: Path, test: str) -> tuple[float, int]:
    # CPU regime: the CPU build, or the CUDA build with no device (`-dev none`), so that no
    # batched matmul is offloaded to a GPU behind the user's back.
    cuda = a.regime != "cpu" or not (build_dir(False) / "bin" / "llama-bench").exists()
    args = [tool("llama-bench", cuda), "-m", gguf, "-r", "1", "-o", "json", "-t", str(a.threads)]
    args += ["-p", str(a.pp), "-n", "0"] if test == "pp" else ["-p", "0", "-n", str(a.tg)]
    if a.regime == "gpu":
        # One GPU even where there are several (llama-bench splits over all of them otherwise).
        args += ["-ngl", "99", "-sm", "none", "-mg", "0"]
    elif a.regime == "gpu2":
        # The layers split over GPUs 0 and 1 (llama.cpp's default split mode, named).
        args += ["-ngl", "99", "-sm", "layer", "-dev", "CUDA0/CUDA1"]
    elif a.regime == "gpu-ram":
        args += ["-ngl", "99", "-ot", "exps=CPU"]
    else:
        args += ["-ngl", "0"] + (["-dev", "none"] if cuda else [])
    out, rss = timed(args)
    js = json.loads(out[out.index("["):out.rindex("]") + 1])
    return float(js[0]["avg_ts"]), rss


BENCH_LINE = re.compile(r"prefill (\d+) tok in [\d.]+ s \(([\d.]+) tok/s\) \| decode ([\d.]+) tok/s")


def flashmoe_run(a, packed: Path, test: str) -> tuple[float, int]:
    args = [flashmoe(), "bench", "decode", "--model", packed, "--routing", "model"]
    if test == "pp":
        args += ["--prefill", str(a.pp), "--tokens", "2", "--warmup", "0"]
    else:
        args += ["--prefill", "4", "--tokens", str(a.tg), "--warmup", "8"]
    if a.regime == "gpu":
        args += ["--device", "cuda", "--io", "page"]
    elif a.regime == "gpu2":
        args += ["--device", "cuda:0,1", "--io", "page"]
    elif a.regime == "gpu-ram":
        # The RAM tier holds every expert, so flashmoe loads them all before it measures (as
        # llama.cpp's mapped file is in the page cache): `auto` with no saved profile.
        args += ["--device", "cuda", "--gpu-cache", gpu_cache_size(packed, a.fm_gpu_cache), "--ram-cache", "100%",
                 "--io", "page", "--hybrid", "auto", "--routing-profile", "auto"]
    else:
        args += ["--device", "cpu", "--io", a.fm_cpu_io]
        if a.fm_cpu_io != "mmap":
            args += ["--ram-cache", "100%", "--routing-profile", "auto"]
    # A fresh cache folder per run: no routing profile from an earlier run changes this one.
    fm_home = home() / "flashmoe-home"
    shutil.rmtree(fm_home, ignore_errors=True)
    # ...but the compiled GPU kernels are shared (else each run spends a minute or more in NVRTC
    # before it measures anything; the cache is keyed by source and options, so sharing is safe).
    kernels = Path(os.environ.get("KCACHE") or home() / "flashmoe-kernel-cache")
    kernels.mkdir(parents=True, exist_ok=True)
    fm_home.mkdir(parents=True)
    (fm_home / "cuda").symlink_to(kernels.resolve(), target_is_directory=True)
    env = dict(os.environ, RAYON_NUM_THREADS=str(a.threads), FLASHMOE_HOME=str(fm_home))
    out, rss = timed(args, env)
    m = BENCH_LINE.search(out)
    if not m:
        sys.stderr.write(out[-3000:])
        sys.exit("no bench line in flashmoe's output")
    return float(m.group(2) if test == "pp" else m.group(3)), rss


def gpu_cache_size(packed: Path, spec: str) -> str:
    """`--gpu-cache` for flashmoe: a size as given, or a share of the model's expert bytes."""
    if not spec.endswith("%"):
        return spec
    if packed.suffix == ".gguf":
        sys.path.insert(0, str(src_dir() / "gguf-py"))
        from gguf import GGUFReader  # noqa: E402

        experts = sum(int(t.n_bytes) for t in GGUFReader(str(packed)).tensors if "_exps" in t.name)
        return f"{int(experts * float(spec[:-1]) / 100) >> 20}M"
    m = json.loads((packed / "manifest.json").read_text())
    experts = sum(layer["num_experts"] * layer["stride"] for layer in m["experts"])
    return f"{int(experts * float(spec[:-1]) / 100) >> 20}M"


def spread(xs: list[float]) -> str:
    return f"{statistics.median(xs):.1f} ({min(xs):.1f}–{max(xs):.1f})"


def cmd_bench(a) -> None:
    d = Path(a.dir)
    packed = d / "packed-4bit"
    ggufs = [d / f"model-{q}.gguf" for q in a.quants.split(",")]
    rows = [("flashmoe packed affine 4-bit g64", packed, packed_bytes_per_token(packed), flashmoe_run)]
    rows += [(f"llama.cpp {g.stem.split('-', 1)[1]}", g, gguf_bytes_per_token(g), llama_run) for g in ggufs]
    if a.fm_gguf:
        # flashmoe on the very files llama.cpp runs.
        rows += [(f"flashmoe {g.stem.split('-', 1)[1]}", g, gguf_bytes_per_token(g), flashmoe_run) for g in ggufs]
    res = {name: {"tg": [], "pp": [], "rss": 0} for name, *_ in rows}
    for rep in range(a.reps):
        for test in ("tg", "pp"):
            if test == "pp" and a.pp == 0:
                continue
            order = rows if rep % 2 == 0 else rows[::-1]
            for name, path, _, fn in order:
                tps, rss = fn(a, path, test)
                res[name][test].append(tps)
                res[name]["rss"] = max(res[name]["rss"], rss)
                log(f"rep {rep + 1} {test} {name}: {tps:.1f} tok/s, peak RSS {rss / 2**30:.2f} GiB")
    print(f"\nregime {a.regime}, threads {a.threads}, {a.reps} alternated repetitions, "
          f"tg{a.tg} / pp{a.pp}, {time.strftime('%Y-%m-%d')}")
    print("| engine, format | bytes / token | decode tok/s | prefill tok/s | peak RSS |")
    print("|---|---|---|---|---|")
    base = res[rows[0][0]]
    for name, _, (bpt, _), _ in rows:
        r = res[name]
        pp = spread(r["pp"]) if r["pp"] else "—"
        print(f"| {name} | {bpt / 2**20:.0f} MiB | {spread(r['tg'])} | {pp} | {r['rss'] / 2**30:.2f} GiB |")
    pairs = [(rows[0][0], name) for name, *_ in rows[1:] if name.startswith("llama.cpp")]
    pairs += [(name, "llama.cpp" + name[len("flashmoe"):]) for name, *_ in rows[1:] if name.startswith("flashmoe")]
    for ours, theirs in pairs:
        b, r = res[ours], res[theirs]
        line = f"{ours} / {theirs}: decode {statistics.median(b['tg']) / statistics.median(r['tg']):.2f}×"
        if r["pp"] and b["pp"]:
            line += f", prefill {statistics.median(b['pp']) / statistics.median(r['pp']):.2f}×"
        print(line)


# ------------------------------------------------------------------------------------------
# logits


def cmd_logits(a) -> None:
    import numpy as np

    d = Path(a.dir)
    gguf = d / "model-F32.gguf"
    hf = d / "hf"
    if not gguf.exists():
        sys.exit(f"{gguf} missing: run `peer.py model --geometry tiny --dtype f32 --out {d}`")
    ids = a.ids
    worst = 0.0
    for mode in ("prefill", "decode"):
        cuda = not (build_dir(False) / "bin" / "peer-logits").exists()
        out, _ = timed([tool("peer-logits", cuda), gguf, mode, ids], stderr=subprocess.DEVNULL)
        ref = np.array(json.loads(out[out.index("{"):])["logits"], dtype=np.float64)
        fm_args = [flashmoe(), "logits", "--model", hf, "--ids", ids, "--json", "--device", "cpu"]
        if mode == "decode":
            fm_args.append("--decode")
        out, _ = timed(fm_args, stderr=subprocess.DEVNULL)
        ours = np.array(json.loads(out[out.index("{"):])["logits"], dtype=np.float64)
        if ours.shape != ref.shape:
            sys.exit(f"{mode}: shapes differ: flashmoe {ours.shape}, llama.cpp {ref.shape}")
        diff = np.abs(ours - ref).max()
        worst = max(worst, diff)
        same = int((ours.argmax(1) == ref.argmax(1)).sum())
        print(f"{mode}: {ref.shape[0]} positions, max |flashmoe − llama.cpp| {diff:.3g}, "
              f"logit std {ref.std():.3g}, max |logit| {np.abs(ref).max():.3g}, "
              f"argmax equal at {same}/{ref.shape[0]}")
    if worst > a.tolerance:
        sys.exit(f"max difference {worst:.3g} above the tolerance {a.tolerance}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("source")
    s.add_argument("--tarball-out")
    s.add_argument("--tarball-in")
    s.set_defaults(fn=cmd_source)
    s = sub.add_parser("build")
    s.add_argument("--cuda", action="store_true")
    s.add_argument("--cuda-arch", default="90")
    s.add_argument("--jobs", type=int)
    # A VM may list AMX in its CPU flags and still fault on it (llama-bench died of SIGILL in its
    # prefill on the 2-core dev box of 2026-12-02): --no-amx builds for AVX-512 without AMX.
    s.add_argument("--no-amx", action="store_true")
    s.set_defaults(fn=cmd_build)
    s = sub.add_parser("model")
    s.add_argument("--geometry", default="qwen3.5-35b-a3b", choices=sorted(GEOMETRIES))
    s.add_argument("--layers", type=int, default=8)
    s.add_argument("--dtype", default="bf16", choices=["bf16", "f32"])
    s.add_argument("--seed", type=int, default=1)
    s.add_argument("--cuda", action="store_true", help="use the CUDA build's llama-quantize")
    s.add_argument("--quants", default="Q4_0,Q4_K_M",
                   help="llama-quantize types to make (Q4_0 pure, the others llama.cpp's mixes, e.g. "
                        "Q4_K_M, IQ4_XS); empty: only the F16 file")
    s.add_argument("--out", required=True)
    s.set_defaults(fn=cmd_model)
    s = sub.add_parser("bench")
    s.add_argument("--dir", required=True)
    s.add_argument("--regime", choices=["gpu", "gpu2", "gpu-ram", "cpu"], required=True)
    s.add_argument("--quants", default="Q4_0,Q4_K_M")
    s.add_argument("--threads", type=int, default=os.cpu_count())
    s.add_argument("--reps", type=int, default=3)
    s.add_argument("--tg", type=int, default=64)
    s.add_argument("--pp", type=int, default=512)
    s.add_argument("--fm-gpu-cache", default="10%", help="flashmoe --gpu-cache in the gpu-ram regime")
    s.add_argument("--fm-cpu-io", default="mmap", choices=["mmap", "page"], help="flashmoe --io on the CPU")
    s.add_argument("--fm-gguf", action="store_true", help="also run flashmoe on the GGUF files")
    s.set_defaults(fn=cmd_bench)
    s = sub.add_parser("logits")
    s.add_argument("--dir", required=True)
    s.add_argument("--ids", default="9707,11,1879,0,576,3974,315,279,5561,13,1083,30")
    s.add_argument("--tolerance", type=float, default=1e-3)
    s.set_defaults(fn=cmd_logits)
    a = ap.parse_args()
    a.fn(a)


if __name__ == "__main__":
    main()
