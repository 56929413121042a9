"""A templated VQA set built from real labelled data we hold: answers known exactly.

Unlike VQA-RAD (clinician-written questions), these questions come from fixed templates and
their answers from labels and headers, so a model can be scored on facts with no annotator
disagreement. They are templated, not natural: say so wherever they are reported.

- BreastMNIST test split: "Is the lesion in this breast ultrasound malignant?" (label 0 = malignant).
- MSD Task04 hippocampus: an axial MR slice with or without hippocampus in its label map:
  "Is the hippocampus visible in this slice?" (label voxels 1 anterior / 2 posterior).
- DICOM series: "What is the imaging modality?" (Modality) and "In which plane is this image?"
  (from ImageOrientationPatient: the slice normal's dominant axis).
- Whole-slide images: a tile of the slide's thumbnail, "Is most of this image covered by tissue?",
  answered from medai's tissue detector (medai.transforms.tissue) on that thumbnail: "yes" when the
  tile is at least 60% tissue, "no" at most 10%; tiles in between are ambiguous and not asked. The
  reference is the detector's mask, not a pathologist's outline.
Images are returned as uint8 arrays (H, W) or RGB (H, W, 3); nothing here imports torch models.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

MODALITY_NAMES = {"MR": "mri", "CT": "ct", "CR": "x-ray", "DX": "x-ray", "US": "ultrasound", "PT": "pet"}


@dataclass(frozen=True)
class TemplatedQuestion:
    """One templated question about one image, with its exact answer and where it came from."""

    image: np.ndarray  # uint8 (H, W), or (H, W, 3) for slide tiles
    question: str
    answer: str  # normalised: "yes"/"no", a modality or a plane
    source: str  # file (and index/slice) the image and answer came from
    template: str  # which template produced it


def _to_uint8(array: np.ndarray) -> np.ndarray:
    array = np.asarray(array, dtype=np.float32)
    lo, hi = np.percentile(array, [0.5, 99.5]) if array.size else (0.0, 1.0)
    if hi <= lo:
        return np.zeros(array.shape, np.uint8)
    return (np.clip((array - lo) / (hi - lo), 0, 1) * 255).astype(np.uint8)


def breastmnist_questions(npz_path: str | Path, split: str = "test") -> Iterator[TemplatedQuestion]:
    """Yield the malignancy question for each BreastMNIST image of a split (label 0 = malignant)."""
    from medai.io.medmnist import load_medmnist

    data = load_medmnist(npz_path)
    images, labels = data.splits[split].images, data.splits[split].labels
    for i, (image, label) in enumerate(zip(images, labels)):
        yield TemplatedQuestion(np.asarray(image), "Is the lesion in this breast ultrasound malignant?",
                                "yes" if int(label[0]) == 0 else "no", f"{npz_path}:{split}[{i}]", "breastmnist_malignant")


def hippocampus_questions(root: str | Path, max_volumes: int = 10) -> Iterator[TemplatedQuestion]:
    """Yield, per volume, one axial slice with hippocampus and one without (from the label map)."""
    from medai.io.nifti import pair_nifti_folder, read_nifti

    for pair in pair_nifti_folder(root)[:max_volumes]:
        image, label = read_nifti(pair["image"]).array, read_nifti(pair["label"]).array
        present = np.flatnonzero((label > 0).reshape(-1, label.shape[2]).any(axis=0))
        absent = np.setdiff1d(np.arange(label.shape[2]), present)
        for slices, answer in ((present, "yes"), (absent, "no")):
            if len(slices):
                z = int(slices[len(slices) // 2])
                yield TemplatedQuestion(_to_uint8(image[:, :, z].T), "Is the hippocampus visible in this slice?",
                                        answer, f"{pair['image']}:z={z}", "hippocampus_present")


def plane_from_orientation(orientation: list[float]) -> str:
    """Return axial / coronal / sagittal from ImageOrientationPatient (dominant axis of the normal)."""
    row, col = np.asarray(orientation[:3], float), np.asarray(orientation[3:6], float)
    normal = np.abs(np.cross(row, col))
    return ("sagittal", "coronal", "axial")[int(np.argmax(normal))]


def dicom_questions(root: str | Path, max_files: int = 20) -> Iterator[TemplatedQuestion]:
    """Yield modality and plane questions for single-frame DICOM images under `root`."""
    import pydicom

    count = 0
    for path in sorted(Path(root).rglob("*.dcm")):
        if count >= max_files:
            break
        try:
            ds = pydicom.dcmread(path)
            pixels = ds.pixel_array
        except Exception:  # a file that does not decode is simply not a question source
            continue
        if pixels.ndim != 2 or "Modality" not in ds:
            continue
        count += 1
        image = _to_uint8(pixels)
        modality = MODALITY_NAMES.get(str(ds.Modality).upper())
        if modality:
            yield TemplatedQuestion(image, "What is the imaging modality?", modality, str(path), "dicom_modality")
        if "ImageOrientationPatient" in ds:
            yield TemplatedQuestion(image, "In which plane is this image?",
                                    plane_from_orientation(list(ds.ImageOrientationPatient)), str(path), "dicom_plane")


def slide_tissue_questions(paths: list[str | Path], thumb_side: int = 1024, tile_px: int = 128,
                           per_answer: int = 8, tissue_yes: float = 0.6, tissue_no: float = 0.1
                           ) -> Iterator[TemplatedQuestion]:
    """Yield up to `per_answer` "yes" and "no" tissue-coverage questions per slide (tiles of its thumbnail)."""
    from medai.io.wsi import open_slide
    from medai.transforms.tissue import TissueConfig, detect_tissue

    for path in paths:
        with open_slide(path) as slide:
            thumb = slide.thumbnail(thumb_side)
            downsample = (slide.dimensions[0] / thumb.shape[1], slide.dimensions[1] / thumb.shape[0])
            tissue = detect_tissue(thumb, downsample, slide.mpp, TissueConfig())
        tile = min(tile_px, *thumb.shape[:2])
        found: dict[str, list[TemplatedQuestion]] = {"yes": [], "no": []}
        for y in range(0, thumb.shape[0] - tile + 1, tile):
            for x in range(0, thumb.shape[1] - tile + 1, tile):
                fraction = float(tissue.mask[y : y + tile, x : x + tile].mean())
                answer = "yes" if fraction >= tissue_yes else "no" if fraction <= tissue_no else None
                if answer and len(found[answer]) < per_answer:
                    found[answer].append(TemplatedQuestion(
                        np.ascontiguousarray(thumb[y : y + tile, x : x + tile]),
                        "Is most of this image covered by tissue?", answer,
                        f"{path}:thumb{thumb.shape[1]}x{thumb.shape[0]}:x={x},y={y},tissue={fraction:.2f}",
                        "slide_tissue_coverage"))
        yield from found["yes"] + found["no"]


def templated_question_set(data_root: str | Path, per_source: int = 40) -> list[TemplatedQuestion]:
    """The templated set over the shared data: BreastMNIST test, hippocampus slices, DICOM headers, slide tiles."""
    import itertools

    root = Path(data_root)
    questions = list(itertools.islice(breastmnist_questions(root / "medmnist" / "breastmnist.npz"), per_source))
    questions += list(itertools.islice(hippocampus_questions(root / "seg3d" / "msd_task04_hippocampus",
                                                             max_volumes=per_source // 2), per_source))
    questions += list(dicom_questions(root / "dicom", max_files=per_source // 2))
    slides = [p for p in sorted((root / "wsi").glob("*")) if p.suffix.lower() in (".svs", ".tif", ".tiff", ".ndpi")]
    questions += list(slide_tissue_questions(slides, per_answer=max(1, per_source // (2 * max(1, len(slides))))))
    return questions
