// mask_stats on the CPU: intersection, union, areas and inclusive xyxy boxes of G predicted masks
// against one ground truth, in one pass over the predictions.
//
// Each row of a mask is turned into 64-bit foreground words (AVX2: compare + movemask; otherwise a
// portable scalar loop), then popcount gives the areas, popcount(pred & gt) the intersection, the
// rows with a set bit the box's y range and an OR of the words over rows the x range. The GT of
// each batch item is turned into bits once and reused by its G masks.
//
// Inputs are validated by lens_fast.ops.mask_stats: sizes > 0, strides in elements with the last
// dimension contiguous, outputs contiguous. Foreground: uint8/bool nonzero; float32 x > threshold;
// float16/bfloat16 compared exactly as float32 would, through an order-preserving integer key.
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "bindings.h"
#include "cpu_features.h"
#include "parallel.h"

namespace lens_fast {
namespace {

constexpr int64_t kWordBits = 64;  // elements per foreground word

// ---- 16-bit floats: x > threshold  <=>  lo <= key(x) <= hi, on the signed key below. ----------
// key() maps sign-magnitude bits to an int16 that orders like the float values (-0 just below +0,
// NaNs beyond +-inf, so the upper bound key(+inf) excludes them).
inline int16_t half_key(uint16_t bits) {
  const int16_t v = static_cast<int16_t>(bits);
  return static_cast<int16_t>(v ^ ((v >> 15) & 0x7FFF));
}

inline float bits_to_float(uint32_t bits) {
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

float float16_value(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000) << 16;
  const uint32_t exponent = (h >> 10) & 0x1F, mantissa = h & 0x3FF;
  if (exponent == 0) {  // zero or subnormal: mantissa * 2^-24
    const float magnitude = static_cast<float>(mantissa) * (1.0f / 16777216.0f);
    return sign ? -magnitude : magnitude;
  }
  if (exponent == 0x1F) return bits_to_float(sign | 0x7F800000u | (mantissa << 13));
  return bits_to_float(sign | ((exponent + 112) << 23) | (mantissa << 13));
}

float bfloat16_value(uint16_t h) { return bits_to_float(static_cast<uint32_t>(h) << 16); }

struct KeyRange {
  int16_t lo, hi;  // foreground iff lo <= key <= hi (empty when lo > hi)
};

// Smallest key whose value exceeds `threshold`, by bisection over the ordered non-NaN keys.
KeyRange key_range(float threshold, uint16_t inf_bits, float (*value)(uint16_t)) {
  const int16_t hi = half_key(inf_bits);
  int32_t first = half_key(static_cast<uint16_t>(inf_bits | 0x8000)), last = hi + 1;
  while (first < last) {
    const int32_t mid = first + (last - first) / 2;
    const uint16_t bits = static_cast<uint16_t>(half_key(static_cast<uint16_t>(mid)));  // key is an involution
    if (value(bits) > threshold) {
      last = mid;
    } else {
      first = mid + 1;
    }
  }
  return {static_cast<int16_t>(first), hi};
}

// ---- Foreground of 64 consecutive elements as one word (bit i = element i). ------------------
struct Params {
  float threshold;
  KeyRange keys;
};

// Portable: bit i = Derived::foreground(element i), elements read with memcpy (any alignment).
template <class Derived, class T>
struct ScalarWord {
  static constexpr int64_t kSize = sizeof(T);
  uint64_t operator()(const char* p) const {
    uint64_t word = 0;
    for (int i = 0; i < kWordBits; ++i) {
      T x;
      std::memcpy(&x, p + sizeof(T) * i, sizeof(T));
      word |= static_cast<uint64_t>(static_cast<const Derived*>(this)->foreground(x)) << i;
    }
    return word;
  }
};

struct ByteScalar : ScalarWord<ByteScalar, uint8_t> {
  explicit ByteScalar(const Params&) {}
  bool foreground(uint8_t x) const { return x != 0; }
};

struct Float32Scalar : ScalarWord<Float32Scalar, float> {
  float threshold;
  explicit Float32Scalar(const Params& p) : threshold(p.threshold) {}
  bool foreground(float x) const { return x > threshold; }
};

struct Key16Scalar : ScalarWord<Key16Scalar, uint16_t> {
  KeyRange keys;
  explicit Key16Scalar(const Params& p) : keys(p.keys) {}
  bool foreground(uint16_t bits) const {
    const int16_t key = half_key(bits);
    return key >= keys.lo && key <= keys.hi;
  }
};

#if LENS_FAST_X86
struct ByteAvx2 {
  static constexpr int64_t kSize = 1;
  explicit ByteAvx2(const Params&) {}
  LENS_FAST_TARGET_AVX2 uint64_t operator()(const char* p) const {
    const __m256i zero = _mm256_setzero_si256();
    const __m256i a = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 32));
    const uint32_t zero_a = static_cast<uint32_t>(_mm256_movemask_epi8(_mm256_cmpeq_epi8(a, zero)));
    const uint32_t zero_b = static_cast<uint32_t>(_mm256_movemask_epi8(_mm256_cmpeq_epi8(b, zero)));
    return ~(static_cast<uint64_t>(zero_b) << 32 | zero_a);
  }
};

struct Float32Avx2 {
  static constexpr int64_t kSize = 4;
  float threshold;
  explicit Float32Avx2(const Params& p) : threshold(p.threshold) {}
  LENS_FAST_TARGET_AVX2 uint64_t operator()(const char* p) const {
    const __m256 t = _mm256_set1_ps(threshold);
    const float* x = reinterpret_cast<const float*>(p);
    uint64_t word = 0;
    for (int i = 0; i < 8; ++i) {
      const __m256 gt = _mm256_cmp_ps(_mm256_loadu_ps(x + 8 * i), t, _CMP_GT_OQ);
      word |= static_cast<uint64_t>(_mm256_movemask_ps(gt)) << (8 * i);
    }
    return word;
  }
};

struct Key16Avx2 {
  static constexpr int64_t kSize = 2;
  KeyRange keys;
  explicit Key16Avx2(const Params& p) : keys(p.keys) {}
  // 16 lanes of 0/-1 for the 16 halves at p.
  LENS_FAST_TARGET_AVX2 __m256i lanes(const char* p, __m256i below, __m256i above) const {
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    const __m256i key =
        _mm256_xor_si256(v, _mm256_and_si256(_mm256_srai_epi16(v, 15), _mm256_set1_epi16(0x7FFF)));
    return _mm256_and_si256(_mm256_cmpgt_epi16(key, below), _mm256_cmpgt_epi16(above, key));
  }
  // 32 bits for the 32 halves at p: pack the 16-bit lanes to bytes, undo the per-lane interleave.
  LENS_FAST_TARGET_AVX2 uint32_t half_word(const char* p, __m256i below, __m256i above) const {
    const __m256i packed = _mm256_packs_epi16(lanes(p, below, above), lanes(p + 32, below, above));
    return static_cast<uint32_t>(_mm256_movemask_epi8(_mm256_permute4x64_epi64(packed, 0xD8)));
  }
  LENS_FAST_TARGET_AVX2 uint64_t operator()(const char* p) const {
    const __m256i below = _mm256_set1_epi16(static_cast<int16_t>(keys.lo - 1));
    const __m256i above = _mm256_set1_epi16(static_cast<int16_t>(keys.hi + 1));
    return static_cast<uint64_t>(half_word(p + 64, below, above)) << 32 | half_word(p, below, above);
  }
};
#else
using ByteAvx2 = ByteScalar;  // never picked: cpu_has_avx2() is false off x86
using Float32Avx2 = Float32Scalar;
using Key16Avx2 = Key16Scalar;
#endif

inline int popcount64(uint64_t x) { return __builtin_popcountll(x); }

// Foreground words of one row: full words in place, the tail through a zero-padded copy.
template <class Fg, class Sink>
inline void for_each_word(const Fg& fg, const char* row, int64_t width, Sink&& sink) {
  const int64_t full = width / kWordBits, tail = width % kWordBits;
  for (int64_t k = 0; k < full; ++k) sink(k, fg(row + k * kWordBits * Fg::kSize));
  if (tail) {
    alignas(32) char buffer[kWordBits * 4] = {};
    std::memcpy(buffer, row + full * kWordBits * Fg::kSize, tail * Fg::kSize);
    sink(full, fg(buffer) & ((uint64_t{1} << tail) - 1));
  }
}

// ---- One GT: its bits (rows x words) and its area. -------------------------------------------
struct Plane {
  const char* data;
  int64_t row_stride;  // bytes
  int64_t height, width;
};

template <class Fg>
inline int64_t gt_bits(const Fg& fg, const Plane& gt, uint64_t* bits) {
  const int64_t words = (gt.width + kWordBits - 1) / kWordBits;
  int64_t area = 0;
  for (int64_t y = 0; y < gt.height; ++y) {
    uint64_t* row_bits = bits + y * words;
    for_each_word(fg, gt.data + y * gt.row_stride, gt.width, [&](int64_t k, uint64_t word) {
      row_bits[k] = word;
      area += popcount64(word);
    });
  }
  return area;
}

// ---- One predicted mask against its GT bits. ---------------------------------------------------
struct MaskResult {
  int64_t intersection = 0, area = 0;
  int64_t box[4] = {0, 0, 0, 0};  // x1, y1, x2, y2 (zeros when empty)
};

template <class Fg>
inline MaskResult scan_mask(const Fg& fg, const Plane& pred, const uint64_t* gt, uint64_t* columns) {
  const int64_t words = (pred.width + kWordBits - 1) / kWordBits;
  std::fill(columns, columns + words, uint64_t{0});
  MaskResult r;
  int64_t y1 = -1, y2 = -1;
  for (int64_t y = 0; y < pred.height; ++y) {
    const uint64_t* gt_row = gt + y * words;
    int64_t row_area = 0, row_intersection = 0;
    for_each_word(fg, pred.data + y * pred.row_stride, pred.width, [&](int64_t k, uint64_t word) {
      row_area += popcount64(word);
      row_intersection += popcount64(word & gt_row[k]);
      columns[k] |= word;
    });
    if (row_area) {
      if (y1 < 0) y1 = y;
      y2 = y;
      r.area += row_area;
      r.intersection += row_intersection;
    }
  }
  if (r.area) {
    int64_t first = 0, last = words - 1;
    while (!columns[first]) ++first;
    while (!columns[last]) --last;
    r.box[0] = first * kWordBits + __builtin_ctzll(columns[first]);
    r.box[1] = y1;
    r.box[2] = last * kWordBits + 63 - __builtin_clzll(columns[last]);
    r.box[3] = y2;
  }
  return r;
}

// Per-ISA entry points. flatten inlines the generic templates into the AVX2-targeted function, so
// the vector code and popcnt are used throughout the loops.
using GtFn = int64_t (*)(const Params&, const Plane&, uint64_t*);
using MaskFn = MaskResult (*)(const Params&, const Plane&, const uint64_t*, uint64_t*);

template <class Fg>
int64_t gt_scalar(const Params& p, const Plane& gt, uint64_t* bits) {
  return gt_bits(Fg(p), gt, bits);
}
template <class Fg>
MaskResult mask_scalar(const Params& p, const Plane& pred, const uint64_t* gt, uint64_t* columns) {
  return scan_mask(Fg(p), pred, gt, columns);
}
#if LENS_FAST_X86
template <class Fg>
LENS_FAST_TARGET_AVX2 __attribute__((flatten)) int64_t gt_avx2(const Params& p, const Plane& gt, uint64_t* bits) {
  return gt_bits(Fg(p), gt, bits);
}
template <class Fg>
LENS_FAST_TARGET_AVX2 __attribute__((flatten)) MaskResult mask_avx2(const Params& p, const Plane& pred,
                                                                     const uint64_t* gt, uint64_t* columns) {
  return scan_mask(Fg(p), pred, gt, columns);
}
#endif

template <class Scalar, class Avx2>
MaskFn pick_mask_fn(bool avx2) {
#if LENS_FAST_X86
  if (avx2) return &mask_avx2<Avx2>;
#endif
  (void)avx2;
  return &mask_scalar<Scalar>;
}

// ---- The whole batch. --------------------------------------------------------------------------
void mask_stats(uintptr_t pred_ptr, const std::string& pred_dtype, int64_t batch, int64_t groups,
                int64_t height, int64_t width, int64_t pred_stride_batch, int64_t pred_stride_group,
                int64_t pred_stride_row, uintptr_t gt_ptr, int64_t gt_stride_batch, int64_t gt_stride_row,
                double threshold, uintptr_t intersection_ptr, uintptr_t union_ptr, uintptr_t pred_area_ptr,
                uintptr_t gt_area_ptr, uintptr_t pred_box_ptr, int num_threads, bool use_avx2) {
  if (batch <= 0 || groups <= 0 || height <= 0 || width <= 0) {
    throw std::invalid_argument("mask_stats: batch, groups, height and width must be > 0");
  }
  const bool avx2 = use_avx2 && cpu_has_avx2();
  Params params{static_cast<float>(threshold), {0, -1}};
  MaskFn mask_fn;
  int64_t elem;
  if (pred_dtype == "uint8") {
    mask_fn = pick_mask_fn<ByteScalar, ByteAvx2>(avx2);
    elem = 1;
  } else if (pred_dtype == "float32") {
    mask_fn = pick_mask_fn<Float32Scalar, Float32Avx2>(avx2);
    elem = 4;
  } else if (pred_dtype == "float16" || pred_dtype == "bfloat16") {
    const bool half = pred_dtype == "float16";
    params.keys = key_range(params.threshold, half ? 0x7C00 : 0x7F80, half ? &float16_value : &bfloat16_value);
    mask_fn = pick_mask_fn<Key16Scalar, Key16Avx2>(avx2);
    elem = 2;
  } else {
    throw std::invalid_argument("mask_stats: pred_dtype must be uint8, float32, float16 or bfloat16, got " +
                                pred_dtype);
  }
#if LENS_FAST_X86
  const GtFn gt_fn = avx2 ? &gt_avx2<ByteAvx2> : &gt_scalar<ByteScalar>;
#else
  const GtFn gt_fn = &gt_scalar<ByteScalar>;
#endif

  const int64_t words = (width + kWordBits - 1) / kWordBits;
  const int64_t plane_words = height * words;
  std::vector<uint64_t> gt_words(static_cast<size_t>(batch * plane_words));
  const char* pred = reinterpret_cast<const char*>(pred_ptr);
  const char* gt = reinterpret_cast<const char*>(gt_ptr);
  auto* intersection = reinterpret_cast<int64_t*>(intersection_ptr);
  auto* union_ = reinterpret_cast<int64_t*>(union_ptr);
  auto* pred_area = reinterpret_cast<int64_t*>(pred_area_ptr);
  auto* gt_area = reinterpret_cast<int64_t*>(gt_area_ptr);
  auto* pred_box = reinterpret_cast<float*>(pred_box_ptr);

  py::gil_scoped_release release;
  parallel_for(batch, num_threads, [&](int64_t b) {
    const Plane plane{gt + b * gt_stride_batch, gt_stride_row, height, width};
    gt_area[b] = gt_fn(params, plane, gt_words.data() + b * plane_words);
  });
  parallel_for(batch * groups, num_threads, [&](int64_t i) {
    const int64_t b = i / groups, g = i % groups;
    thread_local std::vector<uint64_t> columns;
    columns.resize(static_cast<size_t>(words));
    const Plane plane{pred + (b * pred_stride_batch + g * pred_stride_group) * elem, pred_stride_row * elem,
                      height, width};
    const MaskResult r = mask_fn(params, plane, gt_words.data() + b * plane_words, columns.data());
    intersection[i] = r.intersection;
    pred_area[i] = r.area;
    union_[i] = r.area + gt_area[b] - r.intersection;
    for (int k = 0; k < 4; ++k) pred_box[4 * i + k] = static_cast<float>(r.box[k]);
  });
}

void register_mask_stats(py::module_& m) {
  m.def("mask_stats", &mask_stats, py::arg("pred"), py::arg("pred_dtype"), py::arg("batch"), py::arg("groups"),
        py::arg("height"), py::arg("width"), py::arg("pred_stride_batch"), py::arg("pred_stride_group"),
        py::arg("pred_stride_row"), py::arg("gt"), py::arg("gt_stride_batch"), py::arg("gt_stride_row"),
        py::arg("threshold"), py::arg("intersection"), py::arg("union"), py::arg("pred_area"),
        py::arg("gt_area"), py::arg("pred_box"), py::arg("num_threads") = 0, py::arg("use_avx2") = true,
        "Intersection, union, areas and inclusive xyxy boxes of [batch, groups, height, width] masks "
        "(uint8 nonzero, or float32/float16/bfloat16 logit > threshold) against [batch, height, width] "
        "uint8 GTs. Pointers are addresses, strides are in elements (width contiguous); outputs are "
        "contiguous int64 [batch, groups] (intersection, union, pred_area), int64 [batch] (gt_area) and "
        "float32 [batch, groups, 4] (pred_box). use_avx2=False forces the portable path. Releases the GIL.");
}

}  // namespace

LENS_FAST_REGISTER(register_mask_stats)

}  // namespace lens_fast
