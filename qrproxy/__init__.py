"""qrproxy: an edge DICOM proxy (worklist and query cache, durable store-and-forward, retrieve, commitment)."""

__version__ = "0.1.0"
