"""Rank, world size, the process group and the few collectives the trainer needs.

The one module that imports torch.distributed. Everything else asks it and works unchanged in a
single process, where every function here is the identity or a no-op. Processes come from torchrun
(RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT in the environment) or from SLURM tasks (through
submitit's helper, which exports the same variables); nothing assumes one node.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import random
from typing import Any, Callable, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor

from sift_cli.config import ConfigError

T = TypeVar("T")
_control = None  # a gloo group for host-side agreement (budget, stop signals) without a GPU sync


def _from_slurm() -> None:
    """Under several SLURM tasks (`srun`, one per GPU) or submitit's executors (the Hydra launcher, local ones
    included), export torchrun's variables from the job's. submitit reads SLURM's node list; torchrun's
    variables, when set, win, and so do a MASTER_ADDR and MASTER_PORT the user exported."""
    if "RANK" in os.environ:
        return
    if "SUBMITIT_EXECUTOR" in os.environ:
        from submitit import JobEnvironment
    elif int(os.environ.get("SLURM_NTASKS", "1")) > 1 and "SLURM_PROCID" in os.environ:
        # srun in a batch script of the user's own: submitit's SLURM view without its executor
        try:
            from submitit.slurm.slurm import SlurmJobEnvironment as JobEnvironment
        except ImportError:
            raise ConfigError(f"this is one of {os.environ['SLURM_NTASKS']} SLURM tasks, and joining them needs "
                              f"submitit: pip install 'sift-train[slurm]' (or start the processes with torchrun)"
                              ) from None
    else:
        return
    job = JobEnvironment()
    if job.num_tasks <= 1:
        return
    os.environ.setdefault("MASTER_ADDR", job.hostnames[0])
    # a port of this job's own (as submitit's helper picks it): array jobs sharing a node do not collide
    os.environ.setdefault("MASTER_PORT", str(random.Random(job.job_id).randint(20000, 60000)))
    os.environ.update(RANK=str(job.global_rank), WORLD_SIZE=str(job.num_tasks), LOCAL_RANK=str(job.local_rank),
                      LOCAL_WORLD_SIZE=str(job.num_tasks // job.num_nodes))


def init() -> None:
    """Join the process group when launched as several processes; idempotent, a no-op for one."""
    global _control
    _from_slurm()
    if dist.is_initialized() or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(gpu_index())
    # a bad input on one rank ends that rank; torchrun then stops the rest. The timeout bounds
    # a hang for launchers that do not (a rank that died while the others wait in a collective).
    dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(minutes=30),
                            device_id=torch.device("cuda", gpu_index()) if cuda else None)
    _control = dist.new_group(backend="gloo") if cuda else dist.group.WORLD


def shutdown() -> None:
    global _control
    if dist.is_initialized():
        dist.destroy_process_group()
    _control = None


def world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def gpu_index() -> int:
    """This process's GPU: its local rank among the GPUs it sees (a task given only its own GPU sees one)."""
    return local_rank() % max(torch.cuda.device_count(), 1)


def launch_rank() -> int:
    """This process's rank as its launcher assigned it (torchrun, SLURM, submitit), before any process group."""
    _from_slurm()
    return int(os.environ.get("RANK", "0"))


def launch_world() -> int:
    """How many processes the launcher started for this run (torchrun, SLURM, submitit), before any process group."""
    _from_slurm()
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main() -> bool:
    return rank() == 0


def wrap(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """DistributedDataParallel around the model when there are several processes; the model itself otherwise."""
    if world() == 1:
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def no_sync(model) -> contextlib.AbstractContextManager:
    """DDP's gradient reduction held back (a micro-batch that is not a step's last); nothing in one process."""
    return model.no_sync() if world() > 1 else contextlib.nullcontext()


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return getattr(model, "module", model)


def all_reduce_sum(tensor: Tensor) -> Tensor:
    if world() > 1:
        dist.all_reduce(tensor)
    return tensor


def average_buffers(model: torch.nn.Module) -> None:
    """Replace every rank's floating-point buffers (batch norm's running statistics) by their mean over the
    ranks, as timm's distribute_bn does. DDP keeps the weights equal, but each rank's batches move its own
    statistics; averaged before an evaluation or a checkpoint, every rank evaluates and saves one model."""
    buffers = [b for b in model.buffers() if b.is_floating_point()]
    if world() == 1 or not buffers:
        return
    mean = all_reduce_sum(torch.cat([b.reshape(-1) for b in buffers])) / world()
    for buffer, part in zip(buffers, mean.split([b.numel() for b in buffers])):
        buffer.copy_(part.view_as(buffer))


def all_gather(tensor: Tensor) -> Tensor:
    """Every rank's tensor concatenated along dim 0, in rank order (equal shapes on every rank)."""
    if world() == 1:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(world())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts)


def agree_max(values: list[float]) -> list[float]:
    """The maximum over ranks of each value, on the host: every rank then takes the same decision."""
    if world() == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=_control)
    return t.tolist()


def broadcast(obj: Any) -> Any:
    """Rank 0's value of a picklable object, on every rank."""
    if world() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0, group=_control)
    return box[0]


def gather(obj: Any) -> list:
    """Every rank's picklable object, in rank order, on every rank."""
    if world() == 1:
        return [obj]
    out = [None] * world()
    dist.all_gather_object(out, obj, group=_control)
    return out


def from_main(fn: Callable[[], T]) -> T:
    """fn() run on rank 0 alone, its result on every rank. What it raises is raised on every rank: a bad
    input only rank 0 can see (its run folder, a checkpoint path) ends them all with the same error."""
    if world() == 1:
        return fn()
    result = error = None
    if is_main():
        try:
            result = fn()
        except Exception as err:
            error = err
    result, error = broadcast((result, error))
    if error is not None:
        raise error
    return result


def barrier() -> None:
    if world() > 1:
        dist.barrier(group=_control)
