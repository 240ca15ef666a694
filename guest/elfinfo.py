"""What guest/pack.py reads out of ELF files (64-bit little-endian, x86-64 only).

- the `.modinfo` key=value pairs of a kernel module (`depends=`, `vermagic=`),
- the dynamic section of a shared object or program: `DT_NEEDED` and `DT_SONAME`.
"""

import struct

SHT_DYNAMIC = 6
DT_NULL = 0
DT_NEEDED = 1
DT_SONAME = 14


def is_elf64(data):
    """True for a 64-bit little-endian ELF image."""
    return data[:4] == b"\x7fELF" and len(data) > 0x40 and data[4] == 2 and data[5] == 1


def sections(data):
    """Yields (name, type, offset, size, link) of every section header."""
    (shoff,) = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)

    def header(index):
        return struct.unpack_from("<IIQQQQI", data, shoff + index * shentsize)

    _, _, _, _, str_off, _, _ = header(shstrndx)
    for i in range(shnum):
        name, kind, _, _, offset, size, link = header(i)
        end = data.index(b"\0", str_off + name)
        yield data[str_off + name:end].decode(), kind, offset, size, link


def modinfo(data):
    """The key=value pairs of a module's .modinfo ELF section (first value wins)."""
    if not is_elf64(data):
        return {}
    info = {}
    for name, _, offset, size, _ in sections(data):
        if name == ".modinfo":
            for item in data[offset:offset + size].split(b"\0"):
                key, sep, value = item.partition(b"=")
                if sep:
                    info.setdefault(key.decode(), value.decode())
    return info


def dynamic(data):
    """(needed, soname) of a dynamically linked ELF: the DT_NEEDED names in order and
    the DT_SONAME (None when absent). A static ELF gives ([], None)."""
    if not is_elf64(data):
        raise ValueError("not a 64-bit little-endian ELF file")
    headers = list(sections(data))
    needed, soname = [], None
    for _, kind, offset, size, link in headers:
        if kind != SHT_DYNAMIC:
            continue
        str_offset = headers[link][2]

        def string(value):
            return data[str_offset + value:data.index(b"\0", str_offset + value)].decode()

        for entry in range(offset, offset + size, 16):
            tag, value = struct.unpack_from("<qQ", data, entry)
            if tag == DT_NULL:
                break
            if tag == DT_NEEDED:
                needed.append(string(value))
            elif tag == DT_SONAME:
                soname = string(value)
    return needed, soname


def main(argv):
    """`elfinfo.py modinfo FILE [KEY]`: the module's modinfo (one key=value a line, or
    KEY's value); `elfinfo.py needed FILE`: its DT_NEEDED names, one a line."""
    import sys

    if len(argv) < 3 or argv[1] not in ("modinfo", "needed"):
        print("usage: elfinfo.py modinfo FILE [KEY] | needed FILE", file=sys.stderr)
        return 2
    with open(argv[2], "rb") as f:
        data = f.read()
    if argv[1] == "needed":
        print("\n".join(dynamic(data)[0]))
        return 0
    info = modinfo(data)
    if len(argv) > 3:
        if argv[3] not in info:
            return 1
        print(info[argv[3]])
    else:
        print("\n".join(f"{k}={v}" for k, v in sorted(info.items())))
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main(sys.argv))
