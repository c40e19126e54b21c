// The shared dropout keep-mask (spec: peft_kernels/reference/_philox.py) on the CPU in C++.
// The pure-torch spec needs ~30 full passes of int64 tensor ops per mask (Philox's 32x32->64
// multiplies split into 16-bit halves); here one Philox-4x32-10 per 8 elements runs in registers,
// rows in parallel. Bit-for-bit equal to the torch spec and to tl.randint4x (tested).
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <cstdint>

#include "common/checks.h"

namespace peft_kernels {
namespace {

constexpr uint32_t kRoundA = 0xD2511F53u;
constexpr uint32_t kRoundB = 0xCD9E8D57u;
constexpr uint32_t kKeyA = 0x9E3779B9u;
constexpr uint32_t kKeyB = 0xBB67AE85u;
constexpr int kRounds = 10;
constexpr int64_t kGroup = 8;  // elements per Philox call: 4 words x 2 halves of 16 bits

inline void philox4x32_10(uint32_t c[4], uint32_t k0, uint32_t k1) {
  for (int i = 0; i < kRounds; ++i) {
    const uint64_t pb = static_cast<uint64_t>(kRoundB) * c[2];
    const uint64_t pa = static_cast<uint64_t>(kRoundA) * c[0];
    const uint32_t n0 = static_cast<uint32_t>(pb >> 32) ^ c[1] ^ k0;
    const uint32_t n2 = static_cast<uint32_t>(pa >> 32) ^ c[3] ^ k1;
    c[1] = static_cast<uint32_t>(pb);
    c[3] = static_cast<uint32_t>(pa);
    c[0] = n0;
    c[2] = n2;
    k0 += kKeyA;
    k1 += kKeyB;
  }
}

at::Tensor philox_keep_mask_cpu(const at::Tensor& seed, int64_t rows, int64_t cols, int64_t threshold) {
  TORCH_CHECK(seed.numel() == 1, "seed must hold one element, got ", seed.numel());
  TORCH_CHECK(rows >= 0 && cols >= 0, "rows and cols must be >= 0, got ", rows, " x ", cols);
  TORCH_CHECK(threshold >= 0 && threshold < 65536, "threshold must be in [0, 65536), got ", threshold);
  const uint64_t s = static_cast<uint64_t>(seed.to(at::kLong).item<int64_t>());
  const uint32_t k0 = static_cast<uint32_t>(s & 0xFFFFFFFFu);
  const uint32_t k1 = static_cast<uint32_t>(s >> 32);
  auto out = at::empty({rows, cols}, at::TensorOptions().dtype(at::kBool));
  bool* o = out.data_ptr<bool>();
  const int64_t groups = (cols + kGroup - 1) / kGroup;
  const uint32_t thr = static_cast<uint32_t>(threshold);
  at::parallel_for(0, rows, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t row = r0; row < r1; ++row) {
      bool* orow = o + row * cols;
      for (int64_t g = 0; g < groups; ++g) {
        const uint64_t c = static_cast<uint64_t>(row * groups + g);
        uint32_t w[4] = {static_cast<uint32_t>(c & 0xFFFFFFFFu), static_cast<uint32_t>(c >> 32), 0u, 0u};
        philox4x32_10(w, k0, k1);
        const int64_t col0 = g * kGroup;
        const int64_t n = std::min<int64_t>(kGroup, cols - col0);
        for (int64_t j = 0; j < n; ++j) {
          const uint32_t half = (w[j >> 1] >> (16 * (j & 1))) & 0xFFFFu;
          orow[col0 + j] = half >= thr;
        }
      }
    }
  });
  return out;
}

}  // namespace
}  // namespace peft_kernels

TORCH_LIBRARY_IMPL(peft_kernels, CPU, m) {
  m.impl("philox_keep_mask", &peft_kernels::philox_keep_mask_cpu);
}
