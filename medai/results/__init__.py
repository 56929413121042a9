"""Model outputs written back as files a clinician's tools read (DICOM SEG/SR, GeoJSON, reports)."""
