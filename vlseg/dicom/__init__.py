"""DICOM for the viewers: the demo data as DICOM (a CT-like series per demo volume, the 2D images as
secondary-capture instances), a DICOMweb store (Orthanc) started on a loopback port, and uploading to it.

* :mod:`vlseg.dicom.convert` -- arrays -> DICOM datasets (pydicom), the uncertainty series the app publishes;
* :mod:`vlseg.dicom.orthanc` -- start / stop a throw-away Orthanc with its DICOMweb plugin, STOW-RS upload.
"""
