// Argument checks of the C++ entry points. select.py checks everything first and names the Python argument; these
// guard direct callers of es_kernels._C and raise the same Python exception types (TORCH_CHECK_VALUE -> ValueError,
// TORCH_CHECK_TYPE -> TypeError), always naming the argument.
#pragma once

#include <c10/util/Exception.h>

#define CHECK_DEFINED(name, t) TORCH_CHECK_VALUE((t).defined(), name, " must be a tensor")
#define CHECK_DTYPE(name, t, dtype) \
  TORCH_CHECK_TYPE((t).scalar_type() == (dtype), name, " must be ", dtype, ", got ", (t).scalar_type())
#define CHECK_DIM(name, t, d) TORCH_CHECK_VALUE((t).dim() == (d), name, " must be ", d, "-D, got shape ", (t).sizes())
#define CHECK_SAME_DEVICE(name, t, other)                                                                \
  TORCH_CHECK_VALUE((t).device() == (other).device(), name, " is on ", (t).device(), " but the state lives on ", \
                    (other).device())
#define CHECK_RANGE(name, value, low, high)                                                                  \
  TORCH_CHECK_VALUE((value) >= (low) && (value) <= (high), name, " must be in [", low, ", ", high, "], got ", \
                    value)
