"""The SCP side: one module per DICOM service, each offering `contexts()` and `handlers(proxy)`."""
