"""Write deterministic checkpoints of every sample model.

Usage::

    python sample_models/make_checkpoints.py OUTDIR [--seed N]

For each model ``NAME`` in ``mlp``, ``cnn``, ``transformer`` and ``llama`` (default kwargs) this
writes ``OUTDIR/NAME.pt`` (``torch.save(model.state_dict())``) and ``OUTDIR/NAME.safetensors``,
plus ``OUTDIR/transformer_nested.pt``: a training-style checkpoint
``{"model": ..., "optimizer": ..., "epoch": 3, "config": {...}}``. The same seed gives
byte-identical files. Tests can call :func:`make_all` in-process.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from safetensors.torch import save_file, save_model
from torch import nn

# Let ``python sample_models/make_checkpoints.py`` work from any cwd: the package imports below
# need the repository root on sys.path.
_REPO_ROOT = str(Path(__file__).resolve().parent.parent)
if _REPO_ROOT not in sys.path:
    sys.path.insert(0, _REPO_ROOT)

from sample_models.cnn import SmallCNN  # noqa: E402
from sample_models.llama import Llama  # noqa: E402
from sample_models.mlp import MLP  # noqa: E402
from sample_models.transformer import TinyTransformer  # noqa: E402

# Hugging Face writes this metadata into every safetensors file it saves.
_ST_METADATA = {"format": "pt"}


def _build_mlp(seed: int) -> nn.Module:
    """MLP with default kwargs."""
    torch.manual_seed(seed)
    return MLP()


def _build_cnn(seed: int) -> nn.Module:
    """SmallCNN after one train-mode forward pass, so BatchNorm running stats are non-trivial."""
    torch.manual_seed(seed)
    model = SmallCNN()
    model.train()
    with torch.no_grad():
        model(torch.randn(4, 3, 8, 8) * 2.0 + 0.5)
    model.eval()
    return model


def _build_transformer(seed: int) -> nn.Module:
    """TinyTransformer with default kwargs (``lm_head.weight`` tied to ``embed.weight``)."""
    torch.manual_seed(seed)
    return TinyTransformer()


def _build_llama(seed: int) -> nn.Module:
    """Llama with default (tiny) kwargs, untied embeddings."""
    torch.manual_seed(seed)
    return Llama()


_BUILDERS: dict[str, Callable[[int], nn.Module]] = {
    "mlp": _build_mlp,
    "cnn": _build_cnn,
    "transformer": _build_transformer,
    "llama": _build_llama,
}


def _save_safetensors(model: nn.Module, path: Path) -> None:
    """Save ``model`` as safetensors.

    Tied tensors cannot be stored twice in safetensors, so models with shared weights go
    through ``safetensors.torch.save_model``: it keeps the alphabetically first name of each
    shared group (``embed.weight`` for TinyTransformer, so ``lm_head.weight`` is dropped, as
    Hugging Face does) and records the dropped name in ``__metadata__`` as
    ``{"lm_head.weight": "embed.weight"}``. Load it back with ``safetensors.torch.load_model``
    (or ``load_state_dict(strict=False)``; the tie restores ``lm_head.weight``).
    """
    state = model.state_dict()
    ptrs = [t.untyped_storage().data_ptr() for t in state.values()]
    if len(set(ptrs)) != len(ptrs):
        save_model(model, str(path), metadata=dict(_ST_METADATA))
    else:
        save_file({k: v.contiguous() for k, v in state.items()}, str(path), metadata=_ST_METADATA)
    # safetensors >= 0.8 creates its file with mode 0600; give it the umask-derived mode that
    # torch.save (a plain open()) produces, so every fixture has the same permissions.
    os.chmod(path, 0o666 & ~_current_umask())


def _current_umask() -> int:
    """Return the process umask (os.umask can only be read by setting it, so restore it)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _nested_transformer(seed: int) -> dict[str, object]:
    """A training checkpoint: TinyTransformer after one real AdamW step, with optimizer state.

    ``model`` is the state after the step, so it matches ``optimizer`` (it differs from
    ``transformer.pt``, which holds the freshly initialised weights).
    """
    model = _build_transformer(seed)  # seeds the RNG; the batch below continues from it
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    tokens = torch.randint(0, 64, (2, 8))
    logits = model(tokens[:, :-1])
    loss = nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1)
    )
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "epoch": 3,
        "config": {"vocab": 64, "dim": 32},
    }


def make_all(outdir: Path, seed: int = 0) -> dict[str, Path]:
    """Write every sample checkpoint into ``outdir`` (created if missing).

    Returns file name -> path, with keys ``"mlp.pt"``, ``"mlp.safetensors"``, ...,
    ``"llama.safetensors"`` and ``"transformer_nested.pt"``. Output is deterministic (byte for
    byte) for a given ``seed``.
    """
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    for name, build in _BUILDERS.items():
        model = build(seed)
        pt_path = outdir / f"{name}.pt"
        torch.save(model.state_dict(), pt_path)
        written[pt_path.name] = pt_path
        st_path = outdir / f"{name}.safetensors"
        _save_safetensors(model, st_path)
        written[st_path.name] = st_path
    nested_path = outdir / "transformer_nested.pt"
    torch.save(_nested_transformer(seed), nested_path)
    written[nested_path.name] = nested_path
    return written


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; prints one written path per line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("outdir", type=Path, help="folder to write the checkpoints into")
    parser.add_argument("--seed", type=int, default=0, help="torch seed (default: 0)")
    args = parser.parse_args(argv)
    for path in make_all(args.outdir, seed=args.seed).values():
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
