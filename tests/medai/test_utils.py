"""medai.utils: the one atomic-write helper, shipped files, the checkout root."""

import pytest

from medai.utils import atomic_write, previous_copy, repo_root, shipped_file


class Planned(Exception):
    pass


def test_atomic_write_replaces_the_file_only_on_success(tmp_path):
    target = tmp_path / "out" / "report.json"
    with atomic_write(target) as tmp:
        assert tmp.parent == target.parent and tmp.name.startswith(".report.json.") and tmp.suffix == ".tmp"
        tmp.write_text("first")
        assert not target.exists(), "the target appears only when the block succeeds"
    assert target.read_text() == "first"
    with atomic_write(target) as tmp:
        tmp.write_text("second")
    assert target.read_text() == "second"
    assert sorted(p.name for p in target.parent.iterdir()) == ["report.json"]


def test_a_failure_leaves_no_temporary_and_no_partial_target(tmp_path):
    target = tmp_path / "weights.safetensors"
    with pytest.raises(Planned), atomic_write(target) as tmp:
        tmp.write_text("half a fi")
        raise Planned
    assert list(tmp_path.iterdir()) == []

    target.write_text("complete")
    with pytest.raises(Planned), atomic_write(target) as tmp:
        tmp.write_text("half a fi")
        raise Planned
    assert target.read_text() == "complete", "a failed rewrite keeps the previous file"
    assert [p.name for p in tmp_path.iterdir()] == ["weights.safetensors"]


def test_a_folder_replaces_the_previous_folder_and_a_failed_one_is_removed(tmp_path):
    target = tmp_path / "checkpoint"
    for round_ in ("one", "two"):
        with atomic_write(target) as tmp:
            tmp.mkdir()
            (tmp / "model.safetensors").write_text(round_)
    assert [p.name for p in target.iterdir()] == ["model.safetensors"]
    assert (target / "model.safetensors").read_text() == "two"
    with pytest.raises(Planned), atomic_write(target) as tmp:
        tmp.mkdir()
        (tmp / "model.safetensors").write_text("half")
        raise Planned
    assert (target / "model.safetensors").read_text() == "two"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint"]
    assert not previous_copy(target).exists()


def test_keep_existing_keeps_what_another_process_finished_first(tmp_path):
    target = tmp_path / "cache.bin"
    with atomic_write(target, keep_existing=True) as tmp:
        tmp.write_text("ours")
        target.write_text("theirs")  # another process renamed its copy in meanwhile
    assert target.read_text() == "theirs"
    assert [p.name for p in tmp_path.iterdir()] == ["cache.bin"]


def test_shipped_files_are_found_through_the_package():
    assert shipped_file("configs/breastmnist_resnet18.yaml").read_text().startswith(("#", "task"))
    assert shipped_file("checkpoints/breastmnist/medvit_tiny_f16.safetensors").stat().st_size > 0
    assert shipped_file("data_cards/checkpoints/medvit.md").is_file()
    with pytest.raises(FileNotFoundError, match="no_such.yaml"):
        shipped_file("configs/no_such.yaml")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        shipped_file("nowhere/x.yaml")


def test_repo_root_is_this_checkout():
    root = repo_root()
    assert root is not None and (root / "pyproject.toml").is_file() and (root / "medai" / "utils.py").is_file()
