"""The functions a compiled artifact library holds, read from its ELF symbol table without loading it.

TVM exports each compiled function `f` of the module (a kernel's host launcher on CUDA, the kernel
itself on the CPU, and helpers such as `shape_func`) as the symbol `__tvm_ffi_f`. Reading the dynamic
symbol table needs neither TVM nor a GPU driver, so `tensorpress inspect` can list a CUDA artifact's
functions on any machine.
"""

from __future__ import annotations

import struct

TVM_FFI_PREFIX = b"__tvm_ffi_"
_ELF64_LITTLE = b"\x7fELF\x02\x01"  # magic, ELFCLASS64, ELFDATA2LSB
_SECTION = struct.Struct("<IIQQQQIIQQ")  # name, type, flags, addr, offset, size, link, info, align, entsize
_SYMBOL = struct.Struct("<IBBHQQ")  # name, info, other, section index, value, size
_SHT_DYNSYM, _STT_FUNC, _SHN_UNDEF = 11, 2, 0


def exported_functions(library: bytes) -> list[str] | None:
    """The names `f` of the functions `library` (the bytes of an ELF64 little-endian shared object)
    defines as `__tvm_ffi_f`, sorted; None when the bytes are not such a file or cannot be read."""
    if not library.startswith(_ELF64_LITTLE):
        return None
    try:
        (section_offset,) = struct.unpack_from("<Q", library, 0x28)
        entry_size, count = struct.unpack_from("<HH", library, 0x3A)
        sections = [_SECTION.unpack_from(library, section_offset + i * entry_size) for i in range(count)]
        names = set()
        for _, kind, _, _, offset, size, link, _, _, symbol_size in sections:
            if kind != _SHT_DYNSYM or symbol_size < _SYMBOL.size:
                continue
            strings_offset, strings_size = sections[link][4], sections[link][5]
            strings = library[strings_offset : strings_offset + strings_size]
            for start in range(offset, offset + size, symbol_size):
                name_at, info, _, section, _, _ = _SYMBOL.unpack_from(library, start)
                if info & 0xF != _STT_FUNC or section == _SHN_UNDEF:
                    continue
                name = strings[name_at : strings.index(b"\0", name_at)]
                if name.startswith(TVM_FFI_PREFIX) and not name.startswith(TVM_FFI_PREFIX + b"_"):
                    names.add(name[len(TVM_FFI_PREFIX) :].decode())
    except (struct.error, IndexError, ValueError, UnicodeDecodeError):
        return None
    return sorted(names)
