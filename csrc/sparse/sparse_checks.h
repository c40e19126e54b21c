// Device-independent argument checks shared by the CPU and CUDA sparse ops; each file adds its
// own device checks.
#pragma once
#include <torch/extension.h>

#include "common/checks.h"

namespace peft_kernels {

// x (T, K) float; crow (n_rows + 1,) and col (nnz,) int32/int64.
inline void check_csr_operands(const at::Tensor& x, const at::Tensor& crow, const at::Tensor& col, int64_t n_rows) {
  PK_CHECK_DIM(x, 2);
  PK_CHECK_FLOAT(x);
  PK_CHECK_DIM(crow, 1);
  PK_CHECK_DIM(col, 1);
  PK_CHECK_INDEX(crow);
  PK_CHECK_INDEX(col);
  TORCH_CHECK(crow.size(0) == n_rows + 1, "crow must have ", n_rows + 1, " entries, got ", crow.size(0));
}

// SpMM's values: fp32 (the launcher upcasts them), one per nnz.
inline void check_spmm_values(const at::Tensor& val, const at::Tensor& col, int64_t out_features) {
  TORCH_CHECK(out_features >= 0, "out_features must be >= 0, got ", out_features);
  PK_CHECK_DIM(val, 1);
  TORCH_CHECK(val.scalar_type() == at::kFloat, "val must be float32 (the launcher upcasts it), got ",
              val.scalar_type());
  TORCH_CHECK(val.size(0) == col.size(0), "val and col must both have nnz entries");
}

}  // namespace peft_kernels
