"""An optimizer's state as flat safetensors tensors + JSON-able hyperparameters (no pickle)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


def optimizer_state_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, Tensor], list[dict[str, Any]]]:
    """AdamW's state as ``state.<param index>.<name>`` tensors + hyperparameters per group."""
    state_dict = optimizer.state_dict()
    tensors = {}
    for index, slots in state_dict["state"].items():
        for key, value in slots.items():
            if not isinstance(value, Tensor):
                raise TypeError(f"optimizer state {key!r} is not a tensor")  # AdamW keeps tensors only
            tensors[f"state.{index}.{key}"] = value.detach().cpu().contiguous()
    groups = [
        {**{k: v for k, v in group.items() if k != "params"}, "num_params": len(group["params"])}
        for group in state_dict["param_groups"]
    ]
    return tensors, groups


def load_optimizer_state(optimizer: torch.optim.Optimizer, tensors: dict[str, Tensor], groups: list[Any]) -> None:
    """Inverse of :func:`optimizer_state_tensors`; ``ValueError`` when the state does not fit."""
    current = optimizer.state_dict()["param_groups"]
    if len(groups) != len(current) or any(
        not isinstance(g, dict) or g.get("num_params") != len(c["params"]) for g, c in zip(groups, current)
    ):
        raise ValueError("optimizer parameter groups do not match")
    state: dict[int, dict[str, Tensor]] = {}
    for name, tensor in tensors.items():
        _, index, key = name.split(".", 2)
        state.setdefault(int(index), {})[key] = tensor
    param_groups = []
    for recorded, group in zip(groups, current):
        restored = {k: v for k, v in recorded.items() if k != "num_params"}
        if isinstance(restored.get("betas"), list):
            restored["betas"] = tuple(restored["betas"])  # JSON has no tuples
        param_groups.append({**group, **restored, "params": group["params"]})
    try:
        optimizer.load_state_dict({"state": state, "param_groups": param_groups})
    except (KeyError, RuntimeError) as error:
        raise ValueError(f"optimizer state does not fit ({error})") from error
