"""The compiled functions of a library, read from its ELF symbol table: checked on a shared object built
here by the C compiler, whose exported symbols are known."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from tensorpress.runtime.library_functions import exported_functions

SOURCE = """
int __tvm_ffi_weight_gemm_fp6(void) { return 1; }
int __tvm_ffi_fused_relu(void) { return 2; }
int __tvm_ffi__library_ctx_helper(void) { return 3; }  /* TVM's own, not a model function */
int __tvm_ffi_not_a_function = 4;
static int __tvm_ffi_hidden(void) { return 5; }
int other(void) { return __tvm_ffi_hidden(); }
extern int __tvm_ffi_imported(void);
int calls_imported(void) { return __tvm_ffi_imported(); }
"""


@pytest.fixture(scope="module")
def library(tmp_path_factory) -> bytes:
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        pytest.skip("no C compiler")
    folder = tmp_path_factory.mktemp("elf")
    (folder / "lib.c").write_text(SOURCE)
    subprocess.run([compiler, "-shared", "-fPIC", "-o", str(folder / "lib.so"), str(folder / "lib.c")], check=True)
    return (folder / "lib.so").read_bytes()


def test_lists_the_defined_tvm_functions_only(library):
    assert exported_functions(library) == ["fused_relu", "weight_gemm_fp6"]


@pytest.mark.parametrize("cut", [0, 4, 100, -1])
def test_anything_but_a_whole_elf_file_gives_none(library, cut):
    """A cut-off file (its section headers sit at the end) is not misread as a library without functions."""
    assert exported_functions(library[:cut] if cut >= 0 else b"not an ELF file") is None
