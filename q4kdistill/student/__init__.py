"""The student: model, flat parameter buffers, ops (forward/backward pairs), KD losses, AdamW."""
from .model import Student, chunk_size  # noqa: F401
