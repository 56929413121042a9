"""Convert the ACMIL authors' checkpoints (torch pickles) to medai safetensors, without running their code.

The authors' `checkpoint-best.pth` holds {model: state dict, optimizer, epoch, config: utils.utils.Struct}.
It is read through `medai.io.torch_pickle` (allow-listed tensors and containers; the Struct becomes
an inert record), every model tensor is mapped onto `models.mil.AttentionMIL` names (unmatched
names are an error), loaded strictly into a model whose shape is inferred from the tensors, and
written as safetensors with the training config as metadata.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from medai.errors import CheckpointError
from medai.io.torch_pickle import read_torch_checkpoint

log = logging.getLogger(__name__)

# The authors' training-config class, loaded as an inert record (attributes only).
ACMIL_RECORD_CLASSES = ("utils.utils.Struct",)
# Training-config fields kept as metadata in the converted file.
_KEPT_CONFIG = ("D_feat", "D_inner", "n_token", "n_masked_patch", "mask_drop", "n_class", "arch", "pretrain", "dataset", "seed", "lr", "wd", "train_epoch")


def read_acmil_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Return (the authors' model state dict, {epoch, config fields}) from a checkpoint, safely."""
    obj = read_torch_checkpoint(path, records=ACMIL_RECORD_CLASSES)
    if not isinstance(obj, dict) or "model" not in obj:
        raise CheckpointError(path, "expected a dict with a 'model' state dict (the ACMIL authors' save_model layout)")
    state = obj["model"]
    if not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(path, "the 'model' entry holds non-tensor values")
    config = obj.get("config")
    fields = config.as_dict() if hasattr(config, "as_dict") else {}
    info = {k: fields[k] for k in _KEPT_CONFIG if k in fields}
    info["epoch"] = obj.get("epoch")
    return dict(state), info


def convert_acmil_checkpoint(src: str | Path, dest: str | Path) -> Path:
    """Convert an ACMIL authors' checkpoint to a medai safetensors file loadable by AttentionMIL; return dest."""
    from medai.models.mil import AttentionMIL, acmil_config_from_state, convert_acmil_state_dict
    from medai.models.registry import load_state_strict, save_weights

    author_state, info = read_acmil_checkpoint(src)
    try:
        state = convert_acmil_state_dict(author_state)
    except KeyError as exc:
        raise CheckpointError(src, str(exc.args[0])) from exc
    config = acmil_config_from_state(state)
    model = AttentionMIL(config)
    load_state_strict(model, state, src)  # names every missing / unexpected / mis-shaped tensor
    meta = {"source": str(src), "format": "medai.models.mil.AttentionMIL", "authors_config": json.dumps(info)}
    log.info("converted %s (%d tensors, K=%d) -> %s", src, len(state), config.num_branches, dest)
    return save_weights(model, dest, metadata=meta)


def resolve_acmil_bracs(tag: str) -> Path:
    """Return the converted BRACS checkpoint '512d' or '384d' from the shared data, converting it once into the cache."""
    from medai.io.data import dataset_path
    from medai.utils import cache_dir

    if tag not in ("512d", "384d"):
        raise CheckpointError(f"acmil_bracs_{tag}", "unknown ACMIL BRACS checkpoint (512d, 384d)")
    dest = cache_dir() / "weights" / f"acmil_bracs_{tag}.safetensors"
    if dest.exists():
        return dest
    src = dataset_path("acmil_bracs_checkpoints") / f"acmil_bracs_{tag}" / "checkpoint-best.pth"
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".acmil_bracs_{tag}.", suffix=".safetensors", dir=dest.parent)
    os.close(fd)
    try:
        convert_acmil_checkpoint(src, tmp)
        os.replace(tmp, dest)  # atomic: concurrent readers never see half a file
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return dest
