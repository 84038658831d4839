"""Compile a scheduled CUDA module with the real nvcc/ptxas and read what the GPU would run.

    reports = inspect_cuda(sch.mod, "sm_90a")
    for r in reports: print(r.name, r.registers, r.spill_bytes, r.shared_bytes, r.sass["HMMA"])

Works on a machine with nvcc and no GPU: TVM lowers the module and emits CUDA C (no driver needed
for that), we compile it to a cubin with the flags TVM's nvcc mode uses (`tvm/support/nvcc.py`) plus
`ptxas -v`, disassemble it with cuobjdump (from the `nvidia-cuda-cuobjdump` wheel or the CUDA
toolkit), and take the dynamic shared memory of each kernel from the lowered TIR (the launch passes
it; the cubin does not know it).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import tvm
from tvm import tirx

from tensorpress.schedules.tensorcore.arch import arch_spec

ASYNC_COPY_CONFIG = {"tirx.use_async_copy": True}
SASS_OPCODES = ("HMMA", "LDSM", "LDGSTS", "LDGDEPBAR", "DEPBAR", "LDL", "STL", "BAR")

# The flags of TVM's nvcc mode (tvm/support/nvcc.py, TVM 0.27), so the cubin we inspect is the one
# `tvm.compile` embeds in an artifact.
_TVM_NVCC_FLAGS = (
    "-O3",
    "-U__CUDA_NO_HALF_OPERATORS__",
    "-U__CUDA_NO_HALF_CONVERSIONS__",
    "-U__CUDA_NO_BFLOAT16_OPERATORS__",
    "-U__CUDA_NO_BFLOAT16_CONVERSIONS__",
    "-U__CUDA_NO_BFLOAT162_OPERATORS__",
    "-U__CUDA_NO_BFLOAT162_CONVERSIONS__",
    "--expt-relaxed-constexpr",
    "--expt-extended-lambda",
    "--use_fast_math",
    "--ptxas-options=-v,--register-usage-level=10,--warn-on-local-memory-usage",
)


class ToolNotFoundError(RuntimeError):
    """nvcc or cuobjdump is missing on this machine."""


@dataclass
class KernelReport:
    """What ptxas and the SASS say about one kernel of a module, for one architecture."""

    name: str
    arch: str
    registers: int
    stack_bytes: int
    spill_store_bytes: int
    spill_load_bytes: int
    static_shared_bytes: int
    dynamic_shared_bytes: int
    sass: Counter = field(default_factory=Counter)  # opcode (first dot-part) -> count

    @property
    def spill_bytes(self) -> int:
        return self.spill_store_bytes + self.spill_load_bytes

    @property
    def shared_bytes(self) -> int:
        return self.static_shared_bytes + self.dynamic_shared_bytes

    def summary(self) -> str:
        ops = " ".join(f"{op}={self.sass[op]}" for op in ("HMMA", "LDSM", "LDGSTS") if self.sass[op])
        return (
            f"{self.name} [{self.arch}]: {self.registers} regs, {self.spill_bytes} B spill, "
            f"{self.stack_bytes} B stack, {self.shared_bytes} B smem; {ops}"
        )


def find_tool(name: str) -> str:
    """Path of a CUDA tool: PATH, then /usr/local/cuda/bin, then the nvidia-* pip wheels."""
    found = shutil.which(name)
    if found:
        return found
    candidates = [Path("/usr/local/cuda/bin") / name]
    try:
        import nvidia  # the nvidia-cuda-cuobjdump / -nvdisasm wheels

        for root in nvidia.__path__:
            candidates += sorted(Path(root).glob(f"*/bin/{name}"))
    except ImportError:
        pass
    for path in candidates:
        if path.is_file() and os.access(path, os.X_OK):
            return str(path)
    raise ToolNotFoundError(f"{name} was not found on PATH, in /usr/local/cuda/bin or in the nvidia pip wheels.")


def nvcc_arch_flags(arch: str) -> list[str]:
    """-gencode for `arch` ("sm_80", "sm_90a"), as TVM passes it."""
    suffix = arch_spec(arch).name[3:]
    return ["-gencode", f"arch=compute_{suffix},code=sm_{suffix}"]


def cuda_source(mod: tvm.IRModule, arch: str) -> str:
    """The CUDA C that TVM generates for a scheduled module (no nvcc, no driver involved)."""
    target = cuda_target(arch)
    with target, tvm.transform.PassContext(config=ASYNC_COPY_CONFIG):
        built = tvm.tirx.build(mod, target=target)
    for imported in built.imports:
        if imported.kind in ("cuda",):
            return imported.inspect_source("cuda")
    raise RuntimeError("the built module holds no CUDA device code")


def cuda_target(arch: str) -> tvm.target.Target:
    return tvm.target.Target({"kind": "cuda", "arch": arch_spec(arch).name})


def _lower_device(mod: tvm.IRModule, target: tvm.target.Target) -> tvm.IRModule:
    """Run TVM's TIR pipeline for `target` and keep the device (kernel) functions."""
    pipeline, _, _ = tvm.tirx.get_default_tir_pipeline(target)
    bound = tvm.tirx.transform.BindTarget(target.with_host("llvm"))(mod)
    lowered = pipeline(bound)
    device = {}
    for gvar, func in lowered.functions.items():
        attrs = func.attrs if isinstance(func, tirx.PrimFunc) else None
        if attrs is not None and "target" in attrs and attrs["target"].kind.name == "cuda":
            device[gvar] = func
    return tvm.IRModule(device)


def dynamic_shared_bytes(mod: tvm.IRModule, arch: str) -> dict[str, int]:
    """Bytes of dynamic shared memory each kernel of `mod` allocates, by kernel name."""
    target = cuda_target(arch)
    with target, tvm.transform.PassContext(config=ASYNC_COPY_CONFIG):
        device = _lower_device(mod, target)
    sizes: dict[str, int] = {}
    for gvar, func in device.functions.items():
        total = [0]

        def visit(node, _visitor=None, total=total):
            if isinstance(node, tirx.AllocBuffer) and node.buffer.scope() == "shared.dyn":
                count = 1
                for extent in node.buffer.shape:
                    count *= int(extent)
                total[0] += count * tvm.DataType(str(node.buffer.dtype)).bits // 8
            return node

        import tvm_ffi

        tvm_ffi.structural_map(func.body, (tirx.AllocBuffer, visit))
        name = str(func.attrs["global_symbol"]) if "global_symbol" in func.attrs else gvar.name_hint
        sizes[name] = total[0]
    return sizes


_PTXAS_FUNC = re.compile(r"Compiling entry function '([^']+)' for '([^']+)'")
_PTXAS_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_PTXAS_USED = re.compile(r"Used (\d+) registers(?:.*?, (\d+) bytes smem)?")


def parse_ptxas(log: str) -> dict[str, dict[str, int]]:
    """ptxas -v output -> {kernel: {registers, stack, spill_stores, spill_loads, smem}}."""
    result: dict[str, dict[str, int]] = {}
    current = None
    for line in log.splitlines():
        if m := _PTXAS_FUNC.search(line):
            current = m.group(1)
            result[current] = {"registers": 0, "stack": 0, "spill_stores": 0, "spill_loads": 0, "smem": 0}
        elif current and (m := _PTXAS_FRAME.search(line)):
            stack, stores, loads = (int(g) for g in m.groups())
            result[current].update(stack=stack, spill_stores=stores, spill_loads=loads)
        elif current and (m := _PTXAS_USED.search(line)):
            result[current]["registers"] = int(m.group(1))
            result[current]["smem"] = int(m.group(2) or 0)
    return result


def parse_sass(listing: str) -> dict[str, Counter]:
    """cuobjdump -sass listing -> {kernel: Counter(opcode -> count)} (opcode = text before the first '.')."""
    kernels: dict[str, Counter] = {}
    current: Counter | None = None
    for line in listing.splitlines():
        if m := re.search(r"Function : (\S+)", line):
            current = kernels.setdefault(m.group(1), Counter())
        elif current is not None and (m := re.search(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)", line)):
            current[m.group(1)] += 1
    return kernels


def compile_cubin(source: str, arch: str, workdir: str | None = None) -> tuple[bytes, str]:
    """nvcc --cubin with TVM's flags; returns (cubin bytes, ptxas -v log). Raises on compile errors."""
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        src, out = Path(tmp) / "kernels.cu", Path(tmp) / "kernels.cubin"
        src.write_text(source)
        cmd = [find_tool("nvcc"), "--cubin", *nvcc_arch_flags(arch), *_TVM_NVCC_FLAGS, "-o", str(out), str(src)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"nvcc failed for {arch}:\n{proc.stdout}\n{proc.stderr}")
        return out.read_bytes(), proc.stdout + proc.stderr


def disassemble(cubin: bytes) -> str:
    """cuobjdump -sass of a cubin."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        proc = subprocess.run([find_tool("cuobjdump"), "-sass", f.name], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"cuobjdump failed: {proc.stderr}")
    return proc.stdout


@dataclass(frozen=True)
class CudaBuild:
    """Everything the inspection reads from one nvcc build of a module (plain text, JSON-able)."""

    arch: str
    source: str  # the CUDA C TVM generated
    ptxas_log: str  # ptxas -v
    listing: str  # cuobjdump -sass
    dynamic_shared: dict[str, int]  # kernel name -> bytes of dynamic shared memory

    def to_json(self) -> dict:
        return asdict(self)

    @staticmethod
    def from_json(data: dict) -> CudaBuild:
        return CudaBuild(**data)


def build_for_inspection(mod: tvm.IRModule, arch: str) -> CudaBuild:
    """Generate CUDA for a scheduled module, compile it for `arch` with nvcc, disassemble it."""
    source = cuda_source(mod, arch)
    cubin, log = compile_cubin(source, arch)
    return CudaBuild(arch, source, log, disassemble(cubin), dynamic_shared_bytes(mod, arch))


def kernel_reports(build: CudaBuild) -> list[KernelReport]:
    """Every kernel's resources and SASS opcode counts, from a build."""
    sass = parse_sass(build.listing)
    reports = []
    for name, info in parse_ptxas(build.ptxas_log).items():
        reports.append(
            KernelReport(
                name=name,
                arch=build.arch,
                registers=info["registers"],
                stack_bytes=info["stack"],
                spill_store_bytes=info["spill_stores"],
                spill_load_bytes=info["spill_loads"],
                static_shared_bytes=info["smem"],
                dynamic_shared_bytes=build.dynamic_shared.get(name, 0),
                sass=sass.get(name, Counter()),
            )
        )
    return reports


def inspect_cuda(mod: tvm.IRModule, arch: str) -> list[KernelReport]:
    """Compile a scheduled module for `arch` with nvcc and report every kernel's resources and SASS."""
    return kernel_reports(build_for_inspection(mod, arch))
