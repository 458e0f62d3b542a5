"""A source seen through ``--strip-prefix``: what every command opens first."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

from paramctl.model import ParamInfo
from paramctl.sources import open_source
from paramctl.sources.base import OpenOptions, Source
from paramctl.sources.statedict import prefix_list, strip_prefixes, warn_prefix_unmatched

__all__ = ["Prefixes", "View", "open_view"]

Prefixes = str | Sequence[str] | None


@dataclass
class View:
    """A source seen through ``--strip-prefix``: shown names map to stored names."""

    source: Source
    params: list[ParamInfo]
    stored: dict[str, str]  # shown -> stored

    @property
    def names(self) -> list[str]:
        return [p.name for p in self.params]

    def groups(self) -> dict[str, tuple[str, ...]]:
        return {p.name: p.tied for p in self.params if p.tied}


def open_view(spec: str, options: OpenOptions | None = None, *,
              prefix: Prefixes = None) -> View:
    """Open ``spec`` and show its names without ``prefix`` (one or several, applied in
    order, each implying a trailing dot); a prefix that matches no name is a warning."""
    source = open_source(spec, options)
    if options is not None and options.weights is not None and source.format == "module":
        from paramctl.weights import weights_loader

        source.load_weights = weights_loader(options)  # type: ignore[attr-defined]
    params = source.params()
    prefixes = prefix_list(prefix)
    if not prefixes:
        return View(source, params, {p.name: p.name for p in params})
    mapping, unmatched = strip_prefixes([p.name for p in params], prefixes)
    for missed in unmatched:
        warn_prefix_unmatched(missed, source.display, list(mapping))
    back = {v: k for k, v in mapping.items()}

    def rename(p: ParamInfo) -> ParamInfo:
        return replace(p, name=back[p.name], tied=tuple(back[t] for t in p.tied))

    return View(source, [rename(p) for p in params], mapping)
