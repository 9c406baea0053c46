// Per-element COCO RLE functions shared by the CUDA kernels (csrc/rle_cuda.cu) and a C++ path that
// drives them on the CPU (rle_reference_encode / rle_reference_decode in csrc/rle.cpp), so the logic
// the GPU runs is tested on every machine. Plain C++ when not compiled by nvcc.
//
// Column-major position of pixel (y, x) of an h x w mask: p = x * h + y. A run starts at p when the
// pixel differs from the one before it in that order (before pixel 0 the value is 0).
// Encoding splits each column into segments of rows, so that one GPU thread handles one segment:
// 1. count the run starts of every segment, 2. exclusive scan of the counts in column-major
// segment order, 3. write each segment's starts at its offset, 4. run lengths from the starts.
// Decoding gives each pixel the parity of the run ends at or before it.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define LENS_FAST_HD __host__ __device__ __forceinline__
#else
#define LENS_FAST_HD inline
#endif

namespace lens_fast {
namespace rle_kernels {

// An h x w mask of bytes addressed through strides (bytes); nonzero is foreground.
struct MaskRef {
  const uint8_t* data;
  int64_t h, w, stride_h, stride_w;
  LENS_FAST_HD bool at(int64_t y, int64_t x) const { return data[y * stride_h + x * stride_w] != 0; }
};

// Value of the pixel before (y, x) in column-major order.
LENS_FAST_HD bool value_before(const MaskRef& mask, int64_t y, int64_t x) {
  if (y > 0) return mask.at(y - 1, x);
  return x > 0 ? mask.at(mask.h - 1, x - 1) : false;
}

// Number of runs that start at pixels (y, x), y in [y0, y1): one segment of column x.
LENS_FAST_HD uint32_t segment_run_starts(const MaskRef& mask, int64_t x, int64_t y0, int64_t y1) {
  bool previous = value_before(mask, y0, x);
  uint32_t starts = 0;
  for (int64_t y = y0; y < y1; ++y) {
    const bool value = mask.at(y, x);
    starts += value != previous;
    previous = value;
  }
  return starts;
}

// Writes the positions of the runs starting in that segment, increasing, to out.
LENS_FAST_HD void write_segment_run_starts(const MaskRef& mask, int64_t x, int64_t y0, int64_t y1,
                                           uint32_t* out) {
  bool previous = value_before(mask, y0, x);
  const uint32_t base = static_cast<uint32_t>(x * mask.h);
  for (int64_t y = y0; y < y1; ++y) {
    const bool value = mask.at(y, x);
    if (value != previous) *out++ = base + static_cast<uint32_t>(y);
    previous = value;
  }
}

// Length of run k (0 <= k <= n_starts) of a mask of `pixels` pixels whose runs after the first start
// at the increasing positions starts[0, n_starts): run k spans [starts[k - 1], starts[k]), with
// starts[-1] = 0 and starts[n_starts] = pixels. A mask starting with 1 has starts[0] = 0: count 0.
LENS_FAST_HD uint32_t run_length(const uint32_t* starts, int64_t n_starts, int64_t k, uint32_t pixels) {
  const uint32_t begin = k > 0 ? starts[k - 1] : 0u;
  const uint32_t end = k < n_starts ? starts[k] : pixels;
  return end - begin;
}

// The segment i with offsets[i] <= j < offsets[i + 1], for non-decreasing offsets[0, n + 1) with
// offsets[0] <= j < offsets[n] (empty segments are skipped).
LENS_FAST_HD int64_t segment_of(const int64_t* offsets, int64_t n, int64_t j) {
  int64_t lo = 0, hi = n;  // the answer is the last i in [0, n) with offsets[i] <= j
  while (hi - lo > 1) {
    const int64_t mid = lo + (hi - lo) / 2;
    if (offsets[mid] <= j) {
      lo = mid;
    } else {
      hi = mid;
    }
  }
  return lo;
}

// Value (0 or 1) of column-major pixel p of a mask whose run ends (the running sums of its counts,
// the last run's end left out) are the non-decreasing ends[0, m): the parity of the ends <= p.
LENS_FAST_HD uint8_t value_at(const uint32_t* ends, int64_t m, uint32_t p) {
  int64_t lo = 0, hi = m;  // lo becomes the number of ends <= p
  while (lo < hi) {
    const int64_t mid = lo + (hi - lo) / 2;
    if (ends[mid] <= p) {
      lo = mid + 1;
    } else {
      hi = mid;
    }
  }
  return static_cast<uint8_t>(lo & 1);
}

}  // namespace rle_kernels
}  // namespace lens_fast
