"""Reading `*.safetensors` files straight into the tensors' own memory, module by module.

A memory-mapped load looks instant and defers the disk reads to the first request; reading the
bytes here makes load progress (and load time) honest, and lets a throttle simulate a slow disk.

The cost of a load is the copy out of the page cache plus the kernel's work of handing out (and
zeroing) fresh pages; there is no other pass over the bytes. A load lays every tensor it will read
out in one anonymous memory block (reserved up front, filled module by module as read; a page
costs memory only once written), asked for in huge pages: one fault per 2 MiB instead of per 4 KiB,
and no module ends in a part-used huge page that would fall back to small ones. The file bytes land
in it through large `preadv` calls shared by a few threads (one call per thread and module, into
several buffers), so the page being zeroed is the page copied into next, while it is still in the
CPU's cache: both costs are CPU work and one core cannot keep pace with the page cache. The threads
read a few modules ahead of the one being handed out, so they do not stop between modules while the
caller takes one in. The block goes back to the system when its last tensor is dropped.
"""

from __future__ import annotations

import ctypes
import json
import mmap
import os
import struct
import time
from collections import deque
from collections.abc import Iterable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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
ALIGN = 64  # every tensor starts on a cache line, as torch's own allocator would place it
READ_AHEAD = 3  # modules being read at once: the one handed out next, and those after it
MAX_BUFFERS = 512  # buffers in one read (the system allows 1024)
HUGE_PAGE = 2 << 20  # where the reserved block starts, so that its first page can be a huge one


@dataclass(frozen=True)
class TensorEntry:
    file: Path
    dtype: str
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


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
            size = file.stat().st_size
        except (OSError, struct.error, ValueError) as exc:
            raise ModelFolderError(f"{file.name} is not a readable safetensors file: {exc}") from None
        base = 8 + header_len
        for name, meta in header.items():
            if name == "__metadata__":
                continue
            entries[name] = _entry(file, name, meta, base, size)
    return entries


def _entry(file: Path, name: str, meta: Any, base: int, file_size: int) -> TensorEntry:
    dtype = meta.get("dtype") if isinstance(meta, dict) else None
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise ModelFolderError(f"{file.name}: tensor {name} has the unsupported dtype {dtype}")
    try:
        begin, stop = (int(n) for n in meta["data_offsets"])
        shape = tuple(int(n) for n in meta["shape"])
    except (KeyError, TypeError, ValueError):
        raise ModelFolderError(f"{file.name}: tensor {name} has no readable shape and offsets") from None
    entry = TensorEntry(file, dtype, shape, base + begin, base + stop)
    if entry.nbytes != DTYPES[dtype].itemsize * _count(shape):
        raise ModelFolderError(f"{file.name}: tensor {name} has {entry.nbytes} bytes, not what its shape {list(shape)} needs")
    if entry.end > file_size:
        raise ModelFolderError(f"{file.name} is truncated: tensor {name} ends past the end of the file")
    return entry


def _count(shape: tuple[int, ...]) -> int:
    count = 1
    for n in shape:
        count *= n
    return count


def _anonymous_block(size: int) -> mmap.mmap | bytearray:
    """Fresh private memory (never written before, so never copied) in huge pages where the system has them."""
    if not hasattr(mmap, "MAP_PRIVATE"):  # no POSIX mmap: ordinary zero-filled memory
        return bytearray(size)
    block = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if hasattr(mmap, "MADV_HUGEPAGE"):
        block.madvise(mmap.MADV_HUGEPAGE)
    return block


def _to_huge_page(block: mmap.mmap | bytearray) -> int:
    """How far into `block` the first huge-page boundary is (the kernel may not have placed it on one)."""
    if isinstance(block, bytearray):
        return 0
    start = ctypes.c_char.from_buffer(block)
    address = ctypes.addressof(start)
    del start  # release the buffer export at once
    return -address % HUGE_PAGE


def block_size(entries: Mapping[str, TensorEntry]) -> int:
    """The bytes `entries` take once laid out for reading (each tensor on a cache line)."""
    return sum(_padded(entry.nbytes) for entry in entries.values())


def _padded(nbytes: int) -> int:
    return -(-nbytes // ALIGN) * ALIGN


class WeightReader:
    """Reads modules' tensors into memory of their own, optionally no faster than `throttle_mbps`.

    With `reserve` (the `block_size` of everything the load will read), the modules are laid out one
    after another in one block; a module that does not fit in what is left gets a block of its own.
    With several threads, `read_modules` keeps the reads of the next modules going while the caller
    takes in the module just read, so the threads never wait for it between modules.
    """

    def __init__(self, throttle_mbps: float = 0.0, threads: int = 1, reserve: int = 0) -> None:
        self.throttle_mbps = throttle_mbps
        self.bytes_read = 0
        self._threads = max(threads, 1)
        self._started = time.monotonic()
        self._files: dict[Path, int] = {}
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="read-weights") if threads > 1 else None
        self._arena: mmap.mmap | bytearray | None = _anonymous_block(reserve + HUGE_PAGE) if reserve > 0 else None
        self._used = _to_huge_page(self._arena) if self._arena is not None else 0

    def read_module(self, entries: Mapping[str, TensorEntry]) -> dict[str, torch.Tensor]:
        """Every tensor of `entries`, in the file's dtype and shape, its bytes really in memory."""
        return next(self.read_modules([entries]))

    def read_modules(self, modules: Iterable[Mapping[str, TensorEntry]]) -> Iterator[dict[str, torch.Tensor]]:
        """Each module's tensors in turn, once all its bytes are in memory (and the throttle allows).

        The reads start at once (the caller may prepare for the tensors meanwhile) and run up to
        `READ_AHEAD` modules ahead of the one handed out: a module handed out is complete, the next
        ones may be part read. `modules` is drawn from only as the reads need the next one.
        """
        queued = iter(modules)
        in_flight: deque[_Module] = deque()
        self._read_ahead(queued, in_flight)
        return self._hand_out(queued, in_flight)

    def _read_ahead(self, queued: Iterator[Mapping[str, TensorEntry]], in_flight: deque[_Module]) -> None:
        while len(in_flight) < (READ_AHEAD if self._pool is not None else 1):
            entries = next(queued, None)
            if entries is None:
                return
            in_flight.append(self._start(entries))

    def _hand_out(
        self, queued: Iterator[Mapping[str, TensorEntry]], in_flight: deque[_Module]
    ) -> Iterator[dict[str, torch.Tensor]]:
        while in_flight:
            module = in_flight.popleft()
            if self._pool is not None:
                self._read_ahead(queued, in_flight)  # the threads go on with the next module meanwhile
            for read in module.reads:
                read.result()  # a read's error (a file cut short) is the load's error
            self.bytes_read += module.nbytes
            self._throttle()
            yield module.tensors()
            self._read_ahead(queued, in_flight)  # without threads, the next module is read when asked for

    def _start(self, entries: Mapping[str, TensorEntry]) -> _Module:
        """Lay a module out and start its reads: one large read per thread, each of an equal share."""
        order = sorted(entries, key=lambda name: (entries[name].file, entries[name].start))
        offsets: dict[str, int] = {}
        size = 0
        for name in order:
            offsets[name] = size
            size += _padded(entries[name].nbytes)
        block, base = self._place(size)
        module = _Module(block, {name: (entries[name], base + offsets[name]) for name in order})
        view = memoryview(block)
        spans = [
            (entries[name].file, entries[name].start, view[base + offsets[name] : base + offsets[name] + entries[name].nbytes])
            for name in order
        ]
        del view  # the spans' views hold the block only until their reads are done
        shares = _shares(spans, self._threads if self._pool is not None else 1)
        runs = [[(self._fd(file), file.name, position, views) for file, position, views in _runs(share)] for share in shares]
        if self._pool is not None:
            module.reads = [self._pool.submit(_read_runs, share) for share in runs]
        else:
            done: Future[None] = Future()
            _read_runs([run for share in runs for run in share])
            done.set_result(None)
            module.reads = [done]
        return module

    def _place(self, size: int) -> tuple[mmap.mmap | bytearray, int]:
        """Where a module of `size` bytes goes: the next part of the reserved block, or a block of its own."""
        if self._arena is not None and self._used + size <= len(self._arena):
            start = self._used
            self._used += size
            return self._arena, start
        return _anonymous_block(max(size, 1)), 0

    def _fd(self, file: Path) -> int:
        fd = self._files.get(file)
        if fd is None:
            fd = self._files[file] = os.open(file, os.O_RDONLY | getattr(os, "O_BINARY", 0))
        return fd

    def _throttle(self) -> None:
        # A simulated disk: wait until the bytes read so far would have taken this long.
        if self.throttle_mbps > 0:
            due = self.bytes_read / (self.throttle_mbps * 1_000_000)
            elapsed = time.monotonic() - self._started
            if due > elapsed:
                time.sleep(due - elapsed)

    def close(self) -> None:
        """Stop reading ahead, let reads under way end, and close the files."""
        self._arena = None  # the tensors read keep it alive; what was never written costs nothing
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        for fd in self._files.values():
            os.close(fd)
        self._files.clear()


@dataclass
class _Module:
    """One module being read: where each tensor lands in `block`, and the reads filling it."""

    block: mmap.mmap | bytearray
    placed: dict[str, tuple[TensorEntry, int]]
    reads: list[Future[None]] = field(default_factory=list)

    @property
    def nbytes(self) -> int:
        return sum(entry.nbytes for entry, _ in self.placed.values())

    def tensors(self) -> dict[str, torch.Tensor]:
        return {name: _tensor(self.block, entry, offset) for name, (entry, offset) in self.placed.items()}


Span = tuple[Path, int, memoryview]  # bytes of `file` from a position, and where they go


def _shares(spans: list[Span], count: int) -> list[list[Span]]:
    """`spans` cut into `count` runs of nearly equal bytes (in order), splitting a span where needed."""
    total = sum(len(view) for _, _, view in spans)
    share = -(-total // count) if total else 1
    shares: list[list[Span]] = [[]]
    room = share
    for file, position, view in spans:
        while len(view) > room:
            if room:
                shares[-1].append((file, position, view[:room]))
            position, view = position + room, view[room:]
            shares.append([])
            room = share
        if len(view):
            shares[-1].append((file, position, view))
            room -= len(view)
    return [s for s in shares if s]


def _runs(spans: list[Span]) -> Iterator[tuple[Path, int, list[memoryview]]]:
    """Spans that follow one another in the same file, merged into one read into several buffers."""
    current: tuple[Path, int, list[memoryview]] | None = None
    end = 0
    for file, position, view in spans:
        if current is not None and current[0] == file and position == end and len(current[2]) < MAX_BUFFERS:
            current[2].append(view)
        else:
            if current is not None:
                yield current
            current = (file, position, [view])
        end = position + len(view)
    if current is not None:
        yield current


def _read_runs(runs: list[tuple[int, str, int, list[memoryview]]]) -> None:
    for fd, file_name, position, views in runs:
        _read_into(fd, file_name, position, views)


def _read_into(fd: int, file_name: str, position: int, views: list[memoryview]) -> None:
    """Fill `views` from `fd` at `position`, in as few system calls as the kernel allows."""
    while views:
        got = os.preadv(fd, views, position)
        if not got:
            raise ModelFolderError(f"{file_name} ended early (at byte {position}): the file is truncated")
        position += got
        while views and got >= len(views[0]):
            got -= len(views[0])
            views = views[1:]
        if got:
            views = [views[0][got:], *views[1:]]


def _tensor(block: mmap.mmap | bytearray, entry: TensorEntry, offset: int) -> torch.Tensor:
    dtype = DTYPES[entry.dtype]
    count = _count(entry.shape)
    if count == 0:
        return torch.empty(entry.shape, dtype=dtype)
    # The tensor holds a reference to the block; the block is unmapped when the last tensor goes.
    return torch.frombuffer(block, dtype=dtype, count=count, offset=offset).reshape(entry.shape)
