"""Email users the ZIP of frames extracted from their video, from SQS notifications."""

__version__ = "0.2.0"
