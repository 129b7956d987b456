"""A model fused with seqfuse works wherever the unfused one does: inside a
custom nn.Module under torch.compile (inference and a training step),
torch.export, no_grad / inference_mode, autocast, torch.func (functional_call,
vmap, grad, jvp), several Python threads at once, and TorchScript.

Each test builds the same model twice, as written (``nn.Sequential`` blocks)
and through ``seqfuse.fuse``, and compares the two. Where a transform is not
supported by the fused model, the test pins what actually happens, with a
comment. Inside torch.func transforms (vmap, grad, jvp) and with forward-mode
tangents, fused segments run eagerly: the ops have no batching or forward-AD
rules, so the transforms see stock modules.

What test_ops.py / test_plan_cache.py already cover for a lone
FusedSequential (opcheck, compile/export of one container, the plan cache,
same-shape threads with plan invalidation) is not repeated here.
"""

from __future__ import annotations

import copy
import threading
import warnings

import pytest
import torch
from torch import nn

import seqfuse
from seqfuse import FusedSequential

from conftest import forbid_eager, randomize_batchnorm

FUSIBLE = (nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.GELU, nn.Tanh)


class Net(nn.Module):
    """Three Sequential blocks with plain tensor code between them; every
    block is one fused segment once the model is fused (eval mode)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Linear(12, 32), nn.BatchNorm1d(32), nn.GELU())
        self.body = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 32))
        self.head = nn.Sequential(nn.Linear(32, 16), nn.Tanh(), nn.Linear(16, 3))

    def forward(self, x):
        h = self.stem(x)
        h = torch.relu(h + self.body(h))
        return self.head(h)


N_BLOCKS = 3


def make_pair(train: bool = False):
    """(unfused, fused) copies of the same Net with non-trivial BatchNorm stats."""
    torch.manual_seed(0)
    net = Net()
    randomize_batchnorm(net.stem[1], torch.Generator().manual_seed(1))
    net.train(train)
    fused = seqfuse.fuse(net)
    assert all(type(getattr(fused, n)) is FusedSequential for n in ("stem", "body", "head"))
    return net, fused


def freeze(*models):
    for m in models:
        for p in m.parameters():
            p.requires_grad_(False)


def close(a, b, **kw):
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, **kw)


class GraphRecorder:
    """A torch.compile backend that keeps the Dynamo graphs, then hands them to
    a real backend (so the graph is inspected and the compiled code runs)."""

    def __init__(self, backend: str):
        self.backend = backend
        self.graphs = []

    def __call__(self, gm, example_inputs):
        self.graphs.append(gm)
        return torch._dynamo.lookup_backend(self.backend)(gm, example_inputs)

    def targets(self):
        return [str(n.target) for g in self.graphs for n in g.graph.nodes if n.op == "call_function"]


# --------------------------------------------------------------- torch.compile


def test_compile_fullgraph_inference_custom_module():
    """fullgraph, a module mixing fused blocks with plain tensor code: one
    seqfuse::mlp_forward per block in the graph, outputs equal eager. The
    aot_eager backend (functionalization, fake kernels) keeps this quick;
    test_ops.py runs Inductor over a lone FusedSequential."""
    net, fused = make_pair()
    torch._dynamo.reset()
    rec = GraphRecorder("aot_eager")
    compiled = torch.compile(fused, fullgraph=True, backend=rec)
    with torch.no_grad():
        for batch in (6, 6, 1):  # a repeat call reuses the compiled code
            x = torch.randn(batch, 12)
            close(compiled(x), net(x))
    fused_ops = [t for t in rec.targets() if "seqfuse.mlp_forward" in t]
    assert len(rec.graphs) >= 1 and len(fused_ops) == N_BLOCKS * len(rec.graphs), rec.targets()


def test_compile_fullgraph_training_step_matches_eager():
    """A compiled training step (forward + backward, BatchNorm in train mode,
    parameters requiring grad) traces the training ops into the graph (with
    the running-statistics update), and loss, gradients and updated state
    equal eager's."""
    net, fused = make_pair(train=True)
    torch._dynamo.reset()
    rec = GraphRecorder("aot_eager")  # AOTAutograd: the backward is compiled too
    compiled = torch.compile(fused, fullgraph=True, backend=rec)
    opt_ref = torch.optim.SGD(net.parameters(), lr=0.1)
    opt_fused = torch.optim.SGD(fused.parameters(), lr=0.1)
    gen = torch.Generator().manual_seed(2)
    for _ in range(2):
        x, y = torch.randn(8, 12, generator=gen), torch.randn(8, 3, generator=gen)
        opt_ref.zero_grad()
        opt_fused.zero_grad()
        loss_ref = nn.functional.mse_loss(net(x), y)
        loss_ref.backward()
        loss = nn.functional.mse_loss(compiled(x), y)
        loss.backward()
        close(loss, loss_ref)
        for (name, p), q in zip(net.named_parameters(), fused.parameters()):
            close(q.grad, p.grad, msg=name)
        opt_ref.step()
        opt_fused.step()
    targets = rec.targets()
    assert any("seqfuse.mlp_train_forward" in t for t in targets), targets
    assert any("seqfuse.update_running_stats" in t for t in targets), targets
    assert not any("seqfuse.mlp_forward" in t or "seqfuse.mlp_pack" in t for t in targets), targets
    for (k, a), b in zip(net.state_dict().items(), fused.state_dict().values()):
        close(b, a, msg=k)  # parameters and BatchNorm running statistics


# ---------------------------------------------------------------- torch.export


def test_export_custom_module_with_dynamic_batch():
    net, fused = make_pair()
    freeze(net, fused)
    batch = torch.export.Dim("batch", min=2)
    ep = torch.export.export(fused, (torch.randn(4, 12),), dynamic_shapes=({0: batch},))
    targets = [str(n.target) for n in ep.graph.nodes]
    assert targets.count("seqfuse.mlp_forward.default") == N_BLOCKS, targets
    assert set(ep.state_dict) | set(ep.constants) >= set(dict(net.named_parameters()))
    exported = ep.module()
    for b in (2, 9):
        x = torch.randn(b, 12)
        with torch.no_grad():
            close(exported(x), net(x))
    close(exported(x), net(x))  # outside no_grad too (nothing requires grad)


def test_export_with_trainable_parameters_records_the_eager_graph():
    """Pinned behaviour: export traces with grad mode on, so parameters that
    still require grad send every block down the eager path; the program is
    correct but holds no seqfuse op. Freeze parameters to export fused."""
    net, fused = make_pair()
    ep = torch.export.export(fused, (torch.randn(4, 12),))
    assert not any("seqfuse" in str(n.target) for n in ep.graph.nodes)
    x = torch.randn(4, 12)
    with torch.no_grad():
        close(ep.module()(x), net(x))


# ---------------------------------------------- no_grad / inference_mode / autocast


def test_no_grad_and_inference_mode_on_a_fused_model():
    net, fused = make_pair()
    x = torch.randn(5, 12)
    with torch.no_grad():
        ref = net(x)
    with torch.inference_mode(), forbid_eager(*FUSIBLE):
        y = fused(x)  # the plans are built inside inference_mode
    assert y.is_inference()
    close(y, ref)
    with torch.no_grad(), forbid_eager(*FUSIBLE):
        z = fused(x)  # ... and reused outside it
    assert not z.is_inference() and not z.requires_grad and z.grad_fn is None
    close(z, ref)
    # The plans built under inference_mode leaked no inference tensors into
    # the model: a training step still works, and the next fused call sees it.
    for m in (net, fused):
        opt = torch.optim.SGD(m.parameters(), lr=0.1)
        m(x).pow(2).mean().backward()
        opt.step()
        assert not any(p.is_inference() for p in m.parameters())
    with torch.no_grad():
        ref2 = net(x)
        with forbid_eager(*FUSIBLE):
            close(fused(x), ref2)
    assert not torch.allclose(ref, ref2)


def test_autocast_bf16_same_dtype_and_values_as_unfused():
    """Under autocast the fused model gives eager's dtypes: inference runs its
    segments as bfloat16 runs (bfloat16 products, as autocast's, within
    bfloat16 rounding of eager's values: tests/test_autocast.py holds them
    to the numerics rule); a training forward + backward and a compiled
    call run the blocks eagerly and compute exactly what the unfused model
    computes."""
    net, fused = make_pair()
    x = torch.randn(6, 12)

    def exact(a, b):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b, rtol=0, atol=0)

    def close_bf16(a, b):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=2e-2 * b.float().abs().max().item())

    with torch.autocast("cpu", dtype=torch.bfloat16):
        with torch.no_grad():
            ref, out = net(x), fused(x)
        assert ref.dtype == torch.bfloat16
        close_bf16(out, ref)
        close_bf16(fused.stem(x), net.stem(x))  # a block on its own keeps eager's dtype as well
        net(x).float().pow(2).mean().backward()
        fused(x).float().pow(2).mean().backward()
        torch._dynamo.reset()
        with torch.no_grad():
            exact(torch.compile(fused, fullgraph=True, backend="eager")(x), ref)
    for (name, p), q in zip(net.named_parameters(), fused.parameters()):
        assert q.grad.dtype == p.grad.dtype == torch.float32
        exact(q.grad, p.grad)


# ------------------------------------------------------------------ torch.func


def test_functional_call_with_substituted_params_and_buffers():
    net, fused = make_pair()
    x = torch.randn(5, 12)
    with torch.no_grad():
        own = net(x)
    gen = torch.Generator().manual_seed(3)
    for _ in range(2):  # two different substitutions: no plan is reused across them
        state = {k: torch.randn(v.shape, generator=gen) for k, v in net.named_parameters()}
        state.update({k: torch.rand(v.shape, generator=gen) + 0.5 for k, v in net.named_buffers() if "running" in k})
        with torch.no_grad():
            ref = torch.func.functional_call(net, state, (x,))
            out = torch.func.functional_call(fused, state, (x,))
        close(out, ref)
        assert not torch.allclose(out, own)
    with torch.no_grad(), forbid_eager(*FUSIBLE):
        close(fused(x), own)  # the model's own tensors are back in use
    # the same substituted tensors, edited in place between two calls
    state = {k: v.detach().clone() for k, v in net.named_parameters()}
    with torch.no_grad():
        torch.func.functional_call(fused, state, (x,))
        state["head.2.bias"].add_(1.0)
        close(torch.func.functional_call(fused, state, (x,)), own + 1.0)


@pytest.mark.parametrize("in_dims", [0, 1])
def test_vmap_over_inputs_with_autograd_needed_and_bad_shapes(in_dims):
    """vmap where the blocks run eagerly (parameters require grad) matches the
    unfused model; per-sample 1-D inputs fail in BatchNorm1d in both alike."""
    net, fused = make_pair()
    x = torch.randn(3, 5, 12) if in_dims == 0 else torch.randn(5, 3, 12)
    close(torch.func.vmap(fused, in_dims=in_dims)(x), torch.func.vmap(net, in_dims=in_dims)(x))
    for m in (net, fused):
        with torch.no_grad(), pytest.raises(ValueError, match="expected 2D or 3D input"):
            torch.func.vmap(m.stem)(torch.randn(3, 12))


@pytest.mark.parametrize("in_dims", [0, 1])
def test_vmap_over_inputs_fused(in_dims):
    """vmap over a fused model in no_grad matches the unfused model, with no
    SeqfuseWarning (pytest turns one into an error): under the transform the
    segments run eagerly."""
    net, fused = make_pair()
    x = torch.randn(3, 5, 12) if in_dims == 0 else torch.randn(5, 3, 12)
    with torch.no_grad():
        close(torch.func.vmap(fused.stem, in_dims=in_dims)(x), torch.func.vmap(net.stem, in_dims=in_dims)(x))
        close(torch.func.vmap(fused, in_dims=in_dims)(x), torch.func.vmap(net, in_dims=in_dims)(x))


def test_vmap_over_stacked_parameters():
    """Model ensembling (vmap of functional_call over stacked parameters)
    gives the unfused model's result."""
    net, fused = make_pair()
    models = [copy.deepcopy(net.head) for _ in range(3)]
    for i, m in enumerate(models):
        torch.manual_seed(10 + i)
        for p in m.parameters():
            nn.init.normal_(p)
    params, buffers = torch.func.stack_module_state(models)
    x = torch.randn(4, 32)

    def run(module):
        return torch.func.vmap(lambda p, b, x: torch.func.functional_call(module, (p, b), (x,)), in_dims=(0, 0, None))

    with torch.no_grad():
        ref = run(models[0])(params, buffers, x)
        assert ref.shape == (3, 4, 3)
        close(run(seqfuse.fuse(models[0]))(params, buffers, x), ref)


def test_func_grad_through_functional_call():
    net, fused = make_pair()
    params = {k: v.detach() for k, v in net.named_parameters()}
    x = torch.randn(5, 12)

    def loss(module):
        return lambda p: torch.func.functional_call(module, p, (x,)).pow(2).mean()

    ref = torch.func.grad(loss(net))(params)
    out = torch.func.grad(loss(fused))(params)
    for k in ref:
        close(out[k], ref[k], msg=k)


def test_func_grad_and_jacrev_with_respect_to_the_input():
    """Reverse mode with respect to the input (frozen parameters) works: the
    input requires grad inside the transform, so the blocks run eagerly."""
    net, fused = make_pair()
    freeze(net, fused)
    x = torch.randn(5, 12)
    close(torch.func.grad(lambda x: fused(x).sum())(x), torch.func.grad(lambda x: net(x).sum())(x))
    v = torch.randn(32)
    close(torch.func.jacrev(fused.head)(v), torch.func.jacrev(net.head)(v))


def test_func_jvp_forward_mode_ad():
    net, fused = make_pair()
    freeze(net, fused)
    x, t = torch.randn(5, 12), torch.randn(5, 12)
    y_ref, jvp_ref = torch.func.jvp(net, (x,), (t,))
    y, jvp = torch.func.jvp(fused, (x,), (t,))
    close(y, y_ref)
    close(jvp, jvp_ref)


# ---------------------------------------------------------------------- threads


@pytest.mark.parametrize("layout", ["one_segment", "three_segments"])
def test_one_module_called_from_four_threads(layout):
    """One FusedSequential shared by 4 threads at once, each with its own batch
    size and autograd context (grad mode is per thread): every result is right.
    'one_segment' exercises the C++ fast path, 'three_segments' the Python
    plan with an eager segment in the middle."""
    torch.manual_seed(0)
    mods = [nn.Linear(24, 64), nn.BatchNorm1d(64), nn.SiLU(), nn.Linear(64, 32), nn.Tanh()]
    if layout == "three_segments":
        mods[3:3] = [nn.Softsign()]  # no fused kernel: splits the chain
    m = FusedSequential(*mods).eval()
    randomize_batchnorm(m[1], torch.Generator().manual_seed(1))
    ref_model = nn.Sequential(*m)
    contexts = ["no_grad", "inference_mode", "grad_input", "no_grad"]
    batches = [1, 7, 64, 300]
    inputs = [torch.randn(b, 24) for b in batches]
    with torch.no_grad():
        m(inputs[0])  # build the plan first; the threads then share it
        refs = [ref_model(x) for x in inputs]
    grad_refs = [torch.autograd.grad(ref_model(x.requires_grad_()).sum(), x)[0] for x in inputs]
    for x in inputs:
        x.requires_grad_(False)
    start = threading.Barrier(len(batches), timeout=30)
    errors = []

    def worker(i):
        try:
            start.wait()
            x, ref = inputs[i], refs[i]
            for _ in range(40):
                if contexts[i] == "grad_input":
                    xi = x.clone().requires_grad_()
                    y = m(xi)
                    (g,) = torch.autograd.grad(y.sum(), xi)
                    close(g, grad_refs[i])
                else:
                    ctx = torch.inference_mode() if contexts[i] == "inference_mode" else torch.no_grad()
                    with ctx:
                        y = m(x)
                    assert y.is_inference() == (contexts[i] == "inference_mode")
                close(y.detach(), ref)
        except BaseException as e:  # reported below, with the thread's context
            errors.append((contexts[i], batches[i], e))

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(len(batches))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads), "a thread hung"
    assert not errors, errors


# ------------------------------------------------------------------ TorchScript


def test_jit_script_is_not_supported():
    """Pinned behaviour (not a fix): torch.jit.script(nn.Sequential) works, but
    scripting a FusedSequential fails, since TorchScript compiles its Python
    forward, which reaches _forward_traceable (through the is_compiling
    branch) and ``self._modules``, which TorchScript cannot see. The error is a
    RuntimeError raised by torch.jit.script itself, before any call."""
    net, fused = make_pair()
    x = torch.randn(3, 32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit.script is deprecated
        scripted = torch.jit.script(net.body)
        with torch.no_grad():
            close(scripted(x), net.body(x))
        with pytest.raises(RuntimeError, match=r"Module 'FusedSequential' has no attribute '_modules'"):
            torch.jit.script(fused.body)
        with pytest.raises((RuntimeError, TypeError), match=r"FusedSequential|CapturedForward"):
            torch.jit.script(fused)  # a model holding FusedSequential blocks, or with a captured forward


def test_jit_trace_behaviour():
    """Pinned behaviour (not a fix) of torch.jit.trace, which is deprecated:
    (1) tracing a FusedSequential that has not run yet fails the tracer's
    sanity check, because the first call builds the plan (mlp_pack is traced)
    and the check run reuses it (the packed buffer is a constant);
    (2) once warm, the trace records the packed weights as a constant, so the
    traced module is a snapshot: unlike a traced nn.Sequential it does not see
    later weight updates."""
    net, fused = make_pair()
    x = torch.randn(3, 32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        with torch.no_grad():
            with pytest.raises(torch.jit.TracingCheckError, match="Graphs differed across invocations"):
                torch.jit.trace(fused.body, x)
            fused.body.invalidate_plan()
            fused.body(x)
            traced = torch.jit.trace(fused.body, x)
            traced_ref = torch.jit.trace(net.body, x)
            close(traced(x), net.body(x))
            for m in (net, fused):
                m.body[0].weight.mul_(2)
            close(traced_ref(x), net.body(x))  # follows the weights
            close(fused.body(x), net.body(x))  # the module itself re-plans
            assert not torch.allclose(traced(x), net.body(x), rtol=1e-3, atol=1e-3)  # stale snapshot


def test_forward_ad_dual_tensor_outside_functorch():
    """torch.autograd.forward_ad with a dual input: the tangent is propagated
    (the segments run eagerly), not dropped."""
    import torch.autograd.forward_ad as fwAD

    net, fused = make_pair()
    freeze(net, fused)
    x, t = torch.randn(5, 12), torch.randn(5, 12)
    with fwAD.dual_level():
        ref = fwAD.unpack_dual(net(fwAD.make_dual(x, t))).tangent
        out = fwAD.unpack_dual(fused(fwAD.make_dual(x, t))).tangent
    close(out, ref)
