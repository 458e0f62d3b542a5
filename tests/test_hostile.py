"""Hostile pickles: without --unsafe-load nothing in a checkpoint can run code or import.

Every payload below, if unpickled by a real unpickler, creates a marker file (proved by
``test_payloads_are_live``, which loads each file with ``torch.load(weights_only=False)``
in a throw-away subprocess). paramctl reads unknown globals as inert placeholders, so the
marker must never appear, and the outcome is either the correct listing (the payload sits
beside a state dict: it is listed by nothing and carried through rewrites byte for byte)
or one ``error:`` line (the payload is all there is, or it breaks the tensor structure).

The zips are real torch checkpoints: a ``torch.save`` file with its ``data.pkl`` record
replaced by the payload (archive prefix and every other record kept).
"""

from __future__ import annotations

import io
import json
import os
import pickle
import struct
import subprocess
import sys
import textwrap
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from paramctl.core import inspect
from paramctl.errors import ParamctlError

REPO = Path(__file__).resolve().parent.parent
CliFn = Callable[..., subprocess.CompletedProcess[str]]

# ---------------------------------------------------------------------------------------
# pickle building blocks (hand-written opcodes)


def _glob(module: str, name: str) -> bytes:
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def _str(text: str) -> bytes:
    data = text.encode()
    return b"X" + struct.pack("<I", len(data)) + data


def _call1(func: bytes, arg: bytes) -> bytes:
    """``func(arg)`` with REDUCE."""
    return func + arg + b"\x85R"


PROTO2 = b"\x80\x02"


class _Reduce:
    """An object that pickles as ``func(*args)``: the classic ``__reduce__`` payload."""

    def __init__(self, func: object, *args: object) -> None:
        self.func, self.args = func, args

    def __reduce__(self) -> tuple[object, tuple[object, ...]]:
        return self.func, self.args


def _torch_pickle(obj: object) -> bytes:
    """The data.pkl that torch.save writes for ``obj`` (real torch pickler, protocol 2)."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    with zipfile.ZipFile(buf) as zf:
        name = next(n for n in zf.namelist() if n.endswith("/data.pkl"))
        return zf.read(name)


def replace_data_pkl(base: Path, payload: bytes, out: Path) -> Path:
    """Copy torch zip ``base`` to ``out`` with its data.pkl replaced by ``payload``."""
    with zipfile.ZipFile(base) as zin, zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as zout:
        replaced = False
        for info in zin.infolist():
            data = zin.read(info.filename)
            if info.filename.endswith("/data.pkl") and info.filename.count("/") == 1:
                data, replaced = payload, True
            zout.writestr(info, data, compress_type=zipfile.ZIP_STORED)
    assert replaced
    return out


def legacy_file(out: Path, first: bytes, rest: bytes = b"") -> Path:
    """A pre-1.6 (non-zip) torch file: a sequence of pickles, ``first`` at the front."""
    out.write_bytes(first + rest)
    return out


_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_HEAD = (pickle.dumps(_LEGACY_MAGIC, protocol=2) + pickle.dumps(1001, protocol=2)
                + pickle.dumps({"protocol_version": 1001, "little_endian": True,
                                "type_sizes": {"short": 2, "int": 4, "long": 4}}, protocol=2))


# ---------------------------------------------------------------------------------------
# the corpus


@dataclass(frozen=True)
class Payload:
    id: str
    global_name: str  # the global the payload calls (documentation of the case)
    build: Callable[[Path, Path, Path], Path]  # (samples_dir, marker, out dir) -> file
    lists: bool = False  # beside a whole state dict: listed as if the payload were absent
    error: str = "no state dict found"  # otherwise, what the one error line says


def _cmd(marker: Path) -> str:
    return f"touch {marker}"


def _code(marker: Path) -> str:
    return f"open({str(marker)!r}, 'w').close()"


def _mlp_state(samples: Path) -> dict[str, torch.Tensor]:
    return torch.load(samples / "mlp.pt", weights_only=True)


def _zip(samples: Path, out: Path, name: str, payload: bytes, base: str = "mlp.pt") -> Path:
    return replace_data_pkl(samples / base, payload, out / name)


def _top_os_system(s: Path, m: Path, o: Path) -> Path:
    return _zip(s, o, "top.pt", PROTO2 + _call1(_glob("os", "system"), _str(_cmd(m))) + b".")


def _top_exec(s: Path, m: Path, o: Path) -> Path:
    return _zip(s, o, "exec.pt",
                PROTO2 + _call1(_glob("builtins", "exec"), _str(_code(m))) + b".")


def _eval_py2_name(s: Path, m: Path, o: Path) -> Path:
    # Python 2 module name, mapped to builtins by fix_imports for protocol < 3.
    code = f"__import__('os').system({_cmd(m)!r})"
    return _zip(s, o, "py2.pt", PROTO2 + _call1(_glob("__builtin__", "eval"), _str(code)) + b".")


def _in_state_dict(s: Path, m: Path, o: Path) -> Path:
    state = _mlp_state(s)
    state["layers.9.weight"] = _Reduce(os.system, _cmd(m))
    return _zip(s, o, "nested.pt", _torch_pickle(state))


def _in_list(s: Path, m: Path, o: Path) -> Path:
    state = _mlp_state(s)
    values = list(state.values())
    return _zip(s, o, "list.pt", _torch_pickle(
        {"weights": [values[0], values[1], _Reduce(exec, _code(m)), *values[2:]]}))


def _in_checkpoint_wrapper(s: Path, m: Path, o: Path) -> Path:
    state = _mlp_state(s)
    state["head.extra"] = _Reduce(subprocess.call, ["touch", str(m)])
    return _zip(s, o, "wrapper.pt", _torch_pickle(
        {"model": state, "optimizer": {"state": {}, "param_groups": []}, "epoch": 3}))


def _in_state_dict_metadata(s: Path, m: Path, o: Path) -> Path:
    # torch pickles the state dict's `_metadata` as BUILD state: hide the payload there.
    state = _mlp_state(s)
    assert hasattr(state, "_metadata")
    state._metadata["evil"] = _Reduce(open, str(m), "w")  # type: ignore[attr-defined]
    return _zip(s, o, "build_state.pt", _torch_pickle(state))


def _as_dict_key(s: Path, m: Path, o: Path) -> Path:
    state = _mlp_state(s)
    first = next(iter(state.values()))
    code = f"__import__('os').system({_cmd(m)!r})"
    return _zip(s, o, "key.pt", _torch_pickle({("w", _Reduce(eval, code)): first}))


def _setstate_gadget(cls: tuple[str, str], create: bytes) -> Callable[[Path, Path, Path], Path]:
    """BUILD gadget: set an instance's ``__setstate__`` to exec, then BUILD again."""

    def build(s: Path, m: Path, o: Path) -> Path:
        payload = (PROTO2 + _glob(*cls) + create
                   + b"N}" + _str("__setstate__") + _glob("builtins", "exec") + b"s\x86b"
                   + _str(_code(m)) + b"b.")
        return _zip(s, o, f"build_{cls[1]}.pt", payload)

    return build


def _getattr_chain(s: Path, m: Path, o: Path) -> Path:
    # getattr(__import__('os'), 'system')('touch ...')
    os_mod = _call1(_glob("builtins", "__import__"), _str("os"))
    system = _glob("builtins", "getattr") + b"(" + os_mod + _str("system") + b"tR"
    return _zip(s, o, "getattr.pt", PROTO2 + system + _str(_cmd(m)) + b"\x85R.")


def _inst_opcode(s: Path, m: Path, o: Path) -> Path:
    # protocol 0: INST calls os.system('touch ...')
    return _zip(s, o, "inst.pt", b"(S'" + _cmd(m).encode() + b"'\nios\nsystem\n.")


def _obj_opcode(s: Path, m: Path, o: Path) -> Path:
    # protocol 1: OBJ calls exec(code)
    return _zip(s, o, "obj.pt", b"(" + _glob("builtins", "exec") + _str(_code(m)) + b"o.")


def _stack_global_proto4(s: Path, m: Path, o: Path) -> Path:
    payload = pickle.dumps(_Reduce(os.system, _cmd(m)), protocol=4)
    assert b"\x93" in payload and payload[:2] == b"\x80\x04"  # STACK_GLOBAL, protocol 4
    return _zip(s, o, "proto4.pt", payload)


def _dotted_from_torch(s: Path, m: Path, o: Path) -> Path:
    # Protocol 4 resolves dotted names: module "torch", name "serialization.os.system".
    body = (b"\x8c\x05torch\x8c\x17serialization.os.system\x93"
            + b"\x8c" + bytes([len(_cmd(m))]) + _cmd(m).encode() + b"\x85R.")
    return _zip(s, o, "dotted.pt", b"\x80\x04" + body)


def _in_storage_location(s: Path, m: Path, o: Path) -> Path:
    # A genuine mlp data.pkl whose first storage location 'cpu' is os.system('touch ...').
    with zipfile.ZipFile(s / "mlp.pt") as zf:
        original = zf.read("mlp/data.pkl")
    cpu = _str("cpu")
    assert cpu in original
    payload = original.replace(cpu, _call1(_glob("os", "system"), _str(_cmd(m))), 1)
    return _zip(s, o, "location.pt", payload)


def _user_class(s: Path, m: Path, o: Path) -> Path:
    # Importing the module is the attack: its top level creates the marker.
    mod = f"evil_{m.stem}"
    (o / f"{mod}.py").write_text(textwrap.dedent(f"""\
        open({str(m)!r}, "w").close()

        class Thing:
            pass
        """))
    return _zip(s, o, "user_class.pt", PROTO2 + _glob(mod, "Thing") + b")\x81.")


def _legacy_first(s: Path, m: Path, o: Path) -> Path:
    payload = PROTO2 + _call1(_glob("os", "system"), _str(_cmd(m))) + b"."
    return legacy_file(o / "legacy_first.pt", payload)


def _legacy_body(s: Path, m: Path, o: Path) -> Path:
    payload = PROTO2 + _call1(_glob("builtins", "exec"), _str(_code(m))) + b"."
    return legacy_file(o / "legacy_body.pt", _LEGACY_HEAD + payload, pickle.dumps([], 2))


PAYLOADS = [
    Payload("top-level-os.system", "os.system", _top_os_system),
    Payload("top-level-builtins.exec", "builtins.exec", _top_exec),
    Payload("py2-__builtin__.eval", "__builtin__.eval", _eval_py2_name),
    Payload("nested-in-state-dict", "posix.system", _in_state_dict, lists=True),
    Payload("nested-in-list", "__builtin__.exec", _in_list),
    Payload("inside-checkpoint-wrapper", "commands.call", _in_checkpoint_wrapper, lists=True),
    Payload("in-state-dict-metadata-BUILD", "io.open", _in_state_dict_metadata, lists=True),
    Payload("dict-key-builtins.eval", "__builtin__.eval", _as_dict_key,
            error="a tensor is stored under a tuple key"),
    Payload("BUILD-setstate-REDUCE", "types.SimpleNamespace",
            _setstate_gadget(("types", "SimpleNamespace"), b")R")),
    Payload("BUILD-setstate-NEWOBJ", "argparse.Namespace",
            _setstate_gadget(("argparse", "Namespace"), b")\x81")),
    Payload("getattr-chain", "builtins.getattr", _getattr_chain),
    Payload("INST-opcode", "os.system", _inst_opcode),
    Payload("OBJ-opcode", "builtins.exec", _obj_opcode),
    Payload("STACK_GLOBAL-protocol-4", "posix.system", _stack_global_proto4),
    Payload("dotted-name-from-torch", "torch.serialization.os.system", _dotted_from_torch),
    Payload("in-storage-location", "os.system", _in_storage_location,
            error="malformed storage location"),
    Payload("user-class-import", "evil_marker.Thing", _user_class),
    Payload("legacy-payload-first", "os.system", _legacy_first, error="no magic number"),
    Payload("legacy-payload-after-magic", "builtins.exec", _legacy_body),
]
assert len({p.id for p in PAYLOADS}) == len(PAYLOADS) >= 10


def _env(folder: Path) -> dict[str, str]:
    # The payload's folder is importable (cwd and PYTHONPATH), so a user-class payload
    # *would* be imported if anything imported it.
    return {"PYTHONPATH": os.pathsep.join([str(REPO), str(folder)])}


def _build(payload: Payload, samples_dir: Path, tmp_path: Path) -> tuple[Path, Path]:
    marker = tmp_path / "marker"
    return payload.build(samples_dir, marker, tmp_path), marker


def _assert_one_line_error(result: subprocess.CompletedProcess[str], marker: Path) -> str:
    assert not marker.exists(), "the payload ran"
    assert result.returncode == 1, result.stderr
    assert result.stdout == ""
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    return lines[0]


def _mlp_names(samples: Path) -> list[str]:
    return list(_mlp_state(samples))


@pytest.mark.parametrize("payload", PAYLOADS, ids=[p.id for p in PAYLOADS])
@pytest.mark.parametrize("command", [["list"], ["freeze", "*"], ["init", "*=zeros"]],
                         ids=["list", "freeze", "init"])
def test_payload_never_runs(payload: Payload, command: list[str], samples_dir: Path,
                            tmp_path: Path, cli: CliFn) -> None:
    path, marker = _build(payload, samples_dir, tmp_path)
    before = path.read_bytes()
    result = cli(command[0], path, *command[1:], "-f" if command[0] == "list" else "-q",
                 *(["names"] if command[0] == "list" else []), cwd=tmp_path, env=_env(tmp_path))
    assert not marker.exists(), "the payload ran"
    assert sorted(p.name for p in tmp_path.iterdir() if ".paramctl-" in p.name) == []
    if not payload.lists:
        line = _assert_one_line_error(result, marker)
        assert payload.error in line
        assert path.read_bytes() == before
        return
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    if command[0] == "list":
        assert result.stdout.split() == _mlp_names(samples_dir)
        return
    # The rewrite changed tensors or flags only: the payload's bytes are carried as they were.
    after = inspect(str(path))
    assert [p.name for p in after.params] == _mlp_names(samples_dir)
    if command[0] == "freeze":
        assert not any(p.requires_grad for p in after.params)
    with zipfile.ZipFile(path) as zf:
        new_pkl = zf.read(next(n for n in zf.namelist() if n.endswith("/data.pkl")))
    with zipfile.ZipFile(io.BytesIO(before)) as zf:
        old_pkl = zf.read(next(n for n in zf.namelist() if n.endswith("/data.pkl")))
    assert str(marker).encode() in old_pkl and str(marker).encode() in new_pkl
    assert not marker.exists()


@pytest.mark.parametrize("payload", PAYLOADS, ids=[p.id for p in PAYLOADS])
@pytest.mark.parametrize("out", ["cast.safetensors", "cast.pt"])
def test_payload_never_runs_on_convert(payload: Payload, out: str, samples_dir: Path,
                                       tmp_path: Path, cli: CliFn) -> None:
    """convert --cast streams the tensors (read-ahead and writer threads) and carries or
    drops everything else: the payload neither runs nor turns a refusal into a traceback."""
    path, marker = _build(payload, samples_dir, tmp_path)
    before = path.read_bytes()
    result = cli("convert", path, "--cast", "bfloat16", "-o", tmp_path / out, "-q",
                 cwd=tmp_path, env=_env(tmp_path))
    assert not marker.exists(), "the payload ran"
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir() if ".paramctl-" in p.name) == []
    if result.returncode != 0 or not payload.lists:
        # Refused: as corrupt/unsafe (1), or as a cast that would rewrite what is beside
        # the tensors (2); one line either way.
        assert result.returncode in (1, 2), result.stderr
        lines = result.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
        if not payload.lists:
            assert payload.error in lines[0]
        return
    assert "Traceback" not in result.stderr
    cast = inspect(str(tmp_path / out))
    assert [p.name for p in cast.params] == _mlp_names(samples_dir)
    assert {p.dtype for p in cast.params} == {"bfloat16"}
    assert not marker.exists()


@pytest.mark.parametrize("payload", PAYLOADS, ids=[p.id for p in PAYLOADS])
def test_payload_never_runs_in_process(payload: Payload, samples_dir: Path,
                                       tmp_path: Path) -> None:
    """The library API reads the same files (no CLI in between), and imports nothing."""
    path, marker = _build(payload, samples_dir, tmp_path)
    modules = set(sys.modules)
    sys.path.insert(0, str(tmp_path))
    try:
        if payload.lists:
            assert [p.name for p in inspect(str(path)).params] == _mlp_names(samples_dir)
        else:
            with pytest.raises(ParamctlError) as info:
                inspect(str(path))
            assert "\n" not in str(info.value)
            assert payload.error in str(info.value)
    finally:
        sys.path.remove(str(tmp_path))
    assert not marker.exists()
    assert not {m for m in set(sys.modules) - modules if m.startswith("evil_")}


def test_payloads_are_live(samples_dir: Path, tmp_path: Path) -> None:
    """Control: each payload does create its marker under a real unpickler, so the
    refusals above are what keeps the markers away."""
    cases = {}
    for i, payload in enumerate(PAYLOADS):
        folder = tmp_path / f"case{i}"
        folder.mkdir()
        path, marker = _build(payload, samples_dir, folder)
        cases[payload.id] = (str(path), str(marker), str(folder))
    script = textwrap.dedent("""\
        import json, os, sys, warnings
        import torch
        cases = json.loads(sys.argv[1])
        for pid, (path, marker, folder) in cases.items():
            sys.path.insert(0, folder)
            os.chdir(folder)
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    torch.load(path, weights_only=False)
            except Exception:
                pass  # the payload already ran; what follows it may not load
            sys.path.remove(folder)
        """)
    subprocess.run([sys.executable, "-c", script, json.dumps(cases)], check=True,
                   capture_output=True, timeout=300, cwd=tmp_path)
    dead = [pid for pid, (_, marker, _) in cases.items() if not Path(marker).exists()]
    assert dead == []


def test_load_state_dict_never_runs_the_payload(samples_dir: Path, tmp_path: Path) -> None:
    """`paramctl.load_state_dict` builds tensors from the bytes the reader located: the
    payload beside them is neither run nor loaded, and the weights are the file's."""
    import paramctl
    from sample_models.mlp import MLP

    path, marker = _build(PAYLOADS[3], samples_dir, tmp_path)
    model = MLP()
    result = paramctl.load_state_dict(model, str(path))
    assert not marker.exists()
    assert result.missing_keys == [] and result.unexpected_keys == []
    expected = _mlp_state(samples_dir)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, expected[name]), name


# ---------------------------------------------------------------------------------------
# DCP metadata is a pickle too


def test_dcp_metadata_payload_refused(tmp_path: Path, cli: CliFn) -> None:
    """Not DCP metadata: one line naming what the pickle would build, and the way out."""
    folder = tmp_path / "dcp"
    folder.mkdir()
    marker = tmp_path / "marker"
    (folder / ".metadata").write_bytes(
        PROTO2 + _call1(_glob("os", "system"), _str(_cmd(marker))) + b".")
    (folder / "__0_0.distcp").write_bytes(b"")
    result = cli("list", folder, cwd=tmp_path)
    line = _assert_one_line_error(result, marker)
    assert "'os.system'" in line and "--unsafe-load" in line


# ---------------------------------------------------------------------------------------
# --unsafe-load on a benign full-module pickle


@pytest.fixture
def full_module(tmp_path: Path) -> Path:
    from sample_models.mlp import MLP

    torch.manual_seed(0)
    path = tmp_path / "full.pt"
    torch.save(MLP(), path)
    return path


def test_full_module_lists_without_flag(full_module: Path, cli: CliFn) -> None:
    """A whole pickled module is read structurally: no flag, no warning, its names."""
    from sample_models.mlp import MLP

    result = cli("list", full_module, "-f", "names")
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert result.stdout.split() == [n for n, _ in MLP().named_parameters()]


def test_full_module_with_unsafe_load_warns_once(full_module: Path, cli: CliFn) -> None:
    result = cli("list", full_module, "--unsafe-load", "-f", "names")
    assert result.returncode == 0, result.stderr
    warnings = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(warnings) == 1, result.stderr
    assert warnings[0].startswith("warning: ") and "--unsafe-load" in warnings[0]
    assert "layers.0.weight" in result.stdout.split()
    assert "Traceback" not in result.stderr


def test_unsafe_load_warning_goes_to_stderr_only(full_module: Path, cli: CliFn) -> None:
    result = cli("list", full_module, "--unsafe-load", "-f", "json")
    assert result.returncode == 0, result.stderr
    json.loads(result.stdout)  # stdout stays machine-readable
