"""A folder that holds one weights file stands for that file.

``save_pretrained`` of a small model writes ``hf_model/model.safetensors`` (or
``pytorch_model.bin``) beside ``config.json``; a PEFT adapter ``adapter_model.safetensors``
beside ``adapter_config.json``. :func:`resolve_folder` runs before detection and turns such
a folder into the path of its weights file, so every format reads and writes it as if it
had been named; folders a format claims itself (a sharded index, a DCP ``.metadata``) are
left to that format.
"""

from __future__ import annotations

import os
from pathlib import Path

from paramctl.errors import SourceError
from paramctl.formats import PT_EXTENSIONS
from paramctl.io.reader import is_remote
from paramctl.sources.base import openers

__all__ = ["WEIGHTS_SUFFIXES", "resolve_folder", "weights_files"]

WEIGHTS_SUFFIXES = (".safetensors", *PT_EXTENSIONS)
# The names Hugging Face libraries give a model's weights. In a Trainer checkpoint folder
# (model.safetensors beside optimizer.pt, scheduler.pt, rng_state.pth, training_args.bin)
# the one file so named is the model, as from_pretrained takes it.
WELL_KNOWN = ("model.safetensors", "pytorch_model.bin", "adapter_model.safetensors",
              "adapter_model.bin")


def weights_files(folder: Path) -> list[Path]:
    """Regular files in ``folder`` named like weights, sorted by name (hidden files, such
    as an interrupted write's temporary file, are not candidates)."""
    return sorted(p for p in folder.iterdir()
                  if not p.name.startswith(".") and p.name.lower().endswith(WEIGHTS_SUFFIXES)
                  and p.is_file())


def _shown(name: str) -> str:
    # Names come from the disk: escape control characters so the message stays one line.
    return name.encode("unicode_escape").decode("ascii") if not name.isprintable() else name


def resolve_folder(spec: str) -> str:
    """The single weights file of a folder no format claims; any other ``spec`` unchanged.

    >>> resolve_folder("hf_model")  # doctest: +SKIP
    'hf_model/model.safetensors'
    """
    if is_remote(spec) or not os.path.isdir(spec):
        return spec
    if any(detect(spec) for _, detect, _ in openers()):
        return spec
    folder = Path(spec)
    try:
        found = weights_files(folder)
    except OSError as exc:
        raise SourceError(f"cannot list {spec}: {exc.strerror}") from None
    if len(found) > 1:
        known = [p for p in found if p.name in WELL_KNOWN]
        if len(known) != 1:
            raise SourceError(f"{spec} holds several weights files; name one: "
                              f"{', '.join(_shown(p.name) for p in found)}")
        found = known
    return str(found[0]) if found else spec
