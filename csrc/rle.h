// COCO run-length encoding (RLE) of binary masks: the C++ core of lens_fast.rle.
//
// Conventions (those of pycocotools' maskApi.c, which this API follows one function per operation):
// - A mask is h x w; it is read in column-major order (y fastest), position p = x * h + y.
// - counts alternate runs of 0s and 1s starting with 0s (the first count may be 0) and sum to h * w.
// - The compressed string stores each count as 5-bit groups, low first, 0x20 = more groups follow,
//   each char = group + 48 (alphabet '0'..'o'); from the 4th count on (index > 2) the value stored
//   is counts[i] - counts[i - 2], signed (sign from bit 0x10 of the last group).
// - h * w must be below 2^32 (counts are uint32, as in pycocotools).
// Every function that reads counts or strings from outside validates them and throws
// std::invalid_argument on bad input; the others assume valid counts (sum == h * w).
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <new>
#include <string>
#include <vector>

namespace lens_fast {
namespace rle {

// A failed allocation that says its size (pybind11 turns it into a MemoryError with this message).
class AllocationError : public std::bad_alloc {
 public:
  explicit AllocationError(size_t bytes)
      : message_("lens_fast rle: cannot allocate " + std::to_string(bytes) + " bytes") {}
  const char* what() const noexcept override { return message_.c_str(); }

 private:
  std::string message_;
};

// new T[n] (zero-filled when `zero`), throwing AllocationError when the memory is not there.
template <typename T>
T* allocate(size_t n, bool zero) {
  T* p = zero ? new (std::nothrow) T[n]() : new (std::nothrow) T[n];
  if (p == nullptr) throw AllocationError(n * sizeof(T));
  return p;
}

// A grow-only, uninitialised buffer, kept per thread (thread_local) to spare the allocator.
template <typename T>
class Scratch {
 public:
  T* get(size_t n) {
    if (n > capacity_) {
      data_.reset(allocate<T>(n, false));
      capacity_ = n;
    }
    return data_.get();
  }

 private:
  std::unique_ptr<T[]> data_;
  size_t capacity_ = 0;
};

// A borrowed view of one RLE.
struct RleView {
  uint32_t h = 0, w = 0;
  const uint32_t* counts = nullptr;
  size_t m = 0;
  uint64_t pixels() const { return uint64_t(h) * w; }
};

// Lets the AVX2 paths run where the CPU has AVX2 (the default), or not: tests check the portable
// paths on any machine.
void set_simd_enabled(bool enabled);

// ValueError-style check of a mask size: 0 <= h, w and h * w < 2^32 (each side too, whatever the
// other). `what` names it in the message.
void check_size(int64_t h, int64_t w, const std::string& what);

// ---- encoding

// Upper bound on the number of counts of an h x w mask: h * w + 1.
size_t max_counts(uint64_t h, uint64_t w);

// Counts of the h x w mask whose pixel (y, x) is the byte mask[y * stride_h + x * stride_w]
// (strides in bytes, any sign; nonzero = foreground). `counts` must hold max_counts(h, w) values.
// Returns the number of counts written. Rows or columns that are contiguous take a SIMD path:
// C order (stride_w == 1) compares each row with the row above, Fortran order (stride_h == 1)
// scans each column; other strides take a scalar path.
size_t encode(const uint8_t* mask, uint32_t h, uint32_t w, int64_t stride_h, int64_t stride_w,
              uint32_t* counts);

// ---- compressed strings

// Characters needed at most for m counts (7 per count: a delta needs at most 33 bits).
size_t max_string_length(size_t m);
// Writes the compressed string of counts[0, m) to `out` (room for max_string_length(m) chars,
// no terminator); returns its length.
size_t counts_to_chars(const uint32_t* counts, size_t m, char* out);
std::string counts_to_string(const uint32_t* counts, size_t m);
// Parses a compressed string of `len` bytes into `counts` (room for max(len, 1) values); returns the
// number of counts. Throws std::invalid_argument for characters outside '0'..'o', a truncated last
// count, a count that is negative or overflows uint32, or counts not summing to h * w.
size_t string_to_counts(const char* s, size_t len, uint32_t h, uint32_t w, uint32_t* counts);
// Throws std::invalid_argument unless counts[0, m) sum to h * w.
void check_counts(const uint32_t* counts, size_t m, uint32_t h, uint32_t w);

// ---- decoding (counts must be valid)

// Writes the mask as h * w bytes (0/1) in column-major (Fortran) order.
void decode_column_major(const RleView& rle, uint8_t* out);
// Writes the mask as h * w bytes (0/1) in row-major (C) order. Long runs: a sweep over rows, each
// row the row above with the pixels where a run starts flipped; short runs: column-major decode
// into a scratch buffer, then a blocked transpose.
void decode_row_major(const RleView& rle, uint8_t* out);

// ---- measures (counts must be valid)

// Foreground pixels.
uint32_t area(const RleView& rle);
// [x, y, width, height] of the foreground as pycocotools' rleToBbox computes it; zeros when empty
// (where pycocotools' arithmetic wraps around for counts with only zero-length foreground runs).
void to_bbox(const RleView& rle, double* box);
// IoU of box lists as pycocotools' bbIou: boxes xywh, out[g * m + d] for dt d, gt g;
// a crowd gt divides by the dt area instead of the union.
void box_iou(const double* dt, size_t m, const double* gt, size_t n, const uint8_t* iscrowd,
             double* out);
// IoU of RLE lists as pycocotools' rleIou, out[g * m + d] for dt d, gt g: 0 where the boxes do not
// overlap or nothing intersects, -1 for masks of different sizes, crowd: intersection / area(dt).
// Exact on any valid counts (pycocotools' walk stops early when both lists reach zero-length runs
// at once). Spread over num_threads threads (0 = module default).
void iou(const RleView* dt, size_t m, const RleView* gt, size_t n, const uint8_t* iscrowd,
         double* out, int num_threads);
// Union (intersect = false) or intersection of rles[0, n) (n >= 1, one size) into `out`: rles[0]'s
// counts when n == 1, else the canonical counts (no zero-length run past the first) of the result,
// as pycocotools' rleMerge gives for canonical inputs (it overruns its buffer on others).
void merge(const RleView* rles, size_t n, bool intersect, std::vector<uint32_t>& out);

// ---- from other shapes

// Counts of a polygon with k vertices xy[2 * k] (x, y pixels), rasterised as pycocotools' rleFrPoly.
// Throws std::invalid_argument for non-finite coordinates or |coordinate| >= 2e8.
void from_polygon(const double* xy, size_t k, uint32_t h, uint32_t w, std::vector<uint32_t>& counts);
// Counts of the box [x, y, width, height] (the polygon through its four corners).
void from_box(const double* box, uint32_t h, uint32_t w, std::vector<uint32_t>& counts);

}  // namespace rle
}  // namespace lens_fast
