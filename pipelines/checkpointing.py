"""Training state in safetensors: model, optimizer, EMA, RNG and trainer state, written atomically.

A checkpoint folder holds `model.safetensors`, `optimizer.safetensors` (tensors; the param
groups and non-tensor state go into its metadata), optional `ema.safetensors`, one
`rng_rank{r}.safetensors` per process, and `trainer_state.json`. Folders are written under a
temporary name and moved into place by `medai.utils.replace_folder`, so a crash never leaves a
half-written `last/`.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from medai.errors import CheckpointError
from medai.utils import previous_copy


def optimizer_to_safetensors(optimizer: torch.optim.Optimizer, path: Path) -> None:
    """Write an optimizer's state dict as tensors plus JSON metadata."""
    state = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, Any] = {}
    for pid, entry in state["state"].items():
        for key, value in entry.items():
            if torch.is_tensor(value):
                tensors[f"state.{pid}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{pid}.{key}"] = value
    meta = {"param_groups": json.dumps(state["param_groups"]), "scalars": json.dumps(scalars)}
    save_file(tensors, str(path), metadata=meta)


def optimizer_from_safetensors(optimizer: torch.optim.Optimizer, path: Path) -> None:
    """Restore an optimizer's state written by optimizer_to_safetensors."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        meta = handle.metadata()
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}
    state: dict[int, dict[str, Any]] = {}
    for name, tensor in tensors.items():
        _, pid, key = name.split(".", 2)
        state.setdefault(int(pid), {})[key] = tensor
    for name, value in json.loads(meta["scalars"]).items():
        pid, key = name.split(".", 1)
        state.setdefault(int(pid), {})[key] = value
    optimizer.load_state_dict({"state": state, "param_groups": json.loads(meta["param_groups"])})


def rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Capture Python, NumPy and torch RNG states as (tensors, JSON-able values)."""
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{i}"] = s
    np_state = np.random.get_state()
    meta = {
        "python": json.dumps(random.getstate(), default=list),
        "numpy": json.dumps([np_state[0], np_state[1].tolist(), *np_state[2:]]),
    }
    return tensors, meta


def set_rng_state(tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> None:
    """Restore RNG states captured by rng_state."""
    torch.set_rng_state(tensors["torch_cpu"])
    cuda = [tensors[k] for k in sorted(tensors) if k.startswith("torch_cuda_")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    version, internal, gauss = json.loads(meta["python"])
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = json.loads(meta["numpy"])
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))


def save_rng(path: Path) -> None:
    """Write this process's RNG states to `path`."""
    tensors, meta = rng_state()
    save_file(tensors, str(path), metadata=meta)


def load_rng(path: Path) -> None:
    """Restore this process's RNG states from `path`."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        meta = handle.metadata()
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}
    set_rng_state(tensors, meta)


def model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """A contiguous CPU copy of a model's state dict, tied tensors de-duplicated."""
    seen: dict[int, str] = {}
    out = {}
    for key, value in model.state_dict().items():
        ptr = value.data_ptr()
        if ptr in seen and value.numel() > 0:
            continue  # tied weight: saved once under its first name
        seen[ptr] = key
        out[key] = value.detach().cpu().contiguous()
    return out


def run_weights(run_dir: Path, checkpoint: str = "best") -> Path:
    """Return the model weights file of a `medai finetune` run's `best` or `last` checkpoint."""
    return Path(run_dir) / "checkpoints" / checkpoint / "model.safetensors"


def find_checkpoint(folder: Path) -> Path | None:
    """Return the complete checkpoint at `folder` (or its previous copy after a crash mid-replace)."""
    for candidate in (folder, previous_copy(folder)):
        if (candidate / "trainer_state.json").is_file():
            return candidate
    return None


def read_trainer_state(folder: Path) -> dict[str, Any]:
    """Read trainer_state.json of a checkpoint folder."""
    path = folder / "trainer_state.json"
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(path, f"unreadable trainer state ({exc})") from exc


def load_model_state(model: nn.Module, path: Path) -> None:
    """Load a safetensors state into a model strictly (tied weights restored through their alias)."""
    from medai.models.registry import load_state_strict

    load_state_strict(model, load_file(str(path)), path)
