"""Templated VQA questions from real labelled data: answers follow the labels and headers."""

from __future__ import annotations

import itertools

import numpy as np
import pydicom

from medai.pipelines.templated_vqa import breastmnist_questions, dicom_questions, hippocampus_questions, plane_from_orientation


def test_breastmnist_answers_follow_labels(breastmnist_path):
    questions = list(breastmnist_questions(breastmnist_path))
    labels = np.load(breastmnist_path)["test_labels"][:, 0]
    assert len(questions) == len(labels) == 156
    assert [q.answer for q in questions] == ["yes" if y == 0 else "no" for y in labels]
    assert questions[0].image.shape == (28, 28)


def test_hippocampus_slices_match_the_label_map(msd_hippocampus_path):
    questions = list(itertools.islice(hippocampus_questions(msd_hippocampus_path, max_volumes=2), 4))
    assert {q.answer for q in questions} == {"yes", "no"}
    assert all(q.image.dtype == np.uint8 and q.image.ndim == 2 for q in questions)


def test_dicom_modality_and_plane(dicom_brain_tumor_progression_path):
    questions = list(dicom_questions(dicom_brain_tumor_progression_path, max_files=2))
    modality = [q for q in questions if q.template == "dicom_modality"]
    plane = [q for q in questions if q.template == "dicom_plane"]
    assert modality and all(q.answer == "mri" for q in modality)
    for q in plane:
        ds = pydicom.dcmread(q.source)
        assert q.answer == plane_from_orientation(list(ds.ImageOrientationPatient))
    assert plane_from_orientation([1, 0, 0, 0, 1, 0]) == "axial"
    assert plane_from_orientation([0, 1, 0, 0, 0, -1]) == "sagittal"
    assert plane_from_orientation([1, 0, 0, 0, 0, -1]) == "coronal"


def test_slide_tissue_questions_follow_the_tissue_mask(wsi_cmu1_small_region_path):
    from medai.pipelines.templated_vqa import slide_tissue_questions
    from medai.io.wsi import open_slide
    from medai.transforms.tissue import TissueConfig, detect_tissue

    questions = list(slide_tissue_questions([wsi_cmu1_small_region_path], per_answer=3))
    assert [q.answer for q in questions] == ["yes"] * 3 + ["no"] * 3  # this slide has tissue and background
    with open_slide(wsi_cmu1_small_region_path) as slide:
        thumb = slide.thumbnail(1024)
        downsample = (slide.dimensions[0] / thumb.shape[1], slide.dimensions[1] / thumb.shape[0])
        mask = detect_tissue(thumb, downsample, slide.mpp, TissueConfig()).mask
    for q in questions:
        where = dict(part.split("=") for part in q.source.rsplit(":", 1)[1].split(","))
        x, y = int(where["x"]), int(where["y"])
        assert q.image.shape == (128, 128, 3) and np.array_equal(q.image, thumb[y : y + 128, x : x + 128])
        fraction = mask[y : y + 128, x : x + 128].mean()
        assert (fraction >= 0.6) if q.answer == "yes" else (fraction <= 0.1)
