"""Read character vectors out of an R lazy-load database (`Rdata.rdx` + `Rdata.rdb`).

Only what the Austen novels in Debian's `r-cran-janeaustenr` need: R's XDR serialisation
(format 2 or 3) of strings, numbers, lists and pairlists. R itself is never required.
"""
from __future__ import annotations

import gzip
import struct
import zlib
from pathlib import Path

_NIL, _REF = 254, 255
_SPECIAL = {242, 241, 247, 251, 252, 253}  # empty/base env, base namespace, missing, unbound, global
_SYM, _PAIRLIST, _CHAR, _LGL, _INT, _REAL, _STR, _VEC = 1, 2, 9, 10, 13, 14, 16, 19


class _XdrReader:
    def __init__(self, data: bytes):
        if data[:2] != b"X\n":
            raise ValueError(f"not an R XDR stream (starts with {data[:2]!r})")
        self.data, self.pos, self.refs = data, 2, []
        version = self.int()
        self.int(), self.int()  # R version that wrote it, minimal reader version
        if version == 3:
            name_length = self.int()  # native encoding name follows
            self.pos += name_length
        elif version != 2:
            raise ValueError(f"unsupported R serialisation version {version}")

    def int(self) -> int:
        (value,) = struct.unpack_from(">i", self.data, self.pos)
        self.pos += 4
        return value

    def length(self) -> int:
        n = self.int()
        if n == -1:  # long vector: two 32-bit halves
            hi, lo = self.int(), self.int()
            n = (hi << 32) + lo
        return n

    def item(self):
        flags = self.int()
        kind, has_attr, has_tag = flags & 0xFF, flags & (1 << 9), flags & (1 << 10)
        if kind == _NIL or kind in _SPECIAL:
            return None
        if kind == _REF:
            return self.refs[(flags >> 8) - 1]
        if kind == _SYM:
            name = self.item()
            self.refs.append(name)
            return name
        if kind == _PAIRLIST:
            if has_attr:
                self.item()  # a pairlist's own attributes carry nothing we need
            tag = self.item() if has_tag else None
            head, tail = self.item(), self.item()
            return [(tag, head)] + (tail or [])
        if kind == _CHAR:
            n = self.int()
            if n == -1:
                return None
            text = self.data[self.pos : self.pos + n].decode("utf-8", errors="replace")
            self.pos += n
            return text
        if kind in (_LGL, _INT):
            n = self.length()
            value = list(struct.unpack_from(f">{n}i", self.data, self.pos))
            self.pos += 4 * n
        elif kind == _REAL:
            n = self.length()
            value = list(struct.unpack_from(f">{n}d", self.data, self.pos))
            self.pos += 8 * n
        elif kind in (_STR, _VEC):
            value = [self.item() for _ in range(self.length())]
        else:
            raise ValueError(f"unsupported R object type {kind} at byte {self.pos}")
        if has_attr:
            attrs = dict(self.item())
            if "names" in attrs:
                return dict(zip(attrs["names"], value))
        return value


def read_lazyload_db(rdx: Path) -> dict[str, object]:
    """All objects of the lazy-load database whose index is `rdx` (the `.rdb` lies beside it)."""
    index = _XdrReader(gzip.decompress(Path(rdx).read_bytes())).item()
    blob = Path(rdx).with_suffix(".rdb").read_bytes()
    objects = {}
    for name, (offset, size) in index["variables"].items():
        chunk = blob[offset : offset + size]
        # each chunk: 4-byte big-endian uncompressed length, then a zlib stream
        objects[name] = _XdrReader(zlib.decompress(chunk[4:])).item()
    return objects
