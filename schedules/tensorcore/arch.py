"""The GPU architectures the Tensor Core template builds for, and the limits its parameters respect.

mma.sync m16n8k16 with fp32 accumulation, ldmatrix and cp.async all need sm_80 or newer. sm_90a
(H100/H200) runs the same Ampere-style instructions; "90a" is parsed here as 9.0 (dlight's parser
cannot read the "a", see the field guide).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from tensorpress.errors import ConfigError


@dataclass(frozen=True)
class ArchSpec:
    """Per-architecture limits (bytes, counts) of the reference part named in `part`."""

    name: str  # canonical target arch, e.g. "sm_80", "sm_90a"
    major: int
    minor: int
    shared_bytes_per_block: int  # dynamic shared memory a block may opt in to
    shared_bytes_per_sm: int
    part: str
    sm_count: int  # of the reference part; tile heuristics aim to fill it
    registers_per_sm: int = 65536
    max_registers_per_thread: int = 255
    max_threads_per_block: int = 1024
    static_shared_limit: int = 48 * 1024  # without the opt-in (we always use dynamic shared memory)

    @property
    def compute_version(self) -> int:
        return 10 * self.major + self.minor


_SPECS = {
    "80": ArchSpec("sm_80", 8, 0, 166912, 167936, "A100", 108),
    "86": ArchSpec("sm_86", 8, 6, 101376, 102400, "RTX A6000", 84),
    "89": ArchSpec("sm_89", 8, 9, 101376, 102400, "L40S", 142),
    "90": ArchSpec("sm_90", 9, 0, 232448, 233472, "H100 SXM", 132),
    "90a": ArchSpec("sm_90a", 9, 0, 232448, 233472, "H100 SXM", 132),
}


def arch_spec(arch: str) -> ArchSpec:
    """Spec for an arch string such as "sm_80", "sm_90a", "90a" or "sm90"."""
    m = re.fullmatch(r"(?:sm_?)?(\d+a?)", str(arch).strip())
    if m is None or m.group(1) not in _SPECS:
        known = ", ".join(spec.name for spec in _SPECS.values())
        raise ConfigError(f"GPU architecture {arch!r} is not supported by the Tensor Core template (known: {known}).")
    return _SPECS[m.group(1)]


def target_arch(target) -> str | None:
    """The "sm_XX" arch of a TVM cuda Target, or None when it has none."""
    arch = target.attrs.get("arch", None) if hasattr(target, "attrs") else None
    return str(arch) if arch else None
