// postprocess_masks / postprocess_mask_stats on the CPU: SAM's two bilinear resizes (low-res logits ->
// image_size square -> crop [:input_h, :input_w] -> out_h x out_w) fused, reading only the low-res
// logits. Coordinates, weights and the blend order are torch's upsample_bilinear2d (align_corners=False):
//   src = max(scale * (dst + 0.5) - 0.5, 0), scale = in / out (float), i0 = min(floor(src), in - 1),
//   i1 = i0 + (i0 < in - 1), w1 = clamp(src - i0, 0, 1), w0 = 1 - w1, copy when in == out,
//   value = t0 * w0 + t1 * w1 with t = the same blend along the row.
// torch's AVX2/AVX512 builds fuse those multiply-adds into FMAs; on a CPU with FMA this file does the
// same (explicit std::fma), so on such machines the values equal torch's bit for bit (where torch runs
// its generic kernel: out_h + out_w > 128). Without FMA it uses plain float multiply-adds.
//
// Per mask, separable and in torch's order: T = the first resize along x at the intermediate columns
// the second resize needs (for every low-res row), then per intermediate row y the row I(y, .) and its
// second x-resize U(y, .), then each output row from two U rows. Masks run in parallel.
// Inputs are validated by lens_fast.ops (float32 logits with any strides, uint8 gt with unit column
// stride, positive sizes, input size <= image_size, out_h * out_w < 2**31).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "bindings.h"
#include "cpu_features.h"
#include "parallel.h"

namespace lens_fast {
namespace {

#if LENS_FAST_X86
#define LENS_FAST_TARGET_FMA __attribute__((target("avx2,fma"), flatten))
bool cpu_has_fma() {
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return has;
}
#else
#define LENS_FAST_TARGET_FMA
bool cpu_has_fma() { return false; }
#endif

template <bool kFma>
inline float mul_add(float a, float b, float c) {
  if constexpr (kFma) {
    return std::fma(a, b, c);
  } else {
    return a * b + c;
  }
}

// Linear taps of output indices [0, count) resizing in_size -> out_size (count <= out_size).
struct Taps {
  std::vector<int64_t> i0, i1;
  std::vector<float> w0, w1;
};

template <bool kFma>
Taps linear_taps(int64_t in_size, int64_t out_size, int64_t count) {
  Taps taps;
  taps.i0.resize(count);
  taps.i1.resize(count);
  taps.w0.resize(count);
  taps.w1.resize(count);
  const float scale = static_cast<float>(in_size) / static_cast<float>(out_size);
  for (int64_t d = 0; d < count; ++d) {
    if (in_size == out_size) {
      taps.i0[d] = taps.i1[d] = d;
      taps.w0[d] = 1.0f;
      taps.w1[d] = 0.0f;
      continue;
    }
    const float src = std::max(mul_add<kFma>(scale, static_cast<float>(d) + 0.5f, -0.5f), 0.0f);
    const int64_t i0 = std::min(static_cast<int64_t>(std::floor(src)), in_size - 1);
    const float lambda = std::min(std::max(src - static_cast<float>(i0), 0.0f), 1.0f);
    taps.i0[d] = i0;
    taps.i1[d] = i0 + (i0 < in_size - 1 ? 1 : 0);
    taps.w0[d] = 1.0f - lambda;
    taps.w1[d] = lambda;
  }
  return taps;
}

struct Geometry {
  int64_t h, w, image_size, input_h, input_w, out_h, out_w;
};

// Everything about the two resizes that does not depend on the mask.
struct Plan {
  Taps rows2, cols2;  // output -> intermediate (second resize)
  Taps rows1;         // intermediate rows -> low-res rows (first resize)
  // The K intermediate columns the second resize reads: offsets (low-res column * stride_w) and
  // weights of their first-resize taps.
  std::vector<int32_t> col_off0, col_off1;
  std::vector<float> col_w0, col_w1;
  std::vector<int32_t> k0, k1;  // per output column: positions of its intermediate columns in [0, K)
  int64_t row_lo = 0, row_hi = 0;  // low-res rows used
};

template <bool kFma>
Plan make_plan(const Geometry& g, int64_t stride_w) {
  Plan plan;
  plan.rows2 = linear_taps<kFma>(g.input_h, g.out_h, g.out_h);
  plan.cols2 = linear_taps<kFma>(g.input_w, g.out_w, g.out_w);
  plan.rows1 = linear_taps<kFma>(g.h, g.image_size, g.input_h);
  const Taps cols1 = linear_taps<kFma>(g.w, g.image_size, g.input_w);
  std::vector<int32_t> position(g.input_w, -1);
  for (int64_t x = 0; x < g.out_w; ++x) position[plan.cols2.i0[x]] = position[plan.cols2.i1[x]] = 0;
  for (int64_t x = 0; x < g.input_w; ++x) {
    if (position[x] < 0) continue;
    position[x] = static_cast<int32_t>(plan.col_off0.size());
    plan.col_off0.push_back(static_cast<int32_t>(cols1.i0[x] * stride_w));
    plan.col_off1.push_back(static_cast<int32_t>(cols1.i1[x] * stride_w));
    plan.col_w0.push_back(cols1.w0[x]);
    plan.col_w1.push_back(cols1.w1[x]);
  }
  plan.k0.resize(g.out_w);
  plan.k1.resize(g.out_w);
  for (int64_t x = 0; x < g.out_w; ++x) {
    plan.k0[x] = position[plan.cols2.i0[x]];
    plan.k1[x] = position[plan.cols2.i1[x]];
  }
  plan.row_lo = plan.rows1.i0[plan.rows2.i0[0]];
  plan.row_hi = plan.rows1.i1[plan.rows2.i1[g.out_h - 1]];
  return plan;
}

// dst[i] = src[i0[i]] * w0[i] + src[i1[i]] * w1[i] for i < n, as mul_add<kFma>.
template <bool kFma>
inline void gather_blend(const float* src, const int32_t* i0, const int32_t* i1, const float* w0,
                         const float* w1, float* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = mul_add<kFma>(src[i0[i]], w0[i], src[i1[i]] * w1[i]);
}

// Streams the output rows of one mask to sink(y, row) in order, row = out_w float32 logits.
template <bool kFma, typename Sink>
void mask_rows(const float* low, int64_t stride_h, const Geometry& g, const Plan& plan, Sink&& sink) {
  const int64_t n_cols = static_cast<int64_t>(plan.col_off0.size());
  const int64_t n_rows = plan.row_hi - plan.row_lo + 1;
  std::vector<float> first(n_rows * n_cols);  // first resize along x, per low-res row
  for (int64_t r = 0; r < n_rows; ++r) {
    gather_blend<kFma>(low + (plan.row_lo + r) * stride_h, plan.col_off0.data(), plan.col_off1.data(),
                       plan.col_w0.data(), plan.col_w1.data(), first.data() + r * n_cols, n_cols);
  }
  std::vector<float> inter(n_cols), out(g.out_w);
  std::vector<float> cache[2] = {std::vector<float>(g.out_w), std::vector<float>(g.out_w)};
  int64_t cached[2] = {-1, -1};
  // Row y of the intermediate image resized along x, into the cache slot not holding `keep`.
  auto second_row = [&](int64_t y, int64_t keep) -> const float* {
    for (int s = 0; s < 2; ++s) {
      if (cached[s] == y) return cache[s].data();
    }
    const int slot = cached[0] == keep ? 1 : 0;
    const float* t0 = first.data() + (plan.rows1.i0[y] - plan.row_lo) * n_cols;
    const float* t1 = first.data() + (plan.rows1.i1[y] - plan.row_lo) * n_cols;
    const float w0 = plan.rows1.w0[y], w1 = plan.rows1.w1[y];
    for (int64_t k = 0; k < n_cols; ++k) inter[k] = mul_add<kFma>(t0[k], w0, t1[k] * w1);
    float* dst = cache[slot].data();
    gather_blend<kFma>(inter.data(), plan.k0.data(), plan.k1.data(), plan.cols2.w0.data(),
                       plan.cols2.w1.data(), dst, g.out_w);
    cached[slot] = y;
    return dst;
  };
  for (int64_t y = 0; y < g.out_h; ++y) {
    const int64_t y0 = plan.rows2.i0[y], y1 = plan.rows2.i1[y];
    const float* u0 = second_row(y0, y1);
    const float* u1 = second_row(y1, y0);
    const float w0 = plan.rows2.w0[y], w1 = plan.rows2.w1[y];
    for (int64_t x = 0; x < g.out_w; ++x) out[x] = mul_add<kFma>(u0[x], w0, u1[x] * w1);
    sink(y, out.data());
  }
}

struct StatsRow {
  int64_t intersection = 0, area = 0;
  int64_t x1, y1, x2 = -1, y2 = -1;
};

inline void accumulate_row(const float* logits, const uint8_t* truth, int64_t width, float threshold,
                           int64_t y, StatsRow& s) {
  int64_t area = 0, inter = 0;
  for (int64_t x = 0; x < width; ++x) {
    const int fg = logits[x] > threshold;
    area += fg;
    inter += fg & (truth[x] != 0);
  }
  if (area == 0) return;
  s.area += area;
  s.intersection += inter;
  int64_t first = 0, last = width - 1;
  while (!(logits[first] > threshold)) ++first;
  while (!(logits[last] > threshold)) --last;
  s.x1 = std::min(s.x1, first);
  s.x2 = std::max(s.x2, last);
  s.y1 = std::min(s.y1, y);
  s.y2 = y;
}

struct MasksArgs {
  const float* low;
  int64_t n_masks, stride_m, stride_h, stride_w;
  Geometry g;
  void* out;
  bool apply_threshold;
  float threshold;
};

template <bool kFma>
void masks_one(const MasksArgs& a, const Plan& plan, int64_t m) {
  const float* low = a.low + m * a.stride_m;
  const int64_t plane = a.g.out_h * a.g.out_w;
  if (a.apply_threshold) {
    uint8_t* out = static_cast<uint8_t*>(a.out) + m * plane;
    const float threshold = a.threshold;  // a local: uint8 stores may alias anything
    const int64_t width = a.g.out_w;
    mask_rows<kFma>(low, a.stride_h, a.g, plan, [&](int64_t y, const float* row) {
      uint8_t* dst = out + y * width;
      for (int64_t x = 0; x < width; ++x) dst[x] = row[x] > threshold;
    });
  } else {
    float* out = static_cast<float*>(a.out) + m * plane;
    mask_rows<kFma>(low, a.stride_h, a.g, plan, [&](int64_t y, const float* row) {
      std::copy(row, row + a.g.out_w, out + y * a.g.out_w);
    });
  }
}

LENS_FAST_TARGET_FMA void masks_one_fma(const MasksArgs& a, const Plan& plan, int64_t m) {
  masks_one<true>(a, plan, m);
}

struct StatsArgs {
  const float* low;
  int64_t n_masks, stride_m, stride_h, stride_w;
  Geometry g;
  const uint8_t* gt;
  int64_t n_images, gt_stride_b, gt_stride_h;
  float threshold;
  int64_t *intersection, *union_, *pred_area, *gt_area;
  float* box;
};

template <bool kFma>
void stats_one(const StatsArgs& a, const Plan& plan, int64_t m) {
  const uint8_t* truth = a.gt + (m / (a.n_masks / a.n_images)) * a.gt_stride_b;
  StatsRow s;
  s.x1 = a.g.out_w;
  s.y1 = a.g.out_h;
  mask_rows<kFma>(a.low + m * a.stride_m, a.stride_h, a.g, plan, [&](int64_t y, const float* row) {
    accumulate_row(row, truth + y * a.gt_stride_h, a.g.out_w, a.threshold, y, s);
  });
  a.intersection[m] = s.intersection;
  a.pred_area[m] = s.area;
  float* box = a.box + 4 * m;
  const bool empty = s.area == 0;
  box[0] = empty ? 0.0f : static_cast<float>(s.x1);
  box[1] = empty ? 0.0f : static_cast<float>(s.y1);
  box[2] = empty ? 0.0f : static_cast<float>(s.x2);
  box[3] = empty ? 0.0f : static_cast<float>(s.y2);
}

LENS_FAST_TARGET_FMA void stats_one_fma(const StatsArgs& a, const Plan& plan, int64_t m) {
  stats_one<true>(a, plan, m);
}

int64_t nonzero_count(const uint8_t* mask, int64_t height, int64_t width, int64_t row_stride) {
  int64_t count = 0;
  for (int64_t y = 0; y < height; ++y) {
    const uint8_t* row = mask + y * row_stride;
    for (int64_t x = 0; x < width; ++x) count += row[x] != 0;
  }
  return count;
}

void postprocess_masks(uintptr_t low, int64_t n_masks, int64_t h, int64_t w, int64_t stride_m,
                       int64_t stride_h, int64_t stride_w, int64_t image_size, int64_t input_h,
                       int64_t input_w, int64_t out_h, int64_t out_w, uintptr_t out, bool apply_threshold,
                       float threshold, int num_threads) {
  const MasksArgs a{reinterpret_cast<const float*>(low), n_masks, stride_m, stride_h, stride_w,
                    Geometry{h, w, image_size, input_h, input_w, out_h, out_w},
                    reinterpret_cast<void*>(out), apply_threshold, threshold};
  py::gil_scoped_release release;
  const bool fma = cpu_has_fma();
  const Plan plan = fma ? make_plan<true>(a.g, stride_w) : make_plan<false>(a.g, stride_w);
  parallel_for(n_masks, num_threads, [&](int64_t m) {
    if (fma) {
      masks_one_fma(a, plan, m);
    } else {
      masks_one<false>(a, plan, m);
    }
  });
}

void postprocess_mask_stats(uintptr_t low, int64_t n_masks, int64_t h, int64_t w, int64_t stride_m,
                            int64_t stride_h, int64_t stride_w, int64_t image_size, int64_t input_h,
                            int64_t input_w, int64_t out_h, int64_t out_w, uintptr_t gt, int64_t n_images,
                            int64_t gt_stride_b, int64_t gt_stride_h, float threshold, uintptr_t intersection,
                            uintptr_t union_, uintptr_t pred_area, uintptr_t gt_area, uintptr_t box,
                            int num_threads) {
  const StatsArgs a{reinterpret_cast<const float*>(low), n_masks, stride_m, stride_h, stride_w,
                    Geometry{h, w, image_size, input_h, input_w, out_h, out_w},
                    reinterpret_cast<const uint8_t*>(gt), n_images, gt_stride_b, gt_stride_h, threshold,
                    reinterpret_cast<int64_t*>(intersection), reinterpret_cast<int64_t*>(union_),
                    reinterpret_cast<int64_t*>(pred_area), reinterpret_cast<int64_t*>(gt_area),
                    reinterpret_cast<float*>(box)};
  py::gil_scoped_release release;
  const bool fma = cpu_has_fma();
  const Plan plan = fma ? make_plan<true>(a.g, stride_w) : make_plan<false>(a.g, stride_w);
  // Tasks [0, n_masks) are masks, the next n_images count the gt areas.
  parallel_for(n_masks + n_images, num_threads, [&](int64_t task) {
    if (task >= n_masks) {
      const int64_t image = task - n_masks;
      a.gt_area[image] = nonzero_count(a.gt + image * gt_stride_b, out_h, out_w, gt_stride_h);
    } else if (fma) {
      stats_one_fma(a, plan, task);
    } else {
      stats_one<false>(a, plan, task);
    }
  });
  const int64_t group = n_masks / n_images;
  for (int64_t m = 0; m < n_masks; ++m) {
    a.union_[m] = a.pred_area[m] + a.gt_area[m / group] - a.intersection[m];
  }
}

void register_postprocess_masks(py::module_& m) {
  m.def("postprocess_masks", &postprocess_masks,
        "SAM postprocess_masks from float32 low-res logits [M, h, w] (pointer, sizes, strides) into "
        "out [M, out_h, out_w] float32, or uint8 logit > threshold when apply_threshold.",
        py::arg("low"), py::arg("n_masks"), py::arg("h"), py::arg("w"), py::arg("stride_m"),
        py::arg("stride_h"), py::arg("stride_w"), py::arg("image_size"), py::arg("input_h"),
        py::arg("input_w"), py::arg("out_h"), py::arg("out_w"), py::arg("out"), py::arg("apply_threshold"),
        py::arg("threshold"), py::arg("num_threads") = 0);
  m.def("postprocess_mask_stats", &postprocess_mask_stats,
        "MaskStats of the thresholded postprocess_masks of [M, h, w] float32 logits against uint8 gt "
        "[B, out_h, out_w] (M = B * G, image-major) into int64 [M] x3, int64 [B], float32 [M, 4].",
        py::arg("low"), py::arg("n_masks"), py::arg("h"), py::arg("w"), py::arg("stride_m"),
        py::arg("stride_h"), py::arg("stride_w"), py::arg("image_size"), py::arg("input_h"),
        py::arg("input_w"), py::arg("out_h"), py::arg("out_w"), py::arg("gt"), py::arg("n_images"),
        py::arg("gt_stride_b"), py::arg("gt_stride_h"), py::arg("threshold"), py::arg("intersection"),
        py::arg("union_"), py::arg("pred_area"), py::arg("gt_area"), py::arg("box"),
        py::arg("num_threads") = 0);
}

}  // namespace

LENS_FAST_REGISTER(register_postprocess_masks)

}  // namespace lens_fast
