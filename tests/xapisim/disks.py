"""Lazily generated, deterministic, mostly sparse virtual disks.

A :class:`Disk` never holds its whole content: the 64 KiB blocks listed in
``blocks`` are pseudo-random bytes derived from ``(seed, index)``; every other
block reads as zero; writes replace whole 64 KiB blocks copy-on-write (a
partial-block write is a read-modify-write of that block).  A 50 GiB disk with
a handful of blocks costs a few KiB of memory.
"""

import hashlib
import threading
from collections import OrderedDict

BLOCK = 65536
_ZERO_BLOCK = bytes(BLOCK)
_ZERO_CACHE = {}
_ZERO_LOCK = threading.Lock()


def zeros(n):
    """A shared read-only all-zero ``bytes`` of length *n* (cached for common sizes)."""
    if n == BLOCK:
        return _ZERO_BLOCK
    z = _ZERO_CACHE.get(n)
    if z is None:
        z = bytes(n)
        if n <= (16 << 20):
            with _ZERO_LOCK:
                if len(_ZERO_CACHE) > 16:
                    _ZERO_CACHE.clear()
                _ZERO_CACHE[n] = z
    return z


_GEN_CACHE = OrderedDict()
_GEN_CACHE_MAX = 256          # 16 MiB of generated blocks at most
_GEN_LOCK = threading.Lock()


_POOL_SIZE = 8 << 20
_POOL = []


def _pool():
    if not _POOL:
        with _GEN_LOCK:
            if not _POOL:
                _POOL.append(hashlib.shake_256(b"xapisim-disk-pool").digest(_POOL_SIZE + BLOCK))
    return _POOL[0]


def _make_block(seed, index):
    """64 KiB of pseudo-random bytes for (seed, index): a 16-byte BLAKE2b digest of
    (seed, index) followed by a window, chosen by that digest, of a fixed 8 MiB
    SHAKE-256 pool.  Deterministic across runs and Python versions, unique per
    (seed, index), and ~10 GB/s (pure hashing would be ~0.4 GB/s).  Being windows
    of one pool, blocks are incompressible for gzip but zstd's long window may
    find repeats between them."""
    h = hashlib.blake2b(b"xapisim-disk:%d:%d" % (seed, index), digest_size=16).digest()
    o = int.from_bytes(h[:8], "little") % _POOL_SIZE
    return h + _pool()[o:o + BLOCK - 16]


def generate_block(seed, index):
    """The deterministic 64 KiB content of block *index* of a disk seeded *seed*."""
    key = (seed, index)
    with _GEN_LOCK:
        data = _GEN_CACHE.get(key)
        if data is not None:
            _GEN_CACHE.move_to_end(key)
            return data
    data = _make_block(seed, index)
    with _GEN_LOCK:
        _GEN_CACHE[key] = data
        while len(_GEN_CACHE) > _GEN_CACHE_MAX:
            _GEN_CACHE.popitem(last=False)
    return data


class _Node(object):
    """A frozen piece of write history (see Disk.changed_blocks)."""
    __slots__ = ("blocks",)

    def __init__(self, blocks):
        self.blocks = frozenset(blocks)


class Disk(object):
    """A virtual disk of ``virtual_size`` bytes (see module docstring)."""

    def __init__(self, virtual_size, seed=0, blocks=()):
        virtual_size = int(virtual_size)
        if virtual_size < 0:
            raise ValueError("negative virtual_size")
        self.virtual_size = virtual_size
        self.seed = int(seed)
        nblocks = self.nblocks
        bs = set()
        for b in blocks:
            b = int(b)
            if 0 <= b < nblocks:
                bs.add(b)
        self._gen = frozenset(bs)          # blocks generated from (seed, index)
        self._over = {}                    # index -> bytes (len BLOCK) or None (= zero)
        self._lock = threading.RLock()
        self._sha = None                   # cached sha256 hex, reset by writes
        # write history, as a VHD tree keeps it (see "Write history" below):
        # frozen ancestor nodes, and the blocks this disk itself has written
        self._chain = ()
        self._leaf = set(bs)

    # -- constructors ---------------------------------------------------
    @classmethod
    def empty(cls, size):
        return cls(size)

    @classmethod
    def from_bytes(cls, data):
        data = bytes(data)
        d = cls(len(data))
        mv = memoryview(data)
        for i in range(0, len(data), BLOCK):
            chunk = mv[i:i + BLOCK]
            if chunk.tobytes().count(0) != len(chunk):
                d._set_block(i // BLOCK, chunk.tobytes())
        d._leaf.update(d._over)
        return d

    # -- basic properties ---------------------------------------------------
    @property
    def nblocks(self):
        return (self.virtual_size + BLOCK - 1) // BLOCK

    def __len__(self):
        return self.virtual_size

    def __repr__(self):
        return "<Disk size=%d seed=%d allocated=%d>" % (
            self.virtual_size, self.seed, len(self.allocated_blocks()))

    def _block_len(self, index):
        return min(BLOCK, self.virtual_size - index * BLOCK)

    def _block(self, index):
        """Full block content as bytes (length BLOCK, or shorter for the last block),
        or None when the block is known to be zero."""
        over = self._over
        if index in over:
            data = over[index]
        elif index in self._gen:
            data = generate_block(self.seed, index)
        else:
            return None
        if data is None:
            return None
        n = self._block_len(index)
        if n < BLOCK:
            return data[:n]
        return data

    def _set_block(self, index, data):
        """Store a full block (data shorter than BLOCK is zero-padded)."""
        if len(data) < BLOCK:
            data = bytes(data) + bytes(BLOCK - len(data))
        if data.count(0) == BLOCK:
            if index in self._gen:
                self._over[index] = None
            else:
                self._over.pop(index, None)
        else:
            self._over[index] = bytes(data)

    # -- reading --------------------------------------------------------------
    def read(self, offset, length):
        offset = int(offset)
        length = int(length)
        if offset < 0 or length < 0:
            raise ValueError("negative offset/length")
        end = min(offset + length, self.virtual_size)
        if offset >= end:
            return b""
        with self._lock:
            first = offset // BLOCK
            last = (end - 1) // BLOCK
            if first == last:
                data = self._block(first)
                if data is None:
                    return zeros(end - offset)
                s = offset - first * BLOCK
                return data[s:s + (end - offset)]
            parts = []
            for idx in range(first, last + 1):
                bstart = idx * BLOCK
                s = max(offset, bstart) - bstart
                e = min(end, bstart + BLOCK) - bstart
                data = self._block(idx)
                if data is None:
                    parts.append(zeros(e - s))
                else:
                    parts.append(data[s:e])
            return b"".join(parts)

    def allocated_blocks(self):
        """Sorted 64 KiB block indices that may hold non-zero bytes."""
        with self._lock:
            s = set(self._gen)
            for idx, data in self._over.items():
                if data is None:
                    s.discard(idx)
                else:
                    s.add(idx)
            return sorted(s)

    @property
    def physical_utilisation(self):
        return min(len(self.allocated_blocks()) * BLOCK, self.virtual_size)

    def is_zero(self, offset, length):
        offset = int(offset)
        end = min(offset + int(length), self.virtual_size)
        if offset >= end:
            return True
        first = offset // BLOCK
        last = (end - 1) // BLOCK
        with self._lock:
            if last - first + 1 <= len(self._gen) + len(self._over):
                cand = range(first, last + 1)
                check = [i for i in cand if i in self._gen or i in self._over]
            else:
                check = sorted(i for i in (set(self._gen) | set(self._over))
                               if first <= i <= last)
            for idx in check:
                data = self._block(idx)
                if data is None:
                    continue
                bstart = idx * BLOCK
                s = max(offset, bstart) - bstart
                e = min(end, bstart + BLOCK) - bstart
                if data.count(0, s, e) != e - s:
                    return False
        return True

    def iter_raw(self, chunk=1 << 20):
        """Yield the whole content in order, ``chunk`` bytes at a time (the last
        chunk may be shorter).  All-zero chunks are one shared zero buffer."""
        chunk = int(chunk)
        if chunk <= 0:
            raise ValueError("chunk must be positive")
        size = self.virtual_size
        alloc = self.allocated_blocks()
        zero = zeros(chunk)
        ai = 0
        na = len(alloc)
        off = 0
        while off < size:
            n = min(chunk, size - off)
            end = off + n
            # skip allocated blocks that lie entirely before this chunk
            while ai < na and (alloc[ai] + 1) * BLOCK <= off:
                ai += 1
            if ai < na and alloc[ai] * BLOCK < end:
                yield self.read(off, n)
            elif n == chunk:
                yield zero
            else:
                yield zeros(n)
            off = end

    def sha256(self):
        """Hex SHA-256 of the whole content (cached until the next write)."""
        cached = self._sha
        if cached is not None:
            return cached
        h = hashlib.sha256()
        for data in self.iter_raw(4 << 20):
            h.update(data)
        digest = h.hexdigest()
        self._sha = digest
        return digest

    def fingerprint(self):
        """A content digest that is O(allocated blocks), not O(size): equal for two
        disks iff they have the same size and bytes.  (Not a sha256 of the content:
        use it to compare Disks with each other, sha256() to compare with files.)"""
        h = hashlib.sha256(b"xapisim-fingerprint:%d:" % self.virtual_size)
        with self._lock:
            for idx in self.allocated_blocks():
                data = self._block(idx)
                if data is None or data.count(0) == len(data):
                    continue
                h.update(b"%d:" % idx)
                h.update(data)
        return h.hexdigest()

    # -- writing -------------------------------------------------------------
    def write(self, offset, data):
        offset = int(offset)
        data = bytes(data)
        if offset < 0:
            raise ValueError("negative offset")
        if offset + len(data) > self.virtual_size:
            raise ValueError("write of %d bytes at %d past the end of a %d-byte disk"
                             % (len(data), offset, self.virtual_size))
        if not data:
            return
        with self._lock:
            self._sha = None
            end = offset + len(data)
            pos = offset
            mv = memoryview(data)
            while pos < end:
                idx = pos // BLOCK
                bstart = idx * BLOCK
                s = pos - bstart
                e = min(end, bstart + BLOCK) - bstart
                piece = mv[pos - offset:pos - offset + (e - s)]
                self._leaf.add(idx)
                if s == 0 and e == BLOCK:
                    self._set_block(idx, piece.tobytes())
                else:
                    cur = self._block(idx)
                    buf = bytearray(BLOCK)
                    if cur is not None:
                        buf[:len(cur)] = cur
                    buf[s:e] = piece
                    self._set_block(idx, bytes(buf))
                pos = bstart + e

    def clone(self):
        with self._lock:
            d = Disk.__new__(Disk)
            d.virtual_size = self.virtual_size
            d.seed = self.seed
            d._gen = self._gen
            d._over = dict(self._over)     # values are immutable bytes / None
            d._lock = threading.RLock()
            d._sha = self._sha
            d._chain = self._freeze()
            d._leaf = set()
            return d

    # -- write history -------------------------------------------------------
    # A VHD-backed VDI is a chain of VHD files: a snapshot (or clone) freezes the
    # leaf into a read-only parent shared by the source and the copy, and each
    # goes on writing into a new empty leaf.  A Disk keeps the same history: a
    # tuple of frozen nodes (the 64 KiB blocks written while each was the leaf)
    # and its own leaf.  ``changed_blocks`` compares two histories the way
    # vhd-tool's ``include_block`` compares two VHD chains; CBT logs (cbt.py)
    # use ``mark`` / ``written_since``.
    def _freeze(self):
        if self._leaf:
            self._chain = self._chain + (_Node(self._leaf),)
            self._leaf = set()
        return self._chain

    def mark(self):
        """Start a new leaf; returns a marker for ``written_since``."""
        with self._lock:
            chain = self._freeze()
            return chain[-1] if chain else None

    def written_since(self, marker):
        """64 KiB block indices written after ``mark()`` returned ``marker``
        (everything this disk's history holds if the marker is not in it)."""
        with self._lock:
            chain = self._chain
            start = 0
            if marker is not None:
                for i, node in enumerate(chain):
                    if node is marker:
                        start = i + 1
                        break
            out = set(self._leaf)
            for node in chain[start:]:
                out |= node.blocks
            return out

    def changed_blocks(self, base):
        """64 KiB block indices written in this disk's history or ``base``'s but
        not in both (vhd-tool's "t - from" and "from - t" branches)."""
        with self._lock:
            mine, my_leaf = self._chain, set(self._leaf)
        with base._lock:
            theirs, their_leaf = base._chain, set(base._leaf)
        a = {id(n): n for n in mine}
        b = {id(n): n for n in theirs}
        out = my_leaf | their_leaf
        for k in set(a) ^ set(b):
            out |= (a.get(k) or b.get(k)).blocks
        return out

    def resize(self, new_size):
        """Grow (or shrink) the disk; content beyond the new end is dropped."""
        new_size = int(new_size)
        with self._lock:
            self._sha = None
            nb = (new_size + BLOCK - 1) // BLOCK
            old = self.virtual_size
            if new_size > old and old % BLOCK:
                # the old last block was truncated: make its hidden tail zero
                idx = old // BLOCK
                cur = self._block(idx)
                if cur is not None:
                    self._over[idx] = bytes(cur) + bytes(BLOCK - len(cur))
            if new_size < self.virtual_size:
                # zero the tail of a partially kept last block
                if new_size % BLOCK:
                    idx = new_size // BLOCK
                    cur = self._block(idx)
                    if cur is not None:
                        keep = new_size - idx * BLOCK
                        self._over[idx] = bytes(cur[:keep]) + bytes(BLOCK - keep)
                self._gen = frozenset(b for b in self._gen if b < nb)
                self._over = {k: v for k, v in self._over.items() if k < nb}
            self.virtual_size = new_size

    def to_bytes(self):
        """The whole content (small disks only: tests)."""
        return b"".join(self.iter_raw())

    def __eq__(self, other):
        if not isinstance(other, Disk):
            return NotImplemented
        if self.virtual_size != other.virtual_size:
            return False
        return self.fingerprint() == other.fingerprint()

    __hash__ = None
