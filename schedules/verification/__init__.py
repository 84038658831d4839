"""How kernels are trusted without a GPU (docs/DESIGN.md): none of this is on the compile path.

tensorcore_emulation.py  the PTX semantics of our Tensor Core intrinsics (ldmatrix, mma, cp.async) in
                         plain loops: the IntrinsicSet twin the CPU replay builds with
cpu_replay.py            a CUDA schedule built for llvm: thread loops serial and shuffled, shared and
                         local scratch poisoned with NaN
kv_attention_replay.py   the same for the paged KV attention kernels (cross-thread reductions)
cuda_inspection.py       nvcc / ptxas / cuobjdump: registers, spills, shared memory, SASS opcodes
sass_cost.py             the main loop's SASS, costed per weight against the bandwidth budget
"""
