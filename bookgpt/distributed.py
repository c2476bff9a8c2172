"""The processes of a training job: each one's place in a torchrun (DDP) job and the collectives
train.py needs, all on the training device, and the signals that ask a run to stop and save.

    d = setup_distributed(device)          # one process without torchrun
    with StopFlag() as stop: ...           # stop.requested after SIGINT/SIGTERM
"""
from __future__ import annotations

import datetime
import inspect
import os
import signal
import threading
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from bookgpt.config import UserError

DDP = torch.nn.parallel.DistributedDataParallel


@dataclass
class Dist:
    """This process's place in the job, and the collectives train.py uses, all on `device`.

    NCCL serves CUDA tensors only: a CPU tensor in any collective of an NCCL process group raises
    "No backend type associated with device type cpu". Every collective here takes tensors on the
    training device, and refuses others the same way on any backend, so a CPU run catches it too."""
    rank: int = 0
    local_rank: int = 0
    world: int = 1
    device: str = "cpu"

    @property
    def master(self) -> bool:
        return self.rank == 0

    def _check(self, x: torch.Tensor) -> None:
        want = torch.device(self.device)
        if x.device.type != want.type or (want.index is not None and x.device.index != want.index):
            raise RuntimeError(f"a collective got a tensor on {x.device}, but this job's processes exchange "
                               f"tensors on {self.device} (NCCL refuses any other device)")

    def all_mean(self, x: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            self._check(x)
            dist.all_reduce(x, op=dist.ReduceOp.SUM)
            x /= self.world
        return x

    def any(self, flags: list[bool]) -> list[bool]:
        """Each flag, true if it is true on any process (reading the result waits for the device)."""
        if self.world == 1:
            return flags
        t = torch.tensor([float(f) for f in flags], device=self.device)
        self._check(t)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return [bool(v) for v in t.tolist()]

    def gather(self, obj: Any) -> list[Any]:
        """Every process's obj, in rank order (NCCL moves them through the current CUDA device,
        which setup_distributed set)."""
        if self.world == 1:
            return [obj]
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.world > 1:
            index = torch.device(self.device).index
            dist.barrier(device_ids=[index] if index is not None else None)


def setup_distributed(device: str) -> Dist:
    """torchrun sets RANK/WORLD_SIZE. With device=cuda each process takes the GPU of its local rank
    and the processes talk over NCCL; on a CPU over gloo. BOOKGPT_DIST_BACKEND overrides the backend:
    "cuda:gloo" has NCCL's restriction to CUDA tensors and lets two processes share one GPU (device=cuda
    gives process i GPU i modulo the GPUs there are), which is how one GPU checks the two-GPU path
    (gpu_check.py)."""
    if "RANK" not in os.environ:
        return Dist(device=device)
    rank, local_rank, world = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", 0)), int(os.environ["WORLD_SIZE"])
    backend = os.environ.get("BOOKGPT_DIST_BACKEND") or ("nccl" if device.startswith("cuda") else "gloo")
    if device == "cuda":
        gpus = torch.cuda.device_count()
        if local_rank >= gpus and backend == "nccl":
            raise UserError(f"torchrun started process {local_rank} on this node but it has {gpus} GPU(s); use "
                            f"--nproc_per_node={gpus}")
        device = f"cuda:{local_rank % gpus}"  # cuda:gloo: more processes than GPUs share them in turn
        torch.cuda.set_device(local_rank % gpus)
    elif device.startswith("cuda:") and backend == "nccl" and world > 1:
        raise UserError(f"device={device} puts every process on one GPU, which NCCL refuses; pass device=cuda "
                        f"(each process takes its own GPU)")
    # a rank that dies makes the others fail at the next collective after this timeout, not hang
    timeout = float(os.environ.get("BOOKGPT_DIST_TIMEOUT", "300"))
    dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout))
    return Dist(rank, local_rank, world, device)


def wrap_ddp(model: torch.nn.Module, device: str) -> DDP:
    """The model under DDP: gradients averaged across processes once per step. broadcast_buffers=False: its
    only buffers are the rotary tables, the same constants on every process, so nothing is sent before each
    forward (DDP would otherwise broadcast them from rank 0 every step)."""
    index = torch.device(device).index
    # torch 2.13 renamed the switch (the old name still works there, with a warning)
    name = "forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(DDP).parameters else "broadcast_buffers"
    return DDP(model, device_ids=[index] if index is not None else None, **{name: False})


class StopFlag:
    """SIGINT/SIGTERM ask the loop to stop after the current step (and save); a second signal
    while saving changes nothing: the save is atomic and finishes."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "StopFlag":
        if threading.current_thread() is threading.main_thread():  # signals reach the main thread only
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame) -> None:
        if not self.requested:
            print(f"\n{signal.Signals(signum).name}: finishing this step, saving ckpt.pt, then exiting", flush=True)
        self.requested = True
