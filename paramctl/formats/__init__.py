"""On-disk layouts shared by the readers (``sources/``) and the writers (``writers/``).

Codecs and constants live here so that a reader and a writer of the same format agree
without importing each other: ``sources -> formats -> io`` and ``writers -> formats -> io``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = [
    "BIN_INDEX_SUFFIX",
    "DCP_FROZEN_FILE",
    "DCP_METADATA",
    "FROZEN_KEY",
    "INDEX_SUFFIX",
    "PT_EXTENSIONS",
    "STORAGE_DTYPES",
    "contiguous_stride",
    "recorded_frozen",
]

# Suffixes of torch zip checkpoints written by torch.save.
PT_EXTENSIONS = (".pt", ".pth", ".bin", ".ckpt")
# Hugging Face sharded safetensors index.
INDEX_SUFFIX = ".safetensors.index.json"
# Hugging Face sharded torch checkpoint index (pytorch_model.bin.index.json).
BIN_INDEX_SUFFIX = ".bin.index.json"
# Where paramctl records frozen names: safetensors __metadata__ and sharded index metadata.
FROZEN_KEY = "paramctl.frozen"
# DCP folders: torch's metadata file, and paramctl's sidecar with the frozen names.
DCP_METADATA = ".metadata"
DCP_FROZEN_FILE = ".paramctl.json"

# torch.<Name>Storage -> dtype name (torch/storage.py _dtype_to_storage_type_map).
STORAGE_DTYPES: dict[str, str] = {
    "DoubleStorage": "float64",
    "FloatStorage": "float32",
    "HalfStorage": "float16",
    "LongStorage": "int64",
    "IntStorage": "int32",
    "ShortStorage": "int16",
    "CharStorage": "int8",
    "ByteStorage": "uint8",
    "BoolStorage": "bool",
    "BFloat16Storage": "bfloat16",
    "ComplexDoubleStorage": "complex128",
    "ComplexFloatStorage": "complex64",
    "QInt8Storage": "qint8",
    "QInt32Storage": "qint32",
    "QUInt8Storage": "quint8",
    "QUInt4x2Storage": "quint4x2",
    "QUInt2x4Storage": "quint2x4",
}


def contiguous_stride(shape: tuple[int, ...]) -> tuple[int, ...]:
    """The row-major strides (in elements) of a tensor of ``shape``, as torch gives them."""
    stride = []
    acc = 1
    for d in reversed(shape):
        stride.append(acc)
        acc *= max(d, 1)
    return tuple(reversed(stride))


def recorded_frozen(metadata: Mapping[str, Any], where: str) -> set[str]:
    """The names ``metadata[FROZEN_KEY]`` records (a JSON array, or a string holding one;
    none when absent), for a safetensors ``__metadata__`` or a shard index's
    ``metadata``. Anything else is corrupt: the error names ``where`` (the mapping as the
    file spells it)."""
    raw = metadata.get(FROZEN_KEY)
    if raw is None:
        return set()
    if isinstance(raw, str):
        import json

        try:
            raw = json.loads(raw)
        except ValueError:
            raw = None
    if not isinstance(raw, list) or not all(isinstance(n, str) for n in raw):
        from paramctl.errors import CorruptFileError

        raise CorruptFileError(f"{where}[{FROZEN_KEY!r}] is not a JSON array of names")
    return set(raw)
