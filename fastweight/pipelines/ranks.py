"""Which process of a launched run may touch shared files (``accelerate launch``, ``torchrun``, DeepSpeed).

A pipeline run under a launcher runs once per process. Shared files -- the output folder, ``status.json``,
evaluation JSONs, tables, plots, generated data and model caches -- are created, moved aside and written by the
main process only; the other processes wait at a barrier (``barrier``) before they read what it wrote.
Without a launcher (``WORLD_SIZE`` unset or 1) every function here is a no-op for one process, and no process
group is created.

The process group is accelerate's ``PartialState``, created on first use: on a machine without CUDA with
``cpu=True`` (gloo), which is also what DeepSpeed on CPU (``DS_ACCELERATOR=cpu``) needs, since accelerate
creates a process group for its DeepSpeed path only on GPUs; the training loop's ``Accelerator`` then reads
the launcher's DeepSpeed settings as usual.
"""
from __future__ import annotations

import os
from contextlib import contextmanager


def launched() -> bool:
    """True when this process is one of several started by a launcher (``WORLD_SIZE`` > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def state():
    """accelerate's ``PartialState`` (the process group), created on first use; None for one process."""
    if not launched():
        return None
    import torch
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())


def is_main() -> bool:
    """Whether this process writes shared files (rank 0, or the only process)."""
    s = state()
    return s is None or s.is_main_process


def barrier() -> None:
    """Wait until every process of the run is here (no-op for one process)."""
    s = state()
    if s is not None:
        s.wait_for_everyone()


def shutdown() -> None:
    """Leave the process group (if this process joined one) before the interpreter exits: gloo threads torn
    down at exit can hang or abort."""
    import torch.distributed as dist

    if launched() and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


@contextmanager
def main_first():
    """The main process runs the block first (e.g. writes a cache), then the others (which find it written)."""
    barrier()
    if is_main():
        yield
        barrier()
    else:
        barrier()
        yield


__all__ = ["barrier", "is_main", "launched", "main_first", "shutdown", "state"]
