"""The per-step cost of wiring a custom op's backward with
``torch.library.register_autograd`` versus a plain ``autograd.Function``, for
an op with the training ops' signature (tensor lists in and out), measured on
this machine. Why seqfuse registers its training ops' formula for the
Autograd key in C++ (csrc/ops/autograd.cpp).

Both wirings call the same trivial kernels (a clone forward, zeros backward),
so the difference is the wiring alone.

    python benchmarks/autograd_wiring.py
"""

from __future__ import annotations

import time

import torch


def _median_us(fn, rounds: int = 3000) -> float:
    for _ in range(200):
        fn()
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    times.sort()
    return times[len(times) // 2] * 1e6


def main() -> None:
    lib = torch.library.Library("seqfuse_wiring_study", "DEF")
    lib.define("fwd(Tensor x, Tensor[] ps, int[] spec) -> (Tensor, Tensor[])")
    lib.define("bwd(Tensor g, Tensor x, Tensor[] saved, Tensor[] ps, int[] spec) -> (Tensor, Tensor[])")
    lib.impl("fwd", lambda x, ps, spec: (x.clone(), [x.clone()]), "CPU")
    lib.impl("bwd", lambda g, x, saved, ps, spec: (g.clone(), [torch.zeros_like(p) for p in ps]), "CPU")
    ops = torch.ops.seqfuse_wiring_study

    def setup_context(ctx, inputs, output):
        x, ps, spec = inputs
        ctx.save_for_backward(x, *output[1], *ps)
        ctx.spec = spec

    def backward(ctx, g, _saved_grads):
        x, saved, *ps = ctx.saved_tensors
        gi, gps = ops.bwd(g, x, [saved], list(ps), ctx.spec)
        return gi, gps, None

    torch.library.register_autograd("seqfuse_wiring_study::fwd", backward, setup_context=setup_context)

    class Plain(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, *ps):
            y, saved = ops.fwd(x, list(ps), [1])
            ctx.save_for_backward(x, *saved, *ps)
            return y

        @staticmethod
        def backward(ctx, g):
            x, saved, *ps = ctx.saved_tensors
            gi, gps = ops.bwd(g, x, [saved], list(ps), [1])
            return (gi, *gps)

    params = [torch.randn(4, 4, requires_grad=True) for _ in range(6)]
    x = torch.randn(32, 4)

    def with_register_autograd():
        for p in params:
            p.grad = None
        ops.fwd(x, params, [1])[0].sum().backward()

    def with_plain_function():
        for p in params:
            p.grad = None
        Plain.apply(x, *params).sum().backward()

    print(f"register_autograd step: {_median_us(with_register_autograd):7.1f} us")
    print(f"autograd.Function step: {_median_us(with_plain_function):7.1f} us")


if __name__ == "__main__":
    main()
