"""The data-parallel world as torch.distributed sees it (1 outside a process group)."""

from __future__ import annotations

import torch.distributed as dist


def world_size() -> int:
    """Ranks in the default process group; 1 when torch.distributed is not initialised."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
