"""The torchrun environment: which process of a multi-process run this is (used by extract and evaluation).

``torchrun`` starts one process per rank and tells each its place through environment variables; outside
torchrun none is set and the run is a single process. This module only reads them (and, on request, joins
the process group): it imports nothing heavier than torch's own ``torch.distributed``, and only when asked.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

from talk2dino.errors import InvalidInputError

__all__ = ["TorchrunEnv", "init_process_group", "torchrun_env"]


@dataclass(frozen=True)
class TorchrunEnv:
    """This process's place in a ``torchrun`` group ((1, 0, 0) outside torchrun).

    Attributes:
        world_size: number of processes (``WORLD_SIZE``), at least 1.
        rank: this process's global rank in ``[0, world_size)`` (``RANK``).
        local_rank: its rank on this machine, which picks its GPU (``LOCAL_RANK``; defaults to `rank`).
    """

    world_size: int
    rank: int
    local_rank: int


def torchrun_env() -> TorchrunEnv:
    """Read ``WORLD_SIZE``, ``RANK`` and ``LOCAL_RANK`` (defaults 1, 0 and the rank).

    Raises:
        InvalidInputError: a value is not an integer, or the rank lies outside ``[0, WORLD_SIZE)``.
    """
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local_rank = int(os.environ.get("LOCAL_RANK", str(rank)))
    except ValueError as err:
        raise InvalidInputError(f"bad torchrun environment (WORLD_SIZE/RANK/LOCAL_RANK): {err}") from err
    if world < 1 or not 0 <= rank < world:
        raise InvalidInputError(f"bad torchrun environment: RANK={rank}, WORLD_SIZE={world}")
    return TorchrunEnv(world_size=world, rank=rank, local_rank=local_rank)


def init_process_group(env: TorchrunEnv, *, timeout: timedelta | None = None, require_address: bool = False) -> bool:
    """Join the gloo process group of a multi-process run, when there is one to join and it is not joined yet.

    Args:
        env: this process's place (`torchrun_env`); a single process joins nothing.
        timeout: the group's collective timeout (None: torch's default).
        require_address: join only when ``MASTER_ADDR`` and ``MASTER_PORT`` are set (the rendezvous
            torchrun provides); without them return False instead of letting torch fail.

    Returns:
        True when this call created the group (the caller then destroys it), else False.
    """
    import torch.distributed as dist

    if env.world_size == 1 or not dist.is_available() or dist.is_initialized():
        return False
    if require_address and not {"MASTER_ADDR", "MASTER_PORT"} <= set(os.environ):
        return False
    if timeout is None:
        dist.init_process_group("gloo", rank=env.rank, world_size=env.world_size)
    else:
        dist.init_process_group("gloo", rank=env.rank, world_size=env.world_size, timeout=timeout)
    return True
