// COCO RLE core (see rle.h). The Python bindings are in rle_bindings.cpp.
#include "rle.h"

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstring>
#include <memory>
#include <stdexcept>

#include "cpu_features.h"

namespace lens_fast {
namespace rle {

namespace {

[[noreturn]] void fail(const std::string& message) { throw std::invalid_argument(message); }

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
  CountWriter w = out;
  if ((col[0] != 0) != previous) w.start(base);
  uint32_t i = 1;
  for (; i + 64 <= len; i += 64) {
    for (uint64_t bits = differ64(col + i, col + i - 1); bits; bits = _blsr_u64(bits)) {
      w.start(base + i + uint32_t(_tzcnt_u64(bits)));
    }
  }
  for (; i < len; ++i) {
    if ((col[i] != 0) != (col[i - 1] != 0)) w.start(base + i);
  }
  out = w;
  return col[len - 1] != 0;
}
#endif

using ScanColumn = bool (*)(const uint8_t*, uint32_t, uint32_t, bool, CountWriter&);

ScanColumn pick_scan_column() {
#if LENS_FAST_X86
  if (cpu_has_avx2()) return scan_column_avx2;
#endif
  return scan_column_scalar;
}

// Masks whose columns are contiguous (stride_h == 1): each column scanned in turn.
size_t encode_columns(const uint8_t* mask, uint32_t h, uint32_t w, int64_t stride_w, uint32_t* counts) {
  const ScanColumn scan = pick_scan_column();
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
  for (; x + 64 <= w; x += 64) {
    for (uint64_t bits = differ64(cur + x, above + x); bits; bits = _blsr_u64(bits)) {
      const uint32_t col = x + uint32_t(_tzcnt_u64(bits));
      events[n_events++] = col;
      ++per_column[col];
    }
  }
  return diff_rows_scalar(cur, above, x, w, events, n_events, per_column);
}
#endif

using DiffRows = size_t (*)(const uint8_t*, const uint8_t*, uint32_t, uint32_t, uint32_t*, size_t,
                            uint32_t*);

DiffRows pick_diff_rows() {
#if LENS_FAST_X86
  if (cpu_has_avx2()) return diff_rows_avx2;
#endif
  return diff_rows_scalar;
}

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
  const DiffRows diff = pick_diff_rows();
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

}  // namespace

void check_size(int64_t h, int64_t w, const std::string& what) {
  if (h < 0 || w < 0 || (h > 0 && w > int64_t(UINT32_MAX) / h)) {
    fail(what + " must be non-negative with h * w < 2^32, got h=" + std::to_string(h) +
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

std::string counts_to_string(const uint32_t* counts, size_t m) {
  std::string s(max_string_length(m), '\0');
  s.resize(counts_to_chars(counts, m, &s[0]));
  return s;
}

size_t string_to_counts(const char* s, size_t len, uint32_t h, uint32_t w, uint32_t* counts) {
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
  struct Fill {
    uint8_t bytes[2][32];
    constexpr Fill() : bytes() {
      for (int i = 0; i < 32; ++i) bytes[1][i] = 1;
    }
  };
  static constexpr Fill fill;
  uint8_t* p = out;
  uint8_t* const end = out + rle.pixels();
  int value = 0;
  for (size_t k = 0; k < rle.m; ++k) {
    const uint32_t c = rle.counts[k];
    if (c <= 32 && end - p >= 32) {
      std::memcpy(p, fill.bytes[value], 32);  // short run: one fixed-size store, overwritten later
    } else {
      std::memset(p, value, c);
    }
    p += c;
    value ^= 1;
  }
}

void decode_row_major(const RleView& rle, uint8_t* out) {
  const uint32_t h = rle.h, w = rle.w;
  const uint32_t pixels = h * w;
  if (pixels == 0) return;
  thread_local Scratch<uint32_t> rows_buffer, starts_buffer;
  // Pass 1 over the run starts: row 0 (each column's first pixel) and the number of run starts
  // in each row y > 0. Pixel p is 1 when an odd number of run starts are <= p.
  uint32_t* row_next = rows_buffer.get(size_t(h) + 1);
  std::memset(row_next, 0, sizeof(uint32_t) * (size_t(h) + 1));
  uint32_t* per_row = row_next + 1;
  const size_t n_starts = rle.m > 0 ? rle.m - 1 : 0;
  uint32_t position = 0, x = 0, y = 0, next_column = 0;
  uint8_t value = 0;
  for (size_t k = 0; k < n_starts; ++k) {
    const uint32_t c = rle.counts[k];
    position += c;
    y += c;
    if (y >= h) {
      x += y / h;
      y %= h;
    }
    if (position >= pixels) break;  // zero-length runs at the very end
    const uint32_t columns_before = y > 0 ? x + 1 : x;  // columns starting before this run
    for (; next_column < columns_before; ++next_column) out[next_column] = value;
    value ^= 1;
    if (y > 0) ++per_row[y];
  }
  for (; next_column < w; ++next_column) out[next_column] = value;
  // Counting sort of the run starts in rows y > 0 by row.
  uint32_t slot = 0;
  for (uint32_t r = 0; r < h; ++r) {
    const uint32_t n = per_row[r];
    per_row[r] = slot;
    slot += n;
  }
  uint32_t* starts_by_row = starts_buffer.get(std::max<uint32_t>(slot, 1));
  position = x = y = 0;
  for (size_t k = 0; k < n_starts; ++k) {
    const uint32_t c = rle.counts[k];
    position += c;
    y += c;
    if (y >= h) {
      x += y / h;
      y %= h;
    }
    if (position >= pixels) break;
    if (y > 0) starts_by_row[per_row[y]++] = x;
  }
  // per_row[y] is now the end of row y's starts, row_next[y] = per_row[y - 1] its beginning.
  for (uint32_t r = 1; r < h; ++r) {
    uint8_t* row = out + size_t(r) * w;
    std::memcpy(row, row - w, w);
    for (uint32_t e = row_next[r]; e < per_row[r]; ++e) row[starts_by_row[e]] ^= 1;
  }
}

// ---- measures

uint32_t area(const RleView& rle) {
  uint32_t a = 0;
  for (size_t j = 1; j < rle.m; j += 2) a += rle.counts[j];
  return a;
}

void to_bbox(const RleView& rle, double* box) {
  // pycocotools' arithmetic, uint32 wrap-around included (it shows only for counts with a
  // zero-length foreground run and no other).
  const uint32_t h = rle.h, w = rle.w;
  const size_t m = rle.m / 2 * 2;
  if (m == 0) {
    box[0] = box[1] = box[2] = box[3] = 0;
    return;
  }
  uint32_t xs = w, ys = h, xe = 0, ye = 0, cc = 0;
  for (size_t j = 0; j < m; ++j) {
    const uint32_t start = cc;
    cc += rle.counts[j];
    if (j % 2 == 0 || rle.counts[j] == 0) continue;
    const uint32_t y_start = start % h, x_start = start / h;
    const uint32_t y_end = (cc - 1) % h, x_end = (cc - 1) / h;
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

double iou(const RleView& dt, const RleView& gt, bool crowd) {
  // Walk both run lists at once (pycocotools' rleIou loop).
  static const uint32_t kZero = 0;
  const uint32_t* A = dt.m ? dt.counts : &kZero;
  const uint32_t* B = gt.m ? gt.counts : &kZero;
  const size_t ka = std::max<size_t>(dt.m, 1), kb = std::max<size_t>(gt.m, 1);
  uint32_t ca = A[0], cb = B[0], inter = 0, uni = 0;
  bool va = false, vb = false;
  size_t a = 1, b = 1;
  uint64_t remaining = 1;
  while (remaining > 0) {
    const uint32_t c = std::min(ca, cb);
    if (va || vb) {
      uni += c;
      if (va && vb) inter += c;
    }
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
  }
  if (inter == 0) {
    uni = 1;
  } else if (crowd) {
    uni = area(dt);
  }
  return double(inter) / double(uni);
}

void merge(const RleView& ra, const RleView& rb, bool intersect, std::vector<uint32_t>& out) {
  // pycocotools' rleMerge loop for two RLEs: a count is emitted whenever the merged value changes.
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
