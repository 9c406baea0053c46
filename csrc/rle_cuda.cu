// CUDA COCO RLE: encode (N, H, W) masks to counts and decode counts to (N, H, W) masks on the GPU.
// One thread per column segment (encode) or per pixel (decode); the per-element logic lives in
// csrc/rle_kernels.h, which the CPU tests also drive (rle_reference_encode / rle_reference_decode).
#include <cuda_runtime.h>

#include <climits>
#include <stdexcept>
#include <string>

#include "rle_cuda.h"
#include "rle_kernels.h"

namespace lens_fast {
namespace rle_cuda {

namespace {

namespace k = rle_kernels;

constexpr int kThreads = 256;

// Thread t handles (mask, segment, x) with x fastest, so that a warp reads one row of a C-ordered
// mask; the segment's index in column-major order is (mask, x, segment).
struct SegmentIndex {
  int64_t mask, x, y0, y1, slot;
};

__device__ __forceinline__ bool segment_of_thread(int64_t t, int64_t n, int64_t h, int64_t w,
                                                  int64_t rows_per_segment, SegmentIndex& s) {
  const int64_t segments = (h + rows_per_segment - 1) / rows_per_segment;
  if (t >= n * segments * w) return false;
  s.x = t % w;
  const int64_t segment = (t / w) % segments;
  s.mask = t / (w * segments);
  s.y0 = segment * rows_per_segment;
  s.y1 = min(h, s.y0 + rows_per_segment);
  s.slot = (s.mask * w + s.x) * segments + segment;
  return true;
}

__global__ void count_segments_kernel(const uint8_t* masks, int64_t n, int64_t h, int64_t w,
                                      int64_t stride_n, int64_t stride_h, int64_t stride_w,
                                      int64_t rows_per_segment, int32_t* segment_counts) {
  SegmentIndex s;
  const int64_t t = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (!segment_of_thread(t, n, h, w, rows_per_segment, s)) return;
  const k::MaskRef mask{masks + s.mask * stride_n, h, w, stride_h, stride_w};
  segment_counts[s.slot] = int32_t(k::segment_run_starts(mask, s.x, s.y0, s.y1));
}

__global__ void write_segments_kernel(const uint8_t* masks, int64_t n, int64_t h, int64_t w,
                                      int64_t stride_n, int64_t stride_h, int64_t stride_w,
                                      int64_t rows_per_segment, const int64_t* segment_offsets,
                                      uint32_t* starts) {
  SegmentIndex s;
  const int64_t t = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (!segment_of_thread(t, n, h, w, rows_per_segment, s)) return;
  const k::MaskRef mask{masks + s.mask * stride_n, h, w, stride_h, stride_w};
  k::write_segment_run_starts(mask, s.x, s.y0, s.y1, starts + segment_offsets[s.slot]);
}

__global__ void run_lengths_kernel(const uint32_t* starts, const int64_t* start_offsets,
                                   const int64_t* count_offsets, int64_t n, int64_t total_counts,
                                   uint32_t pixels, uint32_t* counts) {
  const int64_t j = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (j >= total_counts) return;
  const int64_t i = k::segment_of(count_offsets, n, j);
  counts[j] = k::run_length(starts + start_offsets[i], start_offsets[i + 1] - start_offsets[i],
                            j - count_offsets[i], pixels);
}

__global__ void decode_kernel(const uint32_t* ends, const int64_t* end_offsets, int64_t n, int64_t h,
                              int64_t w, uint8_t* out) {
  const int64_t t = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  const int64_t pixels = h * w;
  if (t >= n * pixels) return;
  const int64_t i = t / pixels, r = t % pixels, y = r / w, x = r % w;
  out[t] = k::value_at(ends + end_offsets[i], end_offsets[i + 1] - end_offsets[i],
                       uint32_t(x * h + y));
}

// Blocks of kThreads for `items` threads; beyond the grid's 2^31 - 1 blocks a ValueError, not a
// grid silently cut short by the conversion to unsigned.
unsigned blocks_for(int64_t items) {
  const int64_t blocks = (items + kThreads - 1) / kThreads;
  if (blocks > int64_t(INT32_MAX)) {
    throw std::length_error("lens_fast rle CUDA: " + std::to_string(items) +
                            " threads exceed one launch (2^31 - 1 blocks of " + std::to_string(kThreads) + ")");
  }
  return unsigned(blocks);
}

cudaStream_t as_stream(uintptr_t stream) { return reinterpret_cast<cudaStream_t>(stream); }

void check_launch(const char* kernel) {
  const cudaError_t error = cudaGetLastError();
  if (error != cudaSuccess) {
    throw std::runtime_error(std::string("lens_fast rle CUDA kernel ") + kernel + " failed: " +
                             cudaGetErrorString(error));
  }
}

}  // namespace

void count_segment_run_starts(uintptr_t masks, int64_t n, int64_t h, int64_t w, int64_t stride_n,
                              int64_t stride_h, int64_t stride_w, int64_t rows_per_segment,
                              uintptr_t segment_counts, uintptr_t stream) {
  const int64_t threads = n * w * ((h + rows_per_segment - 1) / rows_per_segment);
  if (threads == 0) return;
  count_segments_kernel<<<blocks_for(threads), kThreads, 0, as_stream(stream)>>>(
      reinterpret_cast<const uint8_t*>(masks), n, h, w, stride_n, stride_h, stride_w,
      rows_per_segment, reinterpret_cast<int32_t*>(segment_counts));
  check_launch("count_segments");
}

void write_segment_run_starts(uintptr_t masks, int64_t n, int64_t h, int64_t w, int64_t stride_n,
                              int64_t stride_h, int64_t stride_w, int64_t rows_per_segment,
                              uintptr_t segment_offsets, uintptr_t starts, uintptr_t stream) {
  const int64_t threads = n * w * ((h + rows_per_segment - 1) / rows_per_segment);
  if (threads == 0) return;
  write_segments_kernel<<<blocks_for(threads), kThreads, 0, as_stream(stream)>>>(
      reinterpret_cast<const uint8_t*>(masks), n, h, w, stride_n, stride_h, stride_w,
      rows_per_segment, reinterpret_cast<const int64_t*>(segment_offsets),
      reinterpret_cast<uint32_t*>(starts));
  check_launch("write_segments");
}

void run_lengths(uintptr_t starts, uintptr_t start_offsets, uintptr_t count_offsets, int64_t n,
                 int64_t total_counts, int64_t pixels, uintptr_t counts, uintptr_t stream) {
  if (total_counts == 0) return;
  run_lengths_kernel<<<blocks_for(total_counts), kThreads, 0, as_stream(stream)>>>(
      reinterpret_cast<const uint32_t*>(starts), reinterpret_cast<const int64_t*>(start_offsets),
      reinterpret_cast<const int64_t*>(count_offsets), n, total_counts, uint32_t(pixels),
      reinterpret_cast<uint32_t*>(counts));
  check_launch("run_lengths");
}

void decode(uintptr_t ends, uintptr_t end_offsets, int64_t n, int64_t h, int64_t w, uintptr_t out,
            uintptr_t stream) {
  const int64_t items = n * h * w;
  if (items == 0) return;
  decode_kernel<<<blocks_for(items), kThreads, 0, as_stream(stream)>>>(
      reinterpret_cast<const uint32_t*>(ends), reinterpret_cast<const int64_t*>(end_offsets), n, h, w,
      reinterpret_cast<uint8_t*>(out));
  check_launch("decode");
}

}  // namespace rle_cuda
}  // namespace lens_fast
