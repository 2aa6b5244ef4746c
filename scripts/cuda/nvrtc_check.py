#!/usr/bin/env python3
"""Compiles the CUDA kernels with NVRTC on a machine without a GPU, and optionally shows their SASS.

The engine compiles crates/engine/src/backend/cuda/kernels/*.cu with NVRTC when it starts on a
GPU (context.rs, `CudaDevice::cubin`). NVRTC itself needs no GPU, so this script runs the same
compilation here (the NVRTC of the `nvidia-cuda-nvrtc` wheel), which catches a kernel that no
longer compiles before device time is spent on it, and can disassemble the result (the
`nvidia-cuda-cuobjdump` and `nvidia-cuda-nvdisasm` wheels) to read the code the GPU will run.

    python3 scripts/cuda/nvrtc_check.py                       # every kernel file, sm_90
    python3 scripts/cuda/nvrtc_check.py --arch sm_80 gemv      # one file, another GPU
    python3 scripts/cuda/nvrtc_check.py --arch sm_86,sm_90,sm_120   # RTX 30xx, H100/H200, RTX 50xx
    python3 scripts/cuda/nvrtc_check.py gemv --sass affine_experts_fused_b4_g64_r2_s16 --sass-out f.sass
    python3 scripts/cuda/nvrtc_check.py gemv --order affine_experts_fused_b4_g64_r2_s16

`--order` prints the function's global loads, barriers, atomics and FMA runs in program order
(e.g. whether a tile's weight loads are issued before the block-wide wait). `--install` installs
the wheels into a virtual environment under the temporary folder first. Exit status 1 when a file
does not compile (NVRTC's log is printed) or when the options here are no longer the engine's, 3
when the wheels cannot be installed. CI runs it (`.ci/run`) on every kernel file for sm_86, sm_90 and sm_120.
"""

import argparse
import ctypes
import glob
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
KERNELS = ROOT / "crates/engine/src/backend/cuda/kernels"
VENV = Path(os.environ.get("FLASHMOE_NVRTC_VENV", Path(tempfile.gettempdir()) / "flashmoe-nvrtc-venv"))
WHEELS = ["nvidia-cuda-nvrtc", "nvidia-cuda-cuobjdump", "nvidia-cuda-nvdisasm"]


def options(arch):
    # The options of `CudaDevice::cubin` in crates/engine/src/backend/cuda/context.rs.
    return [f"--gpu-architecture={arch}", "-std=c++17", "-lineinfo", "--fmad=true"]


def site_dirs():
    return glob.glob(str(VENV / "lib/python3*/site-packages")) + [p for p in sys.path if p.endswith("site-packages")]


def find(pattern):
    for d in site_dirs():
        hits = sorted(glob.glob(os.path.join(d, "nvidia", pattern)))
        if hits:
            return hits[-1]
    return None


def options_drift():
    """The options above that context.rs no longer passes (they must be the engine's own)."""
    rs = (ROOT / "crates/engine/src/backend/cuda/context.rs").read_text()
    fixed = [o for o in options("sm_90") if not o.startswith("--gpu-architecture=")]
    return [o for o in fixed if f'"{o}".to_string()' not in rs] + (
        [] if '"--gpu-architecture={}"' in rs else ["--gpu-architecture=..."])


def install():
    """Installs the wheels; exit status 3 when that is impossible (no network: CI skips the step)."""
    try:
        if not (VENV / "bin/pip").exists():
            subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
        subprocess.run([str(VENV / "bin/pip"), "install", "-q", *WHEELS], check=True)
    except (subprocess.CalledProcessError, OSError) as e:
        print(f"cannot install {' '.join(WHEELS)} into {VENV}: {e}")
        sys.exit(3)


def compile_cubin(path, arch):
    lib_path = find("*/lib/libnvrtc.so*") or find("cuda_nvrtc/lib/libnvrtc.so*")
    if lib_path is None:
        sys.exit(f"libnvrtc not found: pip install {WHEELS[0]} (or run with --install)")
    lib = ctypes.CDLL(lib_path)
    src = Path(path).read_bytes()
    prog = ctypes.c_void_p()
    if lib.nvrtcCreateProgram(ctypes.byref(prog), src, Path(path).name.encode(), 0, None, None) != 0:
        return None, "nvrtcCreateProgram failed"
    opts = [o.encode() for o in options(arch)]
    rc = lib.nvrtcCompileProgram(prog, len(opts), (ctypes.c_char_p * len(opts))(*opts))
    n = ctypes.c_size_t()
    lib.nvrtcGetProgramLogSize(prog, ctypes.byref(n))
    log = ctypes.create_string_buffer(n.value)
    lib.nvrtcGetProgramLog(prog, log)
    cubin = None
    if rc == 0:
        lib.nvrtcGetCUBINSize(prog, ctypes.byref(n))
        buf = ctypes.create_string_buffer(n.value)
        lib.nvrtcGetCUBIN(prog, buf)
        cubin = buf.raw
    lib.nvrtcDestroyProgram(ctypes.byref(prog))
    return cubin, log.value.decode(errors="replace")


def sass(cubin_bytes, function):
    tool = find("*/bin/cuobjdump")
    if tool is None:
        sys.exit("cuobjdump not found: pip install nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm (or --install)")
    env = dict(os.environ, PATH=os.path.dirname(tool) + os.pathsep + os.environ.get("PATH", ""))
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin_bytes)
        f.flush()
        out = subprocess.run([tool, "-sass", "-fun", function, f.name], env=env, capture_output=True, text=True)
    if out.returncode != 0 or "Function :" not in out.stdout:
        sys.exit(f"cuobjdump: no function {function}\n{out.stderr}")
    return out.stdout


OPS = re.compile(r"^(LDG|STG|LDS|STS|BAR|ATOM|RED|MEMBAR|NANOSLEEP|FFMA|SHFL|EXIT)")


def order(text):
    """Runs of the interesting instructions, in program order: 'index:OPxN'."""
    runs = []
    for i, line in enumerate(l for l in text.splitlines() if re.match(r"\s*/\*[0-9a-f]{4,}\*/", l)):
        ins = re.sub(r"^\s*/\*[0-9a-f]+\*/\s*", "", line).split(";")[0].split()
        if not ins:
            continue
        op = ins[1] if ins[0].startswith("@") and len(ins) > 1 else ins[0]
        if not OPS.match(op):
            continue
        if runs and runs[-1][1] == op:
            runs[-1][2] += 1
        else:
            runs.append([i, op, 1])
    return " ".join(f"{i}:{op}x{n}" for i, op, n in runs)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("files", nargs="*", help="kernel file names (gemv, forward, ggml); default: all")
    ap.add_argument("--arch", default="sm_90", help="one or more, comma-separated (sm_86,sm_90,sm_120)")
    ap.add_argument("--install", action="store_true", help=f"pip install {' '.join(WHEELS)} into {VENV}")
    ap.add_argument("--sass", metavar="FUNCTION", help="disassemble this kernel")
    ap.add_argument("--sass-out", metavar="FILE", help="write the disassembly here (default: stdout)")
    ap.add_argument("--order", metavar="FUNCTION", help="loads, barriers and FMA runs of this kernel in order")
    a = ap.parse_args()
    drift = options_drift()
    if drift:
        sys.exit(f"options() no longer matches CudaDevice::cubin in context.rs: {drift}")
    if a.install:
        install()
    files = [KERNELS / f"{f.removesuffix('.cu')}.cu" for f in a.files] or sorted(KERNELS.glob("*.cu"))
    for f in files:
        if not f.exists():
            sys.exit(f"no kernel file {f}")

    archs = [x.strip() for x in a.arch.split(",") if x.strip()]
    if (a.sass or a.order) and len(archs) > 1:
        sys.exit("--sass / --order take one --arch")

    def one(job):
        f, arch = job
        return f, arch, *compile_cubin(f, arch)

    failed = False
    # NVRTC compiles one program per call on one thread: the files (and archs) in parallel.
    jobs = [(f, arch) for arch in archs for f in files]
    with ThreadPoolExecutor(max_workers=min(len(jobs), os.cpu_count() or 1)) as pool:
        results = list(pool.map(one, jobs))
    for f, arch, cubin, log in results:
        name = f.relative_to(ROOT)
        if cubin is None:
            failed = True
            print(f"{name}: does not compile for {arch}\n{log}")
            continue
        warnings = [l for l in log.splitlines() if "warning" in l]
        print(f"{name}: compiles for {arch} ({len(cubin) / 1e6:.1f} MB cubin, {len(warnings)} warnings)")
        for w in warnings:
            print(f"  {w}")
        for fn, show in ((a.sass, True), (a.order, False)):
            if fn is None or fn.encode() not in cubin:
                continue
            text = sass(cubin, fn)
            if show and a.sass_out:
                Path(a.sass_out).write_text(text)
            elif show:
                print(text)
            else:
                print(f"{fn}: {order(text)}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
