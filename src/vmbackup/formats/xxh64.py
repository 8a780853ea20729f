"""XXH64, the checksum XVA chunks carry: the C `xxhash` module when installed, else pure Python.

Owns: xxh64_py, xxh64_hex.
Imports: the standard library only.
"""

import struct



try:  # fast C XXH64 when installed; dom0 usually lacks it, hence xxh64_py below
    import xxhash as _xxhash
except ImportError:  # pragma: no cover - depends on the host
    _xxhash = None


_P1, _P2, _P3 = 11400714785074694791, 14029467366897019727, 1609587929392839161


_P4, _P5 = 9650029242287828579, 2870177450012600261


_M64 = (1 << 64) - 1


#: One shared buffer of zeros: zero chunks are common and their hashes are cached.
_ZEROS = bytes(1 << 20)


_ZERO_XXH = {}


def _rotl64(value, bits):
    return ((value << bits) | (value >> (64 - bits))) & _M64


def _xxh_round(acc, word):
    acc = (acc + word * _P2) & _M64
    return (_rotl64(acc, 31) * _P1) & _M64


def xxh64_py(data, seed=0):
    """Return the XXH64 of `data` as an int, in pure Python (for hosts without `xxhash`).

    >>> "%016X" % xxh64_py(b"")
    'EF46DB3751D8E999'
    """
    data = bytes(data)
    n, pos = len(data), 0
    if n >= 32:
        stripes = n // 32
        words = struct.unpack_from("<%dQ" % (stripes * 4), data)
        lanes = []
        for lane, start in enumerate(((seed + _P1 + _P2) & _M64, (seed + _P2) & _M64,
                                      seed & _M64, (seed - _P1) & _M64)):
            acc = start
            for word in words[lane::4]:  # one lane at a time: the hot loop stays tiny
                acc = (acc + word * _P2) & _M64
                acc = ((((acc << 31) | (acc >> 33)) & _M64) * _P1) & _M64
            lanes.append(acc)
        v1, v2, v3, v4 = lanes
        h = (_rotl64(v1, 1) + _rotl64(v2, 7) + _rotl64(v3, 12) + _rotl64(v4, 18)) & _M64
        for lane in lanes:
            h = ((h ^ _xxh_round(0, lane)) * _P1 + _P4) & _M64
        pos = stripes * 32
    else:
        h = (seed + _P5) & _M64
    h = (h + n) & _M64
    while pos + 8 <= n:
        (word,) = struct.unpack_from("<Q", data, pos)
        h ^= _xxh_round(0, word)
        h = (_rotl64(h, 27) * _P1 + _P4) & _M64
        pos += 8
    if pos + 4 <= n:
        (word,) = struct.unpack_from("<I", data, pos)
        h ^= (word * _P1) & _M64
        h = (_rotl64(h, 23) * _P2 + _P3) & _M64
        pos += 4
    while pos < n:
        h ^= (data[pos] * _P5) & _M64
        h = (_rotl64(h, 11) * _P1) & _M64
        pos += 1
    h ^= h >> 33
    h = (h * _P2) & _M64
    h ^= h >> 29
    h = (h * _P3) & _M64
    return h ^ (h >> 32)


def xxh64_hex(data):
    """Return the XXH64 of `data` as XAPI writes it in `.xxhash` members: 16 uppercase hex digits."""
    if _xxhash is not None:
        return "%016X" % _xxhash.xxh64(data).intdigest()
    if len(data) <= len(_ZEROS) and _ZEROS.startswith(data):
        if len(data) not in _ZERO_XXH:
            _ZERO_XXH[len(data)] = "%016X" % xxh64_py(data)
        return _ZERO_XXH[len(data)]
    return "%016X" % xxh64_py(data)
