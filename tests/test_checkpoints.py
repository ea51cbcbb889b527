"""toolbox/checkpoints.py, the checkpoint reader that executes nothing: TorchScript archives (ours, scripted
modules, older layouts, third-party archives written by other torch versions) read bit for bit as torch.jit.load
reads them; torch.save files; safetensors files; every hostile file refused in one line before its memory is spent."""

import os
import pickle
import struct
import tracemalloc
import zipfile
from pathlib import Path

import pytest
import torch

import clip_min
from toolbox import checkpoints
from conftest import ROOT, rewrite_zip

FIXTURES = Path(__file__).resolve().parent / "fixtures"
ARCHIVE, STATE = FIXTURES / "tiny_clip.jit.pt", FIXTURES / "tiny_clip.state.pt"


# ----------------------------------------------------------------------------------------------------
# TorchScript archives


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


