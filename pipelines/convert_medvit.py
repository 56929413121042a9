"""Convert a MedViTV2 checkpoint released by the authors (`.pth`) into a medai safetensors file.

The public training script saves `{'model': state_dict, 'optimizer': ..., ...}`; bare state
dicts and DataParallel `module.` prefixes are accepted too. Only tensors are unpickled
(`weights_only=True`). Names are mapped by `models.medvit.convert_reference_state_dict`, the
variant and head size are read from the shapes, and the result is loaded strictly into a model
built with `reference_code_compat=True` before it is written, so a file that converts loads.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from medai.errors import CheckpointError
from medai.models import create_model, save_weights
from medai.models.medvit import convert_reference_state_dict, reference_config_from_state_dict
from medai.models.registry import load_state_strict

log = logging.getLogger(__name__)


def read_reference_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """Return the model state dict inside a public MedViTV2 `.pth` file (tensors only)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(path, "file not found")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for corrupt or code-carrying pickles
        raise CheckpointError(path, f"not a tensors-only PyTorch checkpoint ({exc})") from exc
    for key in ("model", "state_dict", "model_state_dict"):
        if isinstance(payload, dict) and isinstance(payload.get(key), dict):
            payload = payload[key]
            break
    if not isinstance(payload, dict) or not all(isinstance(v, torch.Tensor) for v in payload.values()):
        raise CheckpointError(path, "no state dict of tensors found (expected the model's or {'model': ...})")
    return payload


def convert_medvit_checkpoint(source: str | Path, destination: str | Path) -> dict[str, Any]:
    """Convert a public MedViTV2 `.pth` to safetensors; return the variant and create_model kwargs."""
    source, destination = Path(source), Path(destination)
    state = convert_reference_state_dict(read_reference_checkpoint(source), source=str(source))
    facts = reference_config_from_state_dict(state)
    kwargs = {"num_classes": facts["num_classes"], "in_chans": facts["in_chans"], "reference_code_compat": True}
    model = create_model(facts["variant"], **kwargs)
    load_state_strict(model, state, source)
    save_weights(model, destination, {"source": source.name, "variant": facts["variant"], "create_model_kwargs": kwargs})
    log.info("converted %s -> %s (%s, %d classes)", source, destination, facts["variant"], facts["num_classes"])
    return {"variant": facts["variant"], "kwargs": kwargs, "path": str(destination)}
