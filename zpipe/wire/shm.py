"""Large arrays and ``bytes`` items through shared memory on ipc links: the message
carries a segment's name, not its bytes.

Where segments live. Each run that ``zpipe launch`` (or ``zpipe.run`` in process
mode) starts has a folder of its own in /dev/shm, named after its runtime folder
(``/dev/shm/zpipe-NAME-XXXXXX``, mode 0700, made by ``make_folder`` before any
replica starts). A segment is a file in it named ``PID-N``: the process that
made it, and its count of segments. The launcher removes the folder once
every replica has been reaped, and the janitor's watcher removes it after a
killed launcher (SIGKILL included), as it does the runtime folder: whatever a
replica held when it died, in flight or in hand, goes with the folder. Segments
are only ever used on links where any end's death ends the run (below), so
nothing has to be cleaned up while a run goes on.

Why segments are reused. On this kind of host a fresh page of shared memory
costs far more than the copy into it (a 10 MiB segment: about 7 ms to make,
write and free, against 0.5 ms to copy into one already mapped), so a segment
is made once and goes round: the sender (``Segments``) copies an item into a
segment of its own that nobody holds, sends its name, and keeps it mapped. The
receiver (``Attached``) opens the name, checks it, maps it (a mapping it keeps
for the next time the same segment comes) and makes the array a view of it:
no copy, writable, and the receiver's own, as nobody else writes into a
segment someone holds. When the receiver's array is gone (every view of it),
the receiver renames the segment ``PID-N.free``; the sender takes it back by
renaming it to ``PID-N`` (rename is atomic: only one of the two wins) the next
time it needs one, and copies the next item into it. A ``bytes`` item is copied
out at once (the user gets ``bytes``, which cannot wrap foreign memory) and its
segment released at once. A sender keeps at most POOL_BYTES of segments and a
receiver at most CACHE_BYTES of mappings; an item that finds no room goes as
a frame, as before: nothing ever waits for a segment. Nor does it hold more
segments than its link's hwm lets messages be on their way: what a link holds
stays about what it held with frames.

An item is frozen as it is sent: it is copied into the segment when the
Batch packs it. A relay that returns its input (an array that is a view of a
segment it received) copies it into a segment of its own too: the name is
never handed on, so no segment is ever held by two processes, and the relay's
array stays its own, whatever it does with it afterwards.

Which links. Only ipc links that are not leased, from and into a replica that
has this run's folder: ipc means one host (one /dev/shm); tcp links keep
frames, and inproc links (threads) keep their private copies. A link that is
not leased has one replica at its receiving end with no restart, and the stage
sending on it has no restart either (docs/protocol.md, Data links), so the
death of either end ends the run, and the folder goes with it. Leased links
keep frames: their sender keeps each message to send it again to another
replica after a loss, which a segment released by a dead receiver's folder
sweep, or reused by its sender, could not be; the copy a leased sender keeps
costs what it did. A receiver takes segment names only on an ipc input: a
stranger on tcp could otherwise name segments other replicas hold.

Untrusted names. A name comes off a socket: only ``PID-N`` (digits, a dash,
digits) is opened, relative to the folder's descriptor and with O_NOFOLLOW, so
no path is ever followed; the file must be a regular file of this user with
one link, and of exactly the size the header claims (fstat, before anything is
mapped); a name this process already holds is refused. Anything else is a
DecodeError. The ipc socket itself sits in a 0700 runtime folder: what reaches
it is this user's.

Why not multiprocessing.shared_memory: it registers every segment with a
resource_tracker process (``track=False`` exists only from Python 3.13), and its
names live in /dev/shm's top level, where a killed run's leftovers would have
to be found one by one. The mmap module is used directly on files in the run's
folder; each mapping holds one descriptor (mmap's own), which POOL_SEGMENTS and
CACHE_SEGMENTS bound.
"""

from __future__ import annotations

import collections
import mmap
import os
import re
import shutil
import stat
import weakref
from typing import Any

ROOT = "/dev/shm"
# Items of this many bytes or more go through a segment (smaller ones as frames,
# or inline). Segments win from 256 KiB already (BENCHMARKS.md, "Shared memory"),
# but each one held is a mapping and a descriptor, and items under 1 MiB are
# many to a link's worth of memory: from 1 MiB, POOL_SEGMENTS are 64 MiB or more.
SHM_MIN = 2**20
POOL_BYTES = 256 * 2**20   # a sender's segments, held or not
POOL_SEGMENTS = 64         # ... and their count (each holds a descriptor: mmap's)
CACHE_BYTES = 256 * 2**20  # a receiver's mappings kept for segments that come again
CACHE_SEGMENTS = 64
_NAME = re.compile(r"[0-9]{1,10}-[0-9]{1,19}\Z")
_FREE = ".free"


class SegmentError(ValueError):
    """A segment name that is not one this run's sender could have sent (codec turns
    it into DecodeError)."""


def folder_for(runtime_dir: str) -> str:
    """The shared-memory folder of the run whose runtime folder is ``runtime_dir``."""
    return os.path.join(ROOT, os.path.basename(os.path.normpath(runtime_dir)))


def make_folder(runtime_dir: str) -> str | None:
    """Make the run's shared-memory folder; None where there is no /dev/shm (links then
    keep frames)."""
    folder = folder_for(runtime_dir)
    try:
        os.mkdir(folder, 0o700)
    except OSError:
        return None
    return folder


def remove_folder(folder: str | None) -> None:
    if folder:
        shutil.rmtree(folder, ignore_errors=True)


def usable(folder: str | None) -> bool:
    """Whether ``folder`` is a run's shared-memory folder made by this user."""
    if not folder:
        return False
    try:
        info = os.lstat(folder)
    except OSError:
        return False
    return stat.S_ISDIR(info.st_mode) and info.st_uid == os.geteuid()


def _open_folder(folder: str) -> int:
    return os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)


class _Own:
    """A segment of this process: its name, size and mapping."""

    __slots__ = ("name", "size", "map")

    def __init__(self, name: str, size: int, mapped: mmap.mmap):
        self.name, self.size, self.map = name, size, mapped


class Segments:
    """A sender's segments: ``put_array``/``put_bytes`` copy an item into one nobody
    holds and return its name, or None (no room: the item goes as a frame)."""

    def __init__(self, folder: str, in_flight: int = POOL_SEGMENTS):
        self.folder = folder
        # At most as many segments as the link's hwm lets messages be on their way
        # (the caller's count): under backpressure a link of segments' names would
        # also fill the kernel's socket buffer, which no hwm counts, with items whose
        # memory frames would have kept within the hwm.
        self.most = max(1, min(POOL_SEGMENTS, in_flight))
        self.dir_fd = _open_folder(folder)
        self.pid = os.getpid()
        self.made = 0
        self.free: list[_Own] = []
        self.busy: collections.deque[_Own] = collections.deque()  # sent, oldest first
        self.size = 0  # bytes of all our segments

    def put_array(self, array: Any) -> str | None:
        """Copy ``array`` (any layout: numpy copies it in C order) into a segment."""
        import numpy
        own = self._take(array.nbytes)
        if own is None:
            return None
        try:
            target = numpy.ndarray(array.shape, array.dtype, buffer=own.map)
            numpy.copyto(target, array.view(numpy.ndarray), casting="no")
        except BaseException:
            self.give_back(own.name)
            raise
        return own.name

    def put_bytes(self, data: bytes) -> str | None:
        own = self._take(len(data))
        if own is None:
            return None
        own.map[:] = data
        return own.name

    def give_back(self, name: str) -> None:
        """A segment just taken, whose message will not be sent (its item failed)."""
        for own in self.busy:
            if own.name == name:
                self.busy.remove(own)
                self.free.append(own)
                return

    def _take(self, size: int) -> _Own | None:
        own = self._reuse(size)
        if own is None:
            own = self._make(size)
            if own is None:
                return None
        self.busy.append(own)
        return own

    def _reuse(self, size: int) -> _Own | None:
        for index, own in enumerate(self.free):
            if own.size == size:
                return self.free.pop(index)
        # Taken back from receivers that let go of them (renamed NAME.free), oldest
        # first: they let go in about the order they got them.
        found = None
        for own in list(self.busy):
            try:
                os.rename(own.name + _FREE, own.name, src_dir_fd=self.dir_fd,
                          dst_dir_fd=self.dir_fd)
            except OSError:
                continue  # still held
            self.busy.remove(own)
            if own.size == size and found is None:
                found = own
                break
            self.free.append(own)
        return found

    def _make(self, size: int) -> _Own | None:
        while self.free and (self.size + size > POOL_BYTES or
                             len(self.free) + len(self.busy) >= self.most):
            self._drop(self.free.pop(0))  # free segments of other sizes make room
        if self.size + size > POOL_BYTES or len(self.busy) >= self.most:
            return None
        self.made += 1
        name = f"{self.pid}-{self.made}"
        try:
            fd = os.open(name, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600,
                         dir_fd=self.dir_fd)
        except OSError:
            return None  # the folder is gone (the run is ending) or full
        try:
            os.ftruncate(fd, size)
            # Populated at once: every page is about to be written.
            mapped = mmap.mmap(fd, size, flags=mmap.MAP_SHARED | mmap.MAP_POPULATE)
        except OSError:
            _unlink(name, self.dir_fd)
            return None
        finally:
            os.close(fd)
        self.size += size
        return _Own(name, size, mapped)

    def close(self) -> None:
        """The replica ends: the segments nobody holds go now (those in flight or held
        downstream stay until the run's folder is removed)."""
        if self.dir_fd < 0:
            return
        self._reuse(-1)  # takes back every segment given back meanwhile
        while self.free:
            self._drop(self.free.pop())
        for own in self.busy:
            own.map.close()
        self.busy.clear()
        os.close(self.dir_fd)
        self.dir_fd = -1

    def _drop(self, own: _Own) -> None:
        _unlink(own.name, self.dir_fd)
        own.map.close()
        self.size -= own.size


def _unlink(name: str, dir_fd: int) -> None:
    try:
        os.unlink(name, dir_fd=dir_fd)
    except OSError:
        pass


class Attached:
    """A receiver's side: segment names from its input turned into arrays and bytes."""

    def __init__(self, folder: str):
        self.folder = folder
        self.dir_fd = _open_folder(folder)
        self.maps: collections.OrderedDict[str, tuple[int, mmap.mmap]] = \
            collections.OrderedDict()
        self.mapped = 0       # bytes of self.maps
        self.held: set[str] = set()  # names this process holds (an array of it lives)

    def array(self, name: Any, dtype: Any, shape: list[int], nbytes: int) -> Any:
        """The array in segment ``name``: a writable view, the segment released once
        every view of it is gone."""
        import numpy
        mapped = self._map(name, nbytes)
        array = numpy.ndarray(shape, dtype, buffer=mapped)
        self.held.add(name)
        weakref.finalize(array, self._release, name)
        return array

    def bytes(self, name: Any, nbytes: int) -> bytes:
        """The bytes in segment ``name``, copied out; the segment released at once."""
        data = self._map(name, nbytes)[:]
        self._release(name)
        return data

    def _map(self, name: Any, nbytes: int) -> mmap.mmap:
        if type(name) is not str or not _NAME.match(name):
            raise SegmentError(f"not a segment name: {name!r:.80}")
        if name in self.held:
            raise SegmentError(f"segment {name} is already held here")
        if not nbytes:
            raise SegmentError(f"segment {name} for 0 bytes")
        try:
            fd = os.open(name, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK,
                         dir_fd=self.dir_fd)
        except OSError as exc:
            raise SegmentError(f"segment {name}: {exc.strerror}") from None
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode) or info.st_uid != os.geteuid() or \
                    info.st_nlink != 1:
                raise SegmentError(f"segment {name} is not a segment of this run")
            if info.st_size != nbytes:
                raise SegmentError(f"segment {name} has {info.st_size} bytes, "
                                   f"the item {nbytes}")
            known = self.maps.get(name)
            if known is not None and known[0] == info.st_ino:
                self.maps.move_to_end(name)
                return known[1]
            mapped = mmap.mmap(fd, nbytes, flags=mmap.MAP_SHARED)
        except OSError as exc:
            raise SegmentError(f"segment {name}: {exc.strerror}") from None
        finally:
            os.close(fd)
        if known is not None:
            self.mapped -= len(known[1])
        self.maps[name] = (info.st_ino, mapped)
        self.maps.move_to_end(name)
        self.mapped += nbytes
        while (self.mapped > CACHE_BYTES or len(self.maps) > CACHE_SEGMENTS) and \
                len(self.maps) > 1:
            # An array that still views an evicted mapping keeps it alive.
            _, (_, old) = self.maps.popitem(last=False)
            self.mapped -= len(old)
        return mapped

    def _release(self, name: str) -> None:
        """Give the segment back to its sender (any thread: the garbage collector's).
        By path, not by the folder's descriptor: an array may outlive this replica
        (a Pipeline's results), whose descriptor is closed then, and maybe reused."""
        self.held.discard(name)
        path = os.path.join(self.folder, name)
        try:
            os.rename(path, path + _FREE)
        except OSError:
            pass  # the run's folder is gone: the run is ending

    def close(self) -> None:
        """The replica ends: arrays it handed out keep their mappings (and give their
        segments back when they go)."""
        self.maps.clear()
        self.mapped = 0
        if self.dir_fd >= 0:
            os.close(self.dir_fd)
            self.dir_fd = -1
