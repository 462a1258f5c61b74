"""Several processes, one run: ``torchrun --nproc_per_node=N -m lis compress CONFIG``.

torchrun starts N copies of the command with ``RANK``, ``WORLD_SIZE`` and
``LOCAL_RANK`` set; ``init`` joins them into one process group (gloo for CPU
tensors, nccl for GPU ones). Every process holds the teacher, a student wrapped in
``DistributedDataParallel`` and the dean, and sees its own slice of each
global batch (``lis.data.EpochSampler``); gradients are averaged so every
process takes the same step, and the ADMM state, the signals and the dean
stay identical everywhere. Process 0 (``is_main``) alone writes the run
directory. Without torchrun (``WORLD_SIZE`` unset) every function here is a
no-op for one process.
"""

from __future__ import annotations

import os
from contextlib import nullcontext
from typing import Callable, Iterable, TypeVar

import torch
import torch.distributed as dist

from lis.errors import LISError

T = TypeVar("T")


def world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if world() > 1 else 0


def is_main() -> bool:
    return rank() == 0


def init() -> None:
    """Join torchrun's process group if launched by it (idempotent); pins each process to its GPU."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return
    if not dist.is_available():
        raise LISError("WORLD_SIZE is set but this PyTorch build has no torch.distributed: run one process")
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    # a backend per device: run.device=cpu on a GPU host still all-reduces CPU tensors
    dist.init_process_group("cpu:gloo,cuda:nccl" if cuda else "gloo")


def device(name: str) -> str:
    """This process's device for ``run.device``: under torchrun ``cuda`` and ``auto`` mean its own GPU, and a
    GPU index is refused (every process would use that one GPU while DDP uses the process's own)."""
    if world() > 1 and name.startswith("cuda:"):
        raise LISError(f"run.device={name} under torchrun: each process uses its own GPU (LOCAL_RANK); "
                       f"set run.device=cuda and choose the GPUs with CUDA_VISIBLE_DEVICES")
    if world() > 1 and name in ("auto", "cuda") and torch.cuda.is_available():
        return f"cuda:{torch.cuda.current_device()}"
    return name


def average_(tensors: Iterable[torch.Tensor]) -> None:
    """Replace each tensor by its mean over the processes (one all-reduce of a flat buffer)."""
    tensors = list(tensors)
    if world() == 1 or not tensors:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat)
    flat /= world()
    offset = 0
    for t in tensors:
        t.copy_(flat[offset:offset + t.numel()].view_as(t))
        offset += t.numel()


def any_(flag: bool) -> bool:
    """True on every process if ``flag`` is true on any (so that all stop at the same iteration)."""
    if world() == 1:
        return flag
    t = torch.tensor([float(flag)])  # a CPU tensor: gloo, whatever the run's device
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def once(fn: Callable[[], T]) -> T:
    """``fn()`` computed by process 0 alone and handed to every process: for a small picklable result (test
    metrics) that would cost every process the same work."""
    if world() == 1:
        return fn()
    box = [fn() if is_main() else None]
    dist.broadcast_object_list(box, src=0)  # through gloo (CPU) even when nccl is the GPU backend
    return box[0]


def wrap(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` in ``DistributedDataParallel`` under torchrun (itself otherwise); the parameters stay those
    of ``model``, so the loops keep using it for everything but the forward pass."""
    if world() == 1:
        return model
    device_ids = [torch.cuda.current_device()] if next(model.parameters()).is_cuda else None
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids)


def no_sync(replica: torch.nn.Module):
    """A context in which ``replica``'s backward does not average gradients (they are averaged by hand)."""
    return replica.no_sync() if isinstance(replica, torch.nn.parallel.DistributedDataParallel) else nullcontext()


def barrier() -> None:
    if world() > 1:
        dist.barrier()
