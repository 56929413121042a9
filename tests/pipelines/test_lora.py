"""LoRA (peft) switched on from the config trains only the adapters and the saved head."""

import yaml

from pipelines.finetune import Trainer, load_train_config


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
