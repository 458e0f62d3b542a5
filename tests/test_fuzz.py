"""Fuzzing: mutated real checkpoints are either listed or refused with one line.

Seeds are the small sample checkpoints, two small GGUF files, and what real training code
saves: a Lightning ``Trainer`` checkpoint (inert placeholders for its hyper-parameters), a
whole pickled ``nn.Module`` with tied weights and buffers, and legacy (pre-1.6, non-zip)
files. Mutations are raw (truncate, flip, overwrite, splice, insert, delete bytes; half of
them aimed at the part the parser reads: the pickle and central directory of a torch zip,
the pickles of a legacy file, the header of a safetensors or GGUF file) and structured
(opcode-level edits of data.pkl or of a legacy file's object pickle, dropped or resized zip
records, JSON-level edits of a safetensors header with a correct length prefix, field-level
edits of a GGUF header: any count, length, type, dimension or offset set to an edge value,
fields dropped or repeated). Every prefix of a GGUF file is listed too (deterministic).

In-process (``paramctl.core.inspect``, fast): the only acceptable outcomes are success or a
``ParamctlError`` with a one-line message, within ``PER_EXAMPLE_SECONDS``. A listed mutant
is also frozen to a new file, which must list again with everything frozen (a listed GGUF
mutant must instead refuse the write with exit 2: GGUF is read-only). A few
mutants go through the real CLI in a subprocess under RLIMIT_AS = 1 GiB.

``PARAMCTL_FUZZ_EXAMPLES`` sets the in-process examples per format (default 150, for CI);
for a long local run: ``PARAMCTL_FUZZ_EXAMPLES=20000 pytest tests/test_fuzz.py -s``
(``-s`` prints the outcome summary).
"""

from __future__ import annotations

import io
import json
import os
import pickletools
import resource
import signal
import struct
import subprocess
import sys
import zipfile
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType
from typing import Any

import gguf
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from paramctl import surgery
from paramctl.core import change, inspect
from paramctl.errors import CorruptFileError, ParamctlError
from paramctl.rules import Step
from paramctl.surgery import ConvertPlan, convert

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = int(os.environ.get("PARAMCTL_FUZZ_EXAMPLES", "150"))
CLI_EXAMPLES = max(5, EXAMPLES // 15)
PER_EXAMPLE_SECONDS = 5.0
MEMORY_LIMIT = 1 << 30

PT_SEEDS = ("mlp.pt", "cnn.pt", "transformer.pt", "transformer_nested.pt", "lightning.ckpt",
            "module.pt")
ST_SEEDS = ("mlp.safetensors", "cnn.safetensors", "transformer.safetensors")
# Plain state dicts: a rewrite of a legacy file converts it to a zip state dict, and a
# converted module's buffers would be plain tensors there (not all frozen).
LEGACY_SEEDS = ("cnn_legacy.pt", "transformer_legacy.pt")

OUTCOMES: dict[str, Counter[str]] = {"pt": Counter(), "safetensors": Counter(),
                                     "gguf": Counter(),
                                     "legacy": Counter()}

FUZZ_SETTINGS = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


class _Timeout(BaseException):
    """Raised from SIGALRM; a BaseException so that no ``except Exception`` swallows it."""


def _alarm(signum: int, frame: FrameType | None) -> None:
    raise _Timeout


class _Seeds(dict[str, bytes]):
    """The seed files; a short repr keeps hypothesis' falsifying examples readable."""

    def __repr__(self) -> str:
        return f"<seeds {sorted(self)}>"


@pytest.fixture(scope="module")
def seeds(samples_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    import torch
    from realworld_models import lightning_checkpoint, tied_model

    extra = tmp_path_factory.mktemp("fuzz_seeds")
    lightning_checkpoint(extra / "lightning.ckpt")
    torch.save(tied_model(), extra / "module.pt")
    for name in ("cnn", "transformer"):
        torch.save(torch.load(samples_dir / f"{name}.pt", weights_only=True),
                   extra / f"{name}_legacy.pt", _use_new_zipfile_serialization=False)
    return _Seeds({name: ((samples_dir / name) if (samples_dir / name).exists()
                          else extra / name).read_bytes()
                   for name in PT_SEEDS + ST_SEEDS + LEGACY_SEEDS})


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


@pytest.fixture(scope="module", autouse=True)
def _report() -> Iterator[None]:
    start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    yield
    grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - start) // 1024
    for fmt, counts in OUTCOMES.items():
        total = sum(counts.values())
        print(f"\nfuzz {fmt}: {total} examples")
        for outcome, n in counts.most_common():
            print(f"  {n:6d}  {outcome}")
    print(f"peak RSS growth during fuzzing: {grown} MiB")
    # A mutant that made paramctl allocate hundreds of MB would show here.
    assert grown < 512


# ---------------------------------------------------------------------------------------
# mutations


def _zip_layout(data: bytes) -> tuple[str, dict[str, bytes], list[tuple[int, int]]]:
    """(prefix, records, regions worth aiming at: data.pkl bytes, central directory)."""
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        infos = zf.infolist()
        records = {i.filename: zf.read(i.filename) for i in infos}
        prefix = infos[0].filename.split("/", 1)[0] + "/"
        pkl = zf.getinfo(prefix + "data.pkl")
    start = pkl.header_offset + 30 + len(pkl.filename.encode()) + len(pkl.extra)
    central = max(i.header_offset for i in infos)
    return prefix, records, [(start, start + pkl.file_size), (central, len(data))]


def _pack(records: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
        for name, payload in records.items():
            zf.writestr(name, payload)
    return buf.getvalue()


_INTERESTING = [0x00, 0x01, 0x7F, 0x80, 0xFF, *b".()]}NRbcsuhqXKJ\x85\x86\x87\x93\x94\x81"]
_OPCODES = [op.code.encode("latin-1") for op in pickletools.opcodes]


@st.composite
def byte_mutations(draw: st.DrawFn, data: bytes, regions: list[tuple[int, int]]) -> bytes:
    buf = bytearray(data)
    for _ in range(draw(st.integers(1, 4))):
        if not buf:
            break
        lo, hi = 0, len(buf)
        if regions and draw(st.booleans()):
            lo, hi = draw(st.sampled_from(regions))
            lo, hi = min(lo, len(buf) - 1), min(max(hi, lo + 1), len(buf))
        pos = draw(st.integers(lo, hi - 1))
        kind = draw(st.sampled_from(
            ["truncate", "flip", "set", "splice", "insert", "delete", "duplicate"]))
        if kind == "truncate":
            del buf[pos:]
        elif kind == "flip":
            buf[pos] ^= 1 << draw(st.integers(0, 7))
        elif kind == "set":
            buf[pos] = draw(st.sampled_from(_INTERESTING) | st.integers(0, 255))
        elif kind == "splice":  # overwrite with bytes from elsewhere in the file
            src = draw(st.integers(0, len(buf) - 1))
            n = draw(st.integers(1, 64))
            chunk = buf[src:src + n]
            buf[pos:pos + len(chunk)] = chunk
        elif kind == "insert":
            buf[pos:pos] = draw(st.binary(min_size=1, max_size=16))
        elif kind == "delete":
            del buf[pos:pos + draw(st.integers(1, 64))]
        else:
            n = draw(st.integers(1, 64))
            buf[pos:pos] = buf[pos:pos + n]
    return bytes(buf)


@st.composite
def pickle_mutations(draw: st.DrawFn, pkl: bytes) -> bytes:
    """Opcode-level edits: replace, delete, duplicate or insert whole opcodes."""
    starts = [pos for _, _, pos in pickletools.genops(pkl)] + [len(pkl)]
    buf = bytearray(pkl)
    for _ in range(draw(st.integers(1, 3))):
        i = draw(st.integers(0, len(starts) - 2))
        a, b = starts[i], starts[i + 1]
        kind = draw(st.sampled_from(["opcode", "delete", "duplicate", "insert", "arg"]))
        if a >= len(buf):
            break
        if kind == "opcode":
            buf[a:a + 1] = draw(st.sampled_from(_OPCODES))
        elif kind == "delete":
            del buf[a:b]
        elif kind == "duplicate":
            buf[a:a] = buf[a:b]
        elif kind == "insert":
            buf[a:a] = draw(st.sampled_from(_OPCODES)) + draw(st.binary(max_size=8))
        elif b - a > 1:
            p = draw(st.integers(a + 1, b - 1))
            buf[p] = draw(st.sampled_from(_INTERESTING) | st.integers(0, 255))
    return bytes(buf)


@st.composite
def pt_mutants(draw: st.DrawFn, seeds: dict[str, bytes]) -> bytes:
    data = seeds[draw(st.sampled_from(PT_SEEDS))]
    prefix, records, regions = _zip_layout(data)
    mode = draw(st.sampled_from(["bytes", "pickle", "records"]))
    if mode == "bytes":
        return draw(byte_mutations(data, regions))
    if mode == "pickle":
        records[prefix + "data.pkl"] = draw(pickle_mutations(records[prefix + "data.pkl"]))
        return _pack(records)
    name = draw(st.sampled_from(sorted(records)))
    action = draw(st.sampled_from(["drop", "shrink", "grow", "rename", "empty"]))
    if action == "drop":
        del records[name]
    elif action == "shrink":
        records[name] = records[name][: draw(st.integers(0, max(0, len(records[name]) - 1)))]
    elif action == "grow":
        records[name] += draw(st.binary(min_size=1, max_size=32))
    elif action == "rename":
        new = draw(st.sampled_from([f"{prefix}data/99", f"{prefix}data.pkl", "x/data.pkl",
                                    f"{prefix}data/0", f"{prefix}code/a.py"])
                   | st.text("abc019_./\n\u00e9", min_size=1, max_size=12))
        if new.strip("/") and not new.endswith("/"):
            records[new] = records.pop(name)
    else:
        records[name] = b""
    return _pack(records)


def _legacy_object_pickle(data: bytes) -> tuple[int, int]:
    """Where a legacy file's fourth pickle (the object itself) starts and ends."""
    stream = io.BytesIO(data)
    for _ in range(3):
        for _op in pickletools.genops(stream):
            pass
    start = stream.tell()
    for _op in pickletools.genops(stream):
        pass
    return start, stream.tell()


@st.composite
def legacy_mutants(draw: st.DrawFn, seeds: dict[str, bytes]) -> bytes:
    data = seeds[draw(st.sampled_from(LEGACY_SEEDS))]
    start, end = _legacy_object_pickle(data)
    if draw(st.booleans()):
        return draw(byte_mutations(data, [(0, start), (start, end), (end, len(data))]))
    return data[:start] + draw(pickle_mutations(data[start:end])) + data[end:]


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.integers(-1, 10_000)
    | st.floats(allow_nan=False) | st.text(max_size=8)
    | st.sampled_from(["F32", "BF16", "I64", "BOOL", "F8_E4M3", "Q4", "__metadata__"]),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=6), children, max_size=4),
    max_leaves=8,
)


def _int_pair(value: object) -> bool:
    return isinstance(value, list) and len(value) == 2 and all(type(v) is int for v in value)


@st.composite
def st_mutants(draw: st.DrawFn, seeds: dict[str, bytes]) -> bytes:
    data = seeds[draw(st.sampled_from(ST_SEEDS))]
    (n,) = struct.unpack("<Q", data[:8])
    if draw(st.booleans()):
        return draw(byte_mutations(data, [(0, 8), (8, 8 + n)]))
    header = json.loads(data[8:8 + n])
    for _ in range(draw(st.integers(1, 3))):
        key = draw(st.sampled_from(sorted(header)))
        entry = header[key]
        field = draw(st.sampled_from(["dtype", "shape", "data_offsets", "*", "key"]))
        if field == "key":
            header[draw(st.text(max_size=8))] = header.pop(key)
        elif field == "*" or not isinstance(entry, dict):
            header[key] = draw(_JSON)
        elif field == "data_offsets" and _int_pair(entry.get("data_offsets")) \
                and draw(st.booleans()):
            begin, end = entry["data_offsets"]
            entry["data_offsets"] = [begin + draw(st.integers(-16, 16)),
                                     end + draw(st.integers(-16, 16))]
        else:
            entry[field] = draw(_JSON)
    body = json.dumps(header).encode()
    return struct.pack("<Q", len(body)) + body + data[8 + n:]


# GGUF: a file from llama.cpp's writer for byte mutations, and a header spelled out field by
# field (("u32" | "u64", value), ("raw", bytes), ("pad", 0) = padding to 32) for edits that
# keep every other field intact.

GgufToken = tuple[str, Any]


def _gguf_writer_seed(path: Path) -> None:
    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(path, "llama")
    w.add_name("fuzz seed")
    w.add_array("general.tags", ["a", "b"])
    w.add_float32("general.temp", 0.5)
    w.add_token_list([f"t{i}" for i in range(24)])
    w.add_token_scores([0.5] * 24)
    w.add_tensor("token_embd.weight", rng.standard_normal((8, 32)).astype(np.float16))
    w.add_tensor("blk.0.attn_norm.weight", np.ones(32, np.float32))
    w.add_tensor("blk.0.ffn_up.weight", gguf.quants.quantize(
        rng.standard_normal((4, 64), dtype=np.float32), gguf.GGMLQuantizationType.Q8_0),
        raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    w.add_tensor("blk.0.ffn_down.weight", gguf.quants.quantize(
        rng.standard_normal((2, 32), dtype=np.float32), gguf.GGMLQuantizationType.Q4_0),
        raw_dtype=gguf.GGMLQuantizationType.Q4_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _gguf_fields() -> list[GgufToken]:
    t: list[GgufToken] = [("raw", b"GGUF"), ("u32", 3), ("u64", 3), ("u64", 5)]

    def text(value: str) -> None:
        raw = value.encode()
        t.extend([("u64", len(raw)), ("raw", raw)])

    def key(name: str, vtype: int) -> None:
        text(name)
        t.append(("u32", vtype))

    key("general.name", 8)
    text("seed")
    key("general.alignment", 4)
    t.append(("u32", 32))
    key("general.tags", 9)
    t.extend([("u32", 8), ("u64", 2)])
    text("a")
    text("b")
    key("tokenizer.ggml.tokens", 9)
    t.extend([("u32", 8), ("u64", 20)])
    for i in range(20):
        text(f"t{i}")
    key("general.nested", 9)  # [[1], []] as arrays of uint32
    t.extend([("u32", 9), ("u64", 2), ("u32", 4), ("u64", 1), ("u32", 1), ("u32", 4),
              ("u64", 0)])
    for name, ne, ggml_type, offset in [("a.weight", (4, 2), 0, 0), ("b.weight", (32, 2), 8, 32),
                                        ("c.bias", (3,), 1, 128)]:
        text(name)
        t.append(("u32", len(ne)))
        t.extend(("u64", d) for d in ne)
        t.extend([("u32", ggml_type), ("u64", offset)])
    t.extend([("pad", 0), ("raw", bytes(range(160)))])
    return t


def _encode(tokens: list[GgufToken]) -> bytes:
    out = bytearray()
    for kind, value in tokens:
        if kind == "u32":
            out += struct.pack("<I", value % 2**32)
        elif kind == "u64":
            out += struct.pack("<Q", value % 2**64)
        elif kind == "pad":
            out += b"\0" * (-len(out) % 32)
        else:
            out += value
    return bytes(out)


_EDGES = [0, 1, 2, 3, 4, 5, 7, 8, 9, 12, 13, 16, 31, 32, 33, 99, 255, 2**16, 2**31,
          2**32 - 1, 2**32, 2**40, 2**60, 2**63 - 1, 2**63, 2**64 - 1]


@st.composite
def gguf_field_mutants(draw: st.DrawFn) -> bytes:
    tokens = _gguf_fields()
    for _ in range(draw(st.integers(1, 3))):
        i = draw(st.integers(0, len(tokens) - 1))
        kind, value = tokens[i]
        action = draw(st.sampled_from(["set", "set", "set", "nudge", "drop", "repeat"]))
        if action == "drop":
            del tokens[i]
        elif action == "repeat":
            tokens.insert(i, tokens[i])
        elif kind in ("u32", "u64"):
            if action == "nudge":
                tokens[i] = (kind, max(0, value + draw(st.integers(-3, 3))))
            else:
                tokens[i] = (kind, draw(st.sampled_from(_EDGES) | st.integers(0, 2**64 - 1)))
        elif kind == "raw" and value:
            raw = bytearray(value)
            raw[draw(st.integers(0, len(raw) - 1))] = draw(st.integers(0, 255))
            tokens[i] = (kind, bytes(raw))
    return _encode(tokens)


@st.composite
def gguf_mutants(draw: st.DrawFn, seed: tuple[bytes, int]) -> bytes:
    data, data_start = seed
    if draw(st.booleans()):
        return draw(byte_mutations(data, [(0, 24), (24, data_start)]))
    return draw(gguf_field_mutants())


# ---------------------------------------------------------------------------------------
# the in-process property


def _outcome(exc: BaseException | None) -> str:
    if exc is None:
        return "listed"
    words = " ".join(str(exc).split(": ", 1)[-1].split()[:5])
    return f"{type(exc).__name__}: {words}"


def _check_in_process(path: Path, fmt: str, workdir: Path) -> None:
    previous = signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, PER_EXAMPLE_SECONDS)
    try:
        try:
            inventory = inspect(str(path))
        except ParamctlError as exc:
            message = str(exc)
            assert message and "\n" not in message and "\r" not in message, repr(message)
            assert exc.exit_code == 1, (exc.exit_code, message)
            OUTCOMES[fmt][_outcome(exc)] += 1
            return
        OUTCOMES[fmt]["listed"] += 1
        if fmt == "gguf":
            _check_read_only(path)
        else:
            _check_rewrite(path, fmt, workdir, len(inventory.params))
    except _Timeout:
        pytest.fail(f"paramctl took over {PER_EXAMPLE_SECONDS}s on this mutant")
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _check_read_only(path: Path) -> None:
    """A listed GGUF file refuses every write with exit 2, and stays as it was."""
    before = path.read_bytes()
    with pytest.raises(ParamctlError) as caught:
        change(str(path), [Step("freeze", patterns=("*",))], allow_empty=True)
    assert caught.value.exit_code == 2, str(caught.value)
    assert "read-only" in str(caught.value)
    assert path.read_bytes() == before
    OUTCOMES["gguf"]["listed; write refused"] += 1


def _check_rewrite(path: Path, fmt: str, workdir: Path, count: int) -> None:
    """A listed mutant can be frozen to a new file, which lists again, all frozen; and
    cast to bfloat16 through the streaming path (read-ahead thread, cast, writer thread;
    pieces of 96 bytes so the small seeds take it), which lists again."""
    out = workdir / f"out{path.suffix}"
    if _written(fmt, workdir, out, "freeze", lambda: change(
            str(path), [Step("freeze", patterns=("*",))], out=out, allow_empty=True)):
        again = inspect(str(out))
        assert len(again.params) == count
        assert not any(p.requires_grad for p in again.params)
        OUTCOMES[fmt]["listed; frozen copy lists again"] += 1
    cast = workdir / "cast.safetensors"  # the streaming writer
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(surgery, "_CAST_STEP", 96)
        written = _written(fmt, workdir, cast, "cast", lambda: convert(
            str(path), ConvertPlan.parse(cast="bfloat16", allow_overflow=True), out=cast,
            allow_empty=True))
    if written:
        assert len(inspect(str(cast)).params) == count
        OUTCOMES[fmt]["listed; bf16 copy lists again"] += 1


def _written(fmt: str, workdir: Path, out: Path, what: str, write: Callable[[], object]
             ) -> bool:
    """Run ``write`` to a fresh ``out``: True when it wrote, False when it refused in one
    line and left nothing behind."""
    out.unlink(missing_ok=True)
    try:
        write()
    except ParamctlError as exc:
        assert "\n" not in str(exc), repr(str(exc))
        OUTCOMES[fmt][f"listed; {what} refused: " + _outcome(exc)] += 1
        assert not [p for p in workdir.iterdir() if ".paramctl-" in p.name]
        return False
    return True


@FUZZ_SETTINGS
@given(data=st.data())
def test_fuzz_pt_in_process(data: st.DataObject, seeds: dict[str, bytes],
                            workdir: Path) -> None:
    mutant = data.draw(pt_mutants(seeds))
    path = workdir / "mutant.pt"
    path.write_bytes(mutant)
    _check_in_process(path, "pt", workdir)


@pytest.fixture(scope="module")
def gguf_seed(workdir: Path) -> tuple[bytes, int]:
    """The writer's file and where its data section starts (as gguf-py's reader says)."""
    path = workdir / "seed.gguf"
    _gguf_writer_seed(path)
    return path.read_bytes(), int(gguf.GGUFReader(path).data_offset)


@FUZZ_SETTINGS
@given(data=st.data())
def test_fuzz_gguf_in_process(data: st.DataObject, gguf_seed: tuple[bytes, int],
                              workdir: Path) -> None:
    mutant = data.draw(gguf_mutants(gguf_seed))
    path = workdir / "mutant.gguf"
    path.write_bytes(mutant)
    _check_in_process(path, "gguf", workdir)


def test_gguf_every_prefix(gguf_seed: tuple[bytes, int], workdir: Path) -> None:
    """Each cut of the file is refused with one line until every tensor's bytes are in it;
    from there on (only padding is missing) it lists exactly as the whole file does."""
    data, _ = gguf_seed
    path = workdir / "prefix.gguf"
    path.write_bytes(data)
    reader = gguf.GGUFReader(path)
    needed = max(int(t.data_offset) + int(t.n_bytes) for t in reader.tensors)
    whole = inspect(str(path)).params
    for n in range(len(data)):
        path.write_bytes(data[:n])
        try:
            listed = inspect(str(path)).params
        except CorruptFileError as exc:
            assert n < needed, (n, str(exc))
            assert "\n" not in str(exc) and str(exc).startswith(f"{path}: "), str(exc)
            continue
        assert n >= needed, n
        assert listed == whole
    OUTCOMES["gguf"][f"every prefix of {len(data)} bytes"] += 1


@FUZZ_SETTINGS
@given(data=st.data())
def test_fuzz_legacy_in_process(data: st.DataObject, seeds: dict[str, bytes],
                                workdir: Path) -> None:
    mutant = data.draw(legacy_mutants(seeds))
    path = workdir / "legacy_mutant.pt"
    path.write_bytes(mutant)
    _check_in_process(path, "legacy", workdir)


@FUZZ_SETTINGS
@given(data=st.data())
def test_fuzz_safetensors_in_process(data: st.DataObject, seeds: dict[str, bytes],
                                     workdir: Path) -> None:
    mutant = data.draw(st_mutants(seeds))
    path = workdir / "mutant.safetensors"
    path.write_bytes(mutant)
    _check_in_process(path, "safetensors", workdir)


# ---------------------------------------------------------------------------------------
# through the CLI, under a memory limit


def _run_limited(path: Path) -> subprocess.CompletedProcess[str]:
    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))

    return subprocess.run(
        [sys.executable, "-m", "paramctl", "list", str(path)], capture_output=True, text=True,
        cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=60, preexec_fn=limit,
    )


def _check_cli(path: Path) -> None:
    result = _run_limited(path)
    assert "Traceback" not in result.stderr, result.stderr
    assert result.returncode in (0, 1), (result.returncode, result.stderr)
    if result.returncode == 1:
        lines = result.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
        assert "internal error" not in lines[0], lines[0]
    else:
        assert result.stdout


CLI_SETTINGS = settings(max_examples=CLI_EXAMPLES, deadline=None,
                        suppress_health_check=[HealthCheck.too_slow])


@CLI_SETTINGS
@given(data=st.data())
def test_fuzz_pt_cli(data: st.DataObject, seeds: dict[str, bytes], workdir: Path) -> None:
    path = workdir / "cli_mutant.pt"
    path.write_bytes(data.draw(pt_mutants(seeds)))
    _check_cli(path)


@CLI_SETTINGS
@given(data=st.data())
def test_fuzz_gguf_cli(data: st.DataObject, gguf_seed: tuple[bytes, int],
                       workdir: Path) -> None:
    path = workdir / "cli_mutant.gguf"
    path.write_bytes(data.draw(gguf_mutants(gguf_seed)))
    _check_cli(path)


@CLI_SETTINGS
@given(data=st.data())
def test_fuzz_legacy_cli(data: st.DataObject, seeds: dict[str, bytes], workdir: Path) -> None:
    path = workdir / "cli_legacy_mutant.pt"
    path.write_bytes(data.draw(legacy_mutants(seeds)))
    _check_cli(path)


@CLI_SETTINGS
@given(data=st.data())
def test_fuzz_safetensors_cli(data: st.DataObject, seeds: dict[str, bytes],
                              workdir: Path) -> None:
    path = workdir / "cli_mutant.safetensors"
    path.write_bytes(data.draw(st_mutants(seeds)))
    _check_cli(path)


def test_seeds_list_cleanly(seeds: dict[str, bytes], gguf_seed: tuple[bytes, int],
                            workdir: Path) -> None:
    """Control: unmutated seeds list and freeze (so failures above are the mutations'); the
    GGUF seeds list and refuse writes."""
    for name, payload in [("writer.gguf", gguf_seed[0]), ("fields.gguf",
                                                           _encode(_gguf_fields()))]:
        path = workdir / f"seed_{name}"
        path.write_bytes(payload)
        assert len(inspect(str(path)).params) == (4 if name == "writer.gguf" else 3)
        _check_read_only(path)
    for name, payload in seeds.items():
        path = workdir / f"seed_{name}"
        path.write_bytes(payload)
        inventory = inspect(str(path))
        assert inventory.params
        fmt = "legacy" if name in LEGACY_SEEDS else \
            "safetensors" if name.endswith(".safetensors") else "pt"
        _check_rewrite(path, fmt, workdir, len(inventory.params))
