"""The parameters of the CPU weight GEMM (`weight_gemm.py`): which schedule, and its register tile.

Every one of the three schedules keeps a tile of Y in vector registers, tokens x weight rows:

    schedule    token_tile (rows of Y, tokens)        weight_tile (columns of Y, weight rows)
    panel       R, the micro-kernel's rows            C, its columns (whole vectors): the panel width
    along_k     n_tile, tokens per register tile      m_tile, weight rows decoded per step of 8 codes
    row_slots   T, tokens in the vector lanes         rows of the 8-row block per pass (1 token: 8, gather)

`default_config` is today's untuned choice (the kernels are the same as before configs existed);
`search_space` lists every valid config for one kernel; `check_config` says why a config cannot
schedule a kernel (a record from a log is used only when it passes).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from tvm import s_tir, tirx
from tvm.target import Target

from tensorpress.errors import ConfigError
from tensorpress.schedules.cpu.decode_along_k import decodes_along_k, schedule_decode_along_k
from tensorpress.schedules.cpu.register_blocked_gemm import (
    GemmBlocks,
    RegisterTile,
    register_tile,
    schedule_register_blocked_gemm,
)
from tensorpress.schedules.cpu.row_slot_gemm import (
    ACCUMULATOR_VECTORS,
    LANES,
    default_row_slot_tile,
    is_row_slot_gemm,
    schedule_row_slot_gemm,
)
from tensorpress.schedules.cpu.vector_unit import VectorUnit, vector_unit
from tensorpress.schedules.decode_stage import DecodeStage
from tensorpress.schedules.weight_gemm import N_HINT_ATTR, ROW_SLOTS_ATTR, decode_stage_of

SCHEDULES = ("panel", "along_k", "row_slots")

# The decode-along-K kernel: up to this many expected tokens; tiles of (tokens, weight rows) whose
# 8-lane accumulators, decoded rows and X vector fit AVX2's 16 registers (4 x 4 spilled).
ALONG_K_MAX_TOKENS = 16
_ALONG_K_DEFAULT_TILES = {True: (1, 4), False: (4, 2)}  # n_hint == 1 (one token: more rows), else
_ALONG_K_TILES = (1, 2, 3, 4, 6, 8)
# The panel kernel's rows at most: 12 with 16 vector registers (AVX2), twice that with 32 (AVX-512, NEON),
# where a one-vector-wide tile of up to 24 rows still fits the registers.
_PANEL_MAX_ROWS_PER_16_REGISTERS = 12


def panel_max_rows(unit: VectorUnit) -> int:
    """The most rows (tokens) a panel register tile may have on `unit` (the search's upper bound)."""
    return _PANEL_MAX_ROWS_PER_16_REGISTERS * unit.registers // 16


@dataclass(frozen=True)
class CpuGemmConfig:
    """One choice for the CPU weight GEMM (module docstring): `schedule` and its register tile."""

    schedule: str
    token_tile: int
    weight_tile: int

    def label(self) -> str:
        """Short stable name, e.g. 'panel-6x16'."""
        return f"{self.schedule}-{self.token_tile}x{self.weight_tile}"

    def to_dict(self) -> dict[str, object]:
        return asdict(self)

    @classmethod
    def from_dict(cls, params: object) -> CpuGemmConfig:
        """Parse recorded parameters; ConfigError for missing, extra or mistyped fields."""
        names = [f.name for f in fields(cls)]
        if not isinstance(params, dict) or sorted(params) != sorted(names):
            raise ConfigError(f"a CPU weight-GEMM config needs exactly the fields {', '.join(names)}; got {params!r}.")
        if not isinstance(params["schedule"], str) or not all(
            isinstance(params[n], int) and not isinstance(params[n], bool) for n in names[1:]
        ):
            raise ConfigError(f"CPU weight-GEMM config {params!r}: schedule is a name, the tiles integers.")
        return cls(**params)


def _n_hint(func: tirx.PrimFunc) -> int | None:
    return int(func.attrs[N_HINT_ATTR]) if N_HINT_ATTR in func.attrs else None


def _stage(func: tirx.PrimFunc) -> DecodeStage:
    try:
        return decode_stage_of(func)
    except KeyError:  # made in another process: its decode block is scheduled as it stands
        return DecodeStage()


def _mk(func: tirx.PrimFunc) -> tuple[int, int]:
    m, k = (int(v) for v in func.attrs["tensorpress.mk"])
    return m, k


def default_config(func: tirx.PrimFunc, target: Target) -> CpuGemmConfig:
    """The untuned config of a weight-GEMM PrimFunc (what the rule used before configs existed)."""
    n_hint = _n_hint(func)
    if is_row_slot_gemm(func):
        block_rows = int(func.attrs[ROW_SLOTS_ATTR])
        if n_hint == 1:
            return CpuGemmConfig("row_slots", 1, block_rows)
        return CpuGemmConfig("row_slots", *default_row_slot_tile(block_rows, n_hint))
    m, k = _mk(func)
    n_tile, m_tile = _ALONG_K_DEFAULT_TILES[n_hint == 1]
    hint = ALONG_K_MAX_TOKENS if n_hint is None else n_hint
    if hint <= ALONG_K_MAX_TOKENS and m % m_tile == 0 and decodes_along_k(_stage(func), k):
        return CpuGemmConfig("along_k", n_tile, m_tile)
    return panel_default(target)


def panel_default(target: Target) -> CpuGemmConfig:
    """The panel schedule's untuned tile: two vectors wide, as many rows as the registers allow."""
    tile = register_tile(vector_unit(target), "float32")  # the accumulator is fp32 whatever the activations
    return CpuGemmConfig("panel", tile.rows, tile.cols)


def check_config(config: CpuGemmConfig, func: tirx.PrimFunc, target: Target) -> None:
    """Raise ConfigError naming what makes `config` unusable for this weight-GEMM PrimFunc on `target`."""
    unit = vector_unit(target)
    where = f"config {config.label()}"
    if config.schedule not in SCHEDULES:
        raise ConfigError(f"{where}: unknown schedule {config.schedule!r}; one of {', '.join(SCHEDULES)}.")
    if config.token_tile < 1 or config.weight_tile < 1:
        raise ConfigError(f"{where}: tiles must be positive.")
    slots = is_row_slot_gemm(func)
    if slots != (config.schedule == "row_slots"):
        raise ConfigError(f"{where}: row-slot kernels take the row_slots schedule, and only they do.")
    if config.schedule == "panel":
        _check_panel(config, unit, where)
    elif config.schedule == "along_k":
        _check_along_k(config, func, unit, where)
    else:
        _check_row_slots(config, func, where)


def _check_panel(config: CpuGemmConfig, unit: VectorUnit, where: str) -> None:
    lanes = unit.lanes("float32")
    if config.weight_tile % lanes:
        raise ConfigError(f"{where}: the panel width must be whole vectors of {lanes} floats.")
    vectors = config.weight_tile // lanes
    needed = config.token_tile * vectors + vectors + 1  # accumulators, B vectors, the broadcast A value
    if config.token_tile > panel_max_rows(unit) or needed > unit.registers:
        raise ConfigError(f"{where}: needs {needed} vector registers, the target has {unit.registers}.")


def _check_along_k(config: CpuGemmConfig, func: tirx.PrimFunc, unit: VectorUnit, where: str) -> None:
    m, k = _mk(func)
    if not decodes_along_k(_stage(func), k):
        raise ConfigError(f"{where}: the {func.attrs['tensorpress.format']} stage cannot decode along K here.")
    if m % config.weight_tile:
        raise ConfigError(f"{where}: M={m} must be a multiple of the weight tile.")
    if config.token_tile not in _ALONG_K_TILES or config.weight_tile not in _ALONG_K_TILES:
        raise ConfigError(f"{where}: tiles must be among {_ALONG_K_TILES}.")
    if config.token_tile * config.weight_tile > unit.registers:
        raise ConfigError(f"{where}: {config.token_tile * config.weight_tile} accumulators exceed the registers.")


def _check_row_slots(config: CpuGemmConfig, func: tirx.PrimFunc, where: str) -> None:
    block_rows = int(func.attrs[ROW_SLOTS_ATTR])
    if _n_hint(func) == 1:
        if (config.token_tile, config.weight_tile) != (1, block_rows):
            raise ConfigError(f"{where}: one token gathers a whole block: 1x{block_rows} only.")
        return
    if config.token_tile % LANES or block_rows % config.weight_tile:
        raise ConfigError(f"{where}: tokens in whole vectors of {LANES}, rows dividing the block of {block_rows}.")
    if config.weight_tile * config.token_tile // LANES > 2 * ACCUMULATOR_VECTORS:
        raise ConfigError(f"{where}: the accumulators exceed the registers.")


def search_space(func: tirx.PrimFunc, target: Target) -> list[CpuGemmConfig]:
    """Every valid config for this kernel on `target`, the default first."""
    unit = vector_unit(target)
    lanes = unit.lanes("float32")
    candidates = [default_config(func, target)]
    if is_row_slot_gemm(func):
        candidates += [CpuGemmConfig("row_slots", t, r) for t in (8, 16, 24, 32) for r in (1, 2, 4, 8)]
    else:
        candidates += [
            CpuGemmConfig("panel", rows, vectors * lanes)
            for rows in range(1, panel_max_rows(unit) + 1)
            for vectors in (1, 2, 3, 4)
        ]
        candidates += [CpuGemmConfig("along_k", n, m) for n in _ALONG_K_TILES for m in _ALONG_K_TILES]
    space: list[CpuGemmConfig] = []
    for config in candidates:
        try:
            check_config(config, func, target)
        except ConfigError:
            continue
        if config not in space:
            space.append(config)
    return space


def schedule_with_config(func: tirx.PrimFunc, target: Target, config: CpuGemmConfig) -> s_tir.Schedule:
    """The weight GEMM scheduled with `config` (checked by `check_config` first); s_tir.ScheduleError
    where TVM cannot tile this decode that way."""
    if config.schedule == "row_slots":
        return schedule_row_slot_gemm(func, tokens=config.token_tile, rows_per_pass=config.weight_tile)
    if config.schedule == "along_k":
        return schedule_decode_along_k(func, _stage(func), n_tile=config.token_tile, m_tile=config.weight_tile)
    unit = vector_unit(target)
    lanes = unit.lanes("float32")
    panel = _stage(func).cpu_panel_width
    tile = RegisterTile(rows=config.token_tile, cols=config.weight_tile)
    sch = s_tir.Schedule(func)
    blocks = GemmBlocks(
        gemm=sch.get_sblock("gemm"),
        # a scatter decode builds all of W once per call (it is no per-element producer): read it in place
        b_source=sch.get_sblock("decode") if _stage(func).decodes_elements else None,
        # stored panels as wide as the tile, a multiple of it, or a whole fraction of it in whole vectors
        # (each vector load then stays within one panel): read in place
        inline_b=panel is not None and (panel % tile.cols == 0 or (tile.cols % panel == 0 and panel % lanes == 0)),
    )
    schedule_register_blocked_gemm(sch, blocks, tile, lanes)
    return sch
