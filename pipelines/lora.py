"""LoRA adapters (peft) on a model, as `model.lora` in a training config asks, and module-name matching.

The engine wraps a model before training and evaluation rewraps it before loading a run's weights,
so both build the same parameter names.
"""

from __future__ import annotations

from torch import nn

from medai.config import ConfigError
from medai.pipelines.train_config import LoraConfig


def in_module(param_name: str, module: str) -> bool:
    """True if `param_name` lies in a module named `module` (a name or a dotted path at any depth)."""
    return f".{module}." in f".{param_name}"


def apply_lora(model: nn.Module, cfg: LoraConfig) -> nn.Module:
    """Wrap `model` with peft LoRA adapters on the configured modules."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    if not cfg.target_modules:
        raise ConfigError("LoRA is enabled but model.lora.target_modules is empty", key="model.lora.target_modules")
    peft_cfg = PeftLoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                              target_modules=cfg.target_modules, modules_to_save=cfg.modules_to_save or None)
    wrapped = get_peft_model(model, peft_cfg)
    for module in cfg.unfreeze:
        params = [p for name, p in wrapped.named_parameters() if in_module(name, module)]
        if not params:
            raise ConfigError(f"model.lora.unfreeze names no module of {type(model).__name__}: {module}",
                              key="model.lora.unfreeze")
        for p in params:
            p.requires_grad_(True)
    return wrapped
