"""medai: medical multimodal AI pipeline (DICOM, WSI, EHR in; grounded model outputs out)."""

__version__ = "0.1.0"
