"""Data-parallel scans over a data set with ``torch.distributed``: one process, or several under ``torchrun``.

    torchrun --nproc-per-node 2 -m resnet_demo.training.scan --weights ... --data ...

:meth:`Dist.from_env` reads what ``torchrun`` puts in the environment (``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``) and joins the process group: ``nccl`` when the
device is CUDA (each process on the GPU of its ``LOCAL_RANK``), ``gloo`` otherwise. Launched without
``torchrun`` it is a single process and every collective returns its input, so the same code runs both
ways.

Each process scans its :meth:`~Dist.shard` of the images; statistics are combined with collectives
(:meth:`~Dist.sum` is ``all_reduce``, :meth:`~Dist.gather` is ``all_gather``). For several processes to
give exactly one process's numbers, counts are summed as integers, and values whose order matters
(percentiles do not, but a float sum would) are gathered back into data order.
"""

from __future__ import annotations

import gc
import os
from datetime import timedelta

import torch
import torch.distributed as dist

from ..runtime import pick_device

__all__ = ["Dist"]

_TIMEOUT = timedelta(minutes=30)  # how long a collective waits for a slower process before failing


class Dist:
    """This process's place in a data-parallel job: ``rank`` of ``world`` processes, computing on ``device``.

    ``Dist()`` is the single process. With ``world`` > 1, :meth:`shard` works anywhere, the collectives only
    in a process group (:meth:`from_env` joins it). Use it as a context manager (or call :meth:`close`) so a
    process group it started is destroyed at the end.
    """

    def __init__(self, rank: int = 0, world: int = 1, device: str | torch.device = "cpu", *, owns_group: bool = False):
        if world < 1 or not 0 <= rank < world:
            raise ValueError(f"rank {rank} of {world} processes is not a place in a job")
        self.rank, self.world = rank, world
        self.device = torch.device(device)
        self._owns_group = owns_group

    @property
    def _comm(self) -> torch.device:
        """Where collectives take their tensors: nccl on this process's GPU, gloo on the CPU."""
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError(
                f"rank {self.rank} of {self.world} processes has no torch.distributed process group to talk to "
                "the others: launch with torchrun and make the Dist with Dist.from_env()"
            )
        nccl = "nccl" in str(dist.get_backend()) and self.device.type == "cuda"
        return self.device if nccl else torch.device("cpu")

    @classmethod
    def from_env(cls, device: str | torch.device | None = "auto") -> Dist:
        """The job ``torchrun`` launched this process in, or the single process when launched without it.

        Args:
            device: ``cpu``, ``cuda``, ``mps`` or ``auto`` (:func:`~resnet_demo.core.runtime.pick_device`).
                Under ``torchrun``, ``cuda`` without an index means the GPU of ``LOCAL_RANK``.

        Raises:
            ValueError: the device is not available. RuntimeError: launched by ``torchrun`` in a
                PyTorch built without ``torch.distributed``.
        """
        device = pick_device(str(device) if device is not None else None)
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls(0, 1, device)
        if not dist.is_available():
            raise RuntimeError("this PyTorch has no torch.distributed, which a run under torchrun needs")
        rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
        if device.type == "cuda" and device.index is None:
            if local >= torch.cuda.device_count():
                raise ValueError(
                    f"process {local} of this machine has no GPU of its own ({torch.cuda.device_count()} visible): "
                    "start at most one process per GPU (--nproc-per-node), or run on the CPU (--device cpu)"
                )
            device = torch.device("cuda", local)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        owns = not dist.is_initialized()
        if owns:
            backend = "nccl" if device.type == "cuda" else "gloo"
            dist.init_process_group(backend, rank=rank, world_size=world, timeout=_TIMEOUT)
        return cls(dist.get_rank(), dist.get_world_size(), device, owns_group=owns)

    @property
    def main(self) -> bool:
        """Whether this is rank 0, the process that writes results."""
        return self.rank == 0

    def shard(self, n: int, block: int = 1) -> torch.Tensor:
        """Indices of the ``n`` items this process takes, ascending (int64).

        With ``block`` 1, item ``i`` goes to rank ``i % world``: ``DistributedSampler(shuffle=False)``'s
        split without the duplicates it pads with, so every item is counted exactly once. With a larger
        ``block``, runs of ``block`` consecutive items go round the ranks: a scan in batches of ``block``
        then runs every batch exactly as one process would, so each image's numbers are bit for bit
        the same however many processes share the work.
        """
        if n < 0 or block < 1:
            raise ValueError(f"cannot shard {n} items in blocks of {block}")
        index = torch.arange(n, dtype=torch.int64)
        return index[(index // block) % self.world == self.rank]

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """The element-wise sum of ``tensor`` over all processes (``all_reduce``), on ``tensor``'s device.

        Integer tensors sum exactly, whatever the order the processes' parts arrive in.
        """
        if self.world == 1:
            return tensor.clone()
        out = tensor.detach().to(self._comm, copy=True)
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out.to(tensor.device)

    def gather(self, tensor: torch.Tensor, index: torch.Tensor | None = None) -> torch.Tensor:
        """Every process's ``tensor`` (lengths along dim 0 may differ), concatenated in rank order.

        With ``index`` (this process's item indices, e.g. from :meth:`shard`, one per row of ``tensor``),
        row ``j`` is put at position ``index[j]``: the result is in data order, as one process computed it.
        """
        if index is not None and len(index) != len(tensor):
            raise ValueError(f"{len(index)} indices for {len(tensor)} rows")
        if self.world == 1:
            out, order = tensor.clone(), index
        else:
            out = torch.cat(self._all_gather(tensor))
            order = torch.cat(self._all_gather(index)) if index is not None else None
        if order is None:
            return out
        order = order.to(out.device, torch.int64)
        if not torch.equal(order.sort().values, torch.arange(len(order), device=out.device)):
            raise ValueError(f"the indices do not number the {len(order)} gathered rows 0..{len(order) - 1} once each")
        placed = torch.empty_like(out)
        placed[order] = out
        return placed

    def _all_gather(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        """``all_gather`` of tensors of different lengths: padded to the longest, trimmed after."""
        comm = self._comm
        local = tensor.detach().to(comm)
        size = torch.tensor([len(local)], dtype=torch.int64, device=comm)
        sizes = [torch.empty_like(size) for _ in range(self.world)]
        dist.all_gather(sizes, size)
        longest = int(max(int(s) for s in sizes))
        padded = torch.zeros((longest, *local.shape[1:]), dtype=local.dtype, device=comm)
        padded[: len(local)] = local
        parts = [torch.empty_like(padded) for _ in range(self.world)]
        dist.all_gather(parts, padded)
        return [p[: int(s)].to(tensor.device) for p, s in zip(parts, sizes)]

    def barrier(self) -> None:
        """Wait until every process has come here."""
        if self.world > 1:
            if self._comm.type == "cuda":  # nccl: on this process's GPU, not one it guesses
                dist.barrier(device_ids=[self._comm.index])
            else:
                dist.barrier()

    def close(self) -> None:
        """Leave the process group, if this object started it.

        Collected at once: gloo's worker threads must not outlive the interpreter's shutdown, where
        releasing what they hold aborts the process (pytorch/pytorch#179291 describes the mechanism).
        """
        if self._owns_group and dist.is_initialized():
            dist.destroy_process_group()
            gc.collect()
        self._owns_group = False

    def __enter__(self) -> Dist:
        return self

    def __exit__(self, exc_type, *exc) -> None:
        # On a normal exit every process waits for the others before leaving the group: a process that
        # finished its share early (the others still reducing or writing) would otherwise tear down gloo's
        # connections under them, and the job dies with "terminate called without an active exception".
        if exc_type is None and self._owns_group and self.world > 1:
            self.barrier()
        self.close()

    def __repr__(self) -> str:
        return f"Dist(rank={self.rank}, world={self.world}, device={self.device})"
