"""Raw-socket DICOM peers for the fuzz and limits tests: PDUs built with pynetdicom's own encoders,
then sent whole, cut short, lied about or mutated."""
