// The one place the peft_kernels op schemas are declared. Families add their schemas here and
// their CPU / CUDA implementations with TORCH_LIBRARY_IMPL in their own files.
#include <torch/extension.h>

#include "common/checks.h"

namespace peft_kernels {

bool with_cuda() {
#ifdef PEFT_KERNELS_WITH_CUDA
  return true;
#else
  return false;
#endif
}

}  // namespace peft_kernels

TORCH_LIBRARY(peft_kernels, m) {
  // dropout (csrc/dropout): the shared counter-based keep-mask of reference/_philox.py, CPU only
  m.def("philox_keep_mask(Tensor seed, int rows, int cols, int threshold) -> Tensor");
  // sparse adapter (csrc/sparse): gather SpMM y = x @ (M.S)^T from a CSR mask (val fp32, y in
  // x.dtype); dx = dy @ (M.S) is the same op on the transposed CSR; SDDMM dval[k] =
  // sum_t dy[t, row(k)] * x[t, col[k]] at the nnz only (fp32). Fakes: peft_kernels/ops/sparse.py.
  m.def("sparse_spmm(Tensor x, Tensor crow, Tensor col, Tensor val, int out_features) -> Tensor");
  // in place: y += x @ (M.S)^T (y (T, N) contiguous, x.dtype): adds the adapter onto the frozen
  // product's output (forward) or onto dY @ W0 (backward) without a separate sum pass
  m.def("sparse_spmm_add_(Tensor(a!) y, Tensor x, Tensor crow, Tensor col, Tensor val) -> ()");
  m.def("sparse_sddmm(Tensor dy, Tensor x, Tensor crow, Tensor col) -> Tensor");
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("with_cuda", &peft_kernels::with_cuda, "whether _C was built with CUDA kernels");
}
