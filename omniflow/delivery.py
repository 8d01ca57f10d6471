"""Delivery: what a lossless edge keeps when its consumer dies.

ZeroMQ queues an edge's frames in both of its processes; a consumer killed with frames in its
queue loses them, and so would its restarted successor. So every data message on an edge carries
an envelope (the producer's instance, a sequence number from 1), and on a lossless ipc:// edge
(both ends on one machine):

* the consumer writes the number of each frame it takes into a 16-byte file shared with the
  producer (`<socket>.ack`, mapped into both processes) before its node sees the frame: a store
  into shared memory, which a SIGKILL does not undo;
* the producer keeps what it sent until that number passes it (at most RETAIN_FRAMES frames and
  RETAIN_BYTES bytes; a frame evicted unread is counted as `unprotected`);
* each time a consumer connects (its first start or a restart), the producer sends a marker (its
  instance, the first number to come) and then, in order, everything the file does not
  acknowledge; the consumer ignores data that comes before the marker (it comes again after it).

So a restarted consumer gets, once and in order, every frame its predecessor had not taken; lost is
only what the dead process held (the frame it was handling, frames it had not sent on yet), and the
turns in flight get an error from the gateway anyway. On tcp:// and inproc:// edges there is no
shared file: nothing is kept, and the envelope lets the consumer count the frames missing from the
sequence (`lost`, logged once per gap).
"""
from __future__ import annotations

import collections
import logging
import mmap
import os
import struct
from pathlib import Path

from .frame import FrameError
from .transport import Link

ENVELOPE = struct.Struct("<QQ")    # producer instance, sequence number: part 0 of a data message
SEQ = struct.Struct("<Q")
MARKER = b"M"                      # a one-part message: MARKER + ENVELOPE(instance, first seq to come)
RETAIN_FRAMES = 4096               # frames a producer keeps per edge for a consumer that may die
RETAIN_BYTES = 64 * 1024**2        # ... and their bytes (a 30 s utterance is ~1.9 MB)

log = logging.getLogger("omniflow.delivery")


def _buffer(part) -> memoryview | bytes:
    """A received part's bytes (a zmq.Frame's buffer, or bytes as given)."""
    return part.buffer if hasattr(part, "buffer") else part


def ack_path(link: Link) -> Path | None:
    """The edge's shared acknowledgement file; None where nothing is kept (lossy, tcp, inproc)."""
    if link.policy != "lossless" or not link.address.startswith("ipc://"):
        return None
    return Path(link.address[6:]).with_suffix(".ack")


def message(instance: int, seq: int, parts: list) -> list:
    """A data message on an edge: [envelope, header, payload] (`parts` from frame.encode)."""
    return [ENVELOPE.pack(instance, seq), *parts]


def marker(instance: int, first: int) -> list:
    """The one-part message that tells a consumer which numbers come next from `instance`."""
    return [MARKER + ENVELOPE.pack(instance, first)]


def new_instance() -> int:
    """A producer instance id: a restarted producer numbers its frames afresh under a new one."""
    return int.from_bytes(os.urandom(8), "little") or 1


class AckFile:
    """16 bytes mapped into both ends of an edge: (instance, seq) of the last frame taken."""

    def __init__(self, path: Path, create: bool):
        flags = os.O_RDWR | (os.O_CREAT if create else 0)
        fd = os.open(path, flags, 0o600)
        try:
            if os.fstat(fd).st_size < ENVELOPE.size:
                if not create:
                    raise FileNotFoundError(f"{path} is not written yet")
                os.ftruncate(fd, ENVELOPE.size)
            self.mm = mmap.mmap(fd, ENVELOPE.size)
        finally:
            os.close(fd)
        self.instance: int | None = None        # what this process last wrote there (its writer's)

    def taken(self, instance: int, seq: int) -> None:
        """(the consumer, its file's one writer)"""
        SEQ.pack_into(self.mm, 8, seq)          # the number first: a reader of the old instance
        if instance != self.instance:           # ignores it, one of the new never sees the old
            SEQ.pack_into(self.mm, 0, instance) # number under the new instance
            self.instance = instance

    def read(self) -> tuple[int, int]:
        return ENVELOPE.unpack_from(self.mm, 0)

    def close(self) -> None:
        self.mm.close()


class Sender:
    """A producer's end of one edge: numbers its messages and, on a lossless ipc edge, keeps
    those the consumer has not taken, to send them again when a consumer (re)connects."""

    def __init__(self, link: Link, instance: int):
        self.link, self.instance, self.seq = link, instance, 0
        self.path = ack_path(link)
        self.kept: collections.deque[tuple[int, list, int]] = collections.deque()   # (seq, parts, bytes)
        self.kept_bytes = 0
        self.unprotected = 0           # frames evicted from `kept` before the consumer took them
        self.lost = 0                  # ... of which a restarted consumer then never got
        self.joins = 0                 # consumer connections seen (ConsumerWatch.accepts)
        self._ack: AckFile | None = None

    def wrap(self, parts: list) -> list:
        """The message for `parts` (a frame's [header, payload]), kept if this edge keeps."""
        self.seq += 1
        sent = message(self.instance, self.seq, parts)
        if self.path is not None:
            size = sum(len(p) for p in parts)
            self.kept.append((self.seq, sent, size))
            self.kept_bytes += size
            self._forget_taken()
            while len(self.kept) > RETAIN_FRAMES or self.kept_bytes > RETAIN_BYTES:
                self._drop_oldest()
                self.unprotected += 1
                if self.unprotected == 1:
                    log.warning("edge %s: its consumer is more than %d frames (or %d MiB) behind; the "
                                "oldest are no longer kept for it should it restart (counted as "
                                "unprotected)", self.link.id, RETAIN_FRAMES, RETAIN_BYTES >> 20)
        return sent

    def taken(self) -> int:
        """The last seq of ours the consumer has taken (0 if none, or if it follows another instance)."""
        if self._ack is None and self.path is not None:
            try:
                self._ack = AckFile(self.path, create=False)
            except OSError:                      # the consumer has not created it yet
                return 0
        if self._ack is None:
            return 0
        instance, seq = self._ack.read()
        return seq if instance == self.instance else 0

    def all_taken(self) -> bool:
        """Everything sent was taken (or nothing is kept here): the producer may exit."""
        self._forget_taken()
        return not self.kept

    def rejoin(self) -> list[list]:
        """A consumer connected: the marker and the messages it has not taken, to send in order."""
        self._forget_taken()
        first = self.kept[0][0] if self.kept else self.seq + 1
        taken = self.taken()
        missed = first - 1 - taken
        if missed > 0 and taken > 0:            # evicted before this consumer took them
            self.lost += missed
            log.warning("edge %s: %d frames its restarted consumer had not taken were no longer "
                        "kept (lost)", self.link.id, missed)
        return [marker(self.instance, first), *(m for _, m, _ in self.kept)]

    def _forget_taken(self) -> None:
        if not self.kept:
            return
        taken = self.taken()
        while self.kept and self.kept[0][0] <= taken:
            self._drop_oldest()

    def _drop_oldest(self) -> None:
        _, _, size = self.kept.popleft()
        self.kept_bytes -= size

    def close(self) -> None:
        if self._ack is not None:
            self._ack.close()


class Receiver:
    """A consumer's end of one edge: takes each frame once, in order, and says so to the producer."""

    def __init__(self, link: Link):
        self.link = link
        self.lossless = link.policy == "lossless"
        path = ack_path(link)
        self.ack = AckFile(path, create=True) if path is not None else None   # before connecting
        self.waiting = self.ack is not None     # for the producer's marker
        self.instance: int | None = None
        self.expected = 0
        self.lost = 0                           # frames missing from the producer's sequence
        self.duplicates = 0

    def take(self, parts: list) -> list | None:
        """The frame parts ([header, payload]) of a received message, or None when it is not for
        the node (a marker, a frame that comes again after the marker, a duplicate). A message
        that is neither a marker nor [envelope, header, payload] raises FrameError."""
        if len(parts) == 1:                     # a producer's marker: what follows is ours
            raw = bytes(_buffer(parts[0]))
            if raw[:1] != MARKER or len(raw) != 1 + ENVELOPE.size:
                raise FrameError(f"a one-part message is a producer's marker ({1 + ENVELOPE.size} "
                                 f"bytes from {MARKER!r}); got {len(raw)} bytes")
            if self.ack is not None:
                self.instance, self.expected = ENVELOPE.unpack_from(raw, 1)
                self.ack.taken(self.instance, self.expected - 1)
                self.waiting = False
            return None
        if len(parts) != 3 or len(parts[0]) != ENVELOPE.size:
            raise FrameError(f"expected 3 message parts (a {ENVELOPE.size}-byte envelope, header, "
                             f"payload), got {len(parts)}" + (f" with a {len(parts[0])}-byte envelope"
                                                              if len(parts) == 3 else ""))
        if not self.lossless:                   # drop-oldest: the producer counts its drops
            return parts[1:]
        instance, seq = ENVELOPE.unpack(_buffer(parts[0]))
        if self.waiting:
            return None                         # sent again after the marker
        if instance != self.instance:
            if self.ack is not None:            # a new producer: its marker and frames follow
                self.waiting = True
                return None
            self.instance, self.expected = instance, seq   # tcp: a new producer, number afresh
        if seq < self.expected:
            self.duplicates += 1
            return None
        if seq > self.expected:
            self.lost += seq - self.expected
            log.warning("edge %s: %d frames never arrived (their producer or this node's "
                        "predecessor died holding them); %d lost on it so far",
                        self.link.id, seq - self.expected, self.lost)
        self.expected = seq + 1
        if self.ack is not None:
            self.ack.taken(instance, seq)
        return parts[1:]

    def close(self) -> None:
        if self.ack is not None:
            self.ack.close()
