"""One client on several processes (GPUs): the process group and the few collectives training needs.

A client whose Job has N GPUs runs N processes started by torch's elastic agent (what `torchrun`
runs, see launch.py), one per GPU: nccl between GPUs, gloo between CPU processes (tests, and
CPU clients). torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT)
says which process this is; without it the client is the usual single process and none of this
is used.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    rank: int
    size: int
    local_rank: int

    @property
    def main(self) -> bool:
        """Rank 0 reads the residual, encodes, uploads and reports; the others only train."""
        return self.rank == 0

    @staticmethod
    def from_env(environ: Mapping[str, str] | None = None) -> World:
        env = os.environ if environ is None else environ
        size = int(env.get("WORLD_SIZE", "1"))
        return World(int(env.get("RANK", "0")), size, int(env.get("LOCAL_RANK", "0")))

    def start(self) -> None:
        """Join the process group (nccl on CUDA, gloo on the CPU); a no-op for one process."""
        if self.size == 1 or dist.is_initialized():
            return
        if torch.cuda.is_available():
            torch.cuda.set_device(self.local_rank)
            dist.init_process_group("nccl", device_id=torch.device("cuda", self.local_rank))
        else:
            dist.init_process_group("gloo")

    def stop(self, finished: bool) -> None:
        """Leave the process group. Processes that `finished` first meet at a barrier: the others
        end their training long before rank 0 has uploaded, and a gloo process that tears its
        group down while a peer still holds the connection can abort (SIGABRT) on exit, which
        the elastic agent reports as a failed client. After a failure there is no barrier: the
        peer may be gone, and the agent stops every process anyway."""
        if self.size > 1 and dist.is_initialized():
            if finished:
                dist.barrier()
            dist.destroy_process_group()

    def all_reduce_grads(self, params: Sequence[torch.Tensor]) -> None:
        """Sum the gradients of `params` over the processes, as one flat tensor (one collective
        per optimizer step). A parameter without a gradient here counts as zero."""
        flat = torch.cat(
            [
                (p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).float()
                for p in params
            ]
        )
        dist.all_reduce(flat)
        at = 0
        for p in params:
            n = p.numel()
            value = flat[at : at + n].view_as(p).to(p.dtype)
            if p.grad is None:
                p.grad = value.clone()
            else:
                p.grad.copy_(value)
            at += n

    def all_reduce_sum(self, values: Sequence[float]) -> list[float]:
        device = torch.device("cuda", self.local_rank) if torch.cuda.is_available() else None
        t = torch.tensor(list(values), dtype=torch.float64, device=device)
        dist.all_reduce(t)
        return t.tolist()

    def check_same(self, params: Sequence[torch.Tensor]) -> None:
        """Fail unless every process ended with the same adapter (rank 0 uploads its own): the
        summed gradient and the same update should make them bit-identical, and a process that
        silently diverged would make the upload a lie about what the others trained."""
        device = params[0].device
        fingerprint = torch.stack(
            [
                torch.stack([p.detach().double().sum(), p.detach().double().abs().sum()])
                for p in params
            ]
        ).to(device)
        gathered = [torch.empty_like(fingerprint) for _ in range(self.size)]
        dist.all_gather(gathered, fingerprint)
        for rank, other in enumerate(gathered):
            if not torch.equal(other, gathered[0]):
                raise RuntimeError(f"process {rank} ended with a different adapter than process 0")
