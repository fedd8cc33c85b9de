"""Reading `*.safetensors` files tensor by tensor with plain reads (no memory map).

A memory-mapped load looks instant and defers the disk reads to the first request; reading the
bytes here makes load progress (and load time) honest, and lets a throttle simulate a slow disk.
"""

from __future__ import annotations

import json
import struct
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from tabby.engines.base import ModelFolderError

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


@dataclass(frozen=True)
class TensorEntry:
    file: Path
    dtype: str
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    end: int


def safetensors_files(model_dir: Path) -> list[Path]:
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise ModelFolderError(f"No .safetensors weight files found in {model_dir}")
    return files


def index_tensors(model_dir: Path) -> dict[str, TensorEntry]:
    """Map every tensor name to where its bytes are, reading only the files' headers."""
    entries: dict[str, TensorEntry] = {}
    for file in safetensors_files(model_dir):
        try:
            with file.open("rb") as f:
                (header_len,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(header_len))
        except (OSError, struct.error, ValueError) as exc:
            raise ModelFolderError(f"{file.name} is not a readable safetensors file: {exc}") from None
        base = 8 + header_len
        for name, meta in header.items():
            if name == "__metadata__":
                continue
            if meta.get("dtype") not in DTYPES:
                raise ModelFolderError(f"{file.name}: tensor {name} has the unsupported dtype {meta.get('dtype')}")
            begin, stop = meta["data_offsets"]
            entries[name] = TensorEntry(file, meta["dtype"], tuple(meta["shape"]), base + begin, base + stop)
    return entries


class WeightReader:
    """Reads tensors into fresh memory, optionally no faster than `throttle_mbps`."""

    def __init__(self, throttle_mbps: float = 0.0) -> None:
        self.throttle_mbps = throttle_mbps
        self.bytes_read = 0
        self._started = time.monotonic()
        self._handles: dict[Path, object] = {}

    def read(self, entry: TensorEntry) -> torch.Tensor:
        size = entry.end - entry.start
        buffer = bytearray(size)
        handle = self._handles.get(entry.file)
        if handle is None:
            handle = self._handles[entry.file] = entry.file.open("rb", buffering=0)
        handle.seek(entry.start)  # type: ignore[attr-defined]
        view = memoryview(buffer)
        got = 0
        while got < size:
            n = handle.readinto(view[got:])  # type: ignore[attr-defined]
            if not n:
                raise ModelFolderError(f"{entry.file.name} is truncated")
            got += n
        self.bytes_read += size
        self._throttle()
        if size == 0:
            return torch.empty(entry.shape, dtype=DTYPES[entry.dtype])
        return torch.frombuffer(buffer, dtype=DTYPES[entry.dtype]).reshape(entry.shape)

    def _throttle(self) -> None:
        # A simulated disk: wait until the bytes read so far would have taken this long.
        if self.throttle_mbps > 0:
            due = self.bytes_read / (self.throttle_mbps * 1_000_000)
            elapsed = time.monotonic() - self._started
            if due > elapsed:
                time.sleep(due - elapsed)

    def close(self) -> None:
        for handle in self._handles.values():
            handle.close()  # type: ignore[attr-defined]
        self._handles.clear()
