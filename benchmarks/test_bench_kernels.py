"""pytest-benchmark view of the same kernels and providers as `prolix bench`, at small shapes.

    pytest benchmarks/ --benchmark-only                     # CPU or GPU, whatever is here
    pytest benchmarks/ --benchmark-only -k fused-grpo --benchmark-columns=median,iqr
    pytest benchmarks/ --benchmark-only -k train_step     # the trainer's forward+backward step

Not part of `make test` (which runs tests/ only). Each benchmark first checks the provider's
answer against the float64 reference (the check that `prolix bench` records), then times one
call: CPU `tiny` at N = 512, CUDA `qwen-1.5b` at N = 4096 (the smallest real shape). The
trainer step (`test_bench_train_step`, `prolix bench train`) times one packed forward+backward
of a random-weight Qwen2 with each provider's LM head: the `tiny` model at N = 512 on CPU,
`qwen-0.5b` at N = 4096 on CUDA; its head is checked first on the model's hidden states. The
sweeps, ceilings, memory and plots are `prolix bench`'s job; this file is for quick A/B
timing while editing a kernel, with pytest-benchmark's compare and histogram tools.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("pytest_benchmark")

from prolix.benchmarks import cases as C  # noqa: E402
from prolix.benchmarks import check  # noqa: E402
from prolix.benchmarks import train_step as TS  # noqa: E402
from prolix.benchmarks.providers import (  # noqa: E402
    PROVIDERS,
    Context,
    Skip,
    bench_config,
    grad_output,
    leaves,
    no_donated_buffers,
)

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
SHAPE, N = (C.SHAPES["qwen-1.5b"], 4096) if DEVICE.type == "cuda" else (C.SHAPES["tiny"], 512)
ROUNDS = 20 if DEVICE.type == "cuda" else 5

CASES = [(k, p.name) for k in C.KERNELS for p in PROVIDERS[k]]


def _sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


@pytest.fixture(autouse=True)
def _compiled_backward_can_retain_graph():
    with no_donated_buffers():
        yield


@pytest.mark.parametrize("mode", ["fwd", "fwdbwd"])
@pytest.mark.parametrize("kernel,provider", CASES, ids=[f"{k}-{p}" for k, p in CASES])
def test_bench(benchmark, kernel: str, provider: str, mode: str) -> None:
    shape = C.LOSS_SHAPE if kernel == "grpo-loss" else SHAPE
    inp = C.make_inputs(shape, N, torch.bfloat16, DEVICE, seq_len=min(N, 1024))
    ctx = Context(device=DEVICE, config=bench_config(), quick=True)
    prov = next(p for p in PROVIDERS[kernel] if p.name == provider)
    try:
        fwd = prov.build(inp, ctx)
    except Skip as e:
        pytest.skip(str(e))
    lv, g = leaves(kernel, inp), grad_output(kernel, inp)

    with_grads = mode == "fwdbwd"
    ref = check.reference_fp64(kernel, inp, g, ctx.config, with_grads=with_grads)
    errors = check.compare(kernel, check.run_once(fwd, lv, g, with_grads), ref)
    assert max(errors.values()) <= check.TOLERANCE[torch.bfloat16], errors

    def call():
        out = fwd()
        if with_grads:
            out.backward(g)
        _sync()

    def clear_grads():
        for t in lv:
            t.grad = None

    benchmark.extra_info.update(kernel=kernel, provider=provider, mode=mode, shape=shape.name, N=N,
                                device=str(DEVICE), errors=errors)
    benchmark.pedantic(call, setup=clear_grads, rounds=ROUNDS, warmup_rounds=1)


TRAIN_SHAPE, TRAIN_N = (TS.MODEL_SHAPES["qwen-0.5b"], 4096) if DEVICE.type == "cuda" else (TS.MODEL_SHAPES["tiny"], 512)


@pytest.fixture(scope="module")
def train_setup() -> TS.TrainSetup:
    """One model and packed batch for every provider (the step's dtype is the trainer's)."""
    return TS.TrainSetup.build(TRAIN_SHAPE, TRAIN_N, TS.step_dtype(torch.bfloat16, DEVICE), DEVICE)


@pytest.mark.parametrize("provider", [p.name for p in PROVIDERS["train"]])
def test_bench_train_step(benchmark, train_setup: TS.TrainSetup, provider: str) -> None:
    ctx = Context(device=DEVICE, config=bench_config(), quick=True)
    prov = next(p for p in PROVIDERS["train"] if p.name == provider)
    inp = train_setup.check_inputs()
    try:
        head = prov.build(inp, ctx)
    except Skip as e:
        pytest.skip(str(e))
    ref = check.reference_fp64("fused-grpo", inp, None, ctx.config)
    errors = check.compare("fused-grpo", check.run_once(head, (inp.hidden, inp.weight), None, True), ref)
    dtype = TS.step_dtype(torch.bfloat16, DEVICE)
    assert max(errors.values()) <= check.TOLERANCE[dtype], errors
    del inp, head

    step, params = train_setup.step(prov, ctx), train_setup.params()

    def call():
        step().backward()
        _sync()

    def clear_grads():
        for t in params:
            t.grad = None

    flop, _, _ = train_setup.work()
    benchmark.extra_info.update(kernel="train", provider=provider, mode="fwdbwd", shape=TRAIN_SHAPE.name,
                                N=TRAIN_N, device=str(DEVICE), errors=errors, model_flop=flop)
    benchmark.pedantic(call, setup=clear_grads, rounds=ROUNDS, warmup_rounds=1)
