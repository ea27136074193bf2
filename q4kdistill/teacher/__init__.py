"""The frozen, quantized teacher: its forward (``forward.py``) and the ``Teacher`` object (``model.py``)."""
from .model import DEFAULT_CHUNK_TOKENS, Teacher  # noqa: F401
