"""The shared fine-tuning engine on real BreastMNIST with a small CNN (few steps)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from safetensors.torch import load_file

from medai.config import ConfigError
from medai.pipelines.finetune import finetune
from medai.pipelines.train_config import load_train_config

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def write_config(tmp_path: Path, data_path: Path, **trainer) -> Path:
    cfg = {
        "task": "classification",
        "model": {"name": "resnet10t"},
        "data": {"path": str(data_path), "batch_size": 32},
        "optim": {"lr": 0.002},
        "trainer": {"epochs": 2, "limit_train_batches": 3, "n_boot": 50, **trainer},
        "seed": 7,
        "output_dir": str(tmp_path / "runs"),
    }
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def run_cli(*args: str, check: bool = True, timeout: int = 600) -> subprocess.CompletedProcess:
    out = subprocess.run([sys.executable, "-m", "medai.cli", *args], capture_output=True, text=True, env=ENV,
                         timeout=timeout)
    if check and out.returncode != 0:
        raise AssertionError(f"exit {out.returncode}\n{out.stdout}\n{out.stderr}")
    return out


def test_run_writes_traceable_outputs(tmp_path, breastmnist_path):
    cfg = load_train_config(write_config(tmp_path, breastmnist_path, ema_decay=0.9))
    result = finetune(cfg)
    run = result.run_dir
    meta = json.loads((run / "run.json").read_text())
    assert meta["seed"] == 7 and "torch" in meta["versions"] and "git_commit" in meta
    assert yaml.safe_load((run / "config.yaml").read_text())["trainer"]["ema_decay"] == 0.9
    history = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in history] == [1, 2] and all("val_auroc" in h for h in history)
    assert (run / "metrics.csv").is_file() and (run / "curves.png").stat().st_size > 1000
    for name in ("best/model.safetensors", "last/model.safetensors", "last/optimizer.safetensors",
                 "last/ema.safetensors", "last/rng_rank0.safetensors"):
        assert (run / "checkpoints" / name).is_file(), name
    report = json.loads((run / "eval_test.json").read_text())
    assert report["n_items"] == 156
    auroc = report["metrics"]["auroc"]
    assert auroc["low"] <= auroc["value"] <= auroc["high"]
    for plot in ("roc_test.png", "confusion_test.png", "reliability_test.png"):
        assert (run / plot).is_file()
    # running the same command again finds the finished run instead of retraining
    again = finetune(cfg)
    assert again.best_epoch == result.best_epoch and len(again.history) == 2
    assert again.test_report["metrics"] == report["metrics"]  # the report the first evaluation saved


def test_trainer_trains_and_leaves_evaluation_to_the_caller(tmp_path, breastmnist_path):
    from medai.pipelines.finetune import Trainer

    cfg = load_train_config(write_config(tmp_path, breastmnist_path, epochs=1, limit_train_batches=1))
    trainer = Trainer(cfg)
    result = trainer.fit()
    assert trainer.trained and (result.run_dir / "checkpoints" / "best" / "model.safetensors").is_file()
    assert result.test_report is None and not list(result.run_dir.glob("eval_*"))


def test_resume_refuses_a_changed_config_but_not_a_field_added_since(tmp_path, breastmnist_path):
    from medai.pipelines.finetune import TrainingError

    path = write_config(tmp_path, breastmnist_path, epochs=1, limit_train_batches=1, evaluate_test=False)
    first = finetune(load_train_config(path))
    saved = first.run_dir / "config.yaml"
    older = yaml.safe_load(saved.read_text())
    del older["optim"]["lr_scale"], older["model"]["lora"]["unfreeze"]  # as a run saved by an older medai
    saved.write_text(yaml.safe_dump(older))
    assert finetune(load_train_config(path)).best_epoch == first.best_epoch
    with pytest.raises(TrainingError, match="config changed at optim.lr$"):
        finetune(load_train_config(path, ["optim.lr=0.01"]))


def test_kill_mid_epoch_then_resume_matches_uninterrupted(tmp_path, breastmnist_path):
    ref_dir, cut_dir = tmp_path / "ref", tmp_path / "cut"
    ref_dir.mkdir(), cut_dir.mkdir()
    settings = dict(epochs=2, limit_train_batches=4, save_every_steps=1, evaluate_test=False)
    ref_cfg = write_config(ref_dir, breastmnist_path, **settings)
    cut_cfg = write_config(cut_dir, breastmnist_path, **settings)
    run_cli("finetune", str(ref_cfg))

    proc = subprocess.Popen([sys.executable, "-m", "medai.cli", "finetune", str(cut_cfg)], env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state_file = cut_dir / "runs" / "classification-resnet10t-seed7" / "checkpoints" / "last" / "trainer_state.json"
    killed_at = None
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        try:
            state = json.loads(state_file.read_text())
        except (OSError, json.JSONDecodeError):
            state = None
        # mid-epoch: the second epoch has started but not finished
        if state and state["epoch"] == 1 and state["batch_in_epoch"] >= 1:
            proc.send_signal(signal.SIGKILL)
            killed_at = state
            break
        time.sleep(0.05)
    proc.wait(timeout=60)
    assert killed_at is not None, "the run finished before it could be killed mid-epoch"
    assert proc.returncode == -signal.SIGKILL

    out = run_cli("finetune", str(cut_cfg), "--resume")
    ref_run = ref_dir / "runs" / "classification-resnet10t-seed7"
    cut_run = cut_dir / "runs" / "classification-resnet10t-seed7"
    assert json.loads((cut_run / "run.json").read_text())["resumed"] is True
    assert json.loads((cut_run / "run.json").read_text())["earlier_starts"][0]["resumed"] is False
    a = load_file(ref_run / "checkpoints" / "last" / "model.safetensors")
    b = load_file(cut_run / "checkpoints" / "last" / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_allclose(a[key].float().numpy(), b[key].float().numpy(), rtol=1e-5, atol=1e-6,
                                   err_msg=key)
    ref_hist = [json.loads(l) for l in (ref_run / "metrics.jsonl").read_text().splitlines()]
    cut_hist = [json.loads(l) for l in (cut_run / "metrics.jsonl").read_text().splitlines()]
    assert ref_hist[-1]["val_loss"] == pytest.approx(cut_hist[-1]["val_loss"], rel=1e-5)


def test_two_process_replicas_stay_identical(tmp_path, breastmnist_path):
    cfg = write_config(tmp_path, breastmnist_path, epochs=1, limit_train_batches=2, evaluate_test=False)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(port), "-m", "medai.cli", "finetune", str(cfg)]
    out = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    replicas = json.loads((tmp_path / "runs" / "classification-resnet10t-seed7" / "replicas.json").read_text())
    assert replicas["world_size"] == 2 and replicas["identical"]
    assert len(set(replicas["digests"])) == 1


def test_malformed_config_names_key_and_file(tmp_path, breastmnist_path):
    path = write_config(tmp_path, breastmnist_path)
    data = yaml.safe_load(path.read_text())
    data["trainer"]["epoch"] = 3
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError) as err:
        load_train_config(path)
    assert "trainer.epoch" in str(err.value) and str(path) in str(err.value)
    out = run_cli("finetune", str(path), check=False)
    assert out.returncode != 0 and "trainer.epoch" in (out.stdout + out.stderr)


@pytest.mark.parametrize("override", ["trainer.epochs=0", "trainer.epochs=-2", "trainer.grad_accum=0",
                                      "trainer.time_budget_minutes=0"])
def test_a_run_that_could_not_take_a_step_is_refused(tmp_path, breastmnist_path, override):
    path = write_config(tmp_path, breastmnist_path)
    with pytest.raises(ConfigError, match=override.split("=")[0].replace(".", r"\.")):
        load_train_config(path, [override])
    out = run_cli("finetune", str(path), "-o", override, check=False)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    assert not (tmp_path / "runs").exists()


def test_bad_task_option_and_missing_data_path_are_named(tmp_path, breastmnist_path):
    path = write_config(tmp_path, breastmnist_path)
    with pytest.raises(ConfigError, match="data.options.augmnet"):
        load_train_config(path, ["data.options.augmnet=false"])
    missing = tmp_path / "nowhere" / "x.npz"
    with pytest.raises(ConfigError) as err:
        load_train_config(path, [f"data.path={missing}"])
    assert str(missing) in str(err.value) and "data.path" in str(err.value)


def test_other_medmnist_file_by_override(tmp_path, shared_data):
    other = shared_data / "medmnist" / "variants" / "pneumoniamnist_balanced_3166.npz"
    path = write_config(tmp_path, shared_data / "medmnist" / "breastmnist.npz", epochs=1, limit_train_batches=1,
                        evaluate_test=False)
    cfg = load_train_config(path, [f"data.path={other}", "run_name=pneumonia"])
    result = finetune(cfg)
    info = json.loads((result.run_dir / "run.json").read_text())["data_info"]
    assert info["task_type"] == "binary" and info["channels"] == 1
    assert sum(info["class_counts_train"]) == 2428


def test_folder_of_images_with_a_labels_csv(tmp_path, breastmnist_path):
    """Real BreastMNIST images written as PNG files + a CSV with label names and splits train through the engine."""
    from PIL import Image

    data = np.load(breastmnist_path)
    names = {0: "malignant", 1: "benign_or_normal"}  # BreastMNIST: 0 malignant, 1 normal + benign
    rows = ["file,diagnosis,fold"]
    for split, count in (("train", 40), ("val", 12), ("test", 12)):
        images, labels = data[f"{split}_images"][:count], data[f"{split}_labels"][:count, 0]
        for i, (image, label) in enumerate(zip(images, labels)):
            name = f"png/{split}_{i:03d}.png"
            (tmp_path / "png").mkdir(exist_ok=True)
            Image.fromarray(image).save(tmp_path / name)
            rows.append(f"{name},{names[int(label)]},{split}")
    csv_path = tmp_path / "labels.csv"
    csv_path.write_text("\n".join(rows) + "\n")
    path = write_config(tmp_path, csv_path, epochs=1, limit_train_batches=1, n_boot=20)
    cfg = load_train_config(path, ["data.options.image_column=file", "data.options.label_column=diagnosis",
                                   "data.options.split_column=fold", "data.options.image_size=32"])
    result = finetune(cfg)
    info = json.loads((result.run_dir / "run.json").read_text())["data_info"]
    assert info["class_names"] == ["benign_or_normal", "malignant"] and info["task_type"] == "binary"
    expected = np.bincount([int(names[int(l)] == "malignant") for l in data["train_labels"][:40, 0]], minlength=2)
    assert info["class_counts_train"] == expected.tolist() and info["channels"] == 3
    assert "auroc" in result.test_report["metrics"]


def test_seeds_report_mean_and_sd(tmp_path, breastmnist_path):
    from medai.pipelines.finetune import finetune_seeds

    cfg = load_train_config(write_config(tmp_path, breastmnist_path, epochs=1, limit_train_batches=1, n_boot=20))
    summary = finetune_seeds(cfg, 2)
    assert summary["seeds"] == [7, 8]
    auroc = summary["metrics"]["auroc"]
    assert len(auroc["per_seed"]) == 2 and auroc["sd"] >= 0
    assert auroc["mean"] == pytest.approx(np.mean(auroc["per_seed"]))
    assert (tmp_path / "runs" / "classification-resnet10t" / "seeds_summary.json").is_file()


def test_time_budget_fixes_the_step_count_and_validation_cadence(tmp_path, breastmnist_path):
    # A budget of 3 s against 50 epochs: after 3 calibration steps (+2 left out) the run is cut to
    # the steps that fit, the LR schedule ends there, and validation runs only after the last step.
    # (1 s was less than the calibration itself on a loaded machine, so the cut fell on step 5.)
    cfg = load_train_config(write_config(tmp_path, breastmnist_path, epochs=50, limit_train_batches=None,
                                         time_budget_minutes=0.05, budget_calibration_steps=3,
                                         eval_every_epochs=10, evaluate_split="val"),
                            ["schedule.name=linear"])
    result = finetune(cfg)
    state = json.loads((result.run_dir / "checkpoints" / "last" / "trainer_state.json").read_text())
    steps = state["budget_steps"]
    assert 5 <= steps < 50 * 18  # 18 batches per BreastMNIST epoch at batch 32: the budget ended the run
    assert state["global_step"] == steps
    assert ["val_auroc" in h for h in result.history] == [False] * (len(result.history) - 1) + [True]
    assert result.history[-1]["lr"] == pytest.approx(0.0, abs=1e-12)  # linear decay reached its end at the cut
    assert result.history[-1]["train_minutes"] > 0
    assert result.test_report["split"] == "val" and (result.run_dir / "eval_val.json").is_file()


def test_validation_every_n_epochs_and_after_the_last(tmp_path, breastmnist_path):
    cfg = load_train_config(write_config(tmp_path, breastmnist_path, epochs=3, limit_train_batches=1,
                                         eval_every_epochs=2, evaluate_test=False))
    history = finetune(cfg).history
    assert ["val_auroc" in h for h in history] == [False, True, True]
