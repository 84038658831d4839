"""The GPU run kit: kernels built here (no GPU), carried to a GPU machine, tested and timed there.

python benchmarks/kit/prepare.py                 # here: build into .device-kit/ (<= 64 MiB)
python3 benchmarks/kit/run.py --out $OUT         # there: gpu tests + benchmarks -> JSON in $OUT

cases.py    what is built and measured (pure Python: both sides read it)
build.py    TVM side: schedules and compiles the kernel libraries (here)
kernels.py  runtime side: loads the libraries with tvm-ffi + TVM's runtime only (there)
prepare.py  the first command;  run.py  the second
sparse_weights.py  the sparse part's pruned weights (random masks, the numpy bitmap and bitmap-e3m2
              packers in parallel); its benchmark is benchmarks/sparse_gemm_gpu.py (bitmap, and sparse x
              FP6 at 80 % on Llama-2-70B's layers), its gpu test test_bitmap_gpu.py
decoder_*.py  the decoder part (artifacts vs transformers, decode throughput): decoder_cases.py says what
              is built and run, decoder_build.py builds it here, decoder_run.py runs it there
"""
