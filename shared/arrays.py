"""Arrays from whatever a caller hands over, without importing torch: the torch-free edge
and the numpy exit rules take torch tensors too (tests, the torch engine, older callers)."""

from __future__ import annotations

from typing import Any

__all__ = ["to_numpy"]


def to_numpy(value: Any) -> Any:
    """A torch tensor's values as a numpy array (detached, on the CPU; a view where it can
    be); anything else as it is."""
    if hasattr(value, "detach"):  # a torch tensor, told apart without importing torch
        value = value.detach().cpu()
        if str(value.dtype) == "torch.bfloat16":  # numpy has no bfloat16
            value = value.float()
        return value.numpy()
    return value
