"""`medai mil ...` end to end on real data (thin wrappers; the pipelines have their own tests)."""

import json
import re

import numpy as np
from typer.testing import CliRunner

from medai.cli import app

METRICS = ("accuracy", "auroc", "balanced_accuracy", "f1")
FAST = ["--folds", "2", "--epochs", "1"]  # the command, not the science: 2 folds of 1 epoch


def test_mil_benchmark_prints_a_table_for_every_model(tmp_path, mil_classic_path):
    # the smallest classic set: MUSK1, 92 bags
    musk1 = str(mil_classic_path / "musk1" / "musk1.mat")
    args = ["mil", "benchmark", musk1, "--models", "abmil,acmil", *FAST, "--n-boot", "50"]
    result = CliRunner().invoke(app, [*args, "--out", str(tmp_path)], env={"COLUMNS": "80"})
    assert result.exit_code == 0, result.output
    assert "### musk1.mat (92 bags; 2-fold CV, seeds [0], 1 epochs)" in result.output
    assert "| model | seed | " + " | ".join(METRICS) + " |" in result.output
    lines = result.output.splitlines()
    rows = {line.split("|")[1].strip(): line for line in lines if line.startswith("| a")}
    assert sorted(rows) == ["abmil", "acmil"]  # one row per model, not wrapped at 80 columns
    saved = json.loads((tmp_path / "results.json").read_text())
    for model, row in rows.items():
        cells = [c.strip() for c in row.strip().strip("|").split("|")]
        assert cells[:2] == [model, "0"] and len(cells) == 2 + len(METRICS)
        for name, cell in zip(METRICS, cells[2:]):
            match = re.fullmatch(r"(\S+) \[(\S+), (\S+)\]", cell)
            value, low, high = map(float, match.groups())
            assert all(0.0 <= v <= 1.0 for v in (value, low, high)) and low <= high, cell
            # the printed table is results.json's, to its 3 decimals
            assert abs(saved["models"][model]["per_seed"]["0"][name]["value"] - value) <= 5e-4
    assert saved["n_bags"] == 92 and saved["settings"]["folds"] == 2
    for model in ("abmil", "acmil"):  # every bag tested once over the folds
        runs = tmp_path / "runs" / model / "seed0"
        tested = [np.load(runs / f"fold{f}" / "predictions_test.npz")["target"] for f in range(2)]
        assert sum(len(t) for t in tested) == 92


def test_mil_benchmark_runs_a_users_bag_csv(tmp_path, mil_classic_path):
    from medai.io.mil_bags import read_mil_toolbox_mat

    # a user's own set as a CSV (bag_id, label, features...): MUSK1's real bags written out
    bags = read_mil_toolbox_mat(mil_classic_path / "musk1" / "musk1.mat")
    dim = bags[0].features.shape[1]
    lines = ["bag_id,label," + ",".join(f"f{i}" for i in range(dim))]
    for bag in bags:
        for row in bag.features:
            lines.append(f"{bag.bag_id},{bag.label}," + ",".join(f"{v:.6g}" for v in row))
    csv = tmp_path / "my_bags.csv"
    csv.write_text("\n".join(lines) + "\n")
    args = ["mil", "benchmark", str(csv), "--models", "abmil", *FAST, "--n-boot", "20"]
    result = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert "### my_bags.csv (92 bags; 2-fold CV" in result.output
    assert "| abmil | 0 |" in result.output and "| acmil |" not in result.output


def test_mil_benchmark_reuses_only_folds_trained_as_asked(tmp_path, mil_classic_path):
    """Settings belong to results: a rerun with other epochs names the difference instead of reporting old folds."""
    musk1 = str(mil_classic_path / "musk1" / "musk1.mat")
    args = ["mil", "benchmark", musk1, "--models", "abmil", "--n-boot", "20", "--out", str(tmp_path)]
    first = CliRunner().invoke(app, [*args, *FAST])
    assert first.exit_code == 0, first.output
    mtime = (tmp_path / "runs" / "abmil" / "seed0" / "fold0" / "predictions_test.npz").stat().st_mtime_ns
    again = CliRunner().invoke(app, [*args, *FAST])  # same settings: folds reused, not retrained
    assert again.exit_code == 0
    assert (tmp_path / "runs" / "abmil" / "seed0" / "fold0" / "predictions_test.npz").stat().st_mtime_ns == mtime
    other = CliRunner().invoke(app, [*args, "--folds", "2", "--epochs", "2"], env={"COLUMNS": "300"})
    assert other.exit_code == 2 and "trainer.epochs" in other.output and "other settings" in other.output, other.output
