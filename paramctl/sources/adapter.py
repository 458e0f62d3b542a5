"""PEFT adapters: ``adapter_config.json`` beside ``adapter_model.safetensors`` (or ``.bin``),
as ``PeftModel.save_pretrained`` writes them.

The weights are an ordinary safetensors or torch file, read by its own reader; this module
reads the few configuration values ``list`` shows with them (rank, alpha, target modules).
The config is JSON, read with a size limit, and never imports or runs anything.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from paramctl.errors import CorruptFileError
from paramctl.io.reader import open_reader

__all__ = ["ADAPTER_CONFIG", "ADAPTER_KEYS", "adapter_extra", "read_adapter_config"]

ADAPTER_CONFIG = "adapter_config.json"
# What ``list`` shows of the config, in this order (a missing key is null).
ADAPTER_KEYS = ("peft_type", "base_model_name_or_path", "r", "lora_alpha", "target_modules")
MAX_CONFIG_BYTES = 1 << 20
_WEIGHTS_STEM = "adapter_model"


def _valid(key: str, value: Any) -> bool:
    if value is None:
        return True
    if key in ("peft_type", "base_model_name_or_path"):
        return isinstance(value, str)
    if key == "r":
        return isinstance(value, int) and not isinstance(value, bool)
    if key == "lora_alpha":
        return isinstance(value, int | float) and not isinstance(value, bool)
    # target_modules: a list of names, or one regular expression as a string.
    return isinstance(value, str) or (
        isinstance(value, list) and all(isinstance(v, str) for v in value))


def read_adapter_config(path: Path) -> dict[str, Any]:
    """The :data:`ADAPTER_KEYS` of an ``adapter_config.json``, validated; a malformed file
    is a one-line :class:`CorruptFileError`."""
    reader = open_reader(str(path))
    try:
        if reader.size > MAX_CONFIG_BYTES:
            raise CorruptFileError(f"{path}: {reader.size} bytes, over the "
                                   f"{MAX_CONFIG_BYTES} byte limit for an adapter config")
        raw = reader.pread(reader.size, 0)
    finally:
        reader.close()
    try:
        doc = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CorruptFileError(f"{path}: not a valid adapter config ({reason})") from None
    if not isinstance(doc, dict):
        raise CorruptFileError(f"{path}: not a valid adapter config (a JSON object expected)")
    out: dict[str, Any] = {}
    for key in ADAPTER_KEYS:
        value = doc.get(key)
        if not _valid(key, value):
            raise CorruptFileError(f"{path}: not a valid adapter config ({key!r} is "
                                   f"{type(value).__name__} {json.dumps(value)[:40]})")
        # PEFT keeps target_modules as a set: sorted, the output does not vary run to run.
        out[key] = sorted(value) if isinstance(value, list) else value
    return out


def adapter_extra(weights: Path) -> dict[str, Any] | None:
    """``{"adapter": config}`` when ``weights`` is a PEFT adapter's weights file with its
    ``adapter_config.json`` beside it; ``None`` for any other file."""
    if not weights.name.startswith(_WEIGHTS_STEM):
        return None
    config = weights.parent / ADAPTER_CONFIG
    if not config.is_file():
        return None
    return {"adapter": read_adapter_config(config)}
