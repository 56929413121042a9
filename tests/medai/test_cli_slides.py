import json

from typer.testing import CliRunner

from medai.cli import app


def test_slides_info_json_and_unknown_mpp(wsi_tcga_cr_7395_path, wsi_small_he_levels_path):
    result = CliRunner().invoke(app, ["slides", "info", str(wsi_tcga_cr_7395_path), "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.output)
    assert info["backend"] == "openslide" and info["vendor"] == "aperio" and info["mpp"] is None
    assert info["level_dimensions"] == [[4443, 3567], [2221, 1783]]
    text = CliRunner().invoke(
        app, ["slides", "info", str(wsi_small_he_levels_path)], env={"COLUMNS": "200"}
    )
    assert text.exit_code == 0 and "unknown (pass --mpp)" in text.output and "352.9" in text.output
    given = CliRunner().invoke(
        app, ["slides", "info", str(wsi_small_he_levels_path), "--mpp", "0.5", "--json"]
    )
    assert (
        json.loads(given.output)["mpp"] == 0.5 and json.loads(given.output)["mpp_source"] == "user"
    )


def test_slides_info_unsupported_file_exits_2_naming_it(tmp_path):
    bad = tmp_path / "scan.svs"
    bad.write_bytes(b"\x00" * 512)
    result = CliRunner().invoke(app, ["slides", "info", str(bad)], env={"COLUMNS": "200"})
    assert result.exit_code == 2 and f"error: {bad}" in result.output


def test_slides_tissue_and_patch_write_files(tmp_path, wsi_cmu1_small_region_path):
    runner = CliRunner()
    tissue = runner.invoke(
        app, ["slides", "tissue", str(wsi_cmu1_small_region_path), str(tmp_path / "t")]
    )
    assert tissue.exit_code == 0, tissue.output
    assert (tmp_path / "t" / "CMU-1-Small-Region.geojson").is_file()
    patch = runner.invoke(
        app,
        ["slides", "patch", str(wsi_cmu1_small_region_path), str(tmp_path / "p")],
        env={"COLUMNS": "200"},
    )
    assert patch.exit_code == 0, patch.output
    assert "patches of 256 px at 0.5 µm/px" in patch.output
    assert (tmp_path / "p" / "patches" / "CMU-1-Small-Region.h5").is_file()
