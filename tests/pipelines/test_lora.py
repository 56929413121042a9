"""LoRA (peft) switched on from the config trains only the adapters and the saved head."""

import yaml

from medai.pipelines.finetune import Trainer
from medai.pipelines.train_config import load_train_config


def test_lora_from_config_trains_only_adapters(tmp_path, breastmnist_path):
    cfg = {"task": "classification", "model": {"name": "resnet10t", "lora": {
        "enabled": True, "r": 4, "alpha": 8, "target_modules": ["conv1", "conv2"], "modules_to_save": ["fc"]}},
        "data": {"path": str(breastmnist_path), "batch_size": 16},
        "trainer": {"epochs": 1, "limit_train_batches": 1, "evaluate_test": False},
        "output_dir": str(tmp_path)}
    path = tmp_path / "lora.yaml"
    path.write_text(yaml.safe_dump(cfg))
    trainer = Trainer(load_train_config(path))
    trainer.fit()
    trainable = [n for n, p in trainer.model_raw.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n or "modules_to_save" in n for n in trainable)
    frozen = sum(p.numel() for p in trainer.model_raw.parameters() if not p.requires_grad)
    assert frozen > 10 * sum(p.numel() for p in trainer.model_raw.parameters() if p.requires_grad)
    assert (trainer.run_dir / "checkpoints" / "best" / "model.safetensors").is_file()


def test_unfreeze_trains_a_module_in_place_and_lr_scale_groups_it():
    import pytest
    import torch

    from medai.config import ConfigError
    from medai.models import create_model
    from medai.pipelines.finetune import build_optimizer
    from medai.pipelines.lora import apply_lora
    from medai.pipelines.train_config import LoraConfig, OptimConfig

    model = apply_lora(create_model("resnet10t", num_classes=2), LoraConfig(
        enabled=True, r=4, alpha=8, target_modules=["layer1.0.conv1"], modules_to_save=["fc"], unfreeze=["layer4"]))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    layer4 = {n for n in trainable if ".layer4." in n}
    assert layer4 and not any("modules_to_save" in n or "lora_" in n for n in layer4)  # in place, no copy
    assert not any(".layer3." in n and "lora_" not in n for n in trainable)

    optimizer = build_optimizer(model, OptimConfig(lr=1e-3, weight_decay=0.1, lr_scale={"layer4": 0.25}))
    by_id = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    for name, p in model.named_parameters():
        if p.requires_grad:
            group = by_id[id(p)]
            assert group["lr"] == pytest.approx(2.5e-4 if ".layer4." in name else 1e-3)
            assert group["weight_decay"] == (0.0 if p.ndim <= 1 or name.endswith(".bias") else 0.1)
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(trainable)
    assert optimizer.param_groups[0]["lr"] == 1e-3 and optimizer.param_groups[0]["weight_decay"] == 0.1
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5)
    scheduler.step()
    assert sorted({g["lr"] for g in optimizer.param_groups}) == pytest.approx([1.25e-4, 5e-4])

    with pytest.raises(ConfigError, match="layer9"):
        build_optimizer(model, OptimConfig(lr_scale={"layer9": 0.1}))
    with pytest.raises(ConfigError, match="no module"):
        apply_lora(create_model("resnet10t", num_classes=2), LoraConfig(enabled=True, target_modules=["conv1"],
                                                                          unfreeze=["vision_tower"]))
