"""Remote specs: ``https://``/``http://`` URLs and ``hf://ORG/REPO[@REV][/PATH]``.

Importing this module registers the three schemes with
:func:`~paramctl.io.reader.register_scheme`. It imports nothing heavy: the HTTP client
(:mod:`paramctl.io.http`, which loads ``http.client`` and ``ssl``) is imported on the first
remote open, so a local command never pays for it.

An ``hf://`` spec becomes ``{HF_ENDPOINT}/{ORG}/{REPO}/resolve/{REV}/{PATH}`` (``REV``
defaults to ``main``; ``refs/pr/1`` works as written or URL-encoded), sent with
``Authorization: Bearer`` + ``HF_TOKEN`` or the huggingface_hub token file. Without a
``PATH`` (or with one ending in ``/``), :func:`resolve` picks the weights file the way
``from_pretrained`` would: :data:`DEFAULT_FILES`, in order.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import quote, unquote, urlsplit

from paramctl.errors import SourceError, UsageError
from paramctl.io.reader import ByteReader, register_scheme

if TYPE_CHECKING:
    from paramctl.io.http import HttpError, HttpReader

__all__ = ["DEFAULT_FILES", "HubFile", "endpoint", "parse", "resolve", "token"]

DEFAULT_ENDPOINT = "https://huggingface.co"
DEFAULT_FILES = (
    "model.safetensors.index.json",
    "model.safetensors",
    "pytorch_model.bin.index.json",
    "pytorch_model.bin",
)
_NAME = re.compile(r"[\w.-]+")
_REPO_ERRORS = ("RepoNotFound", "RevisionNotFound")
_KINDS = {"models": "", "datasets": "datasets", "spaces": "spaces"}


@dataclass(frozen=True)
class HubFile:
    """A parsed ``hf://`` spec."""

    repo: str  # ORG/NAME
    revision: str
    path: str  # inside the repository; "" or ending in "/" for a folder
    kind: str = ""  # "" (a model), "datasets" or "spaces"

    def url(self, base: str) -> str:
        prefix = f"{self.kind}/" if self.kind else ""
        return (f"{base}/{prefix}{self.repo}/resolve/{quote(self.revision, safe='')}/"
                f"{quote(self.path, safe='/')}")

    @property
    def is_folder(self) -> bool:
        return self.path == "" or self.path.endswith("/")


def parse(spec: str) -> HubFile:
    """``hf://ORG/REPO[@REV][/PATH]`` (optionally ``hf://datasets/ORG/REPO...``).

    >>> parse("hf://org/repo@refs/pr/1/model.safetensors").revision
    'refs/pr/1'
    """
    parts = spec.removeprefix("hf://").split("/")
    kind = ""
    if parts[0] in _KINDS and len(parts) >= 3:
        kind = _KINDS[parts.pop(0)]
    org = parts[0]
    name, at, revision = (parts[1] if len(parts) > 1 else "").partition("@")
    rest = parts[2:]
    if at and revision == "refs" and len(rest) >= 2:  # refs/pr/1, refs/convert/parquet
        revision, rest = "/".join(["refs", *rest[:2]]), rest[2:]
    revision = unquote(revision) if at else "main"
    if not (_NAME.fullmatch(org) and _NAME.fullmatch(name) and revision):
        raise UsageError(f"bad hf:// spec {spec!r}: expected hf://ORG/REPO[@REVISION][/PATH], "
                         "e.g. hf://openai-community/gpt2")
    return HubFile(f"{org}/{name}", revision, "/".join(rest), kind)


def endpoint() -> str:
    return (os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")


def token() -> str | None:
    """``HF_TOKEN``, else the token file huggingface_hub's ``login`` writes."""
    found = os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN")
    if found and found.strip():
        return found.strip()
    path = os.environ.get("HF_TOKEN_PATH")
    if not path:
        cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"),
                                                                 ".cache")
        path = os.path.join(os.environ.get("HF_HOME") or os.path.join(cache, "huggingface"),
                            "token")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read().strip()
    except (OSError, UnicodeDecodeError):
        return None
    return text or None


def _check_online() -> None:
    if os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE"):
        raise SourceError("HF_HUB_OFFLINE is set: remote sources are disabled; unset it or "
                          "download the files")


def _origin(url: str) -> tuple[str, str]:
    parts = urlsplit(url)
    return parts.scheme.lower(), parts.netloc.lower()


def _hub_error(exc: HttpError, name: str, repo: str | None, revision: str | None,
               token_sent: bool) -> HttpError:
    """The Hub's answers, in words that say what to do."""
    from paramctl.io.http import HttpError

    status, code = exc.status, exc.error_code
    if status in (401, 403) and not token_sent:
        text = f"gated or private repository (HTTP {status}): set HF_TOKEN"
    elif status == 401:
        text = "the token was not accepted (HTTP 401): check HF_TOKEN"
    elif status == 403:
        text = ("gated or private repository (HTTP 403): the token has no access to it; "
                "request access on the repository's page")
    elif status == 404 and code == "RepoNotFound":
        text = f"repository {repo or ''} not found (HTTP 404)".replace("  ", " ")
    elif status == 404 and code == "RevisionNotFound":
        text = f"revision {revision!r} not found (HTTP 404)"
    elif status == 404 and repo is not None:
        text = f"no such file in {repo} at revision {revision!r} (HTTP 404)"
    else:
        return exc
    return HttpError(f"{name}: {text}", status, code)


def _auth() -> dict[str, str]:
    found = token()
    return {"Authorization": f"Bearer {found}"} if found else {}


def open_url(spec: str) -> ByteReader:
    """An ``https://`` or ``http://`` file; the token goes only to the Hub's own host."""
    _check_online()
    from paramctl.io.http import HttpError, HttpReader

    on_hub = _origin(spec) == _origin(endpoint())
    headers = _auth() if on_hub else {}
    try:
        return HttpReader(spec, headers=headers)
    except HttpError as exc:
        if not on_hub:
            raise
        raise _hub_error(exc, spec, None, None, bool(headers)) from None


# Readers opened while probing for a repository's weights file, handed to the open that
# follows (the probe already fetched the file's first 100 KiB: no second request for it).
_PROBED: dict[str, HttpReader] = {}


def _open_file(spec: str, file: HubFile, repo_spec: str | None = None) -> HttpReader:
    """``repo_spec`` names errors about the repository itself (access, repository or
    revision not found) when probing its files."""
    from paramctl.io.http import HttpError, HttpReader

    headers = _auth()
    try:
        return HttpReader(file.url(endpoint()), name=spec, headers=headers)
    except HttpError as exc:
        about_repo = exc.status in (401, 403) or exc.error_code in _REPO_ERRORS
        name = repo_spec if repo_spec is not None and about_repo else spec
        raise _hub_error(exc, name, file.repo, file.revision, bool(headers)) from None


def open_hf(spec: str) -> ByteReader:
    """The file an ``hf://`` spec names (resolved first when it names a repository)."""
    _check_online()
    spec = resolve(spec)
    probed = _PROBED.pop(spec, None)
    if probed is not None:
        return probed
    return _open_file(spec, parse(spec))


def resolve(spec: str) -> str:
    """An ``hf://`` spec naming a repository (or a folder, ending in ``/``) -> the spec of
    its weights file, the first of :data:`DEFAULT_FILES` that exists. Any other spec is
    returned unchanged."""
    if not spec.startswith("hf://"):
        return spec
    _check_online()
    file = parse(spec)
    if not file.is_folder:
        return spec
    from paramctl.io.http import HttpError

    base = spec if spec.endswith("/") else spec + "/"
    for name in DEFAULT_FILES:
        candidate = base + name
        try:
            reader = _open_file(candidate, parse(candidate), spec)
        except HttpError as exc:
            if exc.status == 404 and exc.error_code not in _REPO_ERRORS:
                continue
            raise
        _PROBED.clear()
        _PROBED[candidate] = reader
        return candidate
    raise SourceError(f"{spec}: no weights file found (tried {', '.join(DEFAULT_FILES)}: "
                      f"HTTP 404 each); name the file: {base}FILE")


register_scheme("https://", open_url)
register_scheme("http://", open_url)
register_scheme("hf://", open_hf)
