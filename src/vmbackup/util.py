"""Small helpers every layer uses: value parsers, human sizes, printable names, durable writes.

Owns: parse_bool/int/percent/rate/compress/umask/fingerprint/text/addresses, human_size, one_line,
display_width, printable, mask_credentials, partial_file (write to .part, rename on success), fsync, write_text,
sha256_file, free_space.
Imports: errors.
"""

import hashlib
import os
import re
import unicodedata



#: Sorts after every real device number (a userdevice that is not a number).
UNNUMBERED = 1 << 30


def parse_bool(text):
    """Return True/False for 1/0, true/false, yes/no, on/off; raise ValueError otherwise."""
    word = str(text).strip().lower()
    if word in ("1", "true", "yes", "on"):
        return True
    if word in ("0", "false", "no", "off"):
        return False
    raise ValueError("expected true or false")


def parse_int(text, minimum=None):
    """Return int(text); raise ValueError naming the rule it breaks."""
    try:
        value = int(str(text).strip())
    except ValueError:
        raise ValueError("not a whole number")
    if minimum is not None and value < minimum:
        raise ValueError("must be at least %d" % minimum)
    return value


def parse_percent(text):
    """Return a float percentage 0..100; raise ValueError otherwise."""
    try:
        value = float(str(text).strip().rstrip("%"))
    except ValueError:
        raise ValueError("not a number")
    if not 0 <= value <= 100:
        raise ValueError("must be between 0 and 100")
    return value


def parse_rate(text):
    """Return bytes per second for a rate like 100M (K, M, G, T are powers of 1024), or None.

    >>> parse_rate("100M"), parse_rate("1.5G/s"), parse_rate("2048"), parse_rate("0")
    (104857600, 1610612736, 2048, None)
    """
    word = str(text).strip().upper()
    match = re.match(r"^(\d+(?:\.\d+)?)\s*([KMGT]?)(?:I?B)?(?:/S)?$", word)
    if not match:
        raise ValueError("expected a rate such as 100M (bytes per second; 0 means no limit)")
    value = float(match.group(1)) * 1024 ** " KMGT".index(match.group(2) or " ")
    return int(value) or None


def parse_compress(text):
    """Return None, 'gzip' or 'zstd' for a compress setting.

    >>> parse_compress("True"), parse_compress("zstd"), parse_compress("0")
    ('gzip', 'zstd', None)
    """
    word = str(text).strip().lower()
    if word in ("zstd", "gzip"):
        return word
    if word == "none":
        return None
    try:
        return "gzip" if parse_bool(word) else None
    except ValueError:
        raise ValueError("expected false, true, gzip or zstd")


def choice(*allowed):
    """Return a parser accepting one of `allowed` (case-insensitive)."""
    def parse(text):
        word = str(text).strip().lower()
        if word not in allowed:
            raise ValueError("expected one of " + ", ".join(allowed))
        return word
    return parse


def parse_umask(text):
    """Return an int umask from an octal string like '077'."""
    try:
        value = int(str(text).strip(), 8)
    except ValueError:
        raise ValueError("not an octal umask like 077")
    if not 0 <= value <= 0o777:
        raise ValueError("not an octal umask like 077")
    return value


def parse_fingerprint(text):
    """Return a normalised SHA-256 fingerprint (64 lowercase hex digits)."""
    digits = re.sub(r"[^0-9a-fA-F]", "", str(text).split("=")[-1]).lower()
    if len(digits) != 64:
        raise ValueError("expected a SHA-256 fingerprint (64 hex digits)")
    return digits


def parse_text(text):
    """Return the value as given, stripped."""
    return str(text).strip()


def parse_addresses(text):
    """Return the mail addresses of a comma-separated list; raise ValueError if one is not one.

    >>> parse_addresses("ops@example.org, Backup Team <backup@example.org>")
    ('ops@example.org', 'Backup Team <backup@example.org>')
    """
    found = tuple(a.strip() for a in str(text).split(",") if a.strip())
    for address in found:
        if not re.match(r"^(?:[^<>@]*<)?[^<>@\s]+@[^<>@\s]+>?$", address):
            raise ValueError("%r is not a mail address" % address)
    if not found:
        raise ValueError("expected one or more mail addresses, comma-separated")
    return found


def human_size(nbytes):
    """Return '1.5G'-style text for a byte count."""
    value = float(nbytes)
    for unit in ("B", "K", "M", "G", "T"):
        if value < 1024 or unit == "T":
            return ("%d%s" % (value, unit)) if unit == "B" else ("%.1f%s" % (value, unit))
        value /= 1024.0
    return "%dB" % nbytes  # pragma: no cover


def one_line(text, limit=300):
    """Return `text` on one line, cut to `limit` characters."""
    flat = " ".join(str(text).split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


def printable(name):
    """Return a VM name safe to print on one line (control characters escaped)."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(name))


def display_width(text):
    """Return the columns `text` takes on a terminal: wide East Asian characters take two,
    combining marks none (`display_width("日本") == 4`)."""
    return sum(0 if unicodedata.combining(c) else 2 if unicodedata.east_asian_width(c) in "WF"
               else 1 for c in text)


class partial_file:
    """`with partial_file(path) as tmp:` write tmp; renamed to path on success, removed on error."""

    def __init__(self, path):
        self.path = path
        self.tmp = path + ".part"

    def __enter__(self):
        if os.path.lexists(self.tmp):
            os.unlink(self.tmp)
        return self.tmp

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            fsync_path(self.tmp)
            os.replace(self.tmp, self.path)
            fsync_dir(os.path.dirname(self.path))
        elif os.path.lexists(self.tmp):
            os.unlink(self.tmp)
        return False


def fsync_path(path):
    """Flush a file that another process wrote to stable storage."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path):
    """Flush a folder's entries (renames) to stable storage, where the OS allows it."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - some network file systems refuse
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def write_text(path, text):
    """Write `text` to `path` (UTF-8) and flush it to disk."""
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())


def sha256_file(path, bufsize=1 << 20):
    """Return the SHA-256 hex digest of a file."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(bufsize), b""):
            digest.update(block)
    return digest.hexdigest()


def free_space(path):
    """Return (free bytes, total bytes, percent free) of the file system holding `path`."""
    st = os.statvfs(path)
    free, total = st.f_bavail * st.f_frsize, st.f_blocks * st.f_frsize
    return free, total, (100.0 * free / total) if total else 0.0


def mask_credentials(url):
    """Return `url` with any user:password@ replaced: 'https://root:pw@h/' -> 'https://***@h/'."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        scheme, rest = "", url
    netloc, slash, tail = rest.partition("/")
    if "@" in netloc:
        netloc = "***@" + netloc.rsplit("@", 1)[1]
    return scheme + sep + netloc + slash + tail
