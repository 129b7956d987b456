#!/usr/bin/env python
"""Minor page faults and CPU time per forward of seqfuse.fuse(torchvision model).

A fused CPU call's outputs and intermediates come from seqfuse's host cache
of recycled blocks (docs/runtime.md, "Host memory of the CPU ops"); with
SEQFUSE_HOST_CACHE_MB=0 they come from the system allocator, and blocks the
OS hands out afresh fault on every page at their first write. Compare:

    python benchmarks/page_faults.py resnet50 1
    SEQFUSE_HOST_CACHE_MB=0 python benchmarks/page_faults.py resnet50 1

Page-fault counts are exact (getrusage), unlike timings on a shared machine.
"""
import resource
import sys
import time

import torch
import torchvision

import seqfuse


def main() -> None:
    name = sys.argv[1] if len(sys.argv) > 1 else "resnet50"
    batch = int(sys.argv[2]) if len(sys.argv) > 2 else 1
    torch.manual_seed(0)
    fused = seqfuse.fuse(getattr(torchvision.models, name)().eval())
    x = torch.randn(batch, 3, 224, 224)
    with torch.inference_mode():
        for _ in range(15):  # warm: engine trials, the cache's first blocks
            fused(x)
        faults0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        cpu0 = time.process_time()
        for _ in range(20):
            fused(x)
        cpu = (time.process_time() - cpu0) / 20 * 1e3
        faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults0) / 20
    print(f"{name} batch {batch}: {faults:.0f} minor page faults per forward, {cpu:.1f} ms CPU time per forward "
          f"(all threads)")


if __name__ == "__main__":
    main()
