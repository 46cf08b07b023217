"""Process-group helpers for ``torchrun`` (DDP): NCCL on GPU, gloo on CPU; no-ops when single-process."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, List

import torch
import torch.distributed as dist

__all__ = ['DistInfo', 'init_distributed', 'is_dist', 'all_reduce_sum', 'all_reduce_min', 'all_gather_object',
           'barrier', 'cleanup']


@dataclass
class DistInfo:
    """Where this process sits: global rank, world size, local rank and its device."""
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device('cpu')

    @property
    def main(self) -> bool:
        return self.rank == 0


def is_dist() -> bool:
    """True inside an initialised process group."""
    return dist.is_available() and dist.is_initialized()


def init_distributed(device: str = 'auto') -> DistInfo:
    """Join the process group described by torchrun's environment (if any) and pick the device."""
    want_cuda = device in ('auto', 'cuda') and torch.cuda.is_available()
    if device not in ('auto', 'cuda', 'cpu'):
        want_cuda = device.startswith('cuda')
    world = int(os.environ.get('WORLD_SIZE', '1'))
    rank = int(os.environ.get('RANK', '0'))
    local_rank = int(os.environ.get('LOCAL_RANK', '0'))
    if want_cuda:
        dev = torch.device('cuda', local_rank) if world > 1 or device in ('auto', 'cuda') else torch.device(device)
        torch.cuda.set_device(dev)
    else:
        dev = torch.device('cpu')
    if world > 1 and not is_dist():
        dist.init_process_group(backend='nccl' if dev.type == 'cuda' else 'gloo')
    return DistInfo(rank=rank, world=world, local_rank=local_rank, device=dev)


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over ranks in place (identity when single-process)."""
    if is_dist():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_reduce_min(t: torch.Tensor) -> torch.Tensor:
    """Minimum over ranks in place (identity when single-process)."""
    if is_dist():
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return t


def all_gather_object(obj: Any) -> List[Any]:
    """``[obj of rank 0, obj of rank 1, ...]`` (``[obj]`` when single-process)."""
    if not is_dist():
        return [obj]
    out: List[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    """Wait for all ranks."""
    if is_dist():
        dist.barrier()


def cleanup() -> None:
    """Leave the process group."""
    if is_dist():
        dist.destroy_process_group()
