"""The pipeline every command runs: open -> select -> plan -> (write). Pure data in and out.

Commands call :func:`inspect` (list) or :func:`change` (freeze, unfreeze, init, apply);
both return plain records (:mod:`paramctl.model`) that :mod:`paramctl.render` turns into
output. Writing is :func:`paramctl.writers.write`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from paramctl.errors import NoMatchError, OperationError, SourceError, UsageError
from paramctl.io.reader import is_remote
from paramctl.model import FLOAT_DTYPES, Change, ChangeResult, Edit, Inventory
from paramctl.sources.base import OpenOptions
from paramctl.view import Prefixes, View, open_view

if TYPE_CHECKING:
    import torch

    from paramctl.memory import MemEstimate
    from paramctl.rules import InitRule, Step

__all__ = ["Change", "ChangeResult", "View", "change", "check_writable", "inspect", "mem",
           "open_view"]


def _open(spec: str, options: OpenOptions | None, prefix: Prefixes,
          others: Sequence[str], command: str) -> View:
    """:func:`open_view`, saying so when the arguments look swapped (a pattern first)."""
    try:
        return open_view(spec, options, prefix=prefix)
    except SourceError as exc:
        from paramctl.patterns import swapped_arguments_hint

        hint = swapped_arguments_hint(spec, others, command=command)
        if hint is None:
            raise
        raise SourceError(f"{exc}; {hint}") from None


def inspect(spec: str, patterns: Sequence[str] = (), *, excludes: Sequence[str] = (),
            options: OpenOptions | None = None, prefix: Prefixes = None,
            trainable: bool | None = None, allow_empty: bool = False) -> Inventory:
    """List a source's parameters, optionally filtered by patterns and trainable state.

    >>> inv = inspect("sample_models/mlp.py:MLP", ["*.bias"])  # doctest: +SKIP
    """
    view = _open(spec, options, prefix, [*patterns, *excludes], "list")
    params = view.params
    if patterns or excludes:
        from paramctl.patterns import select

        chosen = set(select(view.names, patterns, excludes, allow_empty=allow_empty,
                            default_all=True))
        params = [p for p in params if p.name in chosen]
    if trainable is not None:
        # --frozen lists what is recorded frozen: floating-point tensors that do not train.
        # Integer tensors (num_batches_tracked) are never trainable and never "frozen".
        params = [p for p in params if p.requires_grad == trainable and not p.buffer
                  and p.dtype in FLOAT_DTYPES]
    # Optional: what a source says about itself beyond its tensors (a PEFT adapter's config).
    describe = getattr(view.source, "extra", None)
    # And GGUF's general.* metadata.
    about = getattr(view.source, "metadata", None)
    return Inventory(view.source.display, view.source.format, params,
                     extra=describe() if describe is not None else None,
                     metadata=about() if callable(about) else None)


def mem(spec: str, *, optimizer: str = "adamw", precision: str = "fp32", shards: int = 1,
        zero: int = 0, key: str | None = None, strip_prefix: Prefixes = None,
        options: OpenOptions | None = None) -> MemEstimate:
    """Estimate the memory training ``spec`` needs with its current frozen set.

    Reads what ``inspect`` reads (metadata only for files; ``meta`` for module paths),
    buffers included; see :func:`paramctl.memory.estimate` for the arithmetic.

    >>> paramctl.mem("ckpt.safetensors", precision="bf16-mixed").bytes.total  # doctest: +SKIP
    """
    from dataclasses import replace

    from paramctl.memory import estimate, validate

    validate(optimizer, precision, shards, zero)  # before a slow open, not after
    opts = replace(options or OpenOptions(), buffers=True)
    if key is not None:
        opts = replace(opts, key=key)
    inv = inspect(spec, options=opts, prefix=strip_prefix)
    return estimate(inv.params, source=inv.source, optimizer=optimizer, precision=precision,
                    shards=shards, zero=zero)


def _expand_tied(names: list[str], view: View) -> list[tuple[str, str | None]]:
    groups = view.groups()
    out: list[tuple[str, str | None]] = []
    seen: set[str] = set()
    for name in names:
        if name in seen:
            continue
        seen.add(name)
        out.append((name, None))
        for other in groups.get(name, ()):
            if other not in seen:
                seen.add(other)
                out.append((other, name))
    return out


def _select_for(step: Step, names: list[str], patterns: Sequence[str], *,
                exact: Sequence[str] = (), allow_empty: bool) -> list[str]:
    """:func:`select` for one step; a pattern that matches nothing names the step's place
    in its rules file (``rules.toml: rule 2: pattern 'x' matched no parameter ...``)."""
    from paramctl.patterns import select

    try:
        return select(names, patterns, step.excludes, exact=exact, allow_empty=allow_empty,
                      default_all=False)
    except NoMatchError as exc:
        if not step.where:
            raise
        raise NoMatchError(f"{step.where}: {exc}") from None


def plan(view: View, steps: Sequence[Step], *, allow_empty: bool = False
         ) -> tuple[list[Change], list[str], list[str], dict[str, InitRule]]:
    """Evaluate ``steps`` in order on the current flags; the last step wins per name."""
    from paramctl.rules import check_applies

    info = {p.name: p for p in view.params}
    flags = {p.name: p.requires_grad for p in view.params}
    inits: dict[str, tuple[InitRule, str | None]] = {}
    touched: dict[str, str | None] = {}
    unchanged: list[str] = []
    skipped: list[str] = []
    for step in steps:
        if step.kind in ("freeze", "unfreeze"):
            want = step.kind == "unfreeze"
            chosen = _select_for(step, view.names, step.patterns, exact=step.exact,
                                 allow_empty=allow_empty)
            for name, via in _expand_tied(chosen, view):
                p = info[name]
                if p.buffer or p.dtype not in FLOAT_DTYPES:
                    skipped.append(name)
                    continue
                if flags[name] == want and name not in touched:
                    unchanged.append(name)
                flags[name] = want
                touched.setdefault(name, via)
        else:
            for rule in step.rules:
                chosen = _select_for(step, view.names, [rule.pattern],
                                     allow_empty=allow_empty)
                for name, via in _expand_tied(chosen, view):
                    p = info[name]
                    if p.buffer and view.source.format != "module":
                        raise OperationError(
                            f"cannot initialise buffer {name} ({p.dtype}): a file's "
                            "buffers (running statistics, position ids) are not "
                            "parameters; narrow the pattern to leave it out")
                    check_applies(rule, name, p.shape, p.dtype, FLOAT_DTYPES)
                    inits[name] = (rule, via)
    changes: list[Change] = []
    for p in view.params:
        if p.name in inits:
            rule, via = inits[p.name]
            changes.append(Change(p.name, p.shape, p.dtype, rule.call, p.requires_grad,
                                  flags[p.name], via))
        elif p.name in touched and flags[p.name] != p.requires_grad:
            action = "unfreeze" if flags[p.name] else "freeze"
            changes.append(Change(p.name, p.shape, p.dtype, action, p.requires_grad,
                                  flags[p.name], touched[p.name]))
    unchanged = [n for n in dict.fromkeys(unchanged) if flags[n] == info[n].requires_grad]
    return changes, unchanged, list(dict.fromkeys(skipped)), {n: r for n, (r, _) in inits.items()}


def make_init_fn(rules: dict[str, InitRule], seed: int | None
                 ) -> Callable[[str, torch.Tensor], None]:
    """The callback writers invoke per stored tensor to re-initialise it in place."""
    from paramctl.rules import run_init

    def init_fn(stored_name: str, tensor: torch.Tensor) -> None:
        run_init(rules[stored_name], stored_name, tensor, seed)

    return init_fn


def check_writable(spec: str, dry_run: bool = False) -> None:
    """Refuse a write to a remote source before any request (a dry run only reads)."""
    if is_remote(spec) and not dry_run:
        raise UsageError(f"{spec}: remote sources are read-only; download first")


def change(spec: str, steps: Sequence[Step], *, options: OpenOptions | None = None,
           prefix: Prefixes = None, out: Path | None = None, dry_run: bool = False,
           allow_empty: bool = False, seed: int | None = None,
           max_shard_size: int | None = None,
           progress: Callable[[int, int], None] | None = None, force: bool = False,
           wait: float = 0.0) -> ChangeResult:
    """Apply freeze/unfreeze/init ``steps`` to ``spec`` and save (unless ``dry_run``).

    Nothing is written when nothing changes and no ``out`` was asked for. ``progress`` is
    called with ``(bytes just written, bytes in all)`` while saving. ``force`` and ``wait``
    are :func:`paramctl.writers.write`'s (rewrite a read-only file; wait for a lock).
    """
    from paramctl.rules import CONVERT_KINDS  # `list` (inspect) never needs the rules

    if not steps:
        raise UsageError("nothing to do: give at least one pattern or rule")
    check_writable(spec, dry_run)
    if out is not None and not dry_run:
        from paramctl.writers import check_output_name

        check_output_name(spec, out)  # a mistyped -o fails before the open, not after
    others = [*(p for s in steps for p in s.patterns), *(r.pattern for s in steps
                                                         for r in s.rules)]
    view = _open(spec, options, prefix, others, steps[0].kind)
    from paramctl.writers import check_writable as check_format_writable

    # Before planning: a file whose tensors are all quantised would otherwise report
    # "nothing to change" instead of saying that it can never be written.
    check_format_writable(view.source)
    surgery_steps = [s for s in steps if s.kind in CONVERT_KINDS]
    changes, unchanged, skipped, inits = plan(
        view, [s for s in steps if s.kind not in CONVERT_KINDS], allow_empty=allow_empty)
    result = ChangeResult(view.source.display, view.source.format, changes, unchanged, skipped)
    rows = None
    if surgery_steps:
        from paramctl.surgery import ConvertPlan, describe_rows, plan_convert

        cplan = ConvertPlan.from_steps(surgery_steps)
        rows = plan_convert(view.params, cplan, allow_empty=allow_empty)
        result.notes.extend(describe_rows(rows))
    if dry_run or (not changes and out is None and rows is None):
        return result
    stored = view.stored
    flag_edits = {stored[c.name]: c.after for c in changes if c.before != c.after}
    stored_rules = {stored[name]: rule for name, rule in inits.items()}
    edit = Edit(
        requires_grad=flag_edits,
        init=frozenset(stored_rules),
        init_fn=make_init_fn(stored_rules, seed) if stored_rules else None,
        max_shard_size=max_shard_size,
    )
    notes = getattr(view.source, "conversion_warnings", None)
    if out is not None and notes is not None:
        result.warnings.extend(notes(out))
    total = view.source.total_bytes()
    step = (lambda n: progress(n, total)) if progress is not None else None
    if rows is not None:
        from paramctl.surgery import write_plan

        result.written = write_plan(view, rows, cplan, out, edit=edit,
                                    max_shard_size=max_shard_size, progress=step, force=force,
                                    wait=wait)
        return result
    from paramctl.writers import write

    result.written = write(view.source, edit, out, step, force=force, wait=wait)
    return result
