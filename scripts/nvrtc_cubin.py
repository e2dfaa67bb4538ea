"""Compiles CUDA source parts with NVRTC, as the library does (compile.rs: -std=c++17, no fast
math, the GPU's sm_XX), to a CUBIN file, with no GPU needed:
    python3 scripts/nvrtc_cubin.py OUT.cubin PART.cu... [--arch 90] [--option=-DX ...]
The parts are concatenated in the order given (a kernel `Source`'s order in kernels/*.rs).
libnvrtc is found through the loader's path (LD_LIBRARY_PATH), e.g. /usr/local/cuda/lib64 or
the `nvidia-cuda-nvrtc` wheel's nvidia/cu13/lib."""

import argparse
import ctypes
import sys


def load_nvrtc():
    for name in ("libnvrtc.so", "libnvrtc.so.13", "libnvrtc.so.12"):
        try:
            return ctypes.CDLL(name)
        except OSError:
            continue
    sys.exit("libnvrtc not found (set LD_LIBRARY_PATH to the directory that holds it)")


def check(nvrtc, status, what):
    if status != 0:
        nvrtc.nvrtcGetErrorString.restype = ctypes.c_char_p
        sys.exit(f"{what}: {nvrtc.nvrtcGetErrorString(status).decode()}")


def compile_cubin(nvrtc, text, options):
    prog = ctypes.c_void_p()
    check(nvrtc, nvrtc.nvrtcCreateProgram(ctypes.byref(prog), text.encode(), b"kernels.cu",
                                          0, None, None), "nvrtcCreateProgram")
    opts = (ctypes.c_char_p * len(options))(*[o.encode() for o in options])
    status = nvrtc.nvrtcCompileProgram(prog, len(options), opts)
    size = ctypes.c_size_t()
    nvrtc.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
    log = ctypes.create_string_buffer(size.value)
    nvrtc.nvrtcGetProgramLog(prog, log)
    if log.value.strip():
        print(log.value.decode(), file=sys.stderr)
    check(nvrtc, status, "nvrtcCompileProgram")
    check(nvrtc, nvrtc.nvrtcGetCUBINSize(prog, ctypes.byref(size)), "nvrtcGetCUBINSize")
    cubin = ctypes.create_string_buffer(size.value)
    check(nvrtc, nvrtc.nvrtcGetCUBIN(prog, cubin), "nvrtcGetCUBIN")
    nvrtc.nvrtcDestroyProgram(ctypes.byref(prog))
    return cubin.raw


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("parts", nargs="+")
    parser.add_argument("--arch", default="90")
    parser.add_argument("--option", action="append", default=[])
    args = parser.parse_args()
    text = "".join(open(p).read() for p in args.parts)
    options = ["-std=c++17", f"--gpu-architecture=sm_{args.arch}", *args.option]
    with open(args.out, "wb") as f:
        f.write(compile_cubin(load_nvrtc(), text, options))


if __name__ == "__main__":
    main()
