/* A stand-in libcuda.so.1 for machines with nvcc but no NVIDIA driver.
 *
 * TVM's CUDA runtime library (libtvm_runtime_cuda.so) links against the driver. Without a loadable
 * libcuda.so.1 it is not loaded, and tvm.compile(target=cuda) silently keeps CUDA *source* instead of
 * calling nvcc. Preloading this stub lets TVM build real fatbins; every entry point reports
 * CUDA_ERROR_NO_DEVICE (100), so nothing can ever run on it. Never used where a real driver exists.
 */
typedef int CUresult;
enum { kNoDevice = 100 };
static const char* kMessage = "CUDA_ERROR_NO_DEVICE (tensorpress build-only libcuda stub)";

CUresult cuInit(unsigned flags) { return kNoDevice; }
CUresult cuDriverGetVersion(int* version) { *version = 0; return kNoDevice; }
CUresult cuGetErrorName(CUresult error, const char** text) { *text = kMessage; return 0; }
CUresult cuGetErrorString(CUresult error, const char** text) { *text = kMessage; return 0; }
CUresult cuDeviceGetName(char* name, int length, int device) { return kNoDevice; }
CUresult cuFuncSetAttribute(void* function, int attribute, int value) { return kNoDevice; }
CUresult cuLaunchKernelEx(const void* config, void* function, void** params, void** extra) { return kNoDevice; }
CUresult cuModuleGetFunction(void** function, void* module, const char* name) { return kNoDevice; }
CUresult cuModuleLoadData(void** module, const void* image) { return kNoDevice; }
CUresult cuModuleUnload(void* module) { return kNoDevice; }
CUresult cuTensorMapEncodeTiled(void* a, int b, unsigned c, void* d, const void* e, const void* f, const void* g,
                                const void* h, int i, int j, int k, int l) { return kNoDevice; }
