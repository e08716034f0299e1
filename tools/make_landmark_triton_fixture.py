"""Build tests/data/landmark/G_official_triton_kernel.npz (see tests/data/landmark/README.md).

The official repository ships a fused Triton kernel for landmark training attention
(epfml/landmark-attention, `llama/ltriton/flash_landmark_attention.py`: `fused_landmark_attention(q,
k, v, is_mem, sm_scale=None, block_size=64)`, layout [B, H, T, D], a landmark closing every block of
`block_size` tokens). `benchmarks/landmark_attention.py` times mnemax's Pallas kernel against it on a
GPU; this script records what it computes, so that a test can check both compute the same function.

It runs the official file, unchanged but for one line, in Triton's interpreter on CPU
(`TRITON_INTERPRET=1`: the kernels' block programs run one after another in numpy, float32
throughout, `tl.dot` without TF32): forward, then the backward of `y` with a random cotangent. The
removed line is the wrapper's `assert q.is_cuda and k.is_cuda and v.is_cuda` (the interpreter takes
CPU tensors); the script fails if the file does not hold that line exactly once. The official file
is read from `--official`, never copied into this repository.

Torch and triton are never mnemax dependencies, and this script is not part of `make test`. It runs
in its own venv (PyPI's torch wheel; its CUDA libraries are unused):

    python3.12 -m venv /path && /path/bin/pip install torch numpy
    /path/bin/python tools/make_landmark_triton_fixture.py \
        --official PATH/landmark-attention/llama/ltriton/flash_landmark_attention.py \
        --out tests/data/landmark/G_official_triton_kernel.npz [--seed 0]

The committed file: the official file at commit 9f13a6008ca5e1bd813b9421d28413f4594c2114, Python
3.12.1, torch 2.14.1+cu130 (run on CPU), triton 3.8.0, numpy 2.5.5, seed 0 (the versions are also in
the file).
"""
import argparse
import importlib.util
import os
import pathlib
import platform
import tempfile

os.environ["TRITON_INTERPRET"] = "1"   # before triton is imported

import numpy as np  # noqa: E402
import torch  # noqa: E402
import triton  # noqa: E402

# (name, B, H, T, D, block_size): T a whole number of blocks (the official backward needs it);
# block_size a power of two ≥ 16 (tl.arange, tl.dot).
CASES = (("b16", 2, 2, 64, 16, 16), ("b32", 1, 2, 96, 16, 32))
CUDA_ONLY = "        assert q.is_cuda and k.is_cuda and v.is_cuda\n"


def load_official(path: pathlib.Path):
    source = path.read_text()
    if source.count(CUDA_ONLY) != 1:
        raise SystemExit(f"{path}: expected the line {CUDA_ONLY.strip()!r} once (the file this "
                         "script was written for, commit 9f13a6008ca5e1bd813b9421d28413f4594c2114)")
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
        f.write(source.replace(CUDA_ONLY, ""))
    spec = importlib.util.spec_from_file_location("flash_landmark_attention", f.name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    os.unlink(f.name)
    return module


def run_case(module, gen, B, H, T, D, block):
    q, k, v, ct = (torch.randn(B, H, T, D, generator=gen, dtype=torch.float32) for _ in range(4))
    for x in (q, k, v):
        x.requires_grad_(True)
    is_mem = torch.arange(T) % block == block - 1
    y = module.fused_landmark_attention(q, k, v, is_mem, block_size=block)
    y.backward(ct)
    arrays = {"q": q, "k": k, "v": v, "cotangent": ct, "y": y, "dq": q.grad, "dk": k.grad,
              "dv": v.grad}
    out = {n: a.detach().numpy() for n, a in arrays.items()}
    out["mem_freq"] = np.int32(block - 1)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--official", required=True, type=pathlib.Path,
                    help="epfml/landmark-attention's llama/ltriton/flash_landmark_attention.py")
    ap.add_argument("--out", required=True, type=pathlib.Path)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    module = load_official(a.official)
    gen = torch.Generator().manual_seed(a.seed)
    arrays = {}
    for name, *shape in CASES:
        for key, value in run_case(module, gen, *shape).items():
            arrays[f"{name}/{key}"] = value
    arrays["versions"] = np.array(f"python {platform.python_version()}, torch {torch.__version__}, "
                                  f"triton {triton.__version__}, numpy {np.__version__}, "
                                  f"seed {a.seed}")
    a.out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(a.out, **arrays)
    print(f"wrote {a.out}: {', '.join(name for name, *_ in CASES)}")


if __name__ == "__main__":
    main()
