"""This machine's CPU flags, as /proc/cpuinfo names them: what a CPU artifact's `cpu_flags` are checked against."""

from __future__ import annotations

CPU_FLAGS_FILE = "/proc/cpuinfo"


def host_cpu_flags() -> set[str]:
    """The flags of the first CPU listed (empty where the file cannot be read: not Linux)."""
    try:
        with open(CPU_FLAGS_FILE) as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def missing_cpu_flags(needed) -> list[str]:
    """The flags of `needed` this machine's CPU lacks, in `needed`'s order."""
    have = host_cpu_flags()
    return [flag for flag in needed if flag not in have]
