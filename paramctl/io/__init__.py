"""Byte access: the one layer that touches files (and, behind the same reader interface,
remote byte ranges). Format readers use :mod:`paramctl.io.reader`; writers use
:mod:`paramctl.io.files` (atomic replace, locks, in-kernel copies)."""
