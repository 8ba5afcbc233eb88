"""Compile every production kernel configuration for a GPU, offline, and read its resources.

A kernel that spills registers on sm_90 is slow before anyone times it, and the Triton
interpreter accepts code the GPU compiler rejects. Triton compiles for a target GPU without
one being present, and its wheel ships `cuobjdump` and `nvdisasm`, so both facts can be
checked on any machine:

    python -m prolix.kernels.resources --arch 90 --arch 80 --jobs 2
    .venv-triton36/bin/python -m prolix.kernels.resources     # the same under Triton 3.6 (`make triton36`)

prints, per kernel × dtype × flag combination: registers per thread, stack and local memory
(spills), shared memory, and on sm_90 whether the SASS uses Hopper's wgmma (`HGMMA`). Register
allocation changes between Triton versions, so the report names the Triton that compiled it,
and the tests run it under both the installed Triton and the GPU machines' (3.6).
The launches mirror what the launchers in `linear_logprob.py` and `three_gemm.py` do: the same tile configs and
warps/stages, unit inner strides specialised to 1 and 16-divisible sizes and pointers, as the
JIT specialises them for the reference shapes.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import json
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from . import invariant_kernels as ik
from . import linear_logprob as llp
from . import three_gemm
from .logprob_kernels import dlogits_kernel, logprob_fwd_kernel

_PTR = {torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.float32: "*fp32"}
# Stack bytes per thread tolerated before the command fails: none. Every production config is
# chosen spill-free under both Triton versions the project meets (CI's and the GPU machines').
SPILL_BUDGET_BYTES = 0


@dataclasses.dataclass(frozen=True)
class Launch:
    """One production specialisation of a kernel."""

    name: str
    fn: object
    signature: dict
    constexprs: dict
    divisible: tuple  # argument names specialised as divisible by 16
    num_warps: int
    num_stages: int
    has_dot: bool = True  # False for elementwise kernels: no wgmma to look for


@dataclasses.dataclass(frozen=True)
class Resources:
    launch: str
    arch: int
    registers: int
    stack: int
    local: int
    shared: int
    wgmma: bool | None  # None where the target has no wgmma (sm_80) or the kernel no dot
    triton: str = triton.__version__   # the compiler that produced these numbers

    @property
    def spills(self) -> bool:
        return self.stack > 0 or self.local > 0


def production_launches(sm: int = 90) -> list[Launch]:
    """Every (kernel, dtype, flag, configuration set) specialisation the launchers produce on
    sm_<sm>: both `PROLIX_LLP_CONFIG` variants, since either may be selected on a GPU."""
    launches, seen = [], set()
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        for entropy in (False, True):
            for variant in llp.CONFIG_VARIANTS:
                launch = _forward_launch(dtype, entropy, sm, variant)
                # Variants that share a config on this target compile to the same kernel: once.
                key = (tuple(sorted(launch.constexprs.items())), launch.num_warps, launch.num_stages, str(launch.signature))
                if key not in seen:
                    seen.add(key)
                    launches.append(launch)
            launches.append(_dlogits_launch(dtype, entropy, sm))
        launches += _three_gemm_launches(dtype, sm)
    return launches


def _three_gemm_launches(dtype: torch.dtype, sm: int) -> list[Launch]:
    """The three-GEMM loss's kernels (kernels/three_gemm.py): GEMM 1 with and without T, in the
    batch-invariant mode's configuration too (with E stored, and without it for linear_logprobs),
    the in-place entropy fold (E in the input dtype), and the batch-invariant row kernels."""
    launches, seen = [], set()
    for invariant, store in ((False, True), (True, True), (True, False)):
        for entropy in (False, True):
            launch = _exp_shifted_launch(dtype, sm, entropy, invariant, store)
            key = (tuple(sorted(launch.constexprs.items())), launch.num_warps, launch.num_stages)
            if key not in seen:   # the invariant config may be the default one: compiled once
                seen.add(key)
                launches.append(launch)
    t = _PTR[dtype]
    launches.append(Launch(
        name=f"fold_entropy[{t[1:]}]",
        fn=three_gemm.fold_entropy_kernel,
        signature={"e_ptr": t, "a_ptr": "*fp32", "b_ptr": "*fp32", "C": "i32", "V": "i32",
                   "stride_en": "i32", "BLOCK_R": "constexpr", "BLOCK_C": "constexpr"},
        constexprs={"BLOCK_R": three_gemm.FOLD_BLOCK[0], "BLOCK_C": three_gemm.FOLD_BLOCK[1]},
        divisible=("e_ptr", "a_ptr", "b_ptr"),
        num_warps=4, num_stages=1, has_dot=False,
    ))
    return launches + _row_launches(dtype)


def _row_launches(dtype: torch.dtype) -> list[Launch]:
    """The batch-invariant mode's row kernels (kernels/invariant_kernels.py): the target logit
    per input dtype; the merge and the finish (fp32 vectors) once, with the bf16 launches."""
    t = _PTR[dtype]
    launches = [Launch(
        name=f"target_logit[{t[1:]}]", fn=ik.target_logit_kernel,
        signature={"h_ptr": t, "w_ptr": t, "y_ptr": "*i64", "c_ptr": "*fp32", "C": "i32", "H": "i32",
                   "stride_hn": "i32", "stride_hk": "constexpr", "stride_wv": "i32", "stride_wk": "constexpr",
                   "inv_temp": "fp32", "BLOCK_N": "constexpr", "BLOCK_H": "constexpr"},
        constexprs={"stride_hk": 1, "stride_wk": 1, "BLOCK_N": ik.TARGET_BLOCK[0], "BLOCK_H": ik.TARGET_BLOCK[1]},
        divisible=("h_ptr", "w_ptr", "y_ptr", "c_ptr", "H", "stride_hn", "stride_wv"),
        num_warps=4, num_stages=3, has_dot=False,
    )]
    if dtype != torch.bfloat16:
        return launches
    vec = {"C": "i32", "HAS_T": "constexpr", "BLOCK": "constexpr"}
    for has_t in (False, True):
        launches.append(Launch(
            name=f"merge_tiles[T={int(has_t)}]", fn=ik.merge_tiles_kernel,
            signature={"s_ptr": "*fp32", "t_ptr": "*fp32", "s_out": "*fp32", "t_out": "*fp32", **vec,
                       "n_tiles": "i32"},
            constexprs={"HAS_T": has_t, "BLOCK": ik.ROW_BLOCK},
            divisible=("s_ptr", "t_ptr", "s_out", "t_out"), num_warps=4, num_stages=3, has_dot=False,
        ))
        launches.append(Launch(
            name=f"finish_rows[T={int(has_t)}]", fn=ik.finish_rows_kernel,
            signature={**{p: "*fp32" for p in ("c_ptr", "shift_ptr", "s_ptr", "t_ptr", "logp_ptr", "ent_ptr",
                                               "lse_ptr", "ez_ptr")}, **vec},
            constexprs={"HAS_T": has_t, "BLOCK": ik.ROW_BLOCK},
            divisible=("c_ptr", "shift_ptr", "s_ptr", "t_ptr"), num_warps=4, num_stages=1, has_dot=False,
        ))
    return launches


def _exp_shifted_launch(dtype: torch.dtype, sm: int, entropy: bool, invariant: bool, store: bool) -> Launch:
    t, cfg = _PTR[dtype], three_gemm.gemm1_config(dtype, sm, entropy, invariant)
    mode = "" if not invariant else (",invariant" if store else ",invariant,no-E")
    return Launch(
        name=f"exp_shifted[{t[1:]},entropy={int(entropy)}{mode}]",
        fn=three_gemm.exp_shifted_kernel,
        signature={
            "h_ptr": t, "w_ptr": t, "c_ptr": "*fp32", "e_ptr": t,
            "s_ptr": "*fp32", "t_ptr": "*fp32", "m_ptr": "*fp32",
            "C": "i32", "V": "i32", "H": "i32",
            "stride_hn": "i32", "stride_hk": "constexpr", "stride_wv": "i32", "stride_wk": "constexpr",
            "stride_en": "i32", "inv_temp": "fp32", "bound": "fp32",
            "HAS_ENTROPY": "constexpr", "DOT_PRECISION": "constexpr",
            "BLOCK_N": "constexpr", "BLOCK_V": "constexpr", "BLOCK_K": "constexpr", "GROUP_N": "constexpr",
            "STORE_E": "constexpr",
        },
        constexprs={
            "stride_hk": 1, "stride_wk": 1, "HAS_ENTROPY": entropy, "DOT_PRECISION": _precision(dtype),
            "BLOCK_N": cfg.block_n, "BLOCK_V": cfg.block_v, "BLOCK_K": cfg.block_k, "GROUP_N": 8,
            "STORE_E": store,
        },
        divisible=("h_ptr", "w_ptr", "c_ptr", "e_ptr", "s_ptr", "t_ptr", "m_ptr", "H",
                   "stride_hn", "stride_wv"),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


def _forward_launch(dtype: torch.dtype, entropy: bool, sm: int, variant: str) -> Launch:
    t, cfg = _PTR[dtype], llp.forward_config(dtype, sm, variant)
    return Launch(
        name=f"logprob_fwd[{t[1:]},entropy={int(entropy)},{variant}]",
        fn=logprob_fwd_kernel,
        signature={
            "h_ptr": t, "w_ptr": t, "y_ptr": "*i64",
            "m_ptr": "*fp32", "s_ptr": "*fp32", "t_ptr": "*fp32", "zy_ptr": "*fp32",
            "N": "i32", "V": "i32", "H": "i32", "v_per_split": "i32", "n_splits": "i32",
            "stride_hn": "i32", "stride_hk": "constexpr",
            "stride_wv": "i32", "stride_wk": "constexpr", "scale2": "fp32",
            "HAS_ENTROPY": "constexpr", "DOT_PRECISION": "constexpr",
            "BLOCK_N": "constexpr", "BLOCK_V": "constexpr", "BLOCK_K": "constexpr",
            "GROUP_N": "constexpr", "SUB_TILES": "constexpr",
        },
        constexprs={
            "stride_hk": 1, "stride_wk": 1, "HAS_ENTROPY": entropy, "DOT_PRECISION": _precision(dtype),
            "BLOCK_N": cfg.block_n, "BLOCK_V": cfg.block_v, "BLOCK_K": cfg.block_k, "GROUP_N": cfg.group_n,
            "SUB_TILES": cfg.sub_tiles,
        },
        divisible=("h_ptr", "w_ptr", "y_ptr", "m_ptr", "s_ptr", "t_ptr", "zy_ptr",
                   "V", "H", "v_per_split", "stride_hn", "stride_wv"),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )


def _dlogits_launch(dtype: torch.dtype, entropy: bool, sm: int) -> Launch:
    t, cfg = _PTR[dtype], llp.backward_config(dtype, sm)
    return Launch(
        name=f"dlogits[{t[1:]},entropy={int(entropy)}]",
        fn=dlogits_kernel,
        signature={
            "h_ptr": t, "w_ptr": t, "y_ptr": "*i64",
            "lse_ptr": "*fp32", "g_ptr": "*fp32", "gh_ptr": "*fp32", "ez_ptr": "*fp32",
            "dz_ptr": t, "N": "i32", "H": "i32", "v_lo": "i32", "v_hi": "i32",
            "stride_hn": "i32", "stride_hk": "constexpr", "stride_wv": "i32",
            "stride_wk": "constexpr", "stride_dzn": "i32", "inv_temp": "fp32",
            "HAS_ENTROPY": "constexpr", "DOT_PRECISION": "constexpr",
            "BLOCK_N": "constexpr", "BLOCK_V": "constexpr", "BLOCK_K": "constexpr",
            "GROUP_N": "constexpr",
        },
        constexprs={
            "stride_hk": 1, "stride_wk": 1, "HAS_ENTROPY": entropy, "DOT_PRECISION": _precision(dtype),
            "BLOCK_N": cfg.block_n, "BLOCK_V": cfg.block_v, "BLOCK_K": cfg.block_k, "GROUP_N": cfg.group_n,
        },
        divisible=("h_ptr", "w_ptr", "y_ptr", "lse_ptr", "g_ptr", "gh_ptr", "ez_ptr",
                   "dz_ptr", "H", "v_lo", "stride_hn", "stride_wv", "stride_dzn"),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )


def _nvidia_tool(name: str) -> str:
    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
    if not path.exists():
        raise FileNotFoundError(f"{name} not found in the triton wheel at {path}")
    return str(path)


def compile_launch(launch: Launch, arch: int):
    """Compile one launch for sm_<arch>; returns triton's CompiledKernel (asm has 'cubin')."""
    if not hasattr(launch.fn, "arg_names") or os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("compiling for a GPU needs TRITON_INTERPRET unset before prolix.kernels "
                           "is imported (the interpreter replaces the JIT functions)")
    names = launch.fn.arg_names
    attrs = {(names.index(a),): [["tt.divisibility", 16]] for a in launch.divisible}
    src = ASTSource(fn=launch.fn, signature=launch.signature, constexprs=launch.constexprs,
                    attrs=attrs)
    options = {"num_warps": launch.num_warps, "num_stages": launch.num_stages}
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)


def read_resources(launch: Launch, arch: int) -> Resources:
    """Compile, then read registers/stack/local/shared from cuobjdump and wgmma from nvdisasm."""
    kernel = compile_launch(launch, arch)
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "kernel.cubin"
        cubin.write_bytes(kernel.asm["cubin"])
        usage = subprocess.run([_nvidia_tool("cuobjdump"), "--dump-resource-usage", str(cubin)],
                               check=True, capture_output=True, text=True).stdout
        wgmma = None
        if arch >= 90 and launch.has_dot:
            sass = subprocess.run([_nvidia_tool("nvdisasm"), str(cubin)],
                                  check=True, capture_output=True, text=True).stdout
            wgmma = "HGMMA" in sass
    fields = dict(re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", usage))
    if "REG" not in fields:
        raise RuntimeError(f"could not parse cuobjdump output for {launch.name}:\n{usage}")
    # Triton allocates shared memory dynamically; the cubin's static figure is 0, so report its own.
    return Resources(launch=launch.name, arch=arch, registers=int(fields["REG"]),
                     stack=int(fields.get("STACK", 0)), local=int(fields.get("LOCAL", 0)),
                     shared=int(kernel.metadata.shared), wgmma=wgmma)


def _read_nth(arch_index: tuple[int, int]) -> Resources:
    arch, i = arch_index
    return read_resources(production_launches(arch)[i], arch)


def read_all(archs: list[int], jobs: int = 1) -> list[Resources]:
    """Every production launch for every arch, compiled by `jobs` forked processes (a compile is
    one CPU-bound process; the launches are rebuilt by index in the workers)."""
    work = [(arch, i) for arch in archs for i in range(len(production_launches(arch)))]
    if jobs <= 1:
        return [_read_nth(w) for w in work]
    with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("fork")) as pool:
        return list(pool.map(_read_nth, work))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, action="append", help="SM version (repeatable); default 90 and 80")
    parser.add_argument("--json", action="store_true", help="print one JSON list instead of a table")
    parser.add_argument("--jobs", type=int, default=1, help="compile in this many processes (default 1)")
    args = parser.parse_args(argv)
    report = read_all(args.arch or [90, 80], args.jobs)
    if args.json:
        print(json.dumps([dataclasses.asdict(r) for r in report]))
    else:
        print(f"Triton {triton.__version__}\n")
        print("| kernel | sm | regs | stack | local | smem KB | wgmma |\n|---|---|---|---|---|---|---|")
        for r in report:
            wg = "-" if r.wgmma is None else ("yes" if r.wgmma else "NO")
            print(f"| {r.launch} | {r.arch} | {r.registers} | {r.stack} | {r.local} | "
                  f"{r.shared / 1024:.0f} | {wg} |")
    return 1 if any(r.stack > SPILL_BUDGET_BYTES or r.local > SPILL_BUDGET_BYTES for r in report) else 0


if __name__ == "__main__":
    sys.exit(main())
