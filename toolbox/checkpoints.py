"""Reading checkpoints (TorchScript archives such as OpenAI's, torch.save files, safetensors files such as
open_clip's) without executing anything from them.

`clip_min.read_state_dict` and `clip_min.read_shapes` are this module's `read_state_dict` and `read_shapes`.
"""

import io
import json
import math
import pickle
import sys
import zipfile
from pathlib import Path

import torch

#
# A checkpoint is untrusted input: nothing in it is executed, and it can't make the reader allocate more than
# the file's own size. PyTorch stores the pickle and tensor records of its zip archives uncompressed (so that
# they can be memory-mapped): such a record can't inflate, and each storage record must hold exactly numel x
# itemsize bytes. (TorchScript's code/ records are compressed; they are never read.)

# storage classes named in archives, and the dtype of their elements
_STORAGE_DTYPES = {
    "HalfStorage": torch.float16, "FloatStorage": torch.float32, "DoubleStorage": torch.float64,
    "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8, "BoolStorage": torch.bool,
    "ComplexHalfStorage": torch.complex32, "ComplexFloatStorage": torch.complex64,
    "ComplexDoubleStorage": torch.complex128,
}
_MAX_NESTING = 100  # modules within modules; CLIP's deepest tensor is 5 deep (visual.transformer.resblocks.0.attn)
_CHUNK = 1 << 20  # bytes read at a time into a storage


def read_state_dict(path):
    """The tensors of a checkpoint file: a TorchScript archive (OpenAI's), a `torch.save`d state dict
    (open_clip's open_clip_pytorch_model.bin), or a safetensors file (open_clip_model.safetensors).

    Nothing from the file is executed: archives go through a restricted unpickler (`_ArchiveUnpickler`),
    plain files through `torch.load(weights_only=True)`, safetensors files through a JSON header check
    (`_read_safetensors`). Records are size-checked before anything is allocated
    and read once, into the tensors' own memory. A file that is not a sound checkpoint raises one ValueError
    naming it (a missing one FileNotFoundError).
    """
    return _read_checkpoint(Path(path), data=True)


def read_shapes(path):
    """{name: torch.Size} of a checkpoint's tensors without reading their data, with read_state_dict's checks
    (to check a model's layout before loading it). Only a legacy torch.save file (not a zip) is read whole."""
    return {name: tensor.shape for name, tensor in _read_checkpoint(Path(path), data=False).items()}


def check_torch_file(path, blob=None):
    """Raise one ValueError naming `path` unless it is a torch.save zip archive whose records are stored
    uncompressed within the file: then torch.load(weights_only=True) allocates at most the file's size. With
    `blob`, the file's bytes already read are checked (so that what is checked is what gets loaded)."""
    path = Path(path)
    if blob is None:
        with open(path, "rb") as f:
            head = f.read(4)
    else:
        head = blob[:4]
    if head != b"PK\x03\x04":
        raise ValueError(f"{path}: not a torch.save zip archive")
    with _open_archive(path if blob is None else io.BytesIO(blob), path) as archive:
        _archive_top(archive, path)
        _check_records(archive.infolist(), path, None if blob is None else len(blob))


def _read_checkpoint(path, data):
    """{name: tensor} of a checkpoint; without `data`, tensors with the right shapes and dtypes whose bytes are
    never read (meta tensors from archives, memory-mapped ones from torch.load)."""
    if path.is_dir():
        raise ValueError(f"{path}: a directory, not a checkpoint file")
    with open(path, "rb") as f:
        head = f.read(4)
    if not head:
        raise ValueError(f"{path}: empty file, not a checkpoint")
    if is_safetensors(path):
        return _checked(_read_safetensors(path, data), path)
    is_zip = head == b"PK\x03\x04"
    if is_zip:
        with _open_archive(path) as archive:
            if any(name.count("/") == 1 and name.endswith("/model.json") for name in archive.NameToInfo):
                raise ValueError(f"{path}: a TorchScript archive in the model.json format of PyTorch 1.0-1.2, "
                                 f"which PyTorch 2's torch.jit.load no longer reads either; re-save it with "
                                 f"PyTorch 1.x, or save its state_dict()")
            top = _archive_top(archive, path)
            if _is_torchscript(archive, top):
                _check_records([info for info in archive.infolist() if info.filename in (
                    f"{top}/data.pkl", f"{top}/byteorder") or info.filename.startswith(f"{top}/data/")], path)
                return _checked(_read_torchscript(archive, top, path, data), path)
            _check_records(archive.infolist(), path)  # before torch.load reads any of them
    try:
        # a zip (records checked above) can be memory-mapped: its tensors' bytes are then never read
        state_dict = torch.load(path, map_location="cpu", weights_only=True, mmap=is_zip and not data)
    except Exception as e:
        raise ValueError(f"{path}: not a CLIP checkpoint (neither a TorchScript archive nor a torch.save "
                         f"state dict that loads with weights_only=True): {_reason(e)}") from None
    return _checked(state_dict, path)


def _is_torchscript(archive, top):
    """Whether a PyTorch zip archive is TorchScript's (torch.jit.save) rather than torch.save's: only TorchScript
    archives carry constants and code."""
    return f"{top}/constants.pkl" in archive.NameToInfo or any(
        name.startswith(f"{top}/code/") for name in archive.NameToInfo)


def _reason(error):
    """One line saying why `error` happened. (torch.load's weights-only message opens with advice to switch the
    check off; its reason is the next line.)"""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if len(lines) > 1 and lines[0].startswith("Weights only load failed"):
        lines = lines[1:]
    return f"{type(error).__name__}: {lines[0][:300]}" if lines else type(error).__name__


def _checked(state_dict, path):
    """The state dict as a plain dict, if it is a dict of tensors none of which overlaps itself (a view with
    stride 0 would let a small file make a huge tensor)."""
    if not isinstance(state_dict, dict) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise ValueError(f"{path}: expected a dict of tensors (a state dict), got {type(state_dict).__name__}")
    for name, tensor in state_dict.items():
        if tensor.numel() * tensor.element_size() > tensor.untyped_storage().nbytes():
            raise ValueError(f"{path}: tensor {name} of shape {tuple(tensor.shape)} overlaps itself: more "
                             f"elements than its storage holds")
    return dict(state_dict)


def _open_archive(path, name=None):
    """The zip archive at `path` (or in a file object, `name` naming it), its directory read."""
    try:
        return zipfile.ZipFile(path)
    except Exception as e:  # BadZipFile, NotImplementedError, UnicodeDecodeError...: zipfile's ways to fail
        raise ValueError(f"{name or path}: truncated or corrupt checkpoint archive ({_reason(e)})") from None


def _archive_top(archive, path):
    """The archive's top-level folder (named after the saved file, so never assumed), the one holding data.pkl."""
    tops = [name[:-len("/data.pkl")] for name in archive.namelist()
            if name.endswith("/data.pkl") and name.count("/") == 1]
    if len(tops) != 1:
        raise ValueError(f"{path}: not a PyTorch archive: expected one <folder>/data.pkl, found {len(tops)}")
    return tops[0]


def _check_records(records, path, size=None):
    """Each record stored uncompressed and inside the file, and all together no bigger than the file (zip
    entries may point at the same bytes): then reading them takes at most the file's size."""
    size, total = path.stat().st_size if size is None else size, 0
    for info in records:
        if info.compress_type != zipfile.ZIP_STORED or info.compress_size != info.file_size:
            raise ValueError(f"{path}: record {info.filename!r} is compressed ({info.compress_size} bytes declared "
                             f"to inflate to {info.file_size}); PyTorch stores tensor records uncompressed")
        if info.header_offset + info.file_size > size:
            raise ValueError(f"{path}: record {info.filename!r} declares {info.file_size} bytes, past the end of "
                             f"the {size}-byte file")
        total += info.file_size
    if total > size:
        raise ValueError(f"{path}: the records declare {total} bytes in all, more than the file's {size}")


def _read_torchscript(archive, top, path, data):
    """{dotted name: tensor} of every tensor attribute in the archive's module tree, rebuilt from its data/
    records. (torch.jit's state_dict holds the parameters and buffers among them: the code/ records, never read
    here, say which attributes those are; plain tensor attributes such as a model's running state come too.)"""
    byteorder = archive.NameToInfo.get(f"{top}/byteorder")  # older archives have none: they are little-endian
    order = b"little"
    if byteorder is not None:  # its first 16 bytes at most: 'little' or 'big'
        order = _read_record(archive, byteorder, bytearray(min(byteorder.file_size, 16)), path)
    if order != sys.byteorder.encode():  # torch.jit.load ignores the record and misreads such an archive
        raise ValueError(f"{path}: archive byte order {bytes(order)!r} is not this machine's ({sys.byteorder})")
    try:
        with archive.open(f"{top}/data.pkl") as pickled:  # unpickled as it is read
            unpickler = _ArchiveUnpickler(pickled, archive, top, data)
            root = unpickler.load()
        if not isinstance(root, _ScriptObject):
            raise ValueError(f"data.pkl holds a {type(root).__name__}, not a TorchScript module")
        tensors = dict(_module_tensors(root))
    except Exception as e:  # whatever the pickle makes the unpickler raise
        raise ValueError(f"{path}: cannot read the TorchScript archive's data.pkl: {_reason(e)}") from None
    for info, storage in unpickler.unread:
        _read_record(archive, info, memoryview(storage.view(torch.uint8).numpy()), path)
    return tensors


def _read_record(archive, info, buffer, path):
    """`buffer` filled with the first len(buffer) bytes of record `info`, read a chunk at a time: no second
    copy of the record."""
    view = memoryview(buffer)
    try:
        with archive.open(info) as record:
            for start in range(0, len(view), _CHUNK):
                end = min(start + _CHUNK, len(view))
                if record.readinto(view[start:end]) != end - start:
                    raise EOFError(f"{info.file_size}-byte record ends early")
    except Exception as e:  # a damaged local header, a CRC mismatch, a short file...
        raise ValueError(f"{path}: record {info.filename!r} is corrupt ({_reason(e)})") from None
    return buffer


# --- safetensors (https://github.com/huggingface/safetensors, its README's format section): an 8-byte little-endian
# header length N, N bytes of JSON {name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {str:
# str}?}, then the data region; offsets count from the region's start. As the safetensors library does, the
# tensors must tile the region exactly: sorted by offset, each beginning where the one before ends, the last
# ending at the end of the file, each exactly numel x itemsize bytes.

SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U64": torch.uint64, "U32": torch.uint32, "U16": torch.uint16, "U8": torch.uint8, "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
_MAX_SAFETENSORS_HEADER = 100_000_000  # bytes; the safetensors library's own bound


def is_safetensors(path):
    """Whether `path` is (meant to be) a safetensors file: named .safetensors, or a JSON object right after an
    8-byte length (no pickle, zip or TorchScript file starts so)."""
    with open(path, "rb") as f:
        head = f.read(9)
    return Path(path).suffix == ".safetensors" or (len(head) == 9 and head[8:9] == b"{")


def _read_safetensors(path, data):
    """{name: tensor} of a safetensors file, every offset and size checked against the file before anything is
    allocated; tensors are read straight into their own memory (with `data` False: meta tensors, nothing read)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(f"{path}: truncated safetensors file ({size} bytes, less than its 8-byte header length)")
        n = int.from_bytes(head, "little")
        if n > min(_MAX_SAFETENSORS_HEADER, size - 8):
            raise ValueError(f"{path}: safetensors header of {n} bytes, more than the {size}-byte file holds"
                             if n <= _MAX_SAFETENSORS_HEADER else
                             f"{path}: safetensors header of {n} bytes, over the format's {_MAX_SAFETENSORS_HEADER}")
        entries = _safetensors_header(f.read(n), path)
        start, region = 8 + n, size - 8 - n
        end = 0
        for name, dtype, shape, (begin, stop) in sorted(entries, key=lambda e: e[3]):
            if begin != end:  # a gap or an overlap: the library refuses both
                raise ValueError(f"{path}: tensor {name!r} begins at byte {begin} of the data, expected {end} (the "
                                 f"tensors must tile the data region without gaps or overlaps)")
            numel = math.prod(shape)
            if stop - begin != numel * dtype.itemsize:
                raise ValueError(f"{path}: tensor {name!r} of shape {tuple(shape)} and dtype {dtype} takes "
                                 f"{numel * dtype.itemsize} bytes, its offsets give {stop - begin}")
            if stop > region:
                raise ValueError(f"{path}: tensor {name!r} ends at byte {stop} of the data, past the {region}-byte "
                                 f"data region")
            end = stop
        if end != region:
            raise ValueError(f"{path}: the tensors end at byte {end} of the {region}-byte data region (trailing data)")
        # all checked: the tensors take exactly the data region's bytes
        tensors = {name: (begin, torch.empty(shape, dtype=dtype, device="cpu" if data else "meta"))
                   for name, dtype, shape, (begin, _) in entries}
        if data:
            for name, (begin, tensor) in sorted(tensors.items(), key=lambda item: item[1][0]):
                f.seek(start + begin)
                view = memoryview(tensor.view(-1).view(torch.uint8).numpy()) if tensor.numel() else memoryview(b"")
                for at in range(0, len(view), _CHUNK):
                    if f.readinto(view[at:at + _CHUNK]) != len(view[at:at + _CHUNK]):
                        raise ValueError(f"{path}: file ends inside tensor {name!r}")
    return {name: tensor for name, (_, tensor) in tensors.items()}


def _safetensors_header(header, path):
    """[(name, dtype, shape, (begin, end))] of a safetensors JSON header, each field's type checked."""
    def no_duplicates(pairs):
        names = [k for k, _ in pairs]
        if len(set(names)) != len(names):
            raise ValueError(f"a name given twice ({next(k for k in names if names.count(k) > 1)!r})")
        return dict(pairs)

    try:
        parsed = json.loads(header.decode("utf-8"), object_pairs_hook=no_duplicates)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise ValueError(f"{path}: safetensors header is not valid JSON ({_reason(e)})") from None
    if not isinstance(parsed, dict):
        raise ValueError(f"{path}: safetensors header is a JSON {type(parsed).__name__}, not an object")
    metadata = parsed.pop("__metadata__", {})
    if not (isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())):
        raise ValueError(f"{path}: safetensors __metadata__ must map strings to strings")
    entries = []
    for name, info in parsed.items():
        if not (isinstance(info, dict) and set(info) == {"dtype", "shape", "data_offsets"}):
            raise ValueError(f"{path}: safetensors entry {name[:80]!r} must hold exactly dtype, shape and "
                             f"data_offsets")
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if not isinstance(dtype, str) or dtype not in SAFETENSORS_DTYPES:
            raise ValueError(f"{path}: tensor {name[:80]!r} has dtype {str(dtype)[:20]!r}, not one of "
                             f"{', '.join(SAFETENSORS_DTYPES)}")
        if not (isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)):
            raise ValueError(f"{path}: tensor {name[:80]!r} has a malformed shape (expected a list of sizes)")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int and o >= 0 for o in offsets)
                and offsets[0] <= offsets[1]):
            raise ValueError(f"{path}: tensor {name[:80]!r} has malformed data_offsets (expected [begin, end])")
        entries.append((name, SAFETENSORS_DTYPES[dtype], shape, tuple(offsets)))
    return entries


# --- What data.pkl may hold. torch.jit.load's unpickler (torch/csrc/jit/serialization/unpickler.cpp) knows a
# fixed set of globals; those that rebuild data are read here as data, the rest are refused:
#   __torch__.* classes (modules, TorchScript classes, enums)  -> _ScriptObject: its attributes
#   torch._utils._rebuild_tensor_v2                            -> _rebuild_tensor: a checked view of a storage
#   torch._tensor._rebuild_from_type_v2 (with torch.Tensor)    -> _rebuild_from_type: the same tensor
#   torch.<T>Storage                                           -> the dtype of T (a storage's element type)
#   torch.jit._pickle.build_intlist, build_doublelist,
#     build_boollist, build_tensorlist, restore_type_tag        -> the list or value itself (type tags)
#   collections.OrderedDict                                    -> an empty dict (a tensor's backward hooks)
#   torch.device                                               -> the device (as a string: nothing is moved)
#   builtins.complex                                           -> a complex number
# Refused: quantized and sparse tensors (_rebuild_qtensor, _rebuild_sparse_tensor, qint storages), the tensor
# table of the pre-1.3 model.json format (build_tensor_from_id, __main__.*), RRefs, and every other global.
# Each tensor value the pickle can reach is wrapped (_Tensor, _Storage), so that no pickle opcode can call a
# torch method on it (BUILD would call Tensor.__setstate__).

# (attributes of int, float, bool, str, None, lists, tuples and dicts are plain pickle values)
_REFUSED_GLOBALS = {
    ("torch._utils", "_rebuild_qtensor"): "a quantized tensor",
    ("torch._utils", "_rebuild_sparse_tensor"): "a sparse tensor",
    ("torch.jit._pickle", "build_tensor_from_id"): "a tensor-table reference (the pre-1.3 model.json format)",
}
_MAX_VISITS = 1 << 20  # attribute visits in the module tree (a module shared at every level would double each)


class _Storage:
    """A storage from a data/ record: a flat tensor of its dtype (wrapped, see above)."""

    __slots__ = ("tensor",)

    def __init__(self, tensor):
        self.tensor = tensor

    def __setstate__(self, state):
        raise pickle.UnpicklingError("a pickle instruction (BUILD) applied to a storage")


class _Tensor(_Storage):
    """A tensor rebuilt from a storage (wrapped, see above)."""

    __slots__ = ()

    def __setstate__(self, state):
        raise pickle.UnpicklingError("a pickle instruction (BUILD) applied to a tensor")


class _ScriptObject:
    """Stands for any `__torch__.*` class of an archive (a module, a TorchScript class, an enum): its
    attributes, in `attributes` (not the instance's own __dict__: an attribute named __setstate__ stays data)."""

    def __init__(self, *value):  # an enum's value (REDUCE); modules and classes come through NEWOBJ + BUILD
        self.attributes = {"value": value[0]} if len(value) == 1 else {}
        if len(value) > 1:
            raise pickle.UnpicklingError("a TorchScript enum with more than one value")

    def __setstate__(self, state):
        if not isinstance(state, dict):  # a class with its own __getstate__/__setstate__: its code sets it up
            raise pickle.UnpicklingError(f"a TorchScript object whose state is a {type(state).__name__}, set by "
                                         f"its own __setstate__ code (quantized or custom classes), which is "
                                         f"never run here")
        if not hasattr(self, "attributes"):
            self.attributes = {}
        self.attributes.update(state)


def _module_tensors(obj, prefix="", ancestors=(), visits=None):
    """(dotted name, tensor) for every tensor attribute in the tree, as a state dict names them (tensors inside
    lists, tuples and dicts are module state that no state dict names); a module that holds itself, nesting
    deeper than _MAX_NESTING or a tree of more than _MAX_VISITS attributes is an error (not a RecursionError)."""
    visits = [0] if visits is None else visits
    if len(ancestors) == _MAX_NESTING:
        raise ValueError(f"modules nested deeper than {_MAX_NESTING} (at {prefix[:80]}...)")
    for name, value in getattr(obj, "attributes", {}).items():
        visits[0] += 1
        if visits[0] > _MAX_VISITS:
            raise ValueError(f"more than {_MAX_VISITS} attributes in the module tree")
        if isinstance(value, _Tensor):
            yield prefix + str(name), value.tensor
        elif isinstance(value, _ScriptObject):
            if value is obj or any(value is a for a in ancestors):
                raise ValueError(f"module {(prefix + str(name))[:80]!r} contains itself")
            yield from _module_tensors(value, f"{prefix}{name}.", ancestors + (obj,), visits)


def _rebuild_tensor(storage, offset, size, stride, requires_grad=False, hooks=None, metadata=None):
    """What `torch._utils._rebuild_tensor_v2` means: a strided view of a flat storage, which must lie inside it
    (checked here: on the meta device torch doesn't)."""
    if type(storage) is not _Storage:  # (a _Tensor is not a storage)
        raise ValueError(f"a tensor rebuilt from a {type(storage).__name__}, not a storage")
    if not (isinstance(size, tuple) and isinstance(stride, tuple) and len(size) == len(stride)
            and all(type(n) is int and n >= 0 for n in (offset, *size, *stride))):
        raise ValueError("a tensor with a malformed offset, size or stride")
    storage = storage.tensor
    end = offset + sum((n - 1) * s for n, s in zip(size, stride)) + 1 if math.prod(size) else 0
    if end > storage.numel():
        raise ValueError(f"tensor of size {tuple(size)} at offset {offset} reaches past its storage of "
                         f"{storage.numel()} elements")
    return _Tensor(torch.as_strided(storage, size, stride, offset))


def _rebuild_from_type(func, new_type, args, state=None):
    """`torch._tensor._rebuild_from_type_v2`: a tensor of a (sub)class; only plain tensors and parameters, whose
    rebuilt tensor is that of _rebuild_tensor_v2, without Python attributes."""
    if func is not _rebuild_tensor or new_type is not _TensorClass or not isinstance(args, tuple) or state:
        raise ValueError("a tensor of another class, or with Python attributes")
    return func(*args)


class _TensorClass:
    """Stands for the global torch.Tensor, which data.pkl names only as _rebuild_from_type_v2's class: making
    one (torch.Tensor(n) allocates n elements) is refused."""

    def __new__(cls, *args, **kwargs):
        raise pickle.UnpicklingError("refusing to make a torch.Tensor (a checkpoint holds only data)")


def _typed_list(data):
    """torch.jit._pickle.build_intlist and its kin: the list, which they only tag with its element type."""
    if not isinstance(data, list):
        raise ValueError(f"a typed list of a {type(data).__name__}")
    return data


def _type_tag(value, type_str):
    """torch.jit._pickle.restore_type_tag: the value (the tag is TorchScript's static type of a container)."""
    return value


def _ordered_dict():
    """collections.OrderedDict(), only ever called without arguments (a tensor's empty backward-hook dict)."""
    return {}


def _device(name):
    if not isinstance(name, str):
        raise ValueError(f"a device named by a {type(name).__name__}")
    return name


def _complex(real, imag=0.0):
    if not all(type(x) in (int, float) for x in (real, imag)):
        raise ValueError("a complex number of non-numbers")
    return complex(real, imag)


_DATA_GLOBALS = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type,
    ("torch", "Tensor"): _TensorClass,
    ("torch.jit._pickle", "build_intlist"): _typed_list,
    ("torch.jit._pickle", "build_doublelist"): _typed_list,
    ("torch.jit._pickle", "build_boollist"): _typed_list,
    ("torch.jit._pickle", "build_tensorlist"): _typed_list,
    ("torch.jit._pickle", "restore_type_tag"): _type_tag,
    ("collections", "OrderedDict"): _ordered_dict,
    ("torch", "device"): _device,
    ("builtins", "complex"): _complex,
}


class _ArchiveUnpickler(pickle.Unpickler):
    """Unpickles an archive's data.pkl allowing only the data globals above and TorchScript objects.

    Any other global (os.system, builtins.eval, ...) is refused before it can be called. Each storage is
    allocated once its record is found to hold exactly numel x itemsize bytes, and left empty: `unread` lists
    (record, storage) pairs to fill (with data=False storages are meta tensors and nothing is to be read).
    """

    def __init__(self, pickled, archive, top, data):
        super().__init__(pickled)
        self.archive, self.top, self.data = archive, top, data
        self.storages, self.unread = {}, []

    def find_class(self, module, name):
        if module == "__torch__" or module.startswith("__torch__."):
            return _ScriptObject
        if (module, name) in _DATA_GLOBALS:
            return _DATA_GLOBALS[module, name]
        if module == "torch" and name in _STORAGE_DTYPES:
            return _STORAGE_DTYPES[name]
        what = _REFUSED_GLOBALS.get((module, name)) or ("a quantized storage" if module == "torch" and
                                                        name.startswith(("QInt", "QUInt")) else None)
        raise pickle.UnpicklingError(f"refusing global '{module}.{name}' ({what or 'a checkpoint holds only data'}"
                                     f"{', which this reader does not rebuild' if what else ''})")

    def persistent_load(self, pid):
        # pid = ('storage', dtype, key, location, numel): the storage lives in the record <top>/data/<key>
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage" and isinstance(pid[1], torch.dtype)
                and isinstance(pid[2], str) and pid[2].isalnum() and type(pid[4]) is int and pid[4] >= 0):
            raise pickle.UnpicklingError(f"unexpected persistent id (a {type(pid).__name__})")
        _, dtype, key, _, numel = pid
        if key not in self.storages:
            info = self.archive.NameToInfo.get(f"{self.top}/data/{key}")
            if info is None:
                raise ValueError(f"no record data/{key}")
            if info.file_size != numel * dtype.itemsize:  # before allocating or reading anything
                raise ValueError(f"record data/{key} holds {info.file_size} bytes, its storage of {numel} {dtype} "
                                 f"takes {numel * dtype.itemsize}")
            self.storages[key] = _Storage(torch.empty(numel, dtype=dtype, device="cpu" if self.data else "meta"))
            if self.data:
                self.unread.append((info, self.storages[key].tensor))
        elif self.storages[key].tensor.dtype != dtype or self.storages[key].tensor.numel() != numel:
            raise ValueError(f"record data/{key} is named with two dtypes or sizes")
        return self.storages[key]
