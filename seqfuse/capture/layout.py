"""The channels_last run of a captured model's inference call.

An inference call (no autograd, eval mode) of a captured model that has
convolutions, given a contiguous (NCHW) 4-D input, runs channels_last inside:
the input is converted once, every chain and eager op between chains then
works on NHWC activations (a fused chain keeps its input's layout, as eager's
convolution does), and 4-D outputs are returned contiguous, eager's layout for
that input. Code that is not seqfuse's or a stock layer (a forward that could
not be traced, ``x.view(...)`` in a traced one) gets its tensors contiguous,
so it sees what it would see in eager.
"""

from __future__ import annotations

import threading

import torch
import torch.fx as fx
from torch import nn

# Set while this thread runs a captured model channels_last.
_run_layout = threading.local()


def in_nhwc_run() -> bool:
    return getattr(_run_layout, "active", False)


def eager_layout(x):
    """``x`` as eager would hold it in a channels_last run: a 4-D tensor made
    contiguous (the run's input was)."""
    if isinstance(x, torch.Tensor) and x.dim() == 4 and not x.is_contiguous():
        return x.contiguous()
    return x


def nchw_output(x):
    """A channels_last activation leaving a channels_last run, in the layout
    eager gives for the run's NCHW input; any other output as it is."""
    if (isinstance(x, torch.Tensor) and x.dim() == 4 and not x.is_contiguous()
            and x.is_contiguous(memory_format=torch.channels_last)):
        return x.contiguous()
    return x


def seqfuse_view(x, *shape):
    """``x.view(*shape)`` in a captured forward: in a channels_last run, a view
    the NHWC strides cannot express is taken of eager's (contiguous) layout."""
    if in_nhwc_run() and isinstance(x, torch.Tensor) and x.dim() == 4 and not x.is_contiguous():
        try:
            return x.view(*shape)
        except RuntimeError:
            x = x.contiguous()
    return x.view(*shape)


def seqfuse_contiguous(x):
    """``x.contiguous()`` in a captured forward: in a channels_last run a 4-D
    activation stays (or becomes) compact channels_last, so the chains after
    it keep NHWC; ``seqfuse_view`` gives code that needs NCHW strides them."""
    if in_nhwc_run() and isinstance(x, torch.Tensor) and x.dim() == 4 and not x.is_contiguous():
        return x.contiguous(memory_format=torch.channels_last)
    return x.contiguous()


def seqfuse_channel_shuffle(x, split_shape, out_shape):
    """ShuffleNet's channel shuffle, ``x.view(b, g, c // g, h, w).transpose(1,
    2).contiguous().view(b, c, h, w)``, in one copy that keeps a channels_last
    input channels_last (the shuffle permutes each pixel's channels). Any other
    shapes run the ops as written."""
    if (in_nhwc_run() and x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)
            and not x.is_contiguous()):
        b, c, h, w = x.shape
        g = split_shape[1]
        if (tuple(split_shape) == (b, g, c // g, h, w) and g * (c // g) == c
                and tuple(out_shape) in ((b, c, h, w), (b, -1, h, w))):
            pixels = x.permute(0, 2, 3, 1).reshape(b, h, w, g, c // g)
            return pixels.transpose(3, 4).reshape(b, h, w, c).permute(0, 3, 1, 2)
    return x.view(*split_shape).transpose(1, 2).contiguous().view(*out_shape)


for _f in (seqfuse_view, seqfuse_contiguous, seqfuse_channel_shuffle):
    _f.__module__ = __name__


def _is_method(node, name: str, nargs: int) -> bool:
    return node.op == "call_method" and node.target == name and len(node.args) == nargs and not node.kwargs


def rewrite_layout_ops(graph: fx.Graph) -> None:
    """Channel shuffles become one call; views and contiguous() calls learn
    the channels_last run (see seqfuse_view, seqfuse_contiguous)."""
    for node in list(graph.nodes):
        # view(b, g, c/g, h, w) -> transpose(1, 2) -> contiguous() -> view(b, c, h, w)
        if not (_is_method(node, "contiguous", 1) and len(node.users) == 1):
            continue
        tr, out = node.args[0], next(iter(node.users))
        transpose = isinstance(tr, fx.Node) and (
            _is_method(tr, "transpose", 3) or (tr.op == "call_function" and tr.target is torch.transpose
                                               and len(tr.args) == 3 and not tr.kwargs))
        if not (transpose and tuple(tr.args[1:]) == (1, 2) and len(tr.users) == 1 and _is_method(out, "view", 5)):
            continue
        split = tr.args[0]
        if not (isinstance(split, fx.Node) and _is_method(split, "view", 6) and len(split.users) == 1):
            continue
        with graph.inserting_before(out):
            call = graph.call_function(seqfuse_channel_shuffle, (split.args[0], split.args[1:], out.args[1:]))
        out.replace_all_uses_with(call)
        for n in (out, node, tr, split):
            graph.erase_node(n)
    for node in list(graph.nodes):
        if node.op == "call_method" and node.target in ("view", "contiguous") and (
                node.target == "view" or (len(node.args) == 1 and not node.kwargs)):
            fn = seqfuse_view if node.target == "view" else seqfuse_contiguous
            with graph.inserting_before(node):
                call = graph.call_function(fn, node.args, node.kwargs)
            node.replace_all_uses_with(call)
            graph.erase_node(node)


def has_convolution(module: nn.Module) -> bool:
    return any(isinstance(m, nn.Conv2d) for m in module.modules())


def nchw_input(a) -> bool:
    return (isinstance(a, torch.Tensor) and a.dim() == 4 and a.is_floating_point() and a.device.type == "cpu"
            and a.is_contiguous() and not a.is_contiguous(memory_format=torch.channels_last))
