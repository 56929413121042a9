"""Hostile inputs (issue 23): seeded mutated copies of the real shared files of every kind, run beside good files
through every CLI command that reads that kind.

For each command run: no Python traceback in the output, exit code per the convention (0 done; 1 done with
failed items, each named; 2 bad input, nothing done), every good file's result present, every mutated file
either accepted (its result present) or named with a reason, and no temporary file left in the output folders.
`make test` runs a bounded sample (tests/hostile.py: DEFAULT_COUNTS); `make fuzz` sets MEDAI_FUZZ_COUNT (total
mutated inputs) and MEDAI_FUZZ_SEED. The counts are printed at the end of the module and written to
MEDAI_FUZZ_REPORT (a JSON path) when set.
"""

from __future__ import annotations

import gzip
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from medai.cli import app
from tests.hostile import TRACEBACK, Mutant, Tally, fuzz_count, fuzz_seed, make_mutants

REPO = Path(__file__).resolve().parents[1]
SECRET = "hostile-harness-key-0123456789"
WIDE = {"COLUMNS": "2000", "NO_COLOR": "1"}  # no rich wrapping inside a path


@pytest.fixture(scope="module")
def tally(request: pytest.FixtureRequest):
    """The module's counts; printed (through pytest's capture) and written to MEDAI_FUZZ_REPORT at the end."""
    counts = Tally()
    yield counts
    summary = counts.summary()
    if os.environ.get("MEDAI_FUZZ_REPORT"):
        counts.write(Path(os.environ["MEDAI_FUZZ_REPORT"]))
    capture = request.config.pluginmanager.getplugin("capturemanager")
    with capture.global_and_fixture_disabled():
        print(f"\nhostile inputs: {summary['mutated_files']} mutated files, {summary['inputs_tried']} runs of them: "
              f"{summary['refused_with_reason']} refused with a reason, {summary['accepted']} accepted; {summary['good_items_checked']} good items "
              f"present; {summary['command_runs']} command runs; tracebacks = {summary['tracebacks']}; "
              f"lost good items = {summary['lost_good_items']}")
        print(json.dumps(summary["per_kind"]))


def invoke(tally: Tally, command: str, *args: object):
    """Run `medai COMMAND ARGS` in process; check no traceback and an exit code of the convention."""
    saved = list(logging.root.handlers)  # the CLI's basicConfig binds a handler to this run's stderr
    result = CliRunner().invoke(app, [*command.split(), *map(str, args)], env=WIDE)
    logging.root.handlers[:] = saved
    tally.commands[command] += 1
    crashed = result.exception is not None and not isinstance(result.exception, SystemExit)
    if crashed or TRACEBACK in result.output:
        tally.tracebacks += 1
    assert not crashed, f"medai {command} {args}: {result.exception!r}\n{result.output[-3000:]}"
    assert TRACEBACK not in result.output, result.output[-3000:]
    assert result.exit_code in (0, 1, 2), result.output[-3000:]
    return result


def flat(text: str) -> str:
    """Output without rich's table borders and line breaks."""
    return " ".join(text.replace("│", " ").split())


def assert_refused_by_name(result, path: Path) -> None:
    """Exit 2 with one `error:` line naming the file."""
    assert result.exit_code == 2 and "error:" in result.output and path.name in flat(result.output), result.output


def no_temporaries(*folders: Path) -> None:
    """No half-written file (`*.tmp`, `.*.tmp`) left under the folders."""
    left = [p for folder in folders if folder.exists() for p in folder.rglob("*.tmp")]
    assert not left, left


def original_name(m: Mutant) -> str:
    """The mutated copy's name without its `<i>_<mutation>_` prefix (the source's name, or another suffix)."""
    return m.path.name.split("_", 1)[1][len(m.mutation) + 1:]


def mutants(kind: str, sources: list[Path], out_dir: Path, **kw) -> list[Mutant]:
    """This kind's share of the mutated inputs, seeded."""
    return make_mutants(sources, out_dir, fuzz_count(kind), fuzz_seed(), **kw)


# ---------------------------------------------------------------- DICOM


@pytest.fixture(scope="module")
def dicom_batch(tmp_path_factory, dicom_brain_tumor_progression_path, dicom_pydicom_data_path):
    """good/: real instances; mut/: mutated copies of other real instances (some share a SOP UID with good ones)."""
    crop = sorted((dicom_brain_tumor_progression_path / "Study1" / "13_HCropVolume").glob("*.dcm"), key=lambda p: int(p.stem))
    pydicom_files = sorted(dicom_pydicom_data_path.glob("*.dcm"))
    good_names = ("MR2_UNCR.dcm", "US1_UNCR.dcm", "OBXXXX1A.dcm", "eCT_Supplemental.dcm")
    good = crop[:6] + [dicom_pydicom_data_path / n for n in good_names]
    root = tmp_path_factory.mktemp("dicom") / "batch"
    (root / "good").mkdir(parents=True)
    for path in good:
        shutil.copy(path, root / "good" / path.name)
    others = crop[6:20] + [p for p in pydicom_files if p.name not in good_names]
    return root, sorted((root / "good").iterdir()), mutants("dicom", others, root / "mut")


def test_dicom_scan_indexes_every_good_instance_and_names_every_other_file(dicom_batch, tally):
    root, good, bad = dicom_batch
    result = invoke(tally, "dicom scan", root, "--json")
    assert result.exit_code == 0  # the scan ran; refusals are listed in the index
    index = json.loads(result.stdout)
    indexed = {i["path"] for st in index["studies"].values() for se in st["series"].values() for i in se["instances"]}
    refused = {r["path"]: r["reason"] for r in index["refused"]}
    duplicates = {r["path"]: r["reason"] for r in index["duplicates"]}
    lost = [p for p in good if str(p) not in indexed]
    tally.lost_good += len(lost)
    assert not lost, lost
    tally.good_checked["dicom"] += len(good)
    for m in bad:
        reason = refused.get(str(m.path)) or duplicates.get(str(m.path))
        named = str(m.path) in refused or str(m.path) in duplicates
        assert (named and reason) or str(m.path) in indexed, f"{m.path.name} neither indexed nor named with a reason"
        tally.mutant("dicom", m.path, refused=named)
    text = invoke(tally, "dicom scan", root)  # the human listing names the same files
    listing = flat(text.output)
    assert all(Path(p).name in listing for p in refused), "a refused file missing from the REFUSED lines"


def test_dicom_info_on_each_file_decodes_or_says_why(dicom_batch, tally):
    _, good, bad = dicom_batch
    for path in good:
        result = invoke(tally, "dicom info", path)
        assert result.exit_code == 0, result.output
        tally.good_checked["dicom info"] += 1
    for m in bad:
        result = invoke(tally, "dicom info", m.path)
        if result.exit_code == 2:
            assert_refused_by_name(result, m.path)
        elif result.exit_code == 1:
            assert "does not decode:" in result.output, result.output
        tally.mutant("dicom info", m.path, refused=result.exit_code != 0)


def test_dicom_deidentify_writes_every_good_file_and_names_every_refusal(dicom_batch, tally, tmp_path):
    import pydicom

    from medai.io.deidentify import UidMap

    root, good, bad = dicom_batch
    out = tmp_path / "deid"
    result = invoke(tally, "dicom deidentify", root, out, "--secret", SECRET, "--burned-in-checked")
    output = flat(result.output)
    written = sorted(out.iterdir())
    assert f"wrote {len(written)} de-identified file(s)" in output  # the count is what is on disk
    expected = {f"{UidMap(SECRET)(str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID))}.dcm" for p in good}
    lost = expected - {p.name for p in written}
    tally.lost_good += len(lost)
    assert not lost, lost
    tally.good_checked["dicom deidentify"] += len(good)
    refused = [m for m in bad if f"REFUSED {m.path}" in output]
    assert result.exit_code == (1 if refused else 0), result.output[-2000:]
    assert len(written) == len(good) + len(bad) - len(refused)  # every other mutated copy was written
    for m in bad:
        tally.mutant("dicom deidentify", m.path, refused=m in refused)
    no_temporaries(out)


def test_dicom_convert_writes_the_whole_series_or_names_the_bad_slice(dicom_brain_tumor_progression_path, tally,
                                                                      tmp_path):
    """One slice of a 32-slice series replaced by a mutated copy of itself, per run."""
    import nibabel as nib

    crop = dicom_brain_tumor_progression_path / "Study1" / "13_HCropVolume"
    slices = sorted(crop.glob("*.dcm"), key=lambda p: int(p.stem))
    good = invoke(tally, "dicom convert", crop, tmp_path / "good.nii.gz")
    assert good.exit_code == 0 and nib.load(tmp_path / "good.nii.gz").shape[2] == len(slices)
    tally.good_checked["dicom convert"] += 1
    for i, m in enumerate(mutants("dicom convert", slices, tmp_path / "mutated")):
        series = tmp_path / f"series{i}"
        shutil.copytree(crop, series)
        (series / m.source.name).write_bytes(m.path.read_bytes())
        out = tmp_path / f"v{i}.nii.gz"
        result = invoke(tally, "dicom convert", series, out)
        if result.exit_code == 0:
            skipped = f"{m.source.name} not read:" in flat(result.output)
            assert nib.load(out).shape[2] == len(slices) - skipped, result.output
            tally.mutant("dicom convert", m.path, refused=skipped)
        else:
            assert_refused_by_name(result, series / m.source.name)
            assert not out.exists()
            tally.mutant("dicom convert", m.path, refused=True)
    no_temporaries(tmp_path)


# ---------------------------------------------------------------- slides


def test_slides_info_and_tissue_on_good_and_mutated_slides(wsi_cmu1_small_region_path, wsi_small_he_levels_path,
                                                          tally, tmp_path):
    good = [wsi_cmu1_small_region_path, wsi_small_he_levels_path]
    for path in good:
        assert invoke(tally, "slides info", path).exit_code == 0
        out = tmp_path / "good" / path.stem
        assert invoke(tally, "slides tissue", path, out).exit_code == 0 and any(out.glob("*_mask.png"))
        tally.good_checked["slides"] += 1
    for m in mutants("slides", good, tmp_path / "mutated"):
        info = invoke(tally, "slides info", m.path)
        out = tmp_path / "tissue" / m.path.name
        tissue = invoke(tally, "slides tissue", m.path, out)
        for result in (info, tissue):
            if result.exit_code != 0:
                assert_refused_by_name(result, m.path)
        if tissue.exit_code == 0:
            assert any(out.glob("*_mask.png")) and any(out.glob("*.geojson"))
        tally.mutant("slides", m.path, refused=info.exit_code != 0 or tissue.exit_code != 0)
    no_temporaries(tmp_path)


# ---------------------------------------------------------------- EHR: FHIR bundles and NDJSON, MIMIC tables


def _patient_ids(path: Path) -> set[str]:
    """Patient ids in a good FHIR file (Bundle JSON or NDJSON, gzipped or not)."""
    data = gzip.decompress(path.read_bytes()) if path.name.endswith(".gz") else path.read_bytes()
    if ".ndjson" in path.name:
        resources = [json.loads(line) for line in data.splitlines() if line.strip()]
    else:
        resources = [e["resource"] for e in json.loads(data).get("entry", [])]
    return {r["id"] for r in resources if r.get("resourceType") == "Patient"}


def test_ehr_ingest_keeps_every_good_patient_and_names_every_bad_file(synthea_r4_path, mimic_iv_fhir_demo_partial_path,
                                                                     tally, tmp_path):
    import polars as pl

    bundles = sorted((synthea_r4_path / "bundles").glob("*.json.gz"), key=lambda p: p.stat().st_size)[:12]
    lines = (mimic_iv_fhir_demo_partial_path / "Patient.ndjson").read_bytes().splitlines(keepends=True)
    src = tmp_path / "src"
    src.mkdir()
    (src / "Patient.ndjson").write_bytes(b"".join(lines[:20]))
    (src / "PatientB.ndjson").write_bytes(b"".join(lines[20:40]))
    (src / "PatientC.ndjson.gz").write_bytes(gzip.compress(b"".join(lines[40:60])))
    good = bundles[:3] + [src / "Patient.ndjson"]
    bad = mutants("fhir", bundles[3:] + [src / "PatientB.ndjson", src / "PatientC.ndjson.gz"], tmp_path / "mutated")
    for start in range(0, len(bad), 11):
        batch = bad[start:start + 11]
        out = tmp_path / f"timeline{start}"
        result = invoke(tally, "ehr ingest", *good, *(m.path for m in batch), "--out", out)
        assert result.exit_code == 0, result.output[-2000:]
        patients = pl.read_parquet(out / "patients.parquet")
        refused = pl.read_csv(out / "refused.csv", infer_schema=False) if (out / "refused.csv").is_file() else None
        refused_sources = set(refused["source"]) if refused is not None else set()
        for path in good:
            kept = set(patients.filter(pl.col("source") == str(path))["patient_id"])
            missing = _patient_ids(path) - kept
            tally.lost_good += len(missing)
            assert not missing, (path.name, missing)
            tally.good_checked["fhir"] += 1
        for m in batch:
            named = str(m.path) in refused_sources
            empty_export = ".ndjson" in m.path.name and not m.path.read_bytes().strip()  # valid: no resources
            assert named or empty_export or str(m.path) in set(patients["source"]), f"{m.path.name}: not read or named"
            if named:
                reasons = refused.filter(pl.col("source") == str(m.path))["reason"]
                assert reasons.str.len_chars().min() > 0
            tally.mutant("fhir", m.path, refused=named)
        no_temporaries(out)


@pytest.fixture(scope="module")
def mimic_small(tmp_path_factory, mimic_iv_demo_path) -> Path:
    """A MIMIC-IV folder of the demo's real tables, labevents and prescriptions cut to their first 2000 rows."""
    hosp = tmp_path_factory.mktemp("mimic") / "mimic" / "hosp"
    hosp.mkdir(parents=True)
    for name in ("patients", "admissions", "diagnoses_icd", "procedures_icd"):
        shutil.copy(mimic_iv_demo_path / "hosp" / f"{name}.csv.gz", hosp)
    for name in ("labevents", "prescriptions"):
        with gzip.open(mimic_iv_demo_path / "hosp" / f"{name}.csv.gz", "rb") as handle:
            head = b"".join(handle.readline() for _ in range(2000))
        (hosp / f"{name}.csv.gz").write_bytes(gzip.compress(head, mtime=0))
    return hosp.parent


def test_ehr_ingest_of_a_mimic_folder_with_one_mutated_table(mimic_small, synthea_r4_path, tally, tmp_path):
    import polars as pl

    bundle = min((synthea_r4_path / "bundles").glob("*.json.gz"), key=lambda p: p.stat().st_size)
    clean = invoke(tally, "ehr ingest", mimic_small, bundle, "--out", tmp_path / "clean")
    assert clean.exit_code == 0
    expected = set(pl.read_parquet(tmp_path / "clean" / "patients.parquet")["patient_id"])
    assert len(expected) == 101  # the demo's 100 and the bundle's one
    tally.good_checked["mimic"] += 2
    tables = sorted((mimic_small / "hosp").iterdir())
    for i, m in enumerate(mutants("mimic", tables, tmp_path / "mutated")):
        folder = tmp_path / f"mimic{i}"
        shutil.copytree(mimic_small, folder)
        (folder / "hosp" / m.source.name).unlink()
        shutil.copy(m.path, folder / "hosp" / original_name(m))
        out = tmp_path / f"out{i}"
        result = invoke(tally, "ehr ingest", folder, bundle, "--out", out)
        if result.exit_code == 2:  # a broken table: the folder cannot be read, nothing is written
            assert "error:" in result.output and str(folder) in flat(result.output), result.output
            assert not out.exists()
        else:
            assert result.exit_code == 0
            kept = set(pl.read_parquet(out / "patients.parquet")["patient_id"])
            lost = expected - kept
            tally.lost_good += len(lost)
            assert not lost, f"{len(lost)} patients lost, {m.path.name} not named: {result.output[-1500:]}"
        tally.mutant("mimic", m.path, refused=result.exit_code == 2)
        no_temporaries(out)


# ---------------------------------------------------------------- NIfTI, MIL .mat, configs, images


def test_seg_predict_on_mutated_volumes(msd_hippocampus_path, tally, tmp_path):
    """A tiny DynUNet keeps each prediction cheap: the harness is after the reader, not the model."""
    import nibabel as nib
    import torch

    from medai.models import create_model, save_weights

    torch.manual_seed(0)
    weights = save_weights(create_model("dynunet_3d", features=(4, 8, 8)), tmp_path / "w.safetensors")
    model = ["--model", "dynunet_3d", "--weights", weights, "-o", "features=[4, 8, 8]"]
    images = sorted((msd_hippocampus_path / "images").glob("*.nii.gz"))[:4]
    good = invoke(tally, "seg predict", images[0], *model, "--out", tmp_path / "good.nii.gz")
    assert good.exit_code == 0 and nib.load(tmp_path / "good.nii.gz").shape == nib.load(images[0]).shape
    tally.good_checked["nifti"] += 1
    for i, m in enumerate(mutants("nifti", images[1:], tmp_path / "mutated")):
        out = tmp_path / f"pred{i}.nii.gz"
        result = invoke(tally, "seg predict", m.path, *model, "--out", out)
        if result.exit_code == 0:
            assert out.is_file()
        else:
            assert_refused_by_name(result, m.path)
            assert not out.exists()
        tally.mutant("nifti", m.path, refused=result.exit_code != 0)
    no_temporaries(tmp_path)


TINY_BENCHMARK = ("--models", "abmil", "--folds", "2", "--epochs", "1", "--n-boot", "10")


def test_mil_benchmark_on_mutated_bag_files(mil_classic_path, tally, tmp_path):
    musk1 = mil_classic_path / "musk1" / "musk1.mat"
    good = invoke(tally, "mil benchmark", musk1, *TINY_BENCHMARK, "--out", tmp_path / "good")
    assert good.exit_code == 0 and (tmp_path / "good" / "results.json").is_file()
    tally.good_checked["mat"] += 1
    for i, m in enumerate(mutants("mat", [musk1], tmp_path / "mutated")):
        out = tmp_path / f"run{i}"
        result = invoke(tally, "mil benchmark", m.path, *TINY_BENCHMARK, "--out", out)
        if result.exit_code == 0:
            assert (out / "results.json").is_file()
        else:
            assert_refused_by_name(result, m.path)
        tally.mutant("mat", m.path, refused=result.exit_code != 0)
        no_temporaries(out)


def test_finetune_on_mutated_configs(tally, tmp_path, mil_classic_path):
    config = REPO / "configs" / "mil_musk1_abmil.yaml"
    fast = ["-o", "trainer.epochs=1", "-o", "trainer.n_boot=0", "-o", "trainer.limit_train_batches=8",
            "-o", f"output_dir={tmp_path / 'runs'}"]
    good = invoke(tally, "finetune", config, *fast, "-o", "run_name=good")
    assert good.exit_code == 0 and any((tmp_path / "runs" / "good" / "checkpoints").iterdir()), good.output
    tally.good_checked["config"] += 1
    for i, m in enumerate(mutants("config", [config], tmp_path / "mutated")):
        result = invoke(tally, "finetune", m.path, *fast, "-o", f"run_name=run{i}")
        if result.exit_code == 0:
            assert any((tmp_path / "runs" / f"run{i}" / "checkpoints").iterdir())
        else:  # one line naming the file, the key or (a cut data.path) the data that does not fit
            assert result.exit_code == 2 and result.output.count("error:") == 1, result.output[-2000:]
        tally.mutant("config", m.path, refused=result.exit_code != 0)
    no_temporaries(tmp_path / "runs")


def test_vlm_ask_reads_the_image_first_and_names_a_bad_one(vqa_rad_path, tally, tmp_path):
    """An unknown --model keeps this cheap: a good image gets as far as the model lookup, a bad one is named first."""
    images = sorted((vqa_rad_path / "images").glob("*.jpg"))[:6]
    ask = ["Is there a mass?", "--model", "no_such_vlm"]
    for path in images[:2]:
        result = invoke(tally, "vlm ask", path, *ask)
        assert result.exit_code == 2 and "no_such_vlm" in result.output, result.output
        tally.good_checked["image"] += 1
    for m in mutants("image", images[2:], tmp_path / "mutated"):
        result = invoke(tally, "vlm ask", m.path, *ask)
        assert result.exit_code == 2, result.output
        accepted = "no_such_vlm" in result.output
        if not accepted:
            assert_refused_by_name(result, m.path)
        tally.mutant("image", m.path, refused=not accepted)


# ---------------------------------------------------------------- the real console script


def test_console_script_prints_no_traceback_on_hostile_input(dicom_batch, wsi_small_he_levels_path, tally, tmp_path):
    """A few runs through `python -m medai.cli` (its own logging and stderr): messages, never a traceback."""
    root, _, bad = dicom_batch
    cut_slide = tmp_path / "cut.tiff"
    cut_slide.write_bytes(wsi_small_he_levels_path.read_bytes()[:700])
    runs = [["dicom", "scan", str(root), "--json"], ["slides", "info", str(cut_slide)],
            *(["dicom", "info", str(m.path)] for m in bad[:4])]
    for args in runs:
        done = subprocess.run([sys.executable, "-m", "medai.cli", *args], cwd=REPO, capture_output=True, text=True,
                              check=False, timeout=120, env={**os.environ, **WIDE})
        tally.commands[f"console {args[0]} {args[1]}"] += 1
        assert TRACEBACK not in done.stderr + done.stdout, done.stderr[-3000:]
        assert done.returncode in (0, 1, 2), done.stderr[-3000:]
        if done.returncode == 2:
            assert "error: " in done.stderr, done.stderr
