"""Worker processes for test_distributed.py. Imported by name in freshly
spawned interpreters (the tests/ directory is on the path they inherit), so
it holds no test code of its own and imports nothing from pytest at import
time."""

from __future__ import annotations

import contextlib
import datetime
import os

import torch
import torch.distributed as dist
from torch import nn

STEPS = 3
COLLECTIVE_TIMEOUT_S = 30  # every gloo collective (and the rendezvous) gives up after this
FUSIBLE = (nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.GELU)


def make_model() -> nn.Sequential:
    """The same MLP with BatchNorm1d on every rank (seeded)."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(8, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 32), nn.GELU(), nn.Linear(32, 4)
    )


def _full(t: torch.Tensor) -> torch.Tensor:
    """A plain tensor: a DTensor (FSDP2 shard) is all-gathered (a collective:
    every rank calls this in the same order)."""
    t = t.full_tensor() if hasattr(t, "full_tensor") else t
    return t.detach().clone()


def _wrap(kind: str, model: nn.Module) -> nn.Module:
    if kind == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model)
    from torch.distributed.fsdp import fully_shard

    fully_shard(model)
    return model


def _train(kind: str, fused: bool, rank: int) -> dict:
    """STEPS training steps (BatchNorm in train mode, per-rank data), each
    followed by an eval forward under no_grad on a probe batch shared by the
    ranks. The fused model's probe forward must run the fused kernels."""
    import seqfuse
    from conftest import forbid_eager

    model = make_model()
    if fused:
        model = seqfuse.fuse(model)
        assert type(model) is seqfuse.FusedSequential
    wrapped = _wrap(kind, model)
    opt = torch.optim.SGD(wrapped.parameters(), lr=0.1, momentum=0.9)
    data = torch.Generator().manual_seed(100 + rank)  # each rank trains on its own batches
    probe = torch.randn(5, 8, generator=torch.Generator().manual_seed(7))
    rec = {"loss": [], "grads": [], "probe": []}
    for _ in range(STEPS):
        x, y = torch.randn(6, 8, generator=data), torch.randn(6, 4, generator=data)
        wrapped.train()
        opt.zero_grad()
        loss = nn.functional.mse_loss(wrapped(x), y)
        loss.backward()
        rec["loss"].append(loss.detach().clone())
        rec["grads"].append({n: _full(p.grad) for n, p in model.named_parameters()})
        opt.step()
        wrapped.eval()
        with torch.no_grad(), (forbid_eager(*FUSIBLE) if fused else contextlib.nullcontext()):
            rec["probe"].append(wrapped(probe).clone())
    rec["state"] = {k: _full(v) for k, v in model.state_dict().items()}
    return rec


def _fsdp2_unsupported_reason():
    """None if FSDP2 shards and trains a plain (unfused) model on CPU with gloo
    here; else the error, as text."""
    try:
        from torch.distributed.fsdp import fully_shard

        m = nn.Linear(4, 4)
        fully_shard(m)
        m(torch.randn(2, 4)).sum().backward()
        _full(m.weight.grad)
    except Exception as err:  # reported by the test as its skip reason
        return f"{type(err).__name__}: {err}"
    return None


def run(rank: int, world_size: int, port: int, out_dir: str, kinds) -> None:
    """Entry point (torch.multiprocessing start_processes): for each kind
    ('ddp', 'fsdp2'), trains the unfused and the fused model, and saves what
    it saw to out_dir/rank<rank>.pt for the parent to compare. One launch
    serves every kind: starting interpreters is the slow part."""
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)  # two ranks on a small shared machine
    dist.init_process_group(
        "gloo", rank=rank, world_size=world_size, timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S)
    )
    try:
        results = {}
        for kind in kinds:
            reason = _fsdp2_unsupported_reason() if kind == "fsdp2" else None
            if reason is not None:
                results[kind] = {"unsupported": reason}
            else:
                results[kind] = {"eager": _train(kind, False, rank), "fused": _train(kind, True, rank)}
        path = os.path.join(out_dir, f"rank{rank}.pt")
        torch.save(results, path + ".tmp")
        os.replace(path + ".tmp", path)  # the parent never sees a half-written file
        dist.barrier()  # nobody tears the group down while a peer still uses it
    finally:
        dist.destroy_process_group()
