"""PACS through a real Orthanc on loopback: round trip TCIA -> STOW/QIDO/WADO -> measurement -> SEG+SR -> back."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest

from medai.errors import PacsError
from medai.io.dicom import load_series
from medai.io.pacs import DicomWebPacs, DimsePacs, ping, push_paths
from medai.results.dicom_seg import SegmentSpec, read_segmentation, segmentation_to_volume, write_segmentation
from medai.results.dicom_sr import MeasurementGroupSpec, MeasurementSpec, measurements_from_report, write_measurement_report
from tests.conftest import require_system_tool
from tests.io.conftest import start_test_orthanc

pytestmark = pytest.mark.orthanc

SERIES = "Study2/14-T1post-22014"


def otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold of a 1D sample (the fixed measurement of the round trip)."""
    hist, edges = np.histogram(values, bins=bins)
    centers = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(hist)
    w1 = w0[-1] - w0
    m0 = np.cumsum(hist * centers) / np.maximum(w0, 1)
    m1 = (np.sum(hist * centers) - np.cumsum(hist * centers)) / np.maximum(w1, 1)
    return float(centers[np.argmax(w0 * w1 * (m0 - m1) ** 2)])


def test_round_trip_through_orthanc(orthanc, dicom_brain_tumor_progression_path, tmp_path):
    pacs = DicomWebPacs(orthanc.dicomweb_url)
    source = sorted((dicom_brain_tumor_progression_path / SERIES).glob("*.dcm"))
    assert pacs.store(source) == len(source)

    header = pydicom.dcmread(source[0], stop_before_pixels=True)
    studies = pacs.search_studies(PatientID=str(header.PatientID))
    assert [s["StudyInstanceUID"] for s in studies] == [str(header.StudyInstanceUID)]
    series = pacs.search_series(str(header.StudyInstanceUID), Modality="MR")
    assert any(s["SeriesInstanceUID"] == str(header.SeriesInstanceUID) for s in series)
    files = pacs.retrieve_series(str(header.StudyInstanceUID), str(header.SeriesInstanceUID), tmp_path / "wado")
    assert len(files) == len(source)
    volume = load_series(tmp_path / "wado")
    reference = load_series(source)
    assert np.array_equal(volume.array, reference.array)
    np.testing.assert_allclose(volume.affine_lps, reference.affine_lps)

    # Fixed measurement: foreground (head) by Otsu threshold, its volume in mL.
    mask = volume.array > otsu_threshold(volume.array.ravel())
    volume_ml = float(mask.sum() * np.prod(volume.spacing_mm) / 1000.0)
    assert 500 < volume_ml < 5000  # a head section 24 x 6.5 mm thick (scalp included): 0.5-5 L
    seg_path = write_segmentation(mask.astype(np.uint8), volume, [SegmentSpec(1, "Head", "Head")], tmp_path / "seg.dcm")
    sr_path = write_measurement_report(
        volume, [MeasurementGroupSpec("head", "Head", [MeasurementSpec("Volume", volume_ml, "ml", "milliliter")], segment_number=1)],
        tmp_path / "sr.dcm", segmentation=seg_path,
    )
    assert pacs.store([seg_path, sr_path]) == 2

    results = {s["Modality"]: s for s in pacs.search_series(str(header.StudyInstanceUID))}
    assert {"MR", "SEG", "SR"} <= set(results)
    seg_back = pacs.retrieve_series(str(header.StudyInstanceUID), results["SEG"]["SeriesInstanceUID"], tmp_path / "seg_back")
    sr_back = pacs.retrieve_series(str(header.StudyInstanceUID), results["SR"]["SeriesInstanceUID"], tmp_path / "sr_back")
    import highdicom as hd

    seg_ds = hd.seg.segread(seg_back[0])  # highdicom parses and validates the SEG structure
    assert seg_ds.number_of_segments == 1
    assert np.array_equal(segmentation_to_volume(read_segmentation(seg_back[0]), volume)[..., 0], mask)
    sr_ds = hd.sr.srread(sr_back[0])
    assert measurements_from_report(sr_back[0]) == [{"concept": "Volume", "value": pytest.approx(volume_ml), "unit": "ml"}]
    assert sr_ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34"
    require_system_tool("dciodvfy")
    from medai.results.validate import dciodvfy

    for path in (seg_back[0], sr_back[0]):
        report = dciodvfy(path)
        assert report.ok, report.errors


def test_dimse_echo_find_store_move(orthanc, dicom_dcmqi_path, tmp_path):
    peer = DimsePacs("127.0.0.1", orthanc.dicom_port, called_ae=orthanc.aet, calling_ae=orthanc.move_aet)
    assert peer.echo().ok
    ct = sorted((dicom_dcmqi_path / "segmentations" / "ct-3slice").glob("*.dcm"))
    assert peer.store(ct) == 3
    header = pydicom.dcmread(ct[0], stop_before_pixels=True)
    found = peer.find("SERIES", StudyInstanceUID=str(header.StudyInstanceUID))
    assert [f["SeriesInstanceUID"] for f in found] == [str(header.SeriesInstanceUID)]
    moved = peer.move_series(str(header.StudyInstanceUID), str(header.SeriesInstanceUID), tmp_path, port=orthanc.move_port)
    assert len(moved) == 3
    assert np.array_equal(load_series(moved).array, load_series(ct).array)


def test_ping_explains_what_is_wrong(orthanc, orthanc_with_auth):
    assert ping(orthanc.dicomweb_url).ok
    assert ping(f"dicom://{orthanc.aet}@127.0.0.1:{orthanc.dicom_port}").ok
    wrong_ae = ping(f"dicom://NOT_ORTHANC@127.0.0.1:{orthanc.dicom_port}")
    assert not wrong_ae.ok and "AE title" in wrong_ae.detail
    assert "404" in ping(f"{orthanc.rest_url}/wrong-root").detail
    assert "connection refused" in ping("http://127.0.0.1:9/dicom-web").detail
    assert "does not resolve" in ping("http://no-such-host.invalid/dicom-web").detail
    tls = ping(f"https://127.0.0.1:{orthanc.http_port}/dicom-web")
    assert not tls.ok and "plain HTTP" in tls.detail
    unauthorised = ping(orthanc_with_auth.dicomweb_url)
    assert not unauthorised.ok and "401" in unauthorised.detail
    assert ping(orthanc_with_auth.dicomweb_url, username="medai", password="secret").ok
    assert "secret" not in ping(orthanc_with_auth.dicomweb_url.replace("http://", "http://medai:wrong@")).url


def test_cli_pacs_ping_and_push(orthanc, dicom_dcmqi_path):
    from typer.testing import CliRunner

    from medai.cli import app

    runner = CliRunner()
    ok = runner.invoke(app, ["pacs", "ping", orthanc.dicomweb_url])
    assert ok.exit_code == 0 and "OK" in ok.output
    bad = runner.invoke(app, ["pacs", "ping", "http://127.0.0.1:9/dicom-web"])
    assert bad.exit_code == 2 and "refused" in bad.output
    pushed = runner.invoke(app, ["pacs", "push", orthanc.dicomweb_url, str(dicom_dcmqi_path / "segmentations" / "ct-3slice")])
    assert pushed.exit_code == 0 and "stored 3" in pushed.output


def test_cli_push_deidentifies_on_export(orthanc, dicom_dcmqi_path, tmp_path):
    """`pacs push --deidentify-secret` sends no original identifier or UID; the study stays one study."""
    from typer.testing import CliRunner

    from medai.cli import app

    series = dicom_dcmqi_path / "segmentations" / "ct-3slice"
    originals = [pydicom.dcmread(p) for p in sorted(series.glob("*.dcm"))]
    pushed = CliRunner().invoke(app, ["pacs", "push", orthanc.dicomweb_url, str(series), "--deidentify-secret", "k1-0123456789abcdef",
                                      "--pseudonym", "STUDY-A"])
    assert pushed.exit_code == 0 and "stored 3 instance(s) (de-identified)" in pushed.output
    pacs = DicomWebPacs(orthanc.dicomweb_url)
    studies = pacs.search_studies(PatientID="STUDY-A")
    assert len(studies) == 1  # the three slices were remapped into one study
    study_uid = studies[0]["StudyInstanceUID"]
    assert study_uid != originals[0].StudyInstanceUID
    (series_found,) = pacs.search_series(study_uid)
    stored = [pydicom.dcmread(p) for p in pacs.retrieve_series(study_uid, series_found["SeriesInstanceUID"], tmp_path)]
    original_uids = {o.SOPInstanceUID for o in originals} | {originals[0].SeriesInstanceUID}
    assert len(stored) == 3
    for ds in stored:
        assert ds.PatientID == "STUDY-A" and str(ds.PatientName) == "STUDY-A"
        assert ds.SOPInstanceUID not in original_uids and ds.SeriesInstanceUID not in original_uids
        assert ds.PatientIdentityRemoved == "YES"
        for keyword in ("PatientBirthDate", "InstitutionName", "ReferringPhysicianName", "AccessionNumber"):
            original = str(originals[0].get(keyword, "") or "")
            assert not original or str(ds.get(keyword, "") or "") != original, keyword


def test_push_paths_sends_what_deidentifies_and_names_the_rest(orthanc, dicom_dcmqi_path, tmp_path):
    broken = tmp_path / "broken.dcm"
    broken.write_bytes(b"DICM" + b"\x00" * 200)
    series = dicom_dcmqi_path / "segmentations" / "ct-3slice"
    stored, refused = push_paths(orthanc.dicomweb_url, [series, broken], deidentify_secret="push-paths-test-key",
                                 pseudonym="STUDY-B")
    assert stored == 3 and [path for path, _ in refused] == [str(broken)] and refused[0][1]
    assert len(DicomWebPacs(orthanc.dicomweb_url).search_studies(PatientID="STUDY-B")) == 1


def test_stow_failure_is_a_pacs_error(orthanc_with_auth, dicom_dcmqi_path):
    pacs = DicomWebPacs(orthanc_with_auth.dicomweb_url)
    with pytest.raises(PacsError, match="401"):
        pacs.store(sorted((dicom_dcmqi_path / "segmentations" / "ct-3slice").glob("*.dcm")))


def test_unregistered_ae_cannot_store(orthanc, dicom_dcmqi_path):
    stranger = DimsePacs("127.0.0.1", orthanc.dicom_port, called_ae=orthanc.aet, calling_ae="STRANGER")
    with pytest.raises(PacsError):
        stranger.store(sorted((dicom_dcmqi_path / "segmentations" / "ct-3slice").glob("*.dcm"))[:1])


@pytest.mark.parametrize(
    "env, fails",
    [({"CI": "true"}, True), ({"MEDAI_REQUIRE_SYSTEM_TOOLS": "1"}, True), ({}, False), ({"CI": "false"}, False)],
)
def test_missing_orthanc_or_dciodvfy_fails_under_ci_and_skips_elsewhere(env, fails, monkeypatch, tmp_path):
    import tests.io.orthanc

    for name in ("CI", "MEDAI_REQUIRE_SYSTEM_TOOLS"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(tests.io.orthanc, "ORTHANC", str(tmp_path / "no-such-Orthanc"))
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty folder: no dciodvfy
    expected = pytest.fail.Exception if fails else pytest.skip.Exception
    for check, binary in ((lambda: start_test_orthanc(tmp_path), "Orthanc"), (lambda: require_system_tool("dciodvfy"), "dciodvfy")):
        with pytest.raises(expected) as info:
            check()
        assert binary in str(info.value) and "make system-deps" in str(info.value)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_dimse_ping_on_a_closed_port_says_connection_refused_not_ae_title():
    result = ping(f"dicom://ORTHANC@127.0.0.1:{_free_port()}", timeout_s=2)
    assert not result.ok
    assert result.detail.startswith("connection refused") and "AE title" not in result.detail, result.detail


def test_silent_dicomweb_server_fails_after_one_retry_with_the_cause():
    """A server that accepts and never answers: two attempts at the given timeout, then a PacsError."""
    import socket
    import threading

    accepted = []
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    server.settimeout(30)

    def accept() -> None:
        try:
            while len(accepted) < 8:
                accepted.append(server.accept()[0])
        except OSError:
            pass

    threading.Thread(target=accept, daemon=True).start()
    try:
        pacs = DicomWebPacs(f"http://127.0.0.1:{server.getsockname()[1]}/dicom-web", timeout_s=1)
        with pytest.raises(PacsError, match="timed out"):
            pacs.search_studies()
        assert len(accepted) == 2, len(accepted)  # was 5, with back-off: 130 s at a 2 s timeout
    finally:
        server.close()
        for conn in accepted:
            conn.close()
