"""Read torch `.pth` checkpoints without executing code: a restricted unpickler.

A torch checkpoint is a zip archive holding `data.pkl` (a pickle) and one raw file per tensor
storage. Unpickling can call any importable callable, so torch.load with weights_only off on
a file from elsewhere can run arbitrary code. This reader allows only:

- the tensor rebuild functions `torch._utils._rebuild_tensor(_v2)` and torch's typed storage
  names (re-implemented here: raw bytes -> `torch.frombuffer` -> `as_strided`);
- `collections.OrderedDict` and the pickle built-ins (dict, list, tuple, str, numbers);
- classes named in `records`, which are replaced by an inert `PickledRecord` that only keeps
  their attributes (checkpoints often pickle a training-config object of the author's own class).

Any other global is refused with `UnsafePickleError` naming it, before anything is called.
"""

from __future__ import annotations

import io
import pickle
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import Any, Iterable

import torch

from medai.errors import CheckpointError

_STORAGE_DTYPES = {
    "FloatStorage": torch.float32,
    "DoubleStorage": torch.float64,
    "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16,
    "LongStorage": torch.int64,
    "IntStorage": torch.int32,
    "ShortStorage": torch.int16,
    "CharStorage": torch.int8,
    "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
}


class UnsafePickleError(CheckpointError):
    """A pickle names a callable outside the allow-list; nothing was executed."""

    def __init__(self, path: str | Path, name: str):
        self.name = name
        super().__init__(path, f"refused to unpickle '{name}': not a tensor, storage or allowed container type")


class PickledRecord:
    """Inert stand-in for an allow-listed foreign class: keeps the pickled attributes, runs nothing."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.__dict__.update(kwargs)

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, dict):
            self.__dict__.update(state)
        else:
            self.__dict__["_state"] = state

    def as_dict(self) -> dict[str, Any]:
        """Return the recorded attributes as a plain dict."""
        return dict(self.__dict__)


class _StorageType:
    """Marker for a typed storage name found in a persistent id."""

    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype


def _rebuild_tensor(storage: torch.Tensor, offset: int, size, stride, *_unused) -> torch.Tensor:
    """Rebuild a tensor view of a flat storage tensor (what torch's _rebuild_tensor_v2 does)."""
    return torch.as_strided(storage, tuple(size), tuple(stride), offset).clone()


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file, archive: zipfile.ZipFile, prefix: str, path: Path, records: frozenset[str]):
        super().__init__(file)
        self._archive, self._prefix, self._path, self._records = archive, prefix, path, records
        self._storages: dict[str, torch.Tensor] = {}

    def find_class(self, module: str, name: str) -> Any:
        full = f"{module}.{name}"
        if module == "torch._utils" and name in ("_rebuild_tensor", "_rebuild_tensor_v2"):
            return _rebuild_tensor
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(_STORAGE_DTYPES[name])
        if full == "collections.OrderedDict":
            return OrderedDict
        if full in self._records:
            return PickledRecord
        raise UnsafePickleError(self._path, full)

    def persistent_load(self, pid: Any) -> torch.Tensor:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise CheckpointError(self._path, f"unexpected persistent id {pid!r}")
        _, storage_type, key, _location, numel = pid
        if not isinstance(storage_type, _StorageType):
            raise CheckpointError(self._path, f"storage {key} has no recognised dtype")
        if key not in self._storages:
            raw = self._archive.read(f"{self._prefix}/data/{key}")
            flat = torch.frombuffer(bytearray(raw), dtype=storage_type.dtype) if raw else torch.empty(0, dtype=storage_type.dtype)
            if flat.numel() != numel:
                raise CheckpointError(self._path, f"storage {key}: {flat.numel()} elements on disk, header says {numel}")
            self._storages[key] = flat
        return self._storages[key]


def read_torch_checkpoint(path: str | Path, records: Iterable[str] = ()) -> Any:
    """Return the object in a torch zip checkpoint, unpickled with an allow-list (tensors load on CPU).

    `records` names foreign classes ("module.Class") to load as inert PickledRecord objects.
    Raises UnsafePickleError for any other global and CheckpointError for a malformed file.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(path, "file not found")
    if not zipfile.is_zipfile(path):
        raise CheckpointError(path, "not a torch zip checkpoint (legacy tar/pickle checkpoints are not read)")
    with zipfile.ZipFile(path) as archive:
        pickles = [n for n in archive.namelist() if n.endswith("/data.pkl") or n == "data.pkl"]
        if len(pickles) != 1:
            raise CheckpointError(path, f"expected one data.pkl in the archive, found {len(pickles)}")
        prefix = pickles[0].rpartition("/")[0]
        byteorder = f"{prefix}/byteorder"
        if byteorder in archive.namelist() and archive.read(byteorder).strip() != b"little":
            raise CheckpointError(path, "big-endian checkpoints are not supported")
        unpickler = _RestrictedUnpickler(
            io.BytesIO(archive.read(pickles[0])), archive, prefix, path, frozenset(records)
        )
        try:
            return unpickler.load()
        except (pickle.UnpicklingError, EOFError, TypeError, ValueError) as exc:
            raise CheckpointError(path, f"malformed pickle ({exc})") from exc
