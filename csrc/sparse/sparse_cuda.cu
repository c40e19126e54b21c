// Sparse-masked adapter (RoSA-style), CUDA kernels: same ops and math as sparse_cpu.cpp.
//
//   sparse_spmm:  y[t, r]  = sum_{k in row r} val[k] * x[t, col[k]]     (y (T, N), x.dtype)
//   sparse_spmm_add_: the same added into y in place (fp32 sum, one rounding)
//   sparse_sddmm: dval[k]  = sum_t dy[t, row(k)] * x[t, col[k]]         (fp32, nnz only)
//
// Both kernels read token-minor copies x^T (K, T) / dy^T (N, T), so the 32 lanes of a warp
// read 32 consecutive tokens of one gathered column (coalesced) while the CSR indices are
// warp-uniform broadcasts. The autograd Function saves x^T in forward and passes x^T.t(),
// making the `.t().contiguous()` below free on that path. fp32 accumulation throughout.
//
// Kept deliberately simple (one output element per thread in the SpMM, one warp per nonzero
// in the SDDMM); see peft_kernels/ops/sparse.py for what to measure first on an H100.
#ifdef PEFT_KERNELS_WITH_CUDA
#include <algorithm>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/extension.h>

#include "common/checks.h"
#include "sparse/sparse_checks.h"

namespace peft_kernels {
namespace {

// The data dtypes the ops accept (sparse_checks.h rejects the rest before any dispatch): no fp64
// instantiations, which would only lengthen the nvcc build (~1/4 of it).
#define PK_DISPATCH_DATA_TYPES(TYPE, NAME, ...)                         \
  AT_DISPATCH_SWITCH(TYPE, NAME,                                        \
                     AT_DISPATCH_CASE(at::ScalarType::Float, __VA_ARGS__) \
                     AT_DISPATCH_CASE(at::ScalarType::Half, __VA_ARGS__)  \
                     AT_DISPATCH_CASE(at::ScalarType::BFloat16, __VA_ARGS__))

// SpMM tile: 32 tokens x 32 rows per block, 32 x 8 threads (each thread does 4 rows).
constexpr int kTile = 32;
constexpr int kRowsPerPass = 8;
// SDDMM: warps per block; each warp owns one nonzero at a time.
constexpr int kSddmmWarps = 8;

template <typename scalar_t, typename index_t, bool kAccumulate>
__global__ void spmm_kernel(
    // pointers
    const scalar_t* __restrict__ xt,    // (K, T) token-minor input
    const index_t* __restrict__ crow,   // (N + 1,)
    const index_t* __restrict__ col,    // (nnz,)
    const float* __restrict__ val,      // (nnz,)
    scalar_t* __restrict__ y,           // (T, N) output (kAccumulate: added into, in place), row stride ldy
    // sizes; tile_offset: the first token tile of this launch (grid axis y holds at most 65535)
    int64_t T, int64_t N, int64_t ldy, int64_t tile_offset) {
  // blockIdx.x walks row tiles fastest, so the blocks resident at one time share a token tile
  // and its gathered x^T columns (K x 32 tokens) stay in L2.
  __shared__ float tile[kTile][kTile + 1];  // [row][token]; +1 avoids bank conflicts on the transpose
  const int64_t r0 = static_cast<int64_t>(blockIdx.x) * kTile;
  const int64_t t0 = (tile_offset + static_cast<int64_t>(blockIdx.y)) * kTile;
  const int64_t t = t0 + threadIdx.x;
  for (int i = threadIdx.y; i < kTile; i += kRowsPerPass) {
    const int64_t r = r0 + i;
    float acc = 0.f;
    if (r < N && t < T) {
      const int64_t end = static_cast<int64_t>(crow[r + 1]);
      for (int64_t k = static_cast<int64_t>(crow[r]); k < end; ++k) {
        acc += val[k] * static_cast<float>(xt[static_cast<int64_t>(col[k]) * T + t]);
      }
    }
    tile[i][threadIdx.x] = acc;
  }
  __syncthreads();
  // Store through shared memory so consecutive lanes write consecutive output columns.
  for (int j = threadIdx.y; j < kTile; j += kRowsPerPass) {
    const int64_t tt = t0 + j;
    const int64_t rr = r0 + threadIdx.x;
    if (tt < T && rr < N) {
      float v = tile[threadIdx.x][j];
      if (kAccumulate) v += static_cast<float>(y[tt * ldy + rr]);  // one rounding of the fp32 sum
      y[tt * ldy + rr] = static_cast<scalar_t>(v);
    }
  }
}

template <typename scalar_t, typename index_t>
__global__ void sddmm_kernel(
    // pointers
    const scalar_t* __restrict__ dyt,   // (N, T) token-minor output gradient
    const scalar_t* __restrict__ xt,    // (K, T) token-minor input
    const index_t* __restrict__ crow,   // (N + 1,)
    const index_t* __restrict__ col,    // (nnz,)
    float* __restrict__ out,            // (nnz,)
    // sizes
    int64_t T) {
  // One block per output row: the row's dy^T line is reused by all its nonzeros (L1/L2).
  const int64_t r = blockIdx.x;
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int64_t end = static_cast<int64_t>(crow[r + 1]);
  const scalar_t* dr = dyt + r * T;
  for (int64_t k = static_cast<int64_t>(crow[r]) + warp; k < end; k += kSddmmWarps) {
    const scalar_t* xr = xt + static_cast<int64_t>(col[k]) * T;
    float acc = 0.f;
    for (int64_t t = lane; t < T; t += 32) acc += static_cast<float>(dr[t]) * static_cast<float>(xr[t]);
    for (int offset = 16; offset > 0; offset /= 2) acc += __shfl_down_sync(0xffffffffu, acc, offset);
    if (lane == 0) out[k] = acc;
  }
}

void check_cuda_args(const at::Tensor& x, const at::Tensor& crow, const at::Tensor& col, int64_t n_rows) {
  check_csr_operands(x, crow, col, n_rows);
  TORCH_CHECK(crow.scalar_type() == col.scalar_type(), "crow and col must share one index dtype");
  TORCH_CHECK(x.is_cuda(), "sparse CUDA kernels take CUDA tensors");
  PK_CHECK_SAME_DEVICE(x, crow);
  PK_CHECK_SAME_DEVICE(x, col);
}

// Launch the SpMM into y (T, N), overwriting it or (kAccumulate) adding to it.
template <bool kAccumulate>
void launch_spmm(at::Tensor& y, const at::Tensor& x, const at::Tensor& crow, const at::Tensor& col,
                 const at::Tensor& val) {
  const int64_t T = x.size(0), N = y.size(1);
  const int64_t row_tiles = (N + kTile - 1) / kTile, token_tiles = (T + kTile - 1) / kTile;
  const at::Tensor xt = x.t().contiguous();  // (K, T); free when x is a transposed view
  const at::Tensor crowc = crow.contiguous(), colc = col.contiguous(), valc = val.contiguous();
  const dim3 block(kTile, kRowsPerPass);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  // grid axis y (token tiles) is capped at 65535 by CUDA: more than ~2.1 M tokens take several launches
  constexpr int64_t kMaxGridY = 65535;
  for (int64_t offset = 0; offset < token_tiles; offset += kMaxGridY) {
    const dim3 grid(static_cast<unsigned int>(row_tiles),
                    static_cast<unsigned int>(std::min(kMaxGridY, token_tiles - offset)));
    PK_DISPATCH_DATA_TYPES(x.scalar_type(), "sparse_spmm_cuda", [&] {
      AT_DISPATCH_INDEX_TYPES(crowc.scalar_type(), "sparse_spmm_cuda_index", [&] {
        spmm_kernel<scalar_t, index_t, kAccumulate><<<grid, block, 0, stream>>>(
            xt.data_ptr<scalar_t>(), crowc.data_ptr<index_t>(), colc.data_ptr<index_t>(), valc.data_ptr<float>(),
            y.data_ptr<scalar_t>(), T, N, y.stride(0), offset);
      });
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

}  // namespace

at::Tensor sparse_spmm_cuda(const at::Tensor& x, const at::Tensor& crow, const at::Tensor& col,
                            const at::Tensor& val, int64_t out_features) {
  check_spmm_values(val, col, out_features);
  check_cuda_args(x, crow, col, out_features);
  PK_CHECK_SAME_DEVICE(x, val);
  const c10::cuda::CUDAGuard guard(x.device());

  const int64_t T = x.size(0), N = out_features, nnz = col.size(0);
  at::Tensor y = at::empty({T, N}, x.options());
  if (T == 0 || N == 0) return y;
  if (nnz == 0) return y.zero_();
  launch_spmm<false>(y, x, crow, col, val);
  return y;
}

void sparse_spmm_add_cuda(at::Tensor& y, const at::Tensor& x, const at::Tensor& crow, const at::Tensor& col,
                          const at::Tensor& val) {
  PK_CHECK_DIM(y, 2);
  const int64_t N = y.size(1);
  check_spmm_values(val, col, N);
  check_cuda_args(x, crow, col, N);
  PK_CHECK_SAME_DEVICE(x, val);
  PK_CHECK_SAME_DEVICE(x, y);
  TORCH_CHECK(y.size(0) == x.size(0), "y must be (T, N) with T = x.size(0)");
  TORCH_CHECK(y.scalar_type() == x.scalar_type(), "y and x must share one dtype");
  // rows may be padded (a compiled graph's output can have a row stride > N); elements must be dense
  TORCH_CHECK(y.stride(1) == 1 || N == 1, "sparse_spmm_add_: y must have unit stride along its last dim");
  TORCH_CHECK(y.stride(0) >= N || y.size(0) <= 1, "sparse_spmm_add_: y's rows must not overlap");
  const c10::cuda::CUDAGuard guard(x.device());
  if (x.size(0) == 0 || N == 0 || col.size(0) == 0) return;
  launch_spmm<true>(y, x, crow, col, val);
}

at::Tensor sparse_sddmm_cuda(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& crow,
                             const at::Tensor& col) {
  PK_CHECK_DIM(dy, 2);
  const int64_t N = dy.size(1);
  check_cuda_args(x, crow, col, N);
  TORCH_CHECK(dy.scalar_type() == x.scalar_type(), "dy and x must share one dtype");
  TORCH_CHECK(dy.size(0) == x.size(0), "dy and x must have the same number of tokens");
  PK_CHECK_SAME_DEVICE(x, dy);
  const c10::cuda::CUDAGuard guard(x.device());

  const int64_t T = x.size(0), nnz = col.size(0);
  at::Tensor out = at::zeros({nnz}, x.options().dtype(at::kFloat));
  if (T == 0 || nnz == 0 || N == 0) return out;
  const at::Tensor dyt = dy.t().contiguous();  // (N, T)
  const at::Tensor xt = x.t().contiguous();    // (K, T)
  const at::Tensor crowc = crow.contiguous(), colc = col.contiguous();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  PK_DISPATCH_DATA_TYPES(x.scalar_type(), "sparse_sddmm_cuda", [&] {
    AT_DISPATCH_INDEX_TYPES(crowc.scalar_type(), "sparse_sddmm_cuda_index", [&] {
      sddmm_kernel<scalar_t, index_t><<<static_cast<unsigned int>(N), kSddmmWarps * 32, 0, stream>>>(
          dyt.data_ptr<scalar_t>(), xt.data_ptr<scalar_t>(), crowc.data_ptr<index_t>(), colc.data_ptr<index_t>(),
          out.data_ptr<float>(), T);
    });
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace peft_kernels

TORCH_LIBRARY_IMPL(peft_kernels, CUDA, m) {
  m.impl("sparse_spmm", &peft_kernels::sparse_spmm_cuda);
  m.impl("sparse_spmm_add_", &peft_kernels::sparse_spmm_add_cuda);
  m.impl("sparse_sddmm", &peft_kernels::sparse_sddmm_cuda);
}
#endif  // PEFT_KERNELS_WITH_CUDA
