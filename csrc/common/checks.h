// Shared argument checks for the native ops. Python-side launchers validate first and raise
// ValueError/TypeError; these are the last line of defence before touching memory.
#pragma once
#include <torch/extension.h>

#define PK_CHECK_CONTIGUOUS(x) TORCH_CHECK((x).is_contiguous(), #x " must be contiguous")
#define PK_CHECK_DIM(x, d) TORCH_CHECK((x).dim() == (d), #x " must be " #d "-D, got ", (x).dim(), "-D")
#define PK_CHECK_SAME_DEVICE(a, b) \
  TORCH_CHECK((a).device() == (b).device(), #a " and " #b " must be on the same device")
#define PK_CHECK_FLOAT(x)                                                                      \
  TORCH_CHECK((x).scalar_type() == at::kFloat || (x).scalar_type() == at::kHalf ||             \
                  (x).scalar_type() == at::kBFloat16,                                          \
              #x " must be float32, float16 or bfloat16, got ", (x).scalar_type())
#define PK_CHECK_INDEX(x)                                                                     \
  TORCH_CHECK((x).scalar_type() == at::kInt || (x).scalar_type() == at::kLong, #x             \
              " must be int32 or int64, got ", (x).scalar_type())
