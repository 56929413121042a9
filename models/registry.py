"""Model registry and factory: `create_model(name, pretrained=...)` is the only entry point.

One model contract: each family has a config dataclass whose defaults reproduce its paper; a
variant is a function `fn(config) -> nn.Module` registered with the values it sets over those
defaults. `create_model(name, **overrides)` fills the config through `build_config` (unknown
keys and wrong types are ConfigErrors naming the key and the valid ones). An entry also records
the input kind it takes, overrides that make a tiny fast model (for tests), and whether it is a
feature extractor in timm's sense, which slide extraction and the VLM check through
`create_feature_extractor`.

Weights load from local safetensors files only (never pickle). A checkpoint whose keys or
shapes do not match the model is refused with a CheckpointError that names them.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Protocol, TypeVar

import torch
from torch import nn

from medai.config import from_dict
from medai.errors import CheckpointError, ModelContractError
from medai.registry import Registry
from medai.utils import shipped_file

log = logging.getLogger(__name__)

C = TypeVar("C")
# What a model's forward takes; tests build an example input of each kind.
InputKind = Literal["image_2d", "volume_3d", "feature_bag", "token_sequence", "image_text"]
# timm's feature-extractor contract: features without the head, their width, and a way to drop the head.
FEATURE_CONTRACT = ("forward_features", "num_features", "reset_classifier")


class WeightsSource(Protocol):
    """Where a pretrained tag's weights come from: `medai.models.pretrained` (packaged, shipped, shared data)."""

    def resolve(self) -> Path:
        """Return the local weights file, converting it on first use if needed."""
        ...


@dataclass
class ModelEntry:
    """A registered model variant: its builder, card and named pretrained sources."""

    name: str
    builder: Callable[..., nn.Module]
    family: str
    card: str | None = None
    # tag -> source of its weights (resolved and converted on demand)
    pretrained: dict[str, WeightsSource] = field(default_factory=dict)
    # adapts a pretrained state dict to overrides (new head size, input channels) before loading
    adapt: Callable[[dict[str, torch.Tensor], nn.Module], dict[str, torch.Tensor]] | None = None
    # the family's config dataclass and the values this variant sets over its defaults
    config: type | None = None
    defaults: dict[str, Any] = field(default_factory=dict)
    input_kind: InputKind = "image_2d"
    tiny: dict[str, Any] = field(default_factory=dict)  # overrides giving a tiny, fast model (tests)
    feature_extractor: bool = False  # keeps FEATURE_CONTRACT

    def build_config(self, **overrides: Any) -> Any:
        """This variant's config with `overrides` applied strictly (see `build_config`)."""
        return build_config(self.config, self.defaults, overrides, self.name)

    @property
    def card_path(self) -> Path | None:
        """Absolute path of the model card in the installed package, if one is declared."""
        return shipped_file(self.card) if self.card else None


MODELS: Registry[ModelEntry] = Registry("model")


def build_config(config_cls: type[C], defaults: dict[str, Any], overrides: dict[str, Any], name: str) -> C:
    """Fill `config_cls`: its own defaults, then `defaults`, then `overrides`; ConfigError on an unknown key or type."""
    return from_dict(config_cls, {**defaults, **overrides}, source=f"create_model('{name}')")


def register_model(
    family: str,
    config: type,
    input_kind: InputKind,
    tiny: dict[str, Any],
    defaults: dict[str, Any] | None = None,
    feature_extractor: bool = False,
    card: str | None = None,
    pretrained: dict[str, WeightsSource] | None = None,
    adapt: Callable[[dict[str, torch.Tensor], nn.Module], dict[str, torch.Tensor]] | None = None,
) -> Callable[[Callable[[Any], nn.Module]], Callable[[Any], nn.Module]]:
    """Decorator registering a variant `fn(config) -> nn.Module` under its name.

    `create_model(name, **overrides)` calls `fn` with `config` filled by `build_config` from
    `defaults` and the overrides; `tiny` are overrides that make a tiny model of `input_kind`.
    """

    def wrap(fn: Callable[[Any], nn.Module]) -> Callable[[Any], nn.Module]:
        name, variant = fn.__name__, dict(defaults or {})

        def build(**overrides: Any) -> nn.Module:
            return fn(build_config(config, variant, overrides, name))

        entry = ModelEntry(
            name, build, family, card, dict(pretrained or {}), adapt,
            config, variant, input_kind, dict(tiny), feature_extractor,
        )
        MODELS.add(name, entry)
        return fn

    return wrap


def _import_families() -> None:
    # Importing a family module registers its variants; every module in models/ is a family. The
    # folder is this file's: importing medai.models for its __path__ would be an import circle.
    import importlib
    import pkgutil

    for info in pkgutil.iter_modules([str(Path(__file__).parent)]):
        if not info.name.startswith("_") and info.name not in ("registry", "pretrained", "layers"):
            importlib.import_module(f"medai.models.{info.name}")


def list_models(pattern: str = "*") -> list[str]:
    """Return registered model names matching a shell-style pattern."""
    _import_families()
    return MODELS.names(pattern)


def model_entry(name: str) -> ModelEntry:
    """Return the registry entry for `name`."""
    _import_families()
    return MODELS.get(name)


def create_model(name: str, pretrained: str | Path | None = None, **overrides: Any) -> nn.Module:
    """Build a registered model; `pretrained` is a tag (e.g. 'imagenet') or a safetensors path."""
    entry = model_entry(name)
    model = entry.builder(**overrides)
    if pretrained is not None:
        is_tag = isinstance(pretrained, str) and pretrained in entry.pretrained
        if is_tag:
            path = entry.pretrained[pretrained].resolve()
        else:
            path = Path(pretrained)
            if not path.exists():
                tags = ", ".join(entry.pretrained) or "none"
                raise CheckpointError(path, f"no such file, and not a pretrained tag of '{name}' (tags: {tags})")
        state = read_state_dict(path)
        if is_tag and entry.adapt is not None:
            # Only published weights are fitted to new heads/channels; a user's file loads strictly.
            state = entry.adapt(state, model)
        load_state_strict(model, state, path)
    return model


def check_feature_extractor(model: nn.Module, name: str) -> nn.Module:
    """Return `model` if it keeps timm's feature-extractor contract (FEATURE_CONTRACT); else ModelContractError."""
    missing = [attr for attr in FEATURE_CONTRACT if not hasattr(model, attr)]
    if missing:
        raise ModelContractError(
            name,
            f"not a feature extractor: lacks {', '.join(missing)} "
            f"(timm's contract: {', '.join(FEATURE_CONTRACT)}); "
            f"registered feature extractors: {', '.join(list_feature_extractors())}",
        )
    return model


def list_feature_extractors() -> list[str]:
    """Registered model names whose entry declares timm's feature-extractor contract."""
    return [name for name in list_models() if MODELS.get(name).feature_extractor]


def create_feature_extractor(name: str, pretrained: str | Path | None = None, **overrides: Any) -> nn.Module:
    """Build a registered feature extractor (classifier still attached); ModelContractError for any other model."""
    if not model_entry(name).feature_extractor:
        raise ModelContractError(
            name,
            f"not a feature extractor; registered feature extractors: {', '.join(list_feature_extractors())}",
        )
    return check_feature_extractor(create_model(name, pretrained=pretrained, **overrides), name)


def save_weights(model: nn.Module, path: str | Path, metadata: dict[str, Any] | None = None) -> Path:
    """Save a model's state dict as safetensors (shared tensors de-duplicated); return the path."""
    from safetensors.torch import save_model

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {k: v if isinstance(v, str) else json.dumps(v) for k, v in (metadata or {}).items()}
    save_model(model, str(path), metadata=meta)
    return path


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read tensors from a safetensors file; refuse other formats with a clear error."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(path, "file not found")
    if path.suffix != ".safetensors":
        raise CheckpointError(
            path, "only .safetensors checkpoints load (pickled .pt/.pth files can run code); convert it first"
        )
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(path, f"not a readable safetensors file ({exc})") from exc


def load_weights(model: nn.Module, path: str | Path) -> nn.Module:
    """Load a safetensors checkpoint strictly; raise CheckpointError naming any bad keys."""
    return load_state_strict(model, read_state_dict(path), path)


def load_state_strict(model: nn.Module, state: dict[str, torch.Tensor], path: str | Path) -> nn.Module:
    """Load `state` into `model` only if keys and shapes match exactly; else CheckpointError."""
    expected = model.state_dict()
    # Tied weights appear once in the file (safetensors de-duplicates them).
    missing = [k for k in expected if k not in state and not _is_tied_alias(model, k, state)]
    unexpected = [k for k in state if k not in expected]
    mismatched = [
        f"{k} (file {tuple(state[k].shape)} vs model {tuple(expected[k].shape)})"
        for k in state
        if k in expected and state[k].shape != expected[k].shape
    ]
    if missing or unexpected or mismatched:
        raise CheckpointError(path, "checkpoint does not match the model", missing, unexpected, mismatched)
    model.load_state_dict(state, strict=False)
    for module in model.modules():
        if hasattr(module, "weights_source"):  # models that report their provenance (the VLM head)
            module.weights_source = str(path)
    return model


def _is_tied_alias(model: nn.Module, key: str, state: dict[str, torch.Tensor]) -> bool:
    target = model.state_dict(keep_vars=True)[key]
    return any(
        other in state and v is target for other, v in model.state_dict(keep_vars=True).items() if other != key
    )
