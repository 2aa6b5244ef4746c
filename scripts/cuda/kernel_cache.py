#!/usr/bin/env python3
"""Fills a flashmoe kernel cache folder on a machine without a GPU, for a GPU machine to use.

The engine compiles its .cu kernels with NVRTC the first time it starts on a GPU and keeps the
cubins in FLASHMOE_HOME/cuda, named `{module}-{arch}-nvrtc{major}.{minor}-{xxh3 of source, NVRTC
version and options}.cubin` (context.rs, `CudaDevice::cubin`). That first compile takes about
100 s on the lent H200, every time a fresh machine starts. NVRTC needs no GPU, so the same
cubins can be made here with the NVRTC wheel of the GPU machine's major.minor version, carried
over, and unpacked into FLASHMOE_HOME/cuda there (a file the engine does not find under its
own name only means a recompile):

    python3 -m venv /tmp/nvrtc130 && /tmp/nvrtc130/bin/pip install "nvidia-cuda-nvrtc==13.0.*" xxhash
    /tmp/nvrtc130/bin/python scripts/cuda/kernel_cache.py --arch sm_90 --out /tmp/kcache
    tar cf - -C /tmp/kcache . | xz > .carry/kcache.tar.xz     # there: tar xJf … -C $FLASHMOE_HOME/cuda

Run it with the Python of the virtual environment that holds the wheel (its NVRTC version is
the one in the names). About 2 minutes on 2 cores.
"""

import argparse
import ctypes
import glob
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from nvrtc_check import KERNELS, options, options_drift  # noqa: E402


def load_nvrtc():
    site = [p for p in sys.path if p.endswith("site-packages")]
    for d in site:
        libs = sorted(glob.glob(f"{d}/nvidia/*/lib/libnvrtc.so.*")) + sorted(glob.glob(f"{d}/nvidia/cuda_nvrtc/lib/libnvrtc.so.*"))
        libs = [x for x in libs if ".alt." not in x]
        if libs:
            # The builtins library sits beside it; loaded first so that NVRTC finds it.
            for b in glob.glob(str(Path(libs[0]).parent / "libnvrtc-builtins.so.*")):
                if ".alt." not in b:
                    ctypes.CDLL(b, mode=ctypes.RTLD_GLOBAL)
            return ctypes.CDLL(libs[0])
    sys.exit("libnvrtc not found in this Python's site-packages: pip install nvidia-cuda-nvrtc==MAJOR.MINOR.*")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="sm_90")
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args()
    try:
        import xxhash
    except ImportError:
        sys.exit("pip install xxhash (the engine's cache names use XXH3-64)")
    if options_drift():
        sys.exit(f"the options here are no longer the engine's: {options_drift()}")
    lib = load_nvrtc()
    major, minor = ctypes.c_int(), ctypes.c_int()
    lib.nvrtcVersion(ctypes.byref(major), ctypes.byref(minor))
    version = f"{major.value}.{minor.value}"
    a.out.mkdir(parents=True, exist_ok=True)
    opts = options(a.arch)
    for path in sorted(KERNELS.glob("*.cu")):
        name, src = path.stem, path.read_bytes()
        h = xxhash.xxh3_64()
        for part in [src, version.encode(), *(o.encode() for o in opts)]:
            h.update(part)
        prog = ctypes.c_void_p()
        if lib.nvrtcCreateProgram(ctypes.byref(prog), src, name.encode(), 0, None, None) != 0:
            sys.exit(f"{name}: nvrtcCreateProgram failed")
        enc = [o.encode() for o in opts]
        if lib.nvrtcCompileProgram(prog, len(enc), (ctypes.c_char_p * len(enc))(*enc)) != 0:
            n = ctypes.c_size_t()
            lib.nvrtcGetProgramLogSize(prog, ctypes.byref(n))
            log = ctypes.create_string_buffer(n.value)
            lib.nvrtcGetProgramLog(prog, log)
            sys.exit(f"{name}: does not compile\n{log.value.decode(errors='replace')}")
        n = ctypes.c_size_t()
        lib.nvrtcGetCUBINSize(prog, ctypes.byref(n))
        buf = ctypes.create_string_buffer(n.value)
        lib.nvrtcGetCUBIN(prog, buf)
        lib.nvrtcDestroyProgram(ctypes.byref(prog))
        out = a.out / f"{name}-{a.arch}-nvrtc{version}-{h.intdigest():016x}.cubin"
        tmp = out.with_suffix(".partial")
        tmp.write_bytes(buf.raw)
        tmp.rename(out)
        print(f"{out} ({n.value >> 10} KiB)")


if __name__ == "__main__":
    main()
