"""toolbox/checkpoints.py, the checkpoint reader that executes nothing: TorchScript archives (ours, scripted
modules, older layouts, third-party archives written by other torch versions) read bit for bit as torch.jit.load
reads them; torch.save files; safetensors files; every hostile file refused in one line before its memory is spent."""

import json
import os
import pickle
import re
import subprocess
import sys
import struct
import tracemalloc
import zipfile
from pathlib import Path

import pytest
import torch
from PIL import Image

import clip_min
from toolbox import checkpoints
from conftest import ROOT, rewrite_zip

FIXTURES = Path(__file__).resolve().parent / "fixtures"
ARCHIVE, STATE = FIXTURES / "tiny_clip.jit.pt", FIXTURES / "tiny_clip.state.pt"

# torch.jit is deprecated in favour of torch.export, but it is what writes and reads the archives under test
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.*` is deprecated:DeprecationWarning")


# ----------------------------------------------------------------------------------------------------
# TorchScript archives


def bits(tensor):
    """A tensor's bytes (bit-for-bit comparison, NaNs and -0.0 included)."""
    return tensor.detach().contiguous().reshape(-1).view(torch.uint8)


def assert_reads_as_torch_jit(path):
    """Every tensor of torch.jit.load(path).state_dict() comes back from the reader under its name, with its
    dtype, shape, strides and bytes; read_shapes agrees. Returns the names the reader adds (plain tensor
    attributes, which are module state but no parameter or buffer)."""
    expected = torch.jit.load(path, map_location="cpu").state_dict()
    tensors, shapes = checkpoints.read_state_dict(path), checkpoints.read_shapes(path)
    assert expected and set(expected) <= set(tensors) and shapes == {k: v.shape for k, v in tensors.items()}
    for name, value in expected.items():
        ours = tensors[name]
        assert (ours.dtype, ours.shape, ours.stride()) == (value.dtype, value.shape, value.stride()), name
        assert torch.equal(bits(ours), bits(value)), name
    return set(tensors) - set(expected)


class Block(torch.nn.Module):
    """A submodule with a parameter, buffers of several dtypes and an unset (None) buffer."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(3, 2)
        self.register_buffer("steps", torch.tensor(5))
        self.register_buffer("mask", torch.tensor([True, False]))
        self.register_buffer("unset", None)
        self.halves = torch.nn.Parameter(torch.randn(4).half())

    def forward(self, x):
        return self.lin(x) + self.halves.float().sum()


class Scripted(torch.nn.Module):
    """A scripted (not traced) module with an attribute of each kind torch.jit.save writes."""

    ints: list[int]
    floats: list[float]
    bools: list[bool]
    tensors: list[torch.Tensor]
    table: dict[str, torch.Tensor]
    pair: tuple[torch.Tensor, int]

    def __init__(self):
        super().__init__()
        self.block = Block()
        self.blocks = torch.nn.ModuleList([Block(), Block()])
        self.ints, self.floats, self.bools = [1, 2, 3], [0.5, float("nan")], [True, False]
        self.rate, self.scale, self.flag, self.name = 16000, 0.25, True, "scripted"
        self.tensors = [torch.zeros(2), torch.ones(3)]
        self.table = {"a": torch.arange(3.0)}
        self.pair = (torch.full((2,), 7.0), 3)
        self.state = torch.zeros(0)  # a plain tensor attribute: module state, not a buffer
        self.register_buffer("bf16", torch.randn(3).bfloat16())
        self.register_buffer("complexes", torch.randn(2, dtype=torch.complex64))
        self.register_buffer("view", torch.arange(12.0).view(3, 4)[:, 1:3])  # a strided view of a larger storage
        self.register_buffer("signed_zero", torch.tensor([-0.0, float("inf")], dtype=torch.float64))
        self.device = torch.device("cpu")

    def forward(self, x):
        y = self.block(x)
        for block in self.blocks:
            y = y + block(x)
        return y * self.scale + self.tensors[0].sum() + self.table["a"].sum() + self.pair[0].sum() + self.state.sum()


@pytest.fixture(scope="module")
def scripted(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("scripted") / "scripted.pt"
    torch.jit.script(Scripted()).save(path)
    return path


def test_a_scripted_module_reads_as_torch_jit_reads_it(scripted):
    with zipfile.ZipFile(scripted) as z:
        pickled = z.read("scripted/data.pkl")
    for global_name in [b"build_intlist", b"build_doublelist", b"build_boollist", b"build_tensorlist",
                        b"restore_type_tag", b"ctorch\ndevice", b"ComplexFloatStorage", b"BFloat16Storage"]:
        assert global_name in pickled  # the constructs this test is about are in the archive
    assert assert_reads_as_torch_jit(scripted) == {"state"}  # tensors in lists, dicts and tuples get no name


def test_a_traced_module_reads_as_torch_jit_reads_it(tmp_path):
    path = tmp_path / "traced.pt"
    torch.jit.trace(Block(), torch.randn(1, 3)).save(path)
    assert assert_reads_as_torch_jit(path) == set()


# older record layouts, each one that torch.jit.load still reads: the reader must read it the same way
LAYOUTS = {
    "top folder 'archive'": dict(rename=lambda n: "archive/" + n.split("/", 1)[1]),
    "no byteorder record": dict(drop={"scripted/byteorder"}),
    "no .data/ records": dict(drop={"scripted/.data/serialization_id", "scripted/.data/version"}),
    "extra records": dict(replace={"scripted/.data/version": b"3\n", "scripted/extra/notes.txt": b"hello"}),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_older_archive_layouts(scripted, tmp_path, layout):
    options = dict(LAYOUTS[layout])
    extra = options.pop("replace", {})
    path = rewrite_zip(scripted, tmp_path / "old.pt", **options)
    with zipfile.ZipFile(path, "a") as z:
        for name, data in extra.items():
            z.writestr(name, data)
    assert assert_reads_as_torch_jit(path) == {"state"}


def third_party_archives():
    """(name, bytes) of every TorchScript archive inside the wheels in $ORTHCR_THIRD_PARTY_JIT or
    .cache/third-party-jit (.ci/run fetches silero-vad 5.1, 6.0.0 and 6.2.3 there: archives written by other
    torch versions and scripted modules)."""
    folder = Path(os.environ.get("ORTHCR_THIRD_PARTY_JIT") or ROOT / ".cache" / "third-party-jit")
    found = []
    for wheel in sorted(folder.glob("*.whl")):
        with zipfile.ZipFile(wheel) as z:
            found += [(f"{wheel.name}:{name}", z.read(name)) for name in z.namelist()
                      if name.endswith((".jit", ".pt", ".pth"))]
    return found


THIRD_PARTY = third_party_archives()


@pytest.mark.skipif(not THIRD_PARTY, reason="no third-party TorchScript wheels (set ORTHCR_THIRD_PARTY_JIT to a "
                                            "folder of them, as .ci/run does)")
@pytest.mark.parametrize("name", [name for name, _ in THIRD_PARTY])
def test_third_party_archives_read_as_torch_jit_reads_them(tmp_path, name):
    path = tmp_path / Path(name).name
    path.write_bytes(dict(THIRD_PARTY)[name])
    assert_reads_as_torch_jit(path)


def test_archive_top_folder_is_not_hardcoded(tmp_path):
    moved = rewrite_zip(ARCHIVE, tmp_path / "x.pt", rename=lambda n: "some_other_name/" + n.split("/", 1)[1])
    original, renamed = checkpoints.read_state_dict(ARCHIVE), checkpoints.read_state_dict(moved)
    assert original.keys() == renamed.keys()
    assert all(torch.equal(original[k], renamed[k]) for k in original)


# ----------------------------------------------------------------------------------------------------
# Untrusted archives can't exhaust the machine: every fault is one ValueError naming the file, raised before
# the memory is spent

TOP = "tiny_clip.jit"  # the fixture archive's top folder


def archive_with(path, data_pkl=None, **records):
    """The fixture archive with another data.pkl and/or other records (name under TOP/ -> bytes)."""
    replace = {f"{TOP}/{name}": data for name, data in records.items()}
    if data_pkl is not None:
        replace[f"{TOP}/data.pkl"] = data_pkl
    return rewrite_zip(ARCHIVE, path, replace=replace)


def fixture_pickle():
    with zipfile.ZipFile(ARCHIVE) as z:
        return z.read(f"{TOP}/data.pkl")


def nested_modules(depth):
    """A pickle of `depth` TorchScript objects, each the attribute 'child' of the one before (protocol 2 opcodes)."""
    new = b"c__torch__\nM\n)\x81"  # GLOBAL __torch__.M, EMPTY_TUPLE, NEWOBJ
    return b"\x80\x02" + (new + b"}X\x05\x00\x00\x00child") * depth + new + b"}b" + b"sb" * depth + b"."


SELF_CYCLE = b"\x80\x02c__torch__\nM\n)\x81q\x00}X\x04\x00\x00\x00selfh\x00sb."  # obj.self = obj
DEEP_LIST = b"\x80\x02" + b"]" * 100_000 + b"a" * 99_999 + b"."  # a list in a list in ... 100,000 deep


def patch_sizes(path, name, size):
    """Make the local and central zip headers of record `name` declare `size` bytes (both sizes: still stored)."""
    data = bytearray(path.read_bytes())
    for signature, name_at, sizes_at in [(b"PK\x03\x04", 30, 18), (b"PK\x01\x02", 46, 20)]:  # local, central
        at = data.find(signature)
        while not data.startswith(name.encode(), at + name_at):  # the header of this record
            at = data.find(signature, at + 1)
        data[at + sizes_at:at + sizes_at + 8] = struct.pack("<II", size, size)
    path.write_bytes(bytes(data))
    return path


def deflated_bomb(path, megabytes=16):
    """An archive whose storage record data/0 is `megabytes` of zeros deflated to kilobytes, with a data.pkl that
    declares exactly that many bytes for it: honest sizes, only the compression tells."""
    numel = megabytes << 18  # float32 elements
    pickled = fixture_pickle().replace(b"M@\x13t", b"J" + struct.pack("<i", numel) + b"t", 1)  # storage 0's numel
    rewrite_zip(ARCHIVE, path, replace={f"{TOP}/data.pkl": pickled}, drop={f"{TOP}/data/0"})
    with zipfile.ZipFile(path, "a", compression=zipfile.ZIP_DEFLATED) as z:
        with z.open(f"{TOP}/data/0", "w", force_zip64=True) as record:
            for _ in range(megabytes):
                record.write(bytes(1 << 20))
    return path


@pytest.fixture
def opened(monkeypatch):
    """The names of the zip records opened for reading, from now on."""
    names, real_open = [], zipfile.ZipFile.open

    def spy(self, name, mode="r", *args, **kwargs):
        if mode == "r":
            names.append(getattr(name, "filename", name))
        return real_open(self, name, mode, *args, **kwargs)

    monkeypatch.setattr(zipfile.ZipFile, "open", spy)
    return names


FAULTS = {
    "compressed record": (lambda p: rewrite_zip(ARCHIVE, p, deflate={f"{TOP}/data/3"}),
                          f"record '{TOP}/data/3' is compressed"),
    "record past the end": (lambda p: patch_sizes(rewrite_zip(ARCHIVE, p), f"{TOP}/data/0", 1 << 31),
                            "declares 2147483648 bytes, past the end of the"),
    "record bigger than its storage": (lambda p: archive_with(p, **{"data/0": bytes(19712 + 64)}),
                                       "record data/0 holds 19776 bytes, its storage of 4928 torch.float32 takes "
                                       "19712"),
    "record smaller than its storage": (lambda p: archive_with(p, **{"data/0": bytes(100)}),
                                        "record data/0 holds 100 bytes"),
    "missing record": (lambda p: rewrite_zip(ARCHIVE, p, drop={f"{TOP}/data/3"}), "no record data/3"),
    "view past its storage": (lambda p: archive_with(p, fixture_pickle().replace(b"(KMK@t", b"(KMKAt", 1)),
                              "tensor of size (77, 65) at offset 0 reaches past its storage of 4928 elements"),
    "deep nesting": (lambda p: archive_with(p, nested_modules(5000)), "modules nested deeper than 100"),
    "self cycle": (lambda p: archive_with(p, SELF_CYCLE), "module 'self' contains itself"),
    "deep list": (lambda p: archive_with(p, DEEP_LIST), "data.pkl holds a list, not a TorchScript module"),
    "non-UTF-8 byteorder": (lambda p: archive_with(p, byteorder=b"\xff\xfelittle"),
                            "archive byte order b'\\xff\\xfelittle' is not this machine's"),
    "non-UTF-8 name in data.pkl": (lambda p: archive_with(p, fixture_pickle().replace(b"vocab_size", b"vocab_siz\xff")),
                                   "UnicodeDecodeError"),
    "non-UTF-8 record name": (lambda p: p.write_bytes(rewrite_zip(ARCHIVE, p, rename=lambda n: n.replace(
        "version", "versi\u00f3n")).read_bytes().replace("versi\u00f3n".encode(), b"versi\xc3(n")),
        "truncated or corrupt checkpoint archive (UnicodeDecodeError"),
    "empty file": (lambda p: p.write_bytes(b""), "empty file"),
    "directory": (lambda p: p.mkdir(), "a directory"),
    "truncated archive": (lambda p: p.write_bytes(ARCHIVE.read_bytes()[:-100]), "truncated or corrupt"),
    "compressed torch.save record": (lambda p: rewrite_zip(STATE, p, deflate={"tiny_clip.state/data/0"}),
                                     "record 'tiny_clip.state/data/0' is compressed"),
    "stride-0 view": (lambda p: torch.save({"w": torch.zeros(1).expand(1 << 20)}, p),
                      "tensor w of shape (1048576,) overlaps itself"),
    "deflated bomb": (deflated_bomb, f"record '{TOP}/data/0' is compressed"),
}


@pytest.mark.parametrize("read", [checkpoints.read_state_dict, checkpoints.read_shapes], ids=["state_dict", "shapes"])
@pytest.mark.parametrize("fault", list(FAULTS))
def test_archive_faults(tmp_path, fault, read):
    make, problem = FAULTS[fault]
    path = tmp_path / "file.pt"
    make(path)
    with pytest.raises(ValueError) as e:
        read(path)
    message = str(e.value)
    assert message.startswith(f"{path}: ") and "\n" not in message and problem in message


@pytest.mark.parametrize("fault", ["compressed record", "record past the end", "record bigger than its storage",
                                   "deflated bomb"])
def test_bad_records_are_refused_before_any_is_read(tmp_path, fault, opened):
    """The memory bound: a record's size is checked against the zip directory and numel x itemsize before any
    tensor record is opened (so before anything the size of a record is allocated)."""
    make, problem = FAULTS[fault]
    make(tmp_path / "file.pt")
    opened.clear()
    with pytest.raises(ValueError, match=problem):
        checkpoints.read_state_dict(tmp_path / "file.pt")
    assert not [name for name in opened if "/data/" in name]


def test_torch_save_zip_is_checked_before_torch_load(tmp_path, monkeypatch):
    path = FAULTS["compressed torch.save record"][0](tmp_path / "file.pt")
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load reached"))
    with pytest.raises(ValueError, match="is compressed"):
        checkpoints.read_state_dict(path)


def test_records_may_not_share_bytes(tmp_path):
    """Zip entries pointing at the same bytes (overlapping records) can't add up to more than the file."""
    path = rewrite_zip(ARCHIVE, tmp_path / "file.pt")
    with zipfile.ZipFile(path) as z:
        record = z.getinfo(f"{TOP}/data/0")
    n = path.stat().st_size // record.file_size  # as many copies of the record as the file could hold
    checkpoints._check_records([record] * n, path)
    with pytest.raises(ValueError, match=f"declare {(n + 1) * record.file_size} bytes in all, more than the file's"):
        checkpoints._check_records([record] * (n + 1), path)


def test_records_are_read_once_into_the_tensors(tmp_path, opened):
    """Each storage record is read once, straight into its tensor's memory: the reader's own allocations stay
    far below the size of an 8 MiB record (tracemalloc sees Python's allocations, not torch's)."""
    numel = 1 << 21  # float32 elements: 8 MiB
    pickled = fixture_pickle().replace(b"M@\x13t", b"J" + struct.pack("<i", numel) + b"t", 1)  # storage 0's numel
    path = archive_with(tmp_path / "big.pt", pickled, **{"data/0": bytes(range(256)) * (numel * 4 // 256)})
    opened.clear()
    tracemalloc.start()
    try:
        tensors = checkpoints.read_state_dict(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 << 20
    assert tensors["positional_embedding"].untyped_storage().nbytes() == numel * 4
    assert bytes(tensors["positional_embedding"].untyped_storage()[:256]) == bytes(range(256))
    records = [name for name in opened if "/data/" in name]
    assert len(records) == len(set(records)) == len({t.untyped_storage().data_ptr() for t in tensors.values()})


# ----------------------------------------------------------------------------------------------------
# read_shapes: a checkpoint's layout without its data


@pytest.mark.parametrize("path", [ARCHIVE, STATE], ids=["torchscript", "state_dict"])
def test_read_shapes(path):
    assert checkpoints.read_shapes(path) == {k: v.shape for k, v in checkpoints.read_state_dict(path).items()}


def test_read_shapes_reads_no_tensor_data(tmp_path, opened):
    # every storage record's bytes flipped in place: their CRCs no longer match, reading any of them fails
    path = tmp_path / "corrupt.pt"
    data = bytearray(ARCHIVE.read_bytes())
    with zipfile.ZipFile(ARCHIVE) as z:
        for info in z.infolist():
            if "/data/" in info.filename and info.file_size:
                extra = struct.unpack_from("<H", data, info.header_offset + 28)[0]  # the local header's
                start = info.header_offset + 30 + len(info.filename) + extra
                data[start:start + info.file_size] = bytes(b ^ 0xFF for b in data[start:start + info.file_size])
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="is corrupt.*Bad CRC-32"):
        checkpoints.read_state_dict(path)
    opened.clear()
    assert checkpoints.read_shapes(path) == checkpoints.read_shapes(ARCHIVE)
    assert not [name for name in opened if "/data/" in name]


# ----------------------------------------------------------------------------------------------------
# Nothing in a checkpoint is executed


class Payload:
    """Unpickling this runs `touch <marker>` through os.system."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_malicious_payload_is_live(tmp_path):
    """The payload below really runs a command when unpickled normally: the refusals tested next are real."""
    marker = tmp_path / "ran"
    pickle.loads(pickle.dumps(Payload(marker), protocol=2))
    assert marker.exists()


@pytest.mark.parametrize("container", ["torchscript_archive", "torch_save_archive", "plain_pickle"])
def test_malicious_checkpoint_runs_nothing(tmp_path, container):
    marker = tmp_path / "ran"
    payload = pickle.dumps({"weights": Payload(marker)}, protocol=2)
    path = tmp_path / "evil.pt"
    if container == "plain_pickle":
        path.write_bytes(payload)
    else:
        with zipfile.ZipFile(path, "w") as z:
            z.writestr("evil/data.pkl", payload)
            z.writestr("evil/version", "3\n")
            if container == "torchscript_archive":  # what marks a TorchScript archive
                z.writestr("evil/constants.pkl", pickle.dumps((), protocol=2))
                z.writestr("evil/code/__torch__.py", "")
    with pytest.raises(ValueError) as e:
        clip_min.load(path)
    assert str(path) in str(e.value)
    if container == "torchscript_archive":
        assert f"refusing global '{os.system.__module__}.system'" in str(e.value)
    assert not marker.exists()



# data.pkl pickles written opcode by opcode (protocol 2, as torch.jit.save writes them), for what no torch writes


def op_global(module, name):
    return b"c" + f"{module}\n{name}\n".encode()


def op_str(text):
    return b"X" + struct.pack("<I", len(text.encode())) + text.encode()


def op_int(n):
    return b"J" + struct.pack("<i", n)


def op_storage(numel=4928, dtype="FloatStorage", key="0"):
    """A persistent reference to the fixture archive's record data/<key> (4,928 float32 in data/0)."""
    return b"(" + op_str("storage") + op_global("torch", dtype) + op_str(key) + op_str("cpu") + op_int(numel) + b"tQ"


def op_tensor(numel=4):
    """torch._utils._rebuild_tensor_v2(storage 0, 0, (numel,), (1,), False, OrderedDict())."""
    return (op_global("torch._utils", "_rebuild_tensor_v2") + b"(" + op_storage() + op_int(0) + b"(" + op_int(numel)
            + b"t(" + op_int(1) + b"t\x89" + op_global("collections", "OrderedDict") + b")Rt" + b"R")


def module_pickle(**attributes):
    """A TorchScript module `__torch__.M` whose attributes are the given pickled values."""
    items = b"".join(op_str(name) + value for name, value in attributes.items())
    return b"\x80\x02" + op_global("__torch__", "M") + b")\x81}(" + items + b"ub."


def test_the_opcode_writer_makes_what_torch_reads(tmp_path):
    """The hand-written pickles below are sound where they are not hostile: this one reads as a module."""
    path = archive_with(tmp_path / "file.pt", module_pickle(w=op_tensor(), n=op_int(3)))
    first = checkpoints.read_state_dict(ARCHIVE)["positional_embedding"].flatten()[:4]  # storage 0's first floats
    assert torch.equal(checkpoints.read_state_dict(path)["w"], first)


# each pickle: what the archive's data.pkl holds instead of the module, and the one-line refusal
HOSTILE_PICKLES = {
    "BUILD on a tensor": (module_pickle(w=op_tensor() + b"}b"), "BUILD) applied to a tensor"),
    "BUILD on a storage": (module_pickle(w=op_storage() + b"}b"), "BUILD) applied to a storage"),
    "torch.Tensor(n) allocating": (module_pickle(w=op_global("torch", "Tensor") + b"(" + op_int(1 << 30) + b"tR"),
                                   "refusing to make a torch.Tensor"),
    "a tensor from a non-storage": (module_pickle(w=op_global("torch._utils", "_rebuild_tensor_v2") + b"(" + op_int(0)
                                                  + op_int(0) + b"(t(t\x89Nt" + b"R"), "rebuilt from a int"),
    "a quantized tensor": (module_pickle(w=op_global("torch._utils", "_rebuild_qtensor")),
                           "refusing global 'torch._utils._rebuild_qtensor' (a quantized tensor, which"),
    "a quantized storage": (module_pickle(w=op_storage(dtype="QInt8Storage")),
                            "refusing global 'torch.QInt8Storage' (a quantized storage"),
    "a sparse tensor": (module_pickle(w=op_global("torch._utils", "_rebuild_sparse_tensor")),
                        "refusing global 'torch._utils._rebuild_sparse_tensor' (a sparse tensor"),
    "a tensor-table reference": (module_pickle(w=op_global("torch.jit._pickle", "build_tensor_from_id")),
                                 "(a tensor-table reference (the pre-1.3 model.json format)"),
    "a tensor of another class": (module_pickle(w=op_global("torch._tensor", "_rebuild_from_type_v2") + b"("
                                                + op_global("torch._utils", "_rebuild_tensor_v2")
                                                + op_global("torch.nn.parameter", "Parameter") + b")}tR"),
                                  "refusing global 'torch.nn.parameter.Parameter'"),
    "state set by code": (b"\x80\x02" + op_global("__torch__", "Packed") + b")\x81(" + op_int(1) + b"tb.",
                          "whose state is a tuple, set by its own __setstate__ code"),
    "a storage named twice with two sizes": (module_pickle(a=op_storage(), b=op_storage(numel=4)),
                                             "record data/0 is named with two dtypes or sizes"),
}


@pytest.mark.parametrize("read", [checkpoints.read_state_dict, checkpoints.read_shapes], ids=["state_dict", "shapes"])
@pytest.mark.parametrize("hostile", list(HOSTILE_PICKLES))
def test_hostile_pickles_are_refused(tmp_path, hostile, read):
    pickled, problem = HOSTILE_PICKLES[hostile]
    path = archive_with(tmp_path / "file.pt", pickled)
    with pytest.raises(ValueError) as e:
        read(path)
    message = str(e.value)
    assert message.startswith(f"{path}: cannot read the TorchScript archive's data.pkl") and problem in message
    assert "\n" not in message


def test_the_legacy_model_json_format_is_refused_in_one_line(tmp_path):
    """PyTorch 1.0-1.2's archives (model.json, attributes.pkl, tensors/): torch 2 refuses them too."""
    path = tmp_path / "legacy.pt"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("legacy/model.json", "{}")
        z.writestr("legacy/attributes.pkl", pickle.dumps((), protocol=2))
        z.writestr("legacy/tensors/0", bytes(16))
        z.writestr("legacy/version", "1\n")
    with pytest.raises(RuntimeError, match="Legacy model format"):
        torch.jit.load(path)
    with pytest.raises(ValueError, match=f"^{path}: a TorchScript archive in the model.json format of PyTorch "
                                         r"1\.0-1\.2, which PyTorch 2's torch.jit.load no longer reads either"):
        checkpoints.read_state_dict(path)


# ----------------------------------------------------------------------------------------------------
# safetensors files, read without the safetensors package


def safetensors_file(path, tensors=None, header=None, data=None, length=None, pad=b""):
    """Write a safetensors file: `tensors` ({name: tensor}) laid out as the format says, or a raw `header` (a
    JSON-able object) with raw `data`; `length` overrides the header length field, `pad` is appended to the JSON
    (the format allows trailing spaces)."""
    if tensors is not None:
        header, data, at = {"__metadata__": {"format": "pt"}}, b"", 0
        dtypes = {v: k for k, v in checkpoints.SAFETENSORS_DTYPES.items()}
        for name, tensor in tensors.items():
            raw = bits(tensor).numpy().tobytes()
            header[name] = {"dtype": dtypes[tensor.dtype], "shape": list(tensor.shape),
                            "data_offsets": [at, at + len(raw)]}
            data, at = data + raw, at + len(raw)
    blob = (json.dumps(header) if not isinstance(header, (bytes, str)) else header)
    blob = (blob.encode() if isinstance(blob, str) else blob) + pad
    path.write_bytes(struct.pack("<Q", len(blob) if length is None else length) + blob + (data or b""))
    return path


EVERY_DTYPE = {name: (torch.randn(2, 3) * 100).to(dtype) for name, dtype in checkpoints.SAFETENSORS_DTYPES.items()
               if name not in ("U64", "U32", "U16")}  # (no randn casts for those: below)
EVERY_DTYPE.update(U64=torch.tensor([0, 2**64 - 1], dtype=torch.uint64), U32=torch.tensor([7], dtype=torch.uint32),
                   U16=torch.tensor([[1, 2]], dtype=torch.uint16), empty=torch.zeros(0, 4), scalar=torch.tensor(3.5))


@pytest.mark.parametrize("pad", [b"", b"    "], ids=["unpadded", "padded"])
def test_safetensors_every_dtype_bit_for_bit(tmp_path, pad):
    path = safetensors_file(tmp_path / "model.safetensors", EVERY_DTYPE, pad=pad)
    tensors = checkpoints.read_state_dict(path)
    assert tensors.keys() == EVERY_DTYPE.keys()
    for name, value in EVERY_DTYPE.items():
        assert tensors[name].dtype == value.dtype and tensors[name].shape == value.shape
        assert torch.equal(bits(tensors[name]), bits(value)), name
    assert checkpoints.read_shapes(path) == {k: v.shape for k, v in EVERY_DTYPE.items()}


def test_safetensors_is_recognized_by_its_content(tmp_path):
    """open_clip_model.safetensors renamed (say, to .bin) is still read as safetensors, not given to torch.load."""
    path = safetensors_file(tmp_path / "weights.bin", {"w": torch.arange(4.0)})
    assert torch.equal(checkpoints.read_state_dict(path)["w"], torch.arange(4.0))


def test_safetensors_files_of_the_safetensors_package(tmp_path):
    """Where the safetensors package is installed (a test-only extra), the files it writes read the same."""
    st = pytest.importorskip("safetensors.torch")
    expected = {k: v for k, v in EVERY_DTYPE.items() if not k.startswith("U") or k == "U8"} | {
        "shared_storage": torch.arange(10.0)[2:6]}
    st.save_file(expected, tmp_path / "model.safetensors", metadata={"note": "made by the safetensors package"})
    tensors = checkpoints.read_state_dict(tmp_path / "model.safetensors")
    assert tensors.keys() == expected.keys()
    assert all(torch.equal(bits(tensors[k]), bits(v)) for k, v in expected.items())
    # and the package reads ours as we do
    ours = safetensors_file(tmp_path / "ours.safetensors", expected)
    assert all(torch.equal(bits(v), bits(expected[k])) for k, v in st.load_file(ours).items())


F32 = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}

# each hostile file: how it is made, and what the one-line refusal says
SAFETENSORS_FAULTS = {
    "shorter than 8 bytes": (lambda p: p.write_bytes(b"\x05\x00"), "truncated safetensors file (2 bytes"),
    "header past the end": (lambda p: safetensors_file(p, header={"w": F32}, data=bytes(8), length=1000),
                            "safetensors header of 1000 bytes, more than the"),
    "header over 100 MB": (lambda p: safetensors_file(p, header={"w": F32}, data=bytes(8), length=10**9),
                           "over the format's 100000000"),
    "header not JSON": (lambda p: safetensors_file(p, header=b"{not json", data=b""), "not valid JSON"),
    "header not UTF-8": (lambda p: safetensors_file(p, header=b'{"\xff": 1}', data=b""), "not valid JSON"),
    "header a list": (lambda p: safetensors_file(p, header=b"[1, 2]" + b" " * 3, data=b"", length=9),
                      "is a JSON list, not an object"),
    "deeply nested header": (lambda p: safetensors_file(p, header=b"{" + b'"a":[' * 100_000 + b"]" * 100_000 + b"}",
                                                        data=b""), "not valid JSON"),
    "a name given twice": (lambda p: safetensors_file(p, header=b'{"w": %s, "w": %s}' % ((json.dumps(F32).encode(),)
                                                                                          * 2), data=bytes(8)),
                           "a name given twice ('w')"),
    "unknown dtype": (lambda p: safetensors_file(p, header={"w": F32 | {"dtype": "F128"}}, data=bytes(8)),
                      "has dtype 'F128', not one of"),
    "negative size": (lambda p: safetensors_file(p, header={"w": F32 | {"shape": [-2]}}, data=bytes(8)),
                      "malformed shape"),
    "boolean size": (lambda p: safetensors_file(p, header={"w": F32 | {"shape": [True, 2]}}, data=bytes(8)),
                     "malformed shape"),
    "an extra field": (lambda p: safetensors_file(p, header={"w": F32 | {"code": "print(1)"}}, data=bytes(8)),
                       "must hold exactly dtype, shape and data_offsets"),
    "metadata not strings": (lambda p: safetensors_file(p, header={"__metadata__": {"a": 1}, "w": F32},
                                                        data=bytes(8)), "__metadata__ must map strings to strings"),
    "reversed offsets": (lambda p: safetensors_file(p, header={"w": F32 | {"data_offsets": [8, 0]}}, data=bytes(8)),
                         "malformed data_offsets"),
    "size mismatch": (lambda p: safetensors_file(p, header={"w": F32 | {"shape": [1 << 40]}}, data=bytes(8)),
                      "takes 4398046511104 bytes, its offsets give 8"),
    "past the data": (lambda p: safetensors_file(p, header={"w": F32 | {"shape": [4], "data_offsets": [0, 16]}},
                                                 data=bytes(8)), "ends at byte 16 of the data, past the 8-byte"),
    "overlapping tensors": (lambda p: safetensors_file(p, header={"a": F32, "b": F32}, data=bytes(8)),
                            "tensor 'b' begins at byte 0 of the data, expected 8"),
    "a gap": (lambda p: safetensors_file(p, header={"w": F32 | {"data_offsets": [4, 12]}}, data=bytes(12)),
              "tensor 'w' begins at byte 4 of the data, expected 0"),
    "trailing data": (lambda p: safetensors_file(p, header={"w": F32}, data=bytes(12)),
                      "the tensors end at byte 8 of the 12-byte data region"),
}


@pytest.mark.parametrize("read", [checkpoints.read_state_dict, checkpoints.read_shapes], ids=["state_dict", "shapes"])
@pytest.mark.parametrize("fault", list(SAFETENSORS_FAULTS))
def test_safetensors_faults_are_refused_before_anything_is_allocated(tmp_path, monkeypatch, fault, read):
    make, problem = SAFETENSORS_FAULTS[fault]
    path = tmp_path / "model.safetensors"
    make(path)
    allocated = []
    real_empty = torch.empty
    monkeypatch.setattr(torch, "empty", lambda *a, **k: allocated.append(a) or real_empty(*a, **k))
    with pytest.raises(ValueError) as e:
        read(path)
    message = str(e.value)
    assert message.startswith(f"{path}: ") and problem in message and "\n" not in message
    assert not allocated


def test_safetensors_runs_nothing(tmp_path):
    """A safetensors header is JSON: a pickle or a Python expression in it is text, never run."""
    marker = tmp_path / "ran"
    payload = pickle.dumps(Payload(marker), protocol=2)
    path = safetensors_file(tmp_path / "model.safetensors", header={"w": F32, "__metadata__": {
        "pickle": payload.hex(), "code": f"__import__('os').system('touch {marker}')"}}, data=bytes(8))
    assert torch.equal(checkpoints.read_state_dict(path)["w"], torch.zeros(2))
    assert not marker.exists()


# ----------------------------------------------------------------------------------------------------
# open_clip's ViT checkpoints: parity with open_clip's own model code, settings from open_clip_config.json


def open_clip_dir():
    """Folder holding open_clip/ (the open-clip-torch 3.3.0 wheel, unpacked: .ci/run puts it in .cache), or None."""
    for d in (os.environ.get("ORTHCR_OPEN_CLIP"), ROOT / ".cache" / "open-clip-torch-3.3.0"):
        if d and (Path(d) / "open_clip" / "model.py").is_file():
            return Path(d)
    return None


OPEN_CLIP_MODELS = ["ViT-B-16", "ViT-B-32-quickgelu"]  # open_clip's GELU and QuickGELU ViTs


@pytest.fixture(scope="module")
def open_clip_folders(tmp_path_factory):
    """{model name: a folder as open_clip publishes it (weights as .bin and .safetensors, open_clip_config.json)
    plus reference.pt}, for random models made by open_clip's own code (tests/open_clip_reference.py)."""
    folder = open_clip_dir()
    if folder is None:
        pytest.skip("open_clip's code not found (set ORTHCR_OPEN_CLIP to the unpacked open-clip-torch wheel)")
    out = tmp_path_factory.mktemp("open_clip")
    done = subprocess.run([sys.executable, str(Path(__file__).parent / "open_clip_reference.py"), str(folder),
                           str(out), *OPEN_CLIP_MODELS], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    for name in OPEN_CLIP_MODELS:  # without the safetensors package, the same tensors written by this file's writer
        if not (out / name / "open_clip_model.safetensors").exists():
            state = torch.load(out / name / "open_clip_pytorch_model.bin", weights_only=True)
            safetensors_file(out / name / "open_clip_model.safetensors", state)
    return {name: out / name for name in OPEN_CLIP_MODELS}


def features(model, reference):
    with torch.no_grad():
        return model.encode_image(reference["images"]), model.encode_text(reference["text"])


def assert_agree(ours, theirs, atol=1e-5):
    for a, b in zip(ours, theirs):
        assert (unit(a) - unit(b)).abs().max() <= atol


def unit(x):
    return x / x.norm(dim=-1, keepdim=True)


@pytest.mark.parametrize("weights", ["open_clip_pytorch_model.bin", "open_clip_model.safetensors"])
@pytest.mark.parametrize("name", OPEN_CLIP_MODELS)
def test_open_clip_parity(open_clip_folders, name, weights):
    """clip_min.load reads open_clip's files and config; its fp32 features are open_clip's within 1e-5."""
    reference = torch.load(open_clip_folders[name] / "reference.pt", weights_only=True)
    model = clip_min.load(open_clip_folders[name] / weights)
    assert model.activation == ("quick_gelu" if "quickgelu" in name else "gelu")
    assert (model.mean, model.std) == (clip_min.MEAN, clip_min.STD)
    assert_agree(features(model, reference), (reference["image_features"], reference["text_features"]))


def test_open_clip_without_its_config_takes_the_activation_flag(open_clip_folders, tmp_path):
    """Without open_clip_config.json the activation is not known: OpenAI's quick_gelu unless given, and a GELU
    model read with quick_gelu computes other features (so the parity above can fail)."""
    path = tmp_path / "open_clip_pytorch_model.bin"
    path.write_bytes((open_clip_folders["ViT-B-16"] / path.name).read_bytes())
    reference = torch.load(open_clip_folders["ViT-B-16"] / "reference.pt", weights_only=True)
    expected = (reference["image_features"], reference["text_features"])
    assert_agree(features(clip_min.load(path, activation="gelu"), reference), expected)
    with pytest.raises(AssertionError):
        assert_agree(features(clip_min.load(path), reference), expected, atol=1e-3)
    with pytest.raises(ValueError, match=f"{open_clip_folders['ViT-B-16'] / 'open_clip_config.json'}: says the "
                                         f"model uses gelu, not the quick_gelu asked for"):
        clip_min.load(open_clip_folders["ViT-B-16"] / path.name, activation="quick_gelu")


def test_open_clip_attn_mask_buffer_is_dropped(open_clip_folders):
    """Older open_clip releases saved the text tower's causal mask; the model builds its own."""
    path = open_clip_folders["ViT-B-32-quickgelu"] / "open_clip_pytorch_model.bin"
    assert "attn_mask" in checkpoints.read_state_dict(path)  # as the reference script wrote it
    assert "attn_mask" not in checkpoints.read_state_dict(open_clip_folders["ViT-B-16"] / path.name)


def tiny_open_clip(folder, model_cfg=None, preprocess_cfg=None, activation="gelu", **extra_tensors):
    """A tiny random CLIP saved as open_clip publishes it: open_clip_pytorch_model.bin and open_clip_config.json."""
    folder.mkdir(parents=True, exist_ok=True)
    state = clip_min.random_model("tiny", seed=0, activation=activation).state_dict() | extra_tensors
    torch.save(state, folder / "open_clip_pytorch_model.bin")
    config = {"model_cfg": {"embed_dim": 32, "quick_gelu": activation == "quick_gelu",
                            "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8},
                            "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 1,
                                         "layers": 2}} | (model_cfg or {}),
              "preprocess_cfg": {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.5, 1.0]} | (preprocess_cfg or {})}
    (folder / "open_clip_config.json").write_text(json.dumps(config))
    return folder / "open_clip_pytorch_model.bin"


def test_open_clip_normalization_constants_reach_preprocessing(tmp_path):
    path = tiny_open_clip(tmp_path / "m")
    model = clip_min.load(path)
    assert (model.mean, model.std, model.activation) == ((0.5, 0.5, 0.5), (0.25, 0.5, 1.0), "gelu")
    assert clip_min.checkpoint_settings(path) == dict(activation="gelu", mean=model.mean, std=model.std,
                                                      image_size=32)
    image = Image.new("RGB", (40, 36), (255, 128, 0))
    x = clip_min.preprocess(image, 32, model.mean, model.std)
    expected = (torch.tensor([255, 128, 0]) / 255 - torch.tensor(model.mean)) / torch.tensor(model.std)
    assert torch.allclose(x[:, 0, 0], expected)
    assert not torch.allclose(clip_min.preprocess(image, 32)[:, 0, 0], expected)  # CLIP's constants: other values


def text_cfg(**kv):
    return {"text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 1, "layers": 2} | kv}


def vision_cfg(**kv):
    return {"vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8} | kv}


# open_clip configs of models clip_min doesn't compute: each is one line naming the entry
OPEN_CLIP_REFUSALS = {
    "SigLIP's tokenizer": (dict(model_cfg=text_cfg(hf_tokenizer_name="timm/ViT-B-16-SigLIP", vocab_size=32000)),
                           "another tokenizer (text_cfg hf_tokenizer_name 'timm/ViT-B-16-SigLIP'"),
    "a Hugging Face text tower": (dict(model_cfg=text_cfg(hf_model_name="xlm-roberta-base")),
                                  "another tokenizer (text_cfg hf_model_name 'xlm-roberta-base'"),
    "another vocabulary": (dict(model_cfg=text_cfg(vocab_size=32000)), "another tokenizer (text_cfg vocab_size"),
    "a tokenizer option": (dict(model_cfg=text_cfg(tokenizer_kwargs={"clean": "canonicalize"})),
                           "another tokenizer (text_cfg tokenizer_kwargs"),
    "SigLIP's loss": (dict(model_cfg={"init_logit_bias": -10}), "a SigLIP model"),
    "CoCa": (dict(model_cfg={"multimodal_cfg": {"width": 64}}), "another architecture (model_cfg multimodal_cfg"),
    "custom text": (dict(model_cfg={"custom_text": True}), "another architecture (model_cfg custom_text True)"),
    "a timm tower": (dict(model_cfg=vision_cfg(timm_model_name="vit_base_patch16_224")),
                     "vision_cfg timm_model_name 'vit_base_patch16_224'"),
    "a ResNet tower": (dict(model_cfg=vision_cfg(layers=[3, 4, 6, 3])), "a ResNet image tower"),
    "80-wide heads (ViT-H/14)": (dict(model_cfg=vision_cfg(head_width=80)), "vision_cfg head_width 80 (clip_min"),
    "average pooling": (dict(model_cfg=vision_cfg(pool_type="avg")), "vision_cfg pool_type 'avg'"),
    "layer scale": (dict(model_cfg=text_cfg(ls_init_value=1e-5)), "text_cfg ls_init_value 1e-05"),
    "text heads": (dict(model_cfg=text_cfg(heads=4)), "text_cfg heads 4"),
    "squashed images": (dict(preprocess_cfg={"resize_mode": "squash"}), "preprocess_cfg resize_mode 'squash'"),
    "bilinear resizing": (dict(preprocess_cfg={"interpolation": "bilinear"}), "preprocess_cfg interpolation"),
}


@pytest.mark.parametrize("case", list(OPEN_CLIP_REFUSALS))
def test_open_clip_models_clip_min_does_not_compute_are_refused(tmp_path, case):
    options, problem = OPEN_CLIP_REFUSALS[case]
    path = tiny_open_clip(tmp_path / "m", **options)
    with pytest.raises(ValueError) as e:
        clip_min.load(path)
    message = str(e.value)
    assert message.startswith(f"{path.parent / 'open_clip_config.json'}: ") and problem in message
    assert "\n" not in message


@pytest.mark.parametrize("make, problem", [
    (lambda p: tiny_open_clip(p, model_cfg=vision_cfg(image_size=64)), "says 64 px images, the tensors of"),
    (lambda p: tiny_open_clip(p, preprocess_cfg={"std": [1, 0, 1]}), "preprocess_cfg std must be three finite"),
    (lambda p: (tiny_open_clip(p), (p / "open_clip_config.json").write_text("{nope"))[0], "not an open_clip config"),
    (lambda p: (tiny_open_clip(p), (p / "open_clip_config.json").write_text('{"model_cfg": ' + "[" * 100_000))[0],
     "not an open_clip config (maximum recursion depth exceeded"),
    (lambda p: tiny_open_clip(p, logit_bias=torch.zeros([])), "a SigLIP model (it has a logit_bias)"),
    (lambda p: tiny_open_clip(p, **{"text.proj": torch.zeros(2)}), "a custom text tower (keys 'text.*'"),
])
def test_open_clip_files_that_contradict_the_model_are_refused(tmp_path, make, problem):
    path = make(tmp_path / "m")
    with pytest.raises(ValueError, match=re.escape(problem)) as e:
        clip_min.load(path)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("config, problem", [
    (dict(preprocess_cfg={"mean": [0.5, float("nan"), 0.5]}), "preprocess_cfg mean must be three finite numbers, "
                                                              "one per RGB channel; got [0.5, NaN, 0.5]"),
    (dict(preprocess_cfg={"mean": [0.5, 0.5, float("-inf")]}), "preprocess_cfg mean must be three finite numbers"),
    (dict(preprocess_cfg={"mean": ["0.5", 0.5, 0.5]}), "preprocess_cfg mean must be three finite numbers"),
    (dict(preprocess_cfg={"mean": [0.5, 0.5]}), "preprocess_cfg mean must be three finite numbers"),
    (dict(preprocess_cfg={"std": [0.5, float("inf"), 0.5]}), "preprocess_cfg std must be three finite numbers, "
                                                             "one per RGB channel, each > 0 (it divides)"),
    (dict(preprocess_cfg={"std": [0.5, float("nan"), 0.5]}), "preprocess_cfg std must be three finite numbers"),
    (dict(preprocess_cfg={"std": [0.5, -1, 0.5]}), "preprocess_cfg std must be three finite numbers"),
    (dict(preprocess_cfg={"std": [True, 1, 1]}), "preprocess_cfg std must be three finite numbers"),
    (dict(preprocess_cfg={"std": 0.5}), "preprocess_cfg std must be three finite numbers"),
    (dict(model_cfg={"quick_gelu": "yes"}), 'model_cfg quick_gelu must be true or false, got "yes"'),
    (dict(model_cfg={"quick_gelu": 1}), "model_cfg quick_gelu must be true or false, got 1"),
    (dict(preprocess_cfg={"mean": [10**400, 0.5, 0.5]}), "preprocess_cfg mean must be three finite numbers"),  # no float
    (dict(preprocess_cfg={"std": [0.5, 0.5, 10**400]}), "preprocess_cfg std must be three finite numbers"),
    (dict(model_cfg=text_cfg(width="64")), 'text_cfg width must be a whole number > 0, got "64"'),
    (dict(model_cfg=text_cfg(width=None, heads=1)), "text_cfg width must be a whole number > 0, got null"),
])
def test_open_clip_config_values_are_refused_naming_the_file_and_the_key(tmp_path, config, problem):
    path = tiny_open_clip(tmp_path / "m", **config)  # a GELU model's config
    for activation in (None, "gelu", "quick_gelu"):  # a bad value is named as such, never as an activation conflict
        with pytest.raises(ValueError) as e:
            clip_min.checkpoint_settings(path, activation)
        message = str(e.value)
        assert message.startswith(f"{path.parent / 'open_clip_config.json'}: ") and problem in message, message
        assert "\n" not in message


@pytest.mark.parametrize("options", [dict(model_cfg=text_cfg(hf_model_name="x" * 100_000)),
                                     dict(model_cfg=vision_cfg(pool_type="x" * 100_000)),
                                     dict(preprocess_cfg={"interpolation": "x" * 100_000})])
def test_an_open_clip_config_value_of_any_size_is_named_in_a_short_line(tmp_path, options):
    path = tiny_open_clip(tmp_path / "m", **options)
    with pytest.raises(ValueError) as e:
        clip_min.checkpoint_settings(path)
    assert "'xxxxxxxx" in str(e.value) and len(str(e.value)) < 400, str(e.value)[:400]


def test_an_open_clip_config_that_gives_a_key_twice_is_refused_naming_it(tmp_path):
    path = tiny_open_clip(tmp_path / "m")
    config = path.parent / "open_clip_config.json"
    text = config.read_text()
    assert text.count('"quick_gelu": false') == 1
    config.write_text(text.replace('"quick_gelu": false', '"quick_gelu": false, "quick_gelu": true'))
    with pytest.raises(ValueError) as e:
        clip_min.checkpoint_settings(path)
    assert str(e.value) == f"{config}: the key 'quick_gelu' is given twice in one object (JSON readers keep either " \
                           f"value): give it once"
    config.write_text(text.replace('"std": [', '"std": [0.5, 0.5, 0.5], "std": ['))  # nested: preprocess_cfg's
    with pytest.raises(ValueError, match="the key 'std' is given twice"):
        clip_min.load(path)
