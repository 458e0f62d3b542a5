"""A Lightning callback that applies the frozen flags a checkpoint records.

>>> from paramctl.lightning import ApplyFrozen                      # doctest: +SKIP
>>> trainer = Trainer(callbacks=[ApplyFrozen("ckpt.pt")])            # doctest: +SKIP

Imports Lightning (``lightning.pytorch`` and/or ``pytorch_lightning``, whichever are
installed) when this module is imported; ``import paramctl`` never does.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from paramctl.api import apply_frozen

__all__ = ["ApplyFrozen"]


def _callback_bases() -> tuple[type, ...]:
    """``Callback`` of every Lightning flavour installed: a Trainer of either package then
    accepts the callback (each checks ``isinstance`` against its own ``Callback``)."""
    bases: list[type] = []
    try:
        from lightning.pytorch import Callback as LightningCallback

        bases.append(LightningCallback)
    except ImportError:
        pass
    try:
        from pytorch_lightning import Callback as PLCallback

        bases.append(PLCallback)
    except ImportError:
        pass
    if not bases:
        raise ImportError("paramctl.lightning needs Lightning: pip install lightning "
                          "(or pytorch-lightning)")
    return tuple(bases)


if TYPE_CHECKING:
    from lightning.pytorch import Callback as _Callback
    from lightning.pytorch import LightningModule, Trainer
else:
    _Callback = type("_Callback", _callback_bases(), {})


class ApplyFrozen(_Callback):
    """Freeze, before training starts, the parameters ``path`` records as frozen
    (``paramctl freeze``), so that a ``configure_optimizers`` that passes only
    ``requires_grad`` parameters to the optimizer leaves them out.

    It runs in ``setup(stage="fit")``: after the model is built and before the strategy
    creates the optimizers (``on_fit_start`` would be too late) and wraps the model for
    DDP/FSDP. ``submodule`` applies the flags to ``pl_module.get_submodule(submodule)``
    (say ``"model"`` when the LightningModule holds the network as ``self.model`` and the
    file is that network's checkpoint); ``strip_prefix`` and ``key`` are
    :func:`paramctl.apply_frozen`'s. The names frozen are kept in ``self.frozen``. A model
    built in ``configure_model`` does not exist yet at ``setup``: call
    ``paramctl.apply_frozen`` at the end of ``configure_model`` instead.

    >>> Trainer(callbacks=[ApplyFrozen("ckpt.pt", submodule="model")])  # doctest: +SKIP
    """

    def __init__(self, path: str | os.PathLike[str], *, submodule: str | None = None,
                 strip_prefix: str | Sequence[str] | None = None,
                 key: str | None = None) -> None:
        super().__init__()
        self.path = path
        self.submodule = submodule
        self.strip_prefix = strip_prefix
        self.key = key
        self.frozen: list[str] = []

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        target: Any = pl_module.get_submodule(self.submodule) if self.submodule else pl_module
        self.frozen = apply_frozen(target, self.path, strip_prefix=self.strip_prefix,
                                   key=self.key)
