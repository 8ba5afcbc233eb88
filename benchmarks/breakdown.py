"""Where the time of `linear_logprobs` goes, stage by stage, next to cuBLAS at the same shape.

For kernel engineers tuning the Triton path on a GPU (CUDA only):

    python -m prolix.benchmarks.breakdown --shape qwen-1.5b --tokens 16384
    python -m prolix.benchmarks.breakdown --sweep          # also try other tile configs

Prints one table: the bf16 GEMM h·Wᵀ (the unit every stage is measured in), the forward kernel
with and without the entropy accumulator, the backward's dz kernel over all vocabulary chunks,
its two GEMM families (dW per chunk, dh accumulated), and the whole forward+backward. With
`--sweep` it re-times the two Triton kernels under candidate tile configs and chunk budgets, so a
config change is a measured decision. `--json FILE` writes the same rows.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from prolix.kernels import linear_logprob as llp
from prolix.kernels._common import addmm_fp32, has_fp32_out_addmm

SHAPES = {"qwen-1.5b": (1536, 151936), "qwen-7b": (3584, 152064), "llama-8b": (4096, 128256)}
# KernelConfig fields: (block_n, block_v, block_k, num_warps, num_stages[, group_n, sub_tiles]).
FWD_CANDIDATES = [(64, 128, 64, 4, 4), (128, 128, 64, 8, 3, 8), (128, 128, 64, 8, 4, 8),
                  (128, 256, 64, 8, 3, 8, 4), (128, 256, 64, 8, 4, 8, 4), (128, 256, 64, 8, 3, 16, 4),
                  (128, 256, 64, 8, 3, 4, 4), (128, 256, 32, 8, 4, 8, 4)]
BWD_CANDIDATES = [(128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (128, 256, 64, 8, 4), (128, 128, 64, 8, 4),
                  (256, 128, 64, 8, 3), (128, 256, 32, 8, 4)]
BUFFER_BYTES = [256 << 20, 1 << 30, 2 << 30]


def _bench(fn) -> float:
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=50, rep=300, return_mode="median"))


def _inputs(N, H, V, dtype, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    h = torch.randn(N, H, device="cuda", dtype=dtype, generator=g) / H**0.25
    w = torch.randn(V, H, device="cuda", dtype=dtype, generator=g) / H**0.25
    y = torch.randint(0, V, (N,), device="cuda", generator=g)
    return h, w, y


def stages(N, H, V, dtype):
    """[(name, ms)] for every stage at one shape."""
    h, w, y = _inputs(N, H, V, dtype)
    rows = [("gemm h·Wᵀ (cuBLAS, bf16 out)", _bench(lambda: torch.mm(h, w.T)))]
    rows.append(("fwd kernel", _bench(lambda: llp.triton_forward(h, w, y, 1.0, False))))
    rows.append(("fwd kernel + entropy", _bench(lambda: llp.triton_forward(h, w, y, 1.0, True))))
    _, lse, _ = llp.triton_forward(h, w, y, 1.0, False)
    g = torch.randn(N, device="cuda")
    rows.append(("bwd total (dz + dW + dh)",
                 _bench(lambda: llp.triton_backward(h, w, y, lse, g, None, None, 1.0, True, True))))
    rows.append(("bwd, dh only (frozen weight)",
                 _bench(lambda: llp.triton_backward(h, w, y, lse, g, None, None, 1.0, True, False))))
    width = llp.chunk_width(N, V, h.element_size(), llp.backward_config(dtype).block_v)
    dz = torch.randn(N, width, device="cuda", dtype=dtype)
    chunks = -(-V // width)
    rows.append((f"  dW chunk GEMMs ×{chunks} (width {width})",
                 chunks * _bench(lambda: torch.mm(dz.T, h))))
    acc = torch.zeros(N, H, device="cuda")
    how = "fp32-out addmm" if has_fp32_out_addmm("cuda") else "16-bit GEMM + fp32 add"
    rows.append((f"  dh chunk GEMMs ×{chunks} ({how})",
                 chunks * _bench(lambda: addmm_fp32(acc, dz, w[:width]))))
    hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()

    def fwdbwd():
        llp.linear_logprobs(hh, ww, y).sum().backward()

    rows.append(("fwd+bwd (autograd)", _bench(fwdbwd)))
    return rows


def sweep(N, H, V, dtype):
    """Re-time the forward and dz kernels under candidate configs and buffer budgets."""
    h, w, y = _inputs(N, H, V, dtype)
    _, lse, _ = llp.triton_forward(h, w, y, 1.0, False)
    g = torch.randn(N, device="cuda")
    rows = []
    fwd0, bwd0, buf0 = llp.forward_config, llp.backward_config, llp.BWD_BUFFER_BYTES
    try:
        for cand in FWD_CANDIDATES:
            llp.forward_config = lambda dt, sm=90, variant=None, c=cand: llp.KernelConfig(*c)
            try:
                rows.append((f"fwd {cand}", _bench(lambda: llp.triton_forward(h, w, y, 1.0, True))))
            except Exception as e:  # noqa: BLE001 - an invalid config is a result, not a crash
                rows.append((f"fwd {cand}: {type(e).__name__}", float("nan")))
        llp.forward_config = fwd0
        for cand in BWD_CANDIDATES:
            llp.backward_config = lambda dt, sm=90, variant=None, c=cand: llp.KernelConfig(*c)
            try:
                rows.append((f"bwd {cand}", _bench(
                    lambda: llp.triton_backward(h, w, y, lse, g, None, None, 1.0, True, True))))
            except Exception as e:  # noqa: BLE001
                rows.append((f"bwd {cand}: {type(e).__name__}", float("nan")))
        llp.backward_config = bwd0
        for n_bytes in BUFFER_BYTES:
            llp.BWD_BUFFER_BYTES = n_bytes
            rows.append((f"bwd buffer {n_bytes / 2**30:.2g} GiB", _bench(
                lambda: llp.triton_backward(h, w, y, lse, g, None, None, 1.0, True, True))))
    finally:
        llp.forward_config, llp.backward_config, llp.BWD_BUFFER_BYTES = fwd0, bwd0, buf0
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="qwen-1.5b", choices=sorted(SHAPES))
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--dtype", default="bf16", choices=("bf16", "fp16"))
    p.add_argument("--sweep", action="store_true", help="also time candidate tile configs")
    p.add_argument("--json", default=None, help="write the rows to this file")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("breakdown needs a CUDA device", file=sys.stderr)
        return 2
    H, V = SHAPES[args.shape]
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float16
    N = args.tokens
    rows = stages(N, H, V, dtype) + (sweep(N, H, V, dtype) if args.sweep else [])
    gemm = rows[0][1]
    flop = 2 * N * H * V
    print(f"{torch.cuda.get_device_name()} · {args.shape} (H={H}, V={V}) · N={N} · {args.dtype}")
    print(f"one GEMM = {flop / 1e12:.2f} TFLOP: {gemm:.2f} ms = {flop / gemm / 1e9:.0f} TFLOP/s\n")
    print("| stage | ms | × one GEMM |\n|---|---:|---:|")
    for name, ms in rows:
        print(f"| {name} | {ms:.2f} | {ms / gemm:.2f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "shape": args.shape, "N": N, "dtype": args.dtype,
                       "rows": [{"stage": n, "ms": ms} for n, ms in rows]}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
