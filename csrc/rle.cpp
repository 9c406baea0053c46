// COCO RLE core (see rle.h). The Python bindings are in rle_bindings.cpp.
#include "rle.h"

#include <algorithm>
#include <atomic>
#include <climits>
#include <cmath>
#include <cstring>
#include <memory>
#include <stdexcept>

#include "cpu_features.h"
#include "parallel.h"

// The AVX2 variant of a function where the CPU has AVX2 (and set_simd_enabled allows it), else the
// portable one.
#if LENS_FAST_X86
#define LENS_FAST_DISPATCH(avx2, portable) \
  (g_simd_enabled.load(std::memory_order_relaxed) && cpu_has_avx2() ? (avx2) : (portable))
#else
#define LENS_FAST_DISPATCH(avx2, portable) (portable)
#endif

namespace lens_fast {
namespace rle {

namespace {

std::atomic<bool> g_simd_enabled{true};

[[noreturn]] void fail(const std::string& message) { throw std::invalid_argument(message); }

// n / d for 32-bit n by a multiply: floor(n * M / 2^64) with M = floor((2^64 - 1) / d) + 1 is
// exact for n, d < 2^32 (the error n * (M - 2^64 / d) / 2^64 stays below 2^-32 < 1 / d).
struct DivideBy {
  uint32_t d;
  uint64_t magic;
  explicit DivideBy(uint32_t divisor) : d(divisor), magic(divisor > 1 ? ~uint64_t(0) / divisor + 1 : 0) {}
  uint32_t operator()(uint32_t n) const {
    return d == 1 ? n : uint32_t((static_cast<unsigned __int128>(n) * magic) >> 64);
  }
};

// Appends counts as runs start: counts[m++] = start - previous start.
struct CountWriter {
  uint32_t* counts;
  size_t m = 0;
  uint32_t last = 0;
  void start(uint32_t position) {
    counts[m++] = position - last;
    last = position;
  }
  size_t finish(uint32_t pixels) {
    counts[m++] = pixels - last;
    return m;
  }
};

// ---- encode: columns stored contiguously (Fortran order)

// Emits the run starts in col[0, len), whose element i has position base + i and whose first element
// follows a pixel of value `previous`; returns the value of the last element.
bool scan_column_scalar(const uint8_t* col, uint32_t len, uint32_t base, bool previous,
                        CountWriter& out) {
  for (uint32_t i = 0; i < len; ++i) {
    const bool value = col[i] != 0;
    if (value != previous) out.start(base + i);
    previous = value;
  }
  return previous;
}

#if LENS_FAST_X86
// 64 bits: bit i set when (a[i] == 0) != (b[i] == 0).
LENS_FAST_TARGET_AVX2 inline uint64_t differ64(const uint8_t* a, const uint8_t* b) {
  const __m256i zero = _mm256_setzero_si256();
  const __m256i d0 = _mm256_xor_si256(
      _mm256_cmpeq_epi8(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(a)), zero),
      _mm256_cmpeq_epi8(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(b)), zero));
  const __m256i d1 = _mm256_xor_si256(
      _mm256_cmpeq_epi8(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(a + 32)), zero),
      _mm256_cmpeq_epi8(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + 32)), zero));
  return uint64_t(uint32_t(_mm256_movemask_epi8(d0))) |
         (uint64_t(uint32_t(_mm256_movemask_epi8(d1))) << 32);
}

LENS_FAST_TARGET_AVX2 bool scan_column_avx2(const uint8_t* col, uint32_t len, uint32_t base,
                                           bool previous, CountWriter& out) {
  if (len == 0) return previous;
  CountWriter writer = out;  // a local copy stays in registers
  if ((col[0] != 0) != previous) writer.start(base);
  uint32_t i = 1;
  for (; len - i >= 64; i += 64) {  // not i + 64 <= len: that wraps for len near 2^32
    for (uint64_t bits = differ64(col + i, col + i - 1); bits; bits = _blsr_u64(bits)) {
      writer.start(base + i + uint32_t(_tzcnt_u64(bits)));
    }
  }
  for (; i < len; ++i) {
    if ((col[i] != 0) != (col[i - 1] != 0)) writer.start(base + i);
  }
  out = writer;
  return col[len - 1] != 0;
}
#endif

// Masks whose columns are contiguous (stride_h == 1): each column scanned in turn.
size_t encode_columns(const uint8_t* mask, uint32_t h, uint32_t w, int64_t stride_w, uint32_t* counts) {
  const auto scan = LENS_FAST_DISPATCH(scan_column_avx2, scan_column_scalar);
  CountWriter out{counts};
  const uint32_t pixels = h * w;
  if (w == 1 || stride_w == int64_t(h)) {  // one contiguous column-major block
    scan(mask, pixels, 0, false, out);
  } else {
    bool previous = false;
    for (uint32_t x = 0; x < w; ++x) previous = scan(mask + x * stride_w, h, x * h, previous, out);
  }
  return out.finish(pixels);
}

// ---- encode: rows stored contiguously (C order)

// Appends to `events` the x in [x0, w) of every pixel of row `cur` whose value differs from the
// pixel above it (row `above`), counting them per column; returns the new number of events.
size_t diff_rows_scalar(const uint8_t* cur, const uint8_t* above, uint32_t x0, uint32_t w,
                        uint32_t* events, size_t n_events, uint32_t* per_column) {
  for (uint32_t x = x0; x < w; ++x) {
    if ((cur[x] != 0) != (above[x] != 0)) {
      events[n_events++] = x;
      ++per_column[x];
    }
  }
  return n_events;
}

#if LENS_FAST_X86
LENS_FAST_TARGET_AVX2 size_t diff_rows_avx2(const uint8_t* cur, const uint8_t* above, uint32_t x0,
                                           uint32_t w, uint32_t* events, size_t n_events,
                                           uint32_t* per_column) {
  uint32_t x = x0;
  for (; w - x >= 64; x += 64) {
    for (uint64_t bits = differ64(cur + x, above + x); bits; bits = _blsr_u64(bits)) {
      const uint32_t col = x + uint32_t(_tzcnt_u64(bits));
      events[n_events++] = col;
      ++per_column[col];
    }
  }
  return diff_rows_scalar(cur, above, x, w, events, n_events, per_column);
}
#endif

// Masks whose rows are contiguous (stride_w == 1). One pass compares each row with the row above
// and records where runs start (row by row); a counting sort by column then puts the starts in
// column-major order, and their differences are the counts.
size_t encode_rows(const uint8_t* mask, uint32_t h, uint32_t w, int64_t stride_h, uint32_t* counts) {
  thread_local Scratch<uint32_t> events_buffer, columns_buffer, rows_buffer;
  const uint32_t pixels = h * w;
  uint32_t* events = events_buffer.get(pixels);
  uint32_t* per_column = columns_buffer.get(w);
  uint32_t* row_end = rows_buffer.get(h);
  std::memset(per_column, 0, sizeof(uint32_t) * w);
  // Row 0: pixel (0, x) follows pixel (h - 1, x - 1); pixel (0, 0) follows a 0.
  const uint8_t* last_row = mask + int64_t(h - 1) * stride_h;
  size_t n_events = 0;
  bool previous = false;
  for (uint32_t x = 0; x < w; ++x) {
    if ((mask[x] != 0) != previous) {
      events[n_events++] = x;
      ++per_column[x];
    }
    previous = last_row[x] != 0;
  }
  row_end[0] = uint32_t(n_events);
  const auto diff = LENS_FAST_DISPATCH(diff_rows_avx2, diff_rows_scalar);
  for (uint32_t y = 1; y < h; ++y) {
    const uint8_t* row = mask + int64_t(y) * stride_h;
    n_events = diff(row, row - stride_h, 0, w, events, n_events, per_column);
    row_end[y] = uint32_t(n_events);
  }
  if (n_events == 0) {
    counts[0] = pixels;
    return 1;
  }
  // per_column becomes each column's next slot in column-major order.
  uint32_t slot = 0;
  for (uint32_t x = 0; x < w; ++x) {
    const uint32_t n = per_column[x];
    per_column[x] = slot;
    slot += n;
  }
  size_t e = 0;
  for (uint32_t y = 0; y < h; ++y) {
    for (; e < row_end[y]; ++e) {
      const uint32_t x = events[e];
      counts[per_column[x]++] = x * h + y;
    }
  }
  // Run starts -> counts, in place from the back.
  counts[n_events] = pixels - counts[n_events - 1];
  for (size_t k = n_events - 1; k > 0; --k) counts[k] -= counts[k - 1];
  return n_events + 1;
}

// Any strides: pixel by pixel in column-major order.
size_t encode_strided(const uint8_t* mask, uint32_t h, uint32_t w, int64_t stride_h,
                      int64_t stride_w, uint32_t* counts) {
  CountWriter out{counts};
  bool previous = false;
  for (uint32_t x = 0; x < w; ++x) {
    const uint8_t* col = mask + int64_t(x) * stride_w;
    for (uint32_t y = 0; y < h; ++y) {
      const bool value = col[int64_t(y) * stride_h] != 0;
      if (value != previous) out.start(x * h + y);
      previous = value;
    }
  }
  return out.finish(h * w);
}

// ---- decoding helpers

// Writes `count` bytes of `value` at p (p + count <= end). A short run is one fixed-size store
// that may spill past it: the runs that follow overwrite the spill.
inline void fill_run(uint8_t* p, const uint8_t* end, int value, uint32_t count) {
  struct Fill {
    uint8_t bytes[2][32];
    constexpr Fill() : bytes() {
      for (int i = 0; i < 32; ++i) bytes[1][i] = 1;
    }
  };
  static constexpr Fill fill;
  if (count <= 32 && end - p >= 32) {
    std::memcpy(p, fill.bytes[value], 32);
  } else {
    std::memset(p, value, count);
  }
}

// Masks of at least this many pixels are written with non-temporal stores.
constexpr size_t kStreamPixels = size_t(1) << 20;

// ---- row sweep: a row-major mask row by row, each row the row above with the pixels where a run
// starts flipped.

// A grow-only buffer of zeros: every user puts back each zero it changes before it returns.
template <typename T>
class ZeroScratch {
 public:
  T* get(size_t n) {
    if (n > capacity_) {
      data_.reset(allocate<T>(n, true));
      capacity_ = n;
    }
    return data_.get();
  }

 private:
  std::unique_ptr<T[]> data_;
  size_t capacity_ = 0;
};

// The rows of an h x w mask as bits, 32 pixels a word, `stride` words a row (a multiple of 8):
// row0 holds row 0 (zero past w), and flips[y * stride + c] (y >= 1) has bit b set when pixel (y, 32 * c + b)
// differs from the pixel above it. The sweeps write the mask and hand flips back all zero.
struct RowBits {
  size_t stride;
  const uint32_t* row0;
  uint32_t* flips;
};

void sweep_rows_scalar(uint8_t* out, uint32_t h, uint32_t w, const RowBits& rows) {
  for (uint32_t x = 0; x < w; ++x) out[x] = uint8_t((rows.row0[x / 32] >> (x % 32)) & 1);
  for (uint32_t r = 1; r < h; ++r) {
    uint8_t* row = out + size_t(r) * w;
    std::memcpy(row, row - w, w);
    uint32_t* flips = rows.flips + size_t(r) * rows.stride;
    for (size_t c = 0; c < rows.stride; ++c) {
      for (uint32_t bits = flips[c]; bits; bits &= bits - 1) row[32 * c + size_t(__builtin_ctz(bits))] ^= 1;
      flips[c] = 0;
    }
  }
}

#if LENS_FAST_X86
// Bytes (0/1) of 32 pixels from their bits, broadcast to every 32-bit lane of `lanes`: byte i
// takes bit i % 8 of byte i / 8.
LENS_FAST_TARGET_AVX2 inline __m256i expand_lanes(__m256i lanes) {
  const __m256i spread = _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1,  //
                                          2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3);
  const __m256i bit = _mm256_set1_epi64x(int64_t(0x8040201008040201));
  return _mm256_min_epu8(_mm256_and_si256(_mm256_shuffle_epi8(lanes, spread), bit), _mm256_set1_epi8(1));
}

LENS_FAST_TARGET_AVX2 inline void store_bytes(uint8_t* p, __m256i v, bool stream) {
  if (stream) {
    _mm256_stream_si256(reinterpret_cast<__m256i*>(p), v);
  } else {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), v);
  }
}

// Columns [256 * c0 / 8, 256 * (c0 / 8 + K)) of the mask (words c0 .. c0 + 8K of a row of bits), row
// by row: that part of the current row lives in K registers; each row flips them (K loads of
// flips, stored long before, so no load waits for a store) and is expanded from them, 32 bytes a
// store, never read back.
template <int K>
LENS_FAST_TARGET_AVX2 void sweep_stripe(uint8_t* out, uint32_t h, uint32_t w, const RowBits& rows, size_t c0,
                                        bool stream) {
  const uint32_t chunks = w / 32;
  __m256i bits[K];
  for (int j = 0; j < K; ++j) bits[j] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(rows.row0 + c0) + j);
  for (uint32_t r = 0; r < h; ++r) {
    if (r > 0) {
      auto* flips = reinterpret_cast<__m256i*>(rows.flips + size_t(r) * rows.stride + c0);
      for (int j = 0; j < K; ++j) {
        bits[j] = _mm256_xor_si256(bits[j], _mm256_loadu_si256(flips + j));
        _mm256_storeu_si256(flips + j, _mm256_setzero_si256());
      }
    }
    uint8_t* row = out + size_t(r) * w + 32 * c0;
    for (int j = 0; j < K; ++j) {
      const size_t n = std::min<size_t>(8, chunks - std::min<size_t>(chunks, c0 + 8 * j));  // full chunks
      for (size_t k = 0; k < n; ++k) {
        const __m256i lanes = _mm256_permutevar8x32_epi32(bits[j], _mm256_set1_epi32(int32_t(k)));
        store_bytes(row + 256 * j + 32 * k, expand_lanes(lanes), stream);
      }
    }
  }
}

// Up to 1024 columns are swept in one pass (rows written in order), wider masks in passes of 1024
// columns. A column tail (w not a multiple of 32) is written first, 32 bytes ending at w per row,
// before the passes rewrite the bytes it shares with them.
LENS_FAST_TARGET_AVX2 void sweep_rows_avx2(uint8_t* out, uint32_t h, uint32_t w, const RowBits& rows) {
  const size_t stride = rows.stride;
  if (w < 32) {
    sweep_rows_scalar(out, h, w, rows);
    return;
  }
  // Large masks are written around the caches (non-temporal stores): no read for ownership of
  // lines about to be overwritten, and the caches are left to whoever reads the mask next.
  const bool stream =
      size_t(h) * w >= kStreamPixels && w % 32 == 0 && reinterpret_cast<uintptr_t>(out) % 32 == 0;
  if (w % 32 != 0) {
    // Pixels [w - 32, w): 32 of the 64 bits in words c and c + 1 (zero past the row).
    const uint32_t first = w - 32, c = first / 32, shift = first % 32;
    auto window = [&](const uint32_t* words) {
      const uint64_t high = c + 1 < stride ? words[c + 1] : 0;
      return uint32_t(((high << 32) | words[c]) >> shift);
    };
    uint32_t bits = window(rows.row0);
    for (uint32_t r = 0; r < h; ++r) {
      if (r > 0) bits ^= window(rows.flips + size_t(r) * stride);
      store_bytes(out + size_t(r) * w + first, expand_lanes(_mm256_set1_epi32(int32_t(bits))), false);
    }
  }
  size_t c0 = 0;
  for (; c0 + 32 <= stride; c0 += 32) sweep_stripe<4>(out, h, w, rows, c0, stream);
  switch ((stride - c0) / 8) {
    case 1: sweep_stripe<1>(out, h, w, rows, c0, stream); break;
    case 2: sweep_stripe<2>(out, h, w, rows, c0, stream); break;
    case 3: sweep_stripe<3>(out, h, w, rows, c0, stream); break;
    default: break;
  }
  _mm_sfence();
}
#endif

// ---- transpose (column-major h x w -> row-major h x w)

#if LENS_FAST_X86
// dst rows c = 0..15 (dst_stride apart) = byte c of the 16 src rows (src_stride apart). SSE2.
inline void transpose16(const uint8_t* src, size_t src_stride, uint8_t* dst, size_t dst_stride) {
  __m128i r[16], t[16], u[16], v[16];
  for (int i = 0; i < 16; ++i) {
    r[i] = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i * src_stride));
  }
  // Interleave bytes of row pairs, then 16-, 32- and 64-bit units: after each step a register
  // holds twice as many rows of half as many columns.
  for (int k = 0; k < 8; ++k) {
    t[2 * k] = _mm_unpacklo_epi8(r[2 * k], r[2 * k + 1]);
    t[2 * k + 1] = _mm_unpackhi_epi8(r[2 * k], r[2 * k + 1]);
  }
  for (int k = 0; k < 4; ++k) {
    u[4 * k] = _mm_unpacklo_epi16(t[4 * k], t[4 * k + 2]);
    u[4 * k + 1] = _mm_unpackhi_epi16(t[4 * k], t[4 * k + 2]);
    u[4 * k + 2] = _mm_unpacklo_epi16(t[4 * k + 1], t[4 * k + 3]);
    u[4 * k + 3] = _mm_unpackhi_epi16(t[4 * k + 1], t[4 * k + 3]);
  }
  for (int half = 0; half < 2; ++half) {
    for (int j = 0; j < 4; ++j) {
      const __m128i a = u[8 * half + j], b = u[8 * half + 4 + j];
      v[8 * half + 2 * j] = _mm_unpacklo_epi32(a, b);
      v[8 * half + 2 * j + 1] = _mm_unpackhi_epi32(a, b);
    }
  }
  for (int i = 0; i < 8; ++i) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + (2 * i) * dst_stride),
                     _mm_unpacklo_epi64(v[i], v[8 + i]));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + (2 * i + 1) * dst_stride),
                     _mm_unpackhi_epi64(v[i], v[8 + i]));
  }
}
#else
inline void transpose16(const uint8_t* src, size_t src_stride, uint8_t* dst, size_t dst_stride) {
  for (size_t c = 0; c < 16; ++c) {
    for (size_t i = 0; i < 16; ++i) dst[c * dst_stride + i] = src[i * src_stride + c];
  }
}
#endif

// dst (row-major h x w) = src (column-major h x w), in 16 x 16 blocks.
void column_to_row_major(const uint8_t* src, uint32_t h, uint32_t w, uint8_t* dst) {
  uint32_t y0 = 0;
  for (; h - y0 >= 16; y0 += 16) {  // not y0 + 16 <= h, which wraps near 2^32
    uint32_t x0 = 0;
    for (; w - x0 >= 16; x0 += 16) {
      transpose16(src + size_t(x0) * h + y0, h, dst + size_t(y0) * w + x0, w);
    }
    for (uint32_t y = y0; y < y0 + 16; ++y) {
      for (uint32_t x = x0; x < w; ++x) dst[size_t(y) * w + x] = src[size_t(x) * h + y];
    }
  }
  for (uint32_t y = y0; y < h; ++y) {
    for (uint32_t x = 0; x < w; ++x) dst[size_t(y) * w + x] = src[size_t(x) * h + y];
  }
}

// ---- iou and merge

// An RLE's foreground as intervals [begin[i], end[i]) of column-major positions.
struct Foreground {
  std::vector<uint32_t> begin, end;
  uint32_t area = 0;

  explicit Foreground(const RleView& rle) {
    begin.reserve(rle.m / 2);
    end.reserve(rle.m / 2);
    uint32_t position = 0;
    for (size_t k = 0; k < rle.m; ++k) {
      const uint32_t c = rle.counts[k];
      if ((k & 1) && c > 0) {
        begin.push_back(position);
        end.push_back(position + c);
        area += c;
      }
      position += c;
    }
  }
};

// Pixels in the foreground of both a and b, over the span [lo, hi) where both have foreground.
// A two-pointer merge advances whichever interval ends first (both on a tie), without branches on
// the data; each step's loads wait for the last step's compare, so the span is cut in two halves
// merged in lockstep, whose steps overlap.
uint32_t intersection(const Foreground& a, const Foreground& b) {
  const size_t na = a.begin.size(), nb = b.begin.size();
  if (na == 0 || nb == 0) return 0;
  const uint32_t lo = std::max(a.begin[0], b.begin[0]), hi = std::min(a.end[na - 1], b.end[nb - 1]);
  if (lo >= hi) return 0;
  const uint32_t mid = lo + (hi - lo) / 2;
  const uint32_t *ab = a.begin.data(), *ae = a.end.data(), *bb = b.begin.data(), *be = b.end.data();
  // Half 0: intervals ending after lo and beginning before mid; half 1: after mid, before hi.
  auto after = [](const uint32_t* ends, size_t n, uint32_t p) {
    return size_t(std::upper_bound(ends, ends + n, p) - ends);
  };
  auto before = [](const uint32_t* begins, size_t n, uint32_t p) {
    return size_t(std::lower_bound(begins, begins + n, p) - begins);
  };
  size_t i0 = after(ae, na, lo), j0 = after(be, nb, lo);
  const size_t ia0 = before(ab, na, mid), jb0 = before(bb, nb, mid);
  size_t i1 = after(ae, na, mid), j1 = after(be, nb, mid);
  const size_t ia1 = before(ab, na, hi), jb1 = before(bb, nb, hi);
  uint32_t inter0 = 0, inter1 = 0;
  // Half 0 clips overlaps at mid from above, half 1 from below, so no pixel counts twice.
  auto step0 = [&] {
    const uint32_t ea = ae[i0], eb = be[j0];
    const uint32_t first = std::max(ab[i0], bb[j0]), last = std::min(std::min(ea, eb), mid);
    inter0 += last > first ? last - first : 0;
    i0 += ea <= eb;
    j0 += eb <= ea;
  };
  auto step1 = [&] {
    const uint32_t ea = ae[i1], eb = be[j1];
    const uint32_t first = std::max(std::max(ab[i1], bb[j1]), mid), last = std::min(ea, eb);
    inter1 += last > first ? last - first : 0;
    i1 += ea <= eb;
    j1 += eb <= ea;
  };
  while (i0 < ia0 && j0 < jb0 && i1 < ia1 && j1 < jb1) {
    step0();
    step1();
  }
  while (i0 < ia0 && j0 < jb0) step0();
  while (i1 < ia1 && j1 < jb1) step1();
  return inter0 + inter1;
}

// The counts of the same mask without zero-length runs past the first count (the runs on both
// sides of one join).
void canonical_counts(const RleView& rle, std::vector<uint32_t>& out) {
  out.clear();
  for (size_t k = 0; k < rle.m; ++k) {
    const uint32_t c = rle.counts[k];
    if (c == 0 && k > 0) continue;
    if (!out.empty() && (out.size() & 1) == ((k + 1) & 1)) {
      out.back() += c;  // same value as the last run kept
    } else {
      if (out.empty() && (k & 1)) out.push_back(0);  // the mask starts with 1s
      out.push_back(c);
    }
  }
  if (out.empty()) out.push_back(0);
}

// pycocotools' rleMerge loop for two RLEs: a count is emitted whenever the merged value changes.
// Exact, and its result canonical, for canonical inputs (pycocotools' own stops early or overruns
// its buffer on zero-length runs past the first count).
void merge_two(const RleView& ra, const RleView& rb, bool intersect, std::vector<uint32_t>& out) {
  static const uint32_t kZero = 0;
  const uint32_t* A = ra.m ? ra.counts : &kZero;
  const uint32_t* B = rb.m ? rb.counts : &kZero;
  const size_t ka = std::max<size_t>(ra.m, 1), kb = std::max<size_t>(rb.m, 1);
  uint32_t ca = A[0], cb = B[0], cc = 0;
  bool va = false, vb = false, v = false;
  size_t a = 1, b = 1;
  uint64_t remaining = 1;
  while (remaining > 0) {
    const uint32_t c = std::min(ca, cb);
    cc += c;
    ca -= c;
    if (!ca && a < ka) {
      ca = A[a++];
      va = !va;
    }
    cb -= c;
    if (!cb && b < kb) {
      cb = B[b++];
      vb = !vb;
    }
    remaining = uint64_t(ca) + cb;
    const bool before = v;
    v = intersect ? (va && vb) : (va || vb);
    if (v != before || remaining == 0) {
      out.push_back(cc);
      cc = 0;
    }
  }
}

// ---- polygons

// The boundary points of one polygon edge, upsampled as rleFrPoly does: (u, v) on a grid `scale`
// times finer, one point per step of the longer axis, end points included.
template <typename Emit>
void edge_points(int xs, int ys, int xe, int ye, Emit&& emit) {
  const int dx = std::abs(xe - xs), dy = std::abs(ye - ys);
  if (dx == 0 && dy == 0) {
    // pycocotools computes v from 0/0 here; x86 turns that NaN into INT_MIN. The point's u equals
    // its neighbours', so v never reaches the mask.
    emit(xs, INT_MIN);
    return;
  }
  const bool flip = (dx >= dy && xs > xe) || (dx < dy && ys > ye);
  if (flip) {
    std::swap(xs, xe);
    std::swap(ys, ye);
  }
  if (dx >= dy) {
    const double s = double(ye - ys) / dx;
    for (int d = 0; d <= dx; ++d) {
      const int t = flip ? dx - d : d;
      emit(t + xs, int(ys + s * t + .5));
    }
  } else {
    const double s = double(xe - xs) / dy;
    for (int d = 0; d <= dy; ++d) {
      const int t = flip ? dy - d : d;
      emit(int(xs + s * t + .5), t + ys);
    }
  }
}

// The careful parser: stops at the first problem and says what and where. Used to report the
// errors that parse_fast detects.
size_t parse_checked(const char* s, size_t len, uint32_t h, uint32_t w, uint32_t* counts) {
  const uint64_t pixels = uint64_t(h) * w;
  const auto* bytes = reinterpret_cast<const uint8_t*>(s);
  uint64_t total = 0;
  size_t m = 0, p = 0;
  while (p < len) {
    int64_t x = 0;
    int shift = 0;
    uint8_t c;
    do {
      if (p == len) fail("compressed counts end in the middle of a count (truncated string)");
      c = uint8_t(bytes[p] - 48);
      if (c > 63) {
        fail("compressed counts hold byte " + std::to_string(int(bytes[p])) + " at offset " +
             std::to_string(p) + ", outside the alphabet '0'..'o' (48..111)");
      }
      if (shift == 35) fail("compressed counts hold a value longer than 7 characters (overflow)");
      x |= int64_t(c & 0x1f) << shift;
      shift += 5;
      ++p;
    } while (c & 0x20);
    if (c & 0x10) x -= int64_t(1) << shift;  // sign-extend from the last group
    if (m > 2) x += counts[m - 2];
    if (x < 0 || x > int64_t(UINT32_MAX)) {
      fail("compressed counts decode to count " + std::to_string(x) + " at index " +
           std::to_string(m) + ", outside [0, 2^32)");
    }
    total += uint64_t(x);
    if (total > pixels) {
      fail("counts sum to more than h * w = " + std::to_string(pixels) + " (h=" +
           std::to_string(h) + ", w=" + std::to_string(w) + ")");
    }
    counts[m++] = uint32_t(x);
  }
  if (total != pixels) {
    fail("counts sum to " + std::to_string(total) + ", expected h * w = " + std::to_string(pixels) +
         " (h=" + std::to_string(h) + ", w=" + std::to_string(w) + ")");
  }
  return m;
}

// The fast parser: one branch for the common one-character count; range and sum checked at the
// end. Memory-safe on any bytes; returns false on any problem (then parse_checked says which).
bool parse_fast(const uint8_t* s, size_t len, uint64_t pixels, uint32_t* counts, size_t& m_out) {
  size_t m = 0, p = 0;
  uint64_t total = 0, out_of_range = 0;
  while (p < len) {
    uint32_t c = uint32_t(s[p]) - 48u;  // bytes below '0' wrap to large values
    int64_t x;
    if (c < 0x20) {  // a single group: 5 bits, sign in 0x10
      x = int64_t(c) - int64_t((c & 0x10) << 1);
      ++p;
    } else {
      x = 0;
      int shift = 0;
      for (;;) {
        if (c > 63) return false;
        x |= int64_t(c & 0x1f) << shift;
        shift += 5;
        ++p;
        if (!(c & 0x20)) break;
        if (p == len || shift == 35) return false;
        c = uint32_t(s[p]) - 48u;
      }
      if (c & 0x10) x -= int64_t(1) << shift;
    }
    if (m > 2) x += counts[m - 2];
    out_of_range |= uint64_t(x) >> 32;  // negative or >= 2^32
    total += uint32_t(x);
    counts[m++] = uint32_t(x);
  }
  if (out_of_range || total != pixels) return false;
  m_out = m;
  return true;
}

// Masks with more runs than pixels / kShortRunsPerPixel decode through a transpose.
constexpr uint32_t kShortRunsPerPixel = 24;

}  // namespace

void set_simd_enabled(bool enabled) { g_simd_enabled.store(enabled); }

void check_size(int64_t h, int64_t w, const std::string& what) {
  // Each side on its own too: with the other side 0 the product says nothing, and a side that
  // does not fit in uint32 would be stored truncated.
  if (h < 0 || w < 0 || h > int64_t(UINT32_MAX) || w > int64_t(UINT32_MAX) ||
      uint64_t(h) * uint64_t(w) > UINT32_MAX) {
    fail(what + " must be non-negative with h, w and h * w below 2^32, got h=" + std::to_string(h) +
         ", w=" + std::to_string(w));
  }
}

size_t max_counts(uint64_t h, uint64_t w) { return size_t(h * w) + 1; }

size_t encode(const uint8_t* mask, uint32_t h, uint32_t w, int64_t stride_h, int64_t stride_w,
              uint32_t* counts) {
  if (uint64_t(h) * w == 0) {
    counts[0] = 0;
    return 1;
  }
  if (h == 1 && stride_w == 1) return encode_columns(mask, w, 1, 1, counts);
  if (stride_h == 1) return encode_columns(mask, h, w, stride_w, counts);
  if (stride_w == 1) return encode_rows(mask, h, w, stride_h, counts);
  return encode_strided(mask, h, w, stride_h, stride_w, counts);
}

// ---- compressed strings

size_t max_string_length(size_t m) { return 7 * m; }

size_t counts_to_chars(const uint32_t* counts, size_t m, char* out) {
  char* p = out;
  for (size_t i = 0; i < m; ++i) {
    int64_t x = counts[i];
    if (i > 2) x -= counts[i - 2];
    if (uint64_t(x + 16) < 32) {  // one character: 5 bits with the sign in 0x10
      *p++ = char((x & 0x1f) + 48);
      continue;
    }
    for (;;) {
      int c = int(x & 0x1f);
      x >>= 5;  // arithmetic: the sign is carried by bit 0x10 of the last group
      const bool more = (c & 0x10) ? x != -1 : x != 0;
      if (more) c |= 0x20;
      *p++ = char(c + 48);
      if (!more) break;
    }
  }
  return size_t(p - out);
}

size_t string_to_counts(const char* s, size_t len, uint32_t h, uint32_t w, uint32_t* counts) {
  size_t m = 0;
  if (parse_fast(reinterpret_cast<const uint8_t*>(s), len, uint64_t(h) * w, counts, m)) return m;
  return parse_checked(s, len, h, w, counts);  // throws, saying why
}

std::string counts_to_string(const uint32_t* counts, size_t m) {
  std::string s(max_string_length(m), '\0');
  s.resize(counts_to_chars(counts, m, &s[0]));
  return s;
}

void check_counts(const uint32_t* counts, size_t m, uint32_t h, uint32_t w) {
  uint64_t total = 0;
  for (size_t i = 0; i < m; ++i) total += counts[i];
  if (total != uint64_t(h) * w) {
    fail("counts sum to " + std::to_string(total) + ", expected h * w = " +
         std::to_string(uint64_t(h) * w) + " (h=" + std::to_string(h) + ", w=" + std::to_string(w) +
         ")");
  }
}

// ---- decoding

void decode_column_major(const RleView& rle, uint8_t* out) {
  uint8_t* p = out;
  uint8_t* const end = out + rle.pixels();
  int value = 0;
  for (size_t k = 0; k < rle.m; ++k) {
    fill_run(p, end, value, rle.counts[k]);
    p += rle.counts[k];
    value ^= 1;
  }
}

void decode_row_major(const RleView& rle, uint8_t* out) {
  const uint32_t h = rle.h, w = rle.w;
  const uint32_t pixels = h * w;
  if (pixels == 0) return;
  if (h == 1 || w == 1) {  // one row or one column: row-major is column-major
    decode_column_major(rle, out);
    return;
  }
  if (rle.m > pixels / kShortRunsPerPixel) {
    thread_local Scratch<uint8_t> column_major;
    uint8_t* tmp = column_major.get(pixels);
    decode_column_major(rle, tmp);
    column_to_row_major(tmp, h, w, out);
    return;
  }
  // One walk over the run starts marks them in flips (row 0's too), and in `parity` (32 columns
  // a word) the columns holding an odd number of them.
  thread_local ZeroScratch<uint32_t> flips_buffer;
  thread_local Scratch<uint32_t> parity_buffer, row0_buffer;
  // Sizes in size_t: (w + 255) and (w + 31) wrap in 32 bits for w near 2^32.
  const size_t stride = (size_t(w) + 255) / 256 * 8;
  uint32_t* flips = flips_buffer.get(size_t(h) * stride);
  uint32_t* parity = parity_buffer.get(stride);
  std::memset(parity, 0, sizeof(uint32_t) * stride);
  const size_t n_starts = rle.m > 0 ? rle.m - 1 : 0;
  const DivideBy by_h(h);
  uint32_t position = 0, word = 0, word_parity = 0;  // parity of the starts in columns of `word`
  for (size_t k = 0; k < n_starts; ++k) {
    position += rle.counts[k];
    if (position >= pixels) break;  // zero-length runs at the very end
    const uint32_t x = by_h(position), y = position - x * h;
    const uint32_t c = x / 32, bit = uint32_t(1) << (x % 32);
    flips[size_t(y) * stride + c] ^= bit;
    if (c != word) {  // starts come in column order
      parity[word] = word_parity;
      word = c;
      word_parity = 0;
    }
    word_parity ^= bit;
  }
  parity[word] = word_parity;
  // Row 0: pixel (0, x) is 1 when the columns before x hold an odd number of run starts, flipped
  // by a start at (0, x) itself.
  uint32_t* row0 = row0_buffer.get(stride);
  uint32_t odd_before = 0;  // all ones when the words before hold an odd number of starts
  for (size_t c = 0; c < stride; ++c) {
    const uint32_t v = parity[c];
    uint32_t prefix = v ^ (v << 1);  // bit b: parity of bits 0..b of v
    prefix ^= prefix << 2;
    prefix ^= prefix << 4;
    prefix ^= prefix << 8;
    prefix ^= prefix << 16;
    row0[c] = prefix ^ v ^ odd_before ^ flips[c];
    odd_before ^= uint32_t(0) - (prefix >> 31);
    flips[c] = 0;
  }
  const size_t words = (size_t(w) + 31) / 32;  // the carry set every bit past w: clear them
  if (w % 32 != 0) row0[words - 1] &= (uint32_t(1) << (w % 32)) - 1;
  for (size_t c = words; c < stride; ++c) row0[c] = 0;
  const auto sweep_rows = LENS_FAST_DISPATCH(sweep_rows_avx2, sweep_rows_scalar);
  sweep_rows(out, h, w, RowBits{stride, row0, flips});
}

// ---- measures

uint32_t area(const RleView& rle) {
  uint32_t a = 0;
  for (size_t j = 1; j < rle.m; j += 2) a += rle.counts[j];
  return a;
}

void to_bbox(const RleView& rle, double* box) {
  // pycocotools' rule; an empty mask gives zeros (pycocotools' uint32 arithmetic wraps around when
  // zero-length foreground runs are all there is).
  const uint32_t h = rle.h, w = rle.w;
  const size_t m = rle.m / 2 * 2;
  if (m == 0) {
    box[0] = box[1] = box[2] = box[3] = 0;
    return;
  }
  const DivideBy by_h(h);
  uint32_t xs = w, ys = h, xe = 0, ye = 0, cc = 0;
  for (size_t j = 0; j < m; ++j) {
    const uint32_t start = cc;
    cc += rle.counts[j];
    if (j % 2 == 0 || rle.counts[j] == 0) continue;
    const uint32_t x_start = by_h(start), y_start = start - x_start * h;
    const uint32_t x_end = by_h(cc - 1), y_end = cc - 1 - x_end * h;
    xs = std::min(xs, x_start);
    xe = std::max(xe, x_end);
    if (x_start < x_end) {
      ys = 0;
      ye = h - 1;  // the run crosses a column: every row is covered
    } else {
      ys = std::min(ys, y_start);
      ye = std::max(ye, y_end);
    }
  }
  if (xs > xe) {  // no foreground pixel (zero-length foreground runs only)
    box[0] = box[1] = box[2] = box[3] = 0;
    return;
  }
  box[0] = xs;
  box[2] = uint32_t(xe - xs + 1);
  box[1] = ys;
  box[3] = uint32_t(ye - ys + 1);
}

void box_iou(const double* dt, size_t m, const double* gt, size_t n, const uint8_t* iscrowd,
             double* out) {
  for (size_t g = 0; g < n; ++g) {
    const double* G = gt + 4 * g;
    const double ga = G[2] * G[3];
    const bool crowd = iscrowd != nullptr && iscrowd[g];
    for (size_t d = 0; d < m; ++d) {
      const double* D = dt + 4 * d;
      const double da = D[2] * D[3];
      double& o = out[g * m + d];
      o = 0;
      const double bw = std::fmin(D[2] + D[0], G[2] + G[0]) - std::fmax(D[0], G[0]);
      if (bw <= 0) continue;
      const double bh = std::fmin(D[3] + D[1], G[3] + G[1]) - std::fmax(D[1], G[1]);
      if (bh <= 0) continue;
      const double i = bw * bh;
      o = i / (crowd ? da : da + ga - i);
    }
  }
}

void iou(const RleView* dt, size_t m, const RleView* gt, size_t n, const uint8_t* iscrowd,
         double* out, int num_threads) {
  std::vector<double> dt_boxes(4 * m), gt_boxes(4 * n);
  for (size_t d = 0; d < m; ++d) to_bbox(dt[d], dt_boxes.data() + 4 * d);
  for (size_t g = 0; g < n; ++g) to_bbox(gt[g], gt_boxes.data() + 4 * g);
  box_iou(dt_boxes.data(), m, gt_boxes.data(), n, iscrowd, out);  // the prefilter
  std::vector<Foreground> dt_fg, gt_fg;
  dt_fg.reserve(m);
  gt_fg.reserve(n);
  for (size_t d = 0; d < m; ++d) dt_fg.emplace_back(dt[d]);
  for (size_t g = 0; g < n; ++g) gt_fg.emplace_back(gt[g]);
  parallel_for(int64_t(n), num_threads, [&](int64_t gi) {
    const size_t g = size_t(gi);
    const bool crowd = iscrowd != nullptr && iscrowd[g];
    for (size_t d = 0; d < m; ++d) {
      double& o = out[g * m + d];
      if (!(o > 0)) continue;  // the boxes do not overlap: neither do the masks
      if (dt[d].h != gt[g].h || dt[d].w != gt[g].w) {
        o = -1;
      } else {
        const Foreground &a = dt_fg[d], &b = gt_fg[g];
        const uint32_t inter = intersection(a, b);
        const uint32_t uni = inter == 0 ? 1 : crowd ? a.area : a.area + b.area - inter;
        o = double(inter) / double(uni);
      }
    }
  });
}

void merge(const RleView* rles, size_t n, bool intersect, std::vector<uint32_t>& out) {
  if (n == 1) {
    out.assign(rles[0].counts, rles[0].counts + rles[0].m);
    return;
  }
  std::vector<uint32_t> next, other;
  canonical_counts(rles[0], out);
  for (size_t i = 1; i < n; ++i) {
    canonical_counts(rles[i], other);
    next.clear();
    merge_two(RleView{rles[0].h, rles[0].w, out.data(), out.size()},
              RleView{rles[0].h, rles[0].w, other.data(), other.size()}, intersect, next);
    out.swap(next);
  }
}

// ---- from other shapes

void from_polygon(const double* xy, size_t k, uint32_t h, uint32_t w, std::vector<uint32_t>& counts) {
  const double scale = 5;
  std::vector<int> px(k + 1), py(k + 1);
  for (size_t j = 0; j < 2 * k; ++j) {
    if (!std::isfinite(xy[j]) || std::fabs(xy[j]) >= 2e8) {
      fail("polygon coordinate " + std::to_string(xy[j]) + " is not finite or not below 2e8");
    }
  }
  for (size_t j = 0; j < k; ++j) {
    px[j] = int(scale * xy[2 * j] + .5);
    py[j] = int(scale * xy[2 * j + 1] + .5);
  }
  if (k > 0) {
    px[k] = px[0];
    py[k] = py[0];
  }
  // Walk the upsampled boundary; where u (x on the fine grid) changes, keep the point where the
  // boundary crosses a pixel column, as the first row inside the polygon in that column.
  std::vector<uint32_t> crossings;
  bool have_previous = false;
  int pu = 0, pv = 0;
  auto visit = [&](int u, int v) {
    if (have_previous && u != pu) {
      double xd = u < pu ? u : u - 1;
      xd = (xd + .5) / scale - .5;
      if (std::floor(xd) == xd && xd >= 0 && xd <= double(w) - 1) {
        double yd = v < pv ? v : pv;
        yd = (yd + .5) / scale - .5;
        if (yd < 0) {
          yd = 0;
        } else if (yd > h) {
          yd = h;
        }
        yd = std::ceil(yd);
        crossings.push_back(uint32_t(xd) * h + uint32_t(yd));
      }
    }
    have_previous = true;
    pu = u;
    pv = v;
  };
  for (size_t j = 0; j < k; ++j) edge_points(px[j], py[j], px[j + 1], py[j + 1], visit);
  crossings.push_back(h * w);
  std::sort(crossings.begin(), crossings.end());
  // Crossings -> counts; a repeated crossing cancels: the runs on both sides join.
  counts.clear();
  uint32_t previous = 0;
  for (uint32_t& c : crossings) {
    const uint32_t next = c;
    c -= previous;
    previous = next;
  }
  size_t j = 0;
  counts.push_back(crossings[j++]);
  while (j < crossings.size()) {
    if (crossings[j] > 0) {
      counts.push_back(crossings[j++]);
    } else if (++j < crossings.size()) {
      counts.back() += crossings[j++];
    }
  }
}

void from_box(const double* box, uint32_t h, uint32_t w, std::vector<uint32_t>& counts) {
  const double xs = box[0], xe = xs + box[2], ys = box[1], ye = ys + box[3];
  const double xy[8] = {xs, ys, xs, ye, xe, ye, xe, ys};
  from_polygon(xy, 4, h, w, counts);
}

}  // namespace rle
}  // namespace lens_fast
