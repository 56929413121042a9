"""Conventions every `medai` command keeps: the README lists exactly the app's commands; one exit-code rule
(0 done, 1 done with failed items each named, 2 bad input or usage); one override syntax (-o key.sub=value)."""

from __future__ import annotations

import hashlib
import re
import shutil
from pathlib import Path

import pytest
import typer.main
from typer.core import TyperGroup
from typer.testing import CliRunner

from medai.cli import EXIT_CODES, app

README = Path(__file__).resolve().parents[2] / "README.md"
MISSING = "{missing}"  # replaced by a path that does not exist
OUT = "{out}"  # replaced by a fresh output path

# Every command with an input path, run with that path missing: exit 2, naming the path.
MISSING_INPUT = {
    "finetune": [MISSING],
    "evaluate": [MISSING],
    "data verify": ["--root", MISSING],
    "models convert": ["medvit", MISSING, OUT],
    "ehr ingest": [MISSING, "--out", OUT],
    "ehr summary": [MISSING],
    "ehr experiment": [MISSING],
    "dicom scan": [MISSING],
    "dicom convert": [MISSING, OUT],
    "dicom info": [MISSING],
    "dicom deidentify": [MISSING, OUT, "--secret", "a-key-of-16-chars+"],
    "pacs push": ["http://127.0.0.1:9/dicom-web", MISSING],
    "slides info": [MISSING],
    "slides tissue": [MISSING, OUT],
    "slides patch": [MISSING, OUT],
    "slides extract": [MISSING, "--out", OUT],
    "slides heatmap": [MISSING, MISSING, MISSING, "--out", OUT],
    "seg split": [MISSING, "--out", OUT],
    "seg predict": [MISSING, "--model", "dynunet_3d", "--weights", MISSING, "--out", OUT],
    "vlm ask": [MISSING, "Is there a mass?"],
    "vlm eval": ["--run", MISSING, "--out", OUT],
    "vlm templated": ["--run", MISSING, "--out", OUT],
    "vlm report": [MISSING, "--out", OUT],
    "mil benchmark": [MISSING, "--out", OUT],
    "mil attention": ["abmil", MISSING, MISSING, "--out", OUT],
}
# Commands that read no input path of their own (URLs, the registry, the bundled config).
NO_INPUT_PATH = {"doctor", "demo", "data list", "models list", "pacs ping", "pacs search", "pacs pull"}


def app_commands() -> set[str]:
    """Every `GROUP COMMAND` (or top-level `COMMAND`) the app registers, as `medai --help` lists them."""
    found: set[str] = set()

    def walk(command: object, path: tuple[str, ...]) -> None:
        if isinstance(command, TyperGroup):
            for name, sub in command.commands.items():
                walk(sub, (*path, name))
        else:
            found.add(" ".join(path))

    walk(typer.main.get_command(app), ())
    return found


def readme_commands() -> set[str]:
    """The commands the README's "## The CLI" code block lists: `medai` then its lowercase command words."""
    text = README.read_text()
    block = re.search(r"^## The CLI\n```\n(.*?)^```", text, re.DOTALL | re.MULTILINE)
    assert block, "README.md has no '## The CLI' code block"
    listed = set()
    for line in block.group(1).splitlines():
        words = line.split()
        if not words or words[0] != "medai":
            continue
        # command words are lowercase; placeholders are upper case (SLIDE), options start with - or [
        names = [w for w in _leading(words[1:], r"[a-z][a-z0-9-]*")][:2]
        listed.add(" ".join(names))
    return listed


def _leading(words: list[str], pattern: str) -> list[str]:
    out = []
    for word in words:
        if not re.fullmatch(pattern, word):
            break
        out.append(word)
    return out


def _invoke(args: list[str], **kw: object):
    return CliRunner().invoke(app, args, env={"COLUMNS": "250"}, **kw)


def _flat(text: str) -> str:
    """Output without rich's panel borders and line wrapping."""
    return " ".join(text.replace("│", " ").split())


def test_readme_cli_section_lists_exactly_the_apps_commands():
    in_app, in_readme = app_commands(), readme_commands()
    assert not in_app - in_readme, f"commands missing from README.md's CLI section: {sorted(in_app - in_readme)}"
    assert not in_readme - in_app, f"README.md lists commands the app lacks: {sorted(in_readme - in_app)}"


def test_help_states_the_exit_codes():
    result = _invoke(["--help"])
    assert result.exit_code == 0 and EXIT_CODES.split(";")[0] in _flat(result.output)


def test_every_command_is_classified_for_the_missing_input_check():
    unclassified = app_commands() - set(MISSING_INPUT) - NO_INPUT_PATH
    assert not unclassified, f"add these commands to MISSING_INPUT or NO_INPUT_PATH: {sorted(unclassified)}"


@pytest.mark.parametrize("command", sorted(MISSING_INPUT))
def test_a_missing_input_path_exits_2_naming_it(command, tmp_path):
    if command not in app_commands():
        pytest.skip(f"`medai {command}` is not registered on this branch")
    missing = tmp_path / "absent_input"
    args = [str(missing) if a == MISSING else str(tmp_path / "out") if a == OUT else a for a in MISSING_INPUT[command]]
    result = _invoke([*command.split(), *args])
    assert result.exit_code == 2, result.output
    assert "absent_input" in _flat(result.output), result.output
    assert not (tmp_path / "out").exists()  # nothing done


def test_a_batch_with_one_bad_slide_exits_1_naming_it(tmp_path, wsi_cmu1_small_region_path):
    garbage = tmp_path / "vendor.svs"
    garbage.write_bytes(b"\x00" * 4096)
    fast = ["--patch-size", "32", "--target-mpp", "2.0", "--pretrained", "", "--workers", "0", "--no-progress"]
    args = ["slides", "extract", str(wsi_cmu1_small_region_path), str(garbage), "--out", str(tmp_path / "run"), *fast]
    result = _invoke(args)
    assert result.exit_code == 1, result.output
    flat = _flat(result.output)
    assert "vendor failed" in flat and "done: 1, failed: 1" in flat
    assert (tmp_path / "run" / "features" / "CMU-1-Small-Region.h5").is_file()


def test_deidentify_with_one_refused_file_exits_1_naming_it(tmp_path, dicom_dcmqi_path):
    source = tmp_path / "in"
    shutil.copytree(dicom_dcmqi_path / "segmentations" / "ct-3slice", source)
    (source / "broken.dcm").write_bytes(b"DICM" + b"\x00" * 200)
    result = _invoke(["dicom", "deidentify", str(source), str(tmp_path / "out"), "--secret", "a-key-of-16-chars+"])
    assert result.exit_code == 1, result.output
    assert "REFUSED" in result.output and "broken.dcm" in _flat(result.output)
    assert len(list((tmp_path / "out").glob("*.dcm"))) == 3


def test_data_verify_with_one_changed_file_exits_1_naming_it(tmp_path):
    for name, text in (("a.txt", "kept"), ("b.txt", "original")):
        (tmp_path / name).write_text(text)
    sums = "".join(f"{hashlib.sha256((tmp_path / n).read_bytes()).hexdigest()}  {n}\n" for n in ("a.txt", "b.txt"))
    (tmp_path / "SHA256SUMS").write_text(sums)
    assert _invoke(["data", "verify", "--root", str(tmp_path)]).exit_code == 0
    (tmp_path / "b.txt").write_text("changed")
    result = _invoke(["data", "verify", "--root", str(tmp_path)])
    assert result.exit_code == 1 and "MISMATCH b.txt" in _flat(result.output), result.output


@pytest.mark.parametrize(
    "override,named",
    [("features", "override 'features'"), ("featu res=1", "featu res"), ("features=[4, 8", "features")],
)
def test_a_malformed_override_exits_2_naming_it(override, named, tmp_path, msd_hippocampus_path):
    image = msd_hippocampus_path / "images" / "hippocampus_004.nii.gz"
    weights = tmp_path / "w.safetensors"
    weights.write_bytes(b"")
    args = ["seg", "predict", str(image), "--model", "dynunet_3d", "--weights", str(weights), "--out",
            str(tmp_path / "pred.nii.gz"), "-o", override]
    result = _invoke(args)
    assert result.exit_code == 2 and named in _flat(result.output), result.output


def test_an_unknown_model_override_exits_2_naming_it(tmp_path, msd_hippocampus_path):
    """Passes once model families build through the strict-override helper (issue 20, item 5)."""
    image = msd_hippocampus_path / "images" / "hippocampus_004.nii.gz"
    weights = tmp_path / "w.safetensors"
    weights.write_bytes(b"")
    args = ["seg", "predict", str(image), "--model", "dynunet_3d", "--weights", str(weights), "--out",
            str(tmp_path / "pred.nii.gz"), "-o", "featurez=[4, 8, 8]"]
    result = _invoke(args)
    assert result.exit_code == 2 and "featurez" in _flat(result.output), result.output
