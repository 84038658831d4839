"""What the main loop of a compiled weight GEMM costs, read off its SASS, against the HBM budget.

    kernels = parse_listing(cuobjdump_sass_text)            # {kernel: [Instruction, ...]}
    counts = steady_state(kernels[name], decoded_per_thread)  # opcodes one thread runs per K tile
    summary = summarize(counts, config)                       # HMMA, INT, BAR, instr per weight
    summary["instructions_per_weight"] <= weight_budget(bits)  # keeps up with HBM?

The budget. At full HBM bandwidth an H100 SM receives about 14 bytes per clock (3.35 TB/s over 132
SMs at 1.83 GHz), i.e. 14·8/b weights of b bits, and issues 4 × 32 thread-instructions per clock; so
a kernel that streams W may spend at most ~1.15·b thread-instructions per weight on everything
(copies, decode, ldmatrix, mma, loop control): fp16 18.5, FP6 6.9, FP5 5.8, FP4 4.6. More, and the
SM's issue rate, not the memory, bounds the kernel. A count, not a timing: it ignores latencies,
bank conflicts and dual issue; what it says is whether the instruction stream can keep up at all.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass

from tensorpress.schedules.tensorcore.tile_config import TileConfig

INTEGER_OPS = frozenset(
    ["IMAD", "IADD3", "IADD", "LOP3", "LOP", "SHF", "SHL", "SHR", "LEA", "SEL", "ISETP", "PRMT", "VIADD",
     "VIMNMX", "IMNMX", "IABS", "BMSK", "SGXT", "IMUL", "FLO", "POPC", "BREV"]
)  # fmt: skip
FP16_OPS = frozenset(["HMUL2", "HFMA2", "HADD2", "HMNMX2", "F2FP", "HSETP2"])
H100_BYTES_PER_SM_CLOCK = 3.35e12 / (132 * 1.83e9)  # HBM3 datasheet bandwidth / (SMs x boost clock)
ISSUE_PER_SM_CLOCK = 4 * 32  # thread-instructions: 4 schedulers, one warp-instruction each

_INSTRUCTION = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)\s*([^;]*);")


@dataclass(frozen=True)
class Instruction:
    address: int
    opcode: str  # with modifiers, e.g. "LDGSTS.E.BYPASS.128"
    operands: str

    @property
    def base(self) -> str:
        return self.opcode.split(".")[0]

    @property
    def branch_target(self) -> int | None:
        if self.base != "BRA":
            return None
        m = re.search(r"0x([0-9a-f]+)", self.operands)
        return int(m.group(1), 16) if m else None


def parse_listing(listing: str) -> dict[str, list[Instruction]]:
    """cuobjdump -sass listing -> {kernel name: its instructions in address order}."""
    kernels: dict[str, list[Instruction]] = {}
    current: list[Instruction] | None = None
    for line in listing.splitlines():
        if m := re.search(r"Function : (\S+)", line):
            current = kernels.setdefault(m.group(1), [])
        elif current is not None and (m := _INSTRUCTION.search(line)):
            current.append(Instruction(int(m.group(1), 16), m.group(3), m.group(4).strip()))
    return kernels


def loops(instructions: list[Instruction]) -> list[tuple[int, int]]:
    """(first, last) index ranges of the loops: every backward branch closes one."""
    index = {ins.address: i for i, ins in enumerate(instructions)}
    found = []
    for i, ins in enumerate(instructions):
        target = ins.branch_target
        if target is not None and target <= ins.address and target in index:
            found.append((index[target], i))
    return found


def steady_state(instructions: list[Instruction], decoded_per_thread: int) -> Counter | None:
    """Opcode counts one thread executes per iteration of the main loop (the outermost loop holding
    HMMA: one K tile). An inner loop in it counts times its trip count, which is known for a decode
    loop into a shared W tile: `decoded_per_thread` W elements a thread writes per K tile over the
    STS in its body. Forward branches are counted as taken both ways (an upper bound). None when
    there is no such loop or an inner loop's trips cannot be told."""
    spans = loops(instructions)
    holding_mma = [s for s in spans if any(ins.base == "HMMA" for ins in instructions[s[0] : s[1] + 1])]
    if not holding_mma:
        return None
    first, last = max(holding_mma, key=lambda s: s[1] - s[0])
    inner = [s for s in spans if first <= s[0] and s[1] <= last and s != (first, last)]
    inner = [s for s in inner if not any(o != s and o[0] <= s[0] and s[1] <= o[1] for o in inner)]
    counts: Counter = Counter()
    covered: set[int] = set()
    for start, end in inner:
        body = instructions[start : end + 1]
        stores = sum(ins.base == "STS" for ins in body)
        if stores == 0 or decoded_per_thread % stores:
            return None
        trips = decoded_per_thread // stores
        for ins in body:
            counts[ins.base] += trips
        covered.update(range(start, end + 1))
    for i in range(first, last + 1):
        if i not in covered:
            counts[instructions[i].base] += 1
    return counts


@dataclass(frozen=True)
class ScatterTrips:
    """How often the loops of a tile scatter (`schedules/tile_scatter.py`) run per K tile, for one warp
    (a warp runs a loop as often as its busiest lane: the mean over the warps and K tiles of a weight):

    groups:        trips of the loop over groups of words (one vector load of words a trip)
    word_elements: per word of a group, the sum over its group trips of the busiest lane's set bits,
                   rounded up to whole chunks (bitmap words: the loop over a word's set bits, a chunk
                   and its STS a trip); None for a word per element
    fill_stores:   16-byte stores of zeros a thread makes (the zero-fill)
    vector:        words a group holds
    """

    groups: float
    word_elements: float | None
    fill_stores: int
    vector: int = 4


def scatter_steady_state(instructions: list[Instruction], trips: ScatterTrips) -> Counter | None:
    """Opcode counts one warp executes per K tile of the main loop of a tile-scatter kernel, each
    instruction weighted by how often its innermost loop runs (`ScatterTrips`), loops told by what they
    hold:

        holds a BAR            the phase loop (fill, barrier | scatter): each phase is a branch, once
        holds another loop     the loop over groups of words (bitmap words): trips.groups
        only 16-byte STS       the zero-fill: fill_stores / its STS
        other STS (2 bytes)    a word per element: the group loop, groups x vector / its STS;
                               bitmap words: the loop over a word's set bits, word_elements / its STS
                               (nvcc unrolls these loops; the remainder code sits in the loop around,
                               counted at every trip of it)

    Forward branches count as taken both ways (an upper bound, as in `steady_state`). None when the
    kernel has no such main loop or a loop fits none of these."""
    spans = loops(instructions)
    holding_mma = [s for s in spans if any(ins.base == "HMMA" for ins in instructions[s[0] : s[1] + 1])]
    if not holding_mma:
        return None
    main = max(holding_mma, key=lambda s: s[1] - s[0])
    inner = sorted((s for s in spans if main[0] <= s[0] and s[1] <= main[1] and s != main), key=lambda s: s[1] - s[0])
    runs: dict[tuple[int, int], float] = {}
    for span in reversed(inner):  # outermost first: a loop's runs may depend on its parent's
        body = instructions[span[0] : span[1] + 1]
        wide = sum(ins.base == "STS" and ins.opcode.endswith(".128") for ins in body)
        narrow = sum(ins.base == "STS" and not ins.opcode.endswith(".128") for ins in body)
        nested = any(o != span and span[0] <= o[0] and o[1] <= span[1] for o in inner)
        if any(ins.base == "BAR" for ins in body):
            runs[span] = 1.0
        elif nested:
            runs[span] = trips.groups
        elif wide and not narrow:
            runs[span] = trips.fill_stores / wide
        elif narrow:  # a word per element: the group loop stores them; else one word's set bits
            each = trips.groups * trips.vector if trips.word_elements is None else trips.word_elements
            runs[span] = each / narrow
        else:
            return None
    weighted: dict[str, float] = {}
    for i in range(main[0], main[1] + 1):
        around = [s for s in inner if s[0] <= i <= s[1]]
        base = instructions[i].base
        weighted[base] = weighted.get(base, 0.0) + (runs[min(around, key=lambda s: s[1] - s[0])] if around else 1.0)
    return Counter(weighted)


def weight_budget(bits: float) -> float:
    """Thread-instructions an H100 SM may spend per b-bit weight and still stream W at full bandwidth."""
    weights_per_clock = H100_BYTES_PER_SM_CLOCK * 8 / bits
    return ISSUE_PER_SM_CLOCK / weights_per_clock


def summarize(counts: Counter, config: TileConfig) -> dict[str, float]:
    """Per K tile and warp: HMMA, integer ops, fp16 ops, BAR, LDS, STS, all; integer ops per HMMA;
    and thread-instructions per weight of the CTA tile (all warps execute the same count)."""
    total = sum(v for op, v in counts.items() if op != "NOP")
    weights = config.block_m * config.block_k
    integer = sum(v for op, v in counts.items() if op in INTEGER_OPS)
    return {
        "HMMA": counts["HMMA"],
        "INT": integer,
        "FP16": sum(v for op, v in counts.items() if op in FP16_OPS),
        "BAR": counts["BAR"],
        "LDS": counts["LDS"],
        "STS": counts["STS"],
        "total": total,
        "int_per_hmma": integer / max(counts["HMMA"], 1),
        "instructions_per_weight": total * config.threads / weights,
    }
