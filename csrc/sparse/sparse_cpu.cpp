// Sparse-masked adapter (RoSA-style), CPU kernels: gather SpMM and SDDMM over a CSR mask.
//
//   sparse_spmm(x (T, K), crow (N+1), col (nnz), val (nnz) fp32, N)  -> y (T, N) in x.dtype
//       y[t, r] = sum_{k in row r} val[k] * x[t, col[k]]
//   sparse_spmm_add_(y (T, N), x, crow, col, val): the same, added into y in place
//   sparse_sddmm(dy (T, N), x (T, K), crow (N+1), col (nnz))          -> dval (nnz,) fp32
//       dval[k] = sum_t dy[t, row(k)] * x[t, col[k]]
//
// The backward dx = dy @ (M.S) is sparse_spmm on the transposed CSR (built once per mask in
// Python), so two kernels cover forward and backward.
//
// Layout: both kernels work on token-minor ("transposed") fp32 copies, x^T (K, T) and
// dy^T (N, T). A nonzero then touches one contiguous length-T row instead of T strided
// elements, so the inner loops are unit-stride axpy / dot products that the compiler
// vectorises (omp simd). When the caller already holds x^T (the autograd Function saves it
// and passes x^T.t()), `.t().contiguous()` below is free. All accumulation is fp32.
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include "common/checks.h"
#include "sparse/sparse_checks.h"

namespace peft_kernels {
namespace {

// Token tile of the SpMM: one row's accumulator (kTileT floats = 2 KiB) stays in L1 while
// the row's nonzeros stream through it.
constexpr int64_t kTileT = 512;

// Token-minor fp32 copy: (T, D) -> (D, T). Free when `a` is already a transposed fp32 view.
at::Tensor token_minor_float(const at::Tensor& a) {
  return a.t().contiguous().to(at::kFloat);
}

// Serial O(nnz) validation: the Python side checks masks once at creation, but a kernel must
// never read out of bounds, and throwing from inside a parallel region is not allowed.
void check_csr_cpu(const int64_t* crow, const int64_t* col, int64_t n_rows, int64_t nnz, int64_t n_cols) {
  TORCH_CHECK(crow[0] == 0 && crow[n_rows] == nnz, "crow must start at 0 and end at nnz=", nnz, ", got ",
              crow[0], "..", crow[n_rows]);
  for (int64_t r = 0; r < n_rows; ++r) {
    TORCH_CHECK(crow[r] <= crow[r + 1], "crow must be non-decreasing (row ", r, ")");
  }
  for (int64_t k = 0; k < nnz; ++k) {
    TORCH_CHECK(col[k] >= 0 && col[k] < n_cols, "col[", k, "]=", col[k], " out of range [0, ", n_cols, ")");
  }
}

void check_common(const at::Tensor& x, const at::Tensor& crow, const at::Tensor& col, int64_t n_rows) {
  check_csr_operands(x, crow, col, n_rows);
  TORCH_CHECK(x.device().is_cpu() && crow.device().is_cpu() && col.device().is_cpu(),
              "sparse CPU kernels take CPU tensors");
}

}  // namespace

namespace {

// y^T (N, T) fp32 = (x @ (M.S)^T)^T: the shared body of sparse_spmm and sparse_spmm_add_.
at::Tensor spmm_token_minor(const at::Tensor& x, const at::Tensor& crow, const at::Tensor& col,
                            const at::Tensor& val, int64_t out_features) {
  check_spmm_values(val, col, out_features);
  check_common(x, crow, col, out_features);
  TORCH_CHECK(val.device().is_cpu(), "sparse CPU kernels take CPU tensors");

  const int64_t T = x.size(0), K = x.size(1), N = out_features, nnz = col.size(0);
  const at::Tensor crow64 = crow.to(at::kLong).contiguous();
  const at::Tensor col64 = col.to(at::kLong).contiguous();
  const at::Tensor valc = val.contiguous();
  check_csr_cpu(crow64.data_ptr<int64_t>(), col64.data_ptr<int64_t>(), N, nnz, K);

  at::Tensor yt = at::zeros({N, T}, x.options().dtype(at::kFloat));
  if (T > 0 && N > 0 && nnz > 0) {
    const at::Tensor xt = token_minor_float(x);  // (K, T)
    const float* xp = xt.data_ptr<float>();
    const float* vp = valc.data_ptr<float>();
    const int64_t* cp = crow64.data_ptr<int64_t>();
    const int64_t* colp = col64.data_ptr<int64_t>();
    float* yp = yt.data_ptr<float>();
    // Rows are independent: parallel over rows, no write conflicts, deterministic.
    at::parallel_for(0, N, 16, [&](int64_t r_begin, int64_t r_end) {
      for (int64_t r = r_begin; r < r_end; ++r) {
        for (int64_t t0 = 0; t0 < T; t0 += kTileT) {
          const int64_t len = std::min(kTileT, T - t0);
          float* yr = yp + r * T + t0;
          for (int64_t k = cp[r]; k < cp[r + 1]; ++k) {
            const float v = vp[k];
            const float* xr = xp + colp[k] * T + t0;
#pragma omp simd
            for (int64_t t = 0; t < len; ++t) yr[t] += v * xr[t];
          }
        }
      }
    });
  }
  return yt;
}

}  // namespace

at::Tensor sparse_spmm_cpu(const at::Tensor& x, const at::Tensor& crow, const at::Tensor& col,
                           const at::Tensor& val, int64_t out_features) {
  return spmm_token_minor(x, crow, col, val, out_features).t().to(x.scalar_type()).contiguous();
}

void sparse_spmm_add_cpu(at::Tensor& y, const at::Tensor& x, const at::Tensor& crow, const at::Tensor& col,
                         const at::Tensor& val) {
  PK_CHECK_DIM(y, 2);
  TORCH_CHECK(y.device().is_cpu(), "sparse CPU kernels take CPU tensors");
  TORCH_CHECK(x.dim() == 2 && y.size(0) == x.size(0), "y must be (T, N) with T = x.size(0)");
  TORCH_CHECK(y.scalar_type() == x.scalar_type(), "y and x must share one dtype");
  const int64_t N = y.size(1);
  // fp32 sum of the two terms, one rounding to y's dtype (as the CUDA kernel does)
  const at::Tensor yt = spmm_token_minor(x, crow, col, val, N);
  y.copy_(y.to(at::kFloat).add_(yt.t()));
}

at::Tensor sparse_sddmm_cpu(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& crow,
                            const at::Tensor& col) {
  PK_CHECK_DIM(dy, 2);
  PK_CHECK_FLOAT(dy);
  const int64_t N = dy.size(1);
  check_common(x, crow, col, N);
  TORCH_CHECK(dy.size(0) == x.size(0), "dy and x must have the same number of tokens, got ", dy.size(0),
              " and ", x.size(0));
  TORCH_CHECK(dy.device().is_cpu(), "sparse CPU kernels take CPU tensors");

  const int64_t T = x.size(0), K = x.size(1), nnz = col.size(0);
  const at::Tensor crow64 = crow.to(at::kLong).contiguous();
  const at::Tensor col64 = col.to(at::kLong).contiguous();
  check_csr_cpu(crow64.data_ptr<int64_t>(), col64.data_ptr<int64_t>(), N, nnz, K);

  at::Tensor out = at::zeros({nnz}, x.options().dtype(at::kFloat));
  if (T > 0 && nnz > 0) {
    const at::Tensor dyt = token_minor_float(dy);  // (N, T)
    const at::Tensor xt = token_minor_float(x);    // (K, T)
    const float* dp = dyt.data_ptr<float>();
    const float* xp = xt.data_ptr<float>();
    const int64_t* cp = crow64.data_ptr<int64_t>();
    const int64_t* colp = col64.data_ptr<int64_t>();
    float* op = out.data_ptr<float>();
    // Only the nnz dot products are computed: never a dense (N, K) gradient.
    at::parallel_for(0, N, 16, [&](int64_t r_begin, int64_t r_end) {
      for (int64_t r = r_begin; r < r_end; ++r) {
        const float* dr = dp + r * T;
        for (int64_t k = cp[r]; k < cp[r + 1]; ++k) {
          const float* xr = xp + colp[k] * T;
          float acc = 0.f;
#pragma omp simd reduction(+ : acc)
          for (int64_t t = 0; t < T; ++t) acc += dr[t] * xr[t];
          op[k] = acc;
        }
      }
    });
  }
  return out;
}

}  // namespace peft_kernels

TORCH_LIBRARY_IMPL(peft_kernels, CPU, m) {
  m.impl("sparse_spmm", &peft_kernels::sparse_spmm_cpu);
  m.impl("sparse_spmm_add_", &peft_kernels::sparse_spmm_add_cpu);
  m.impl("sparse_sddmm", &peft_kernels::sparse_sddmm_cpu);
}
