// Host entry points of the CUDA COCO RLE kernels (csrc/rle_cuda.cu), built with LENS_FAST_WITH_CUDA.
// Pointers are device addresses of torch-allocated buffers, passed as integers; `stream` is the
// cudaStream_t to launch on. Masks are n x h x w bytes with strides in bytes (nonzero = foreground).
// The per-element logic is csrc/rle_kernels.h; the steps are those of rle_reference_encode.
#pragma once

#include <cstdint>

namespace lens_fast {
namespace rle_cuda {

// Step 1: segment_counts (int32, n * w * segments, indexed (mask, x, segment)) = run starts in each
// segment of rows_per_segment rows of each column.
void count_segment_run_starts(uintptr_t masks, int64_t n, int64_t h, int64_t w, int64_t stride_n,
                              int64_t stride_h, int64_t stride_w, int64_t rows_per_segment,
                              uintptr_t segment_counts, uintptr_t stream);

// Step 3: writes each segment's run-start positions (uint32) at starts + segment_offsets[segment]
// (int64, the exclusive scan of step 1's counts).
void write_segment_run_starts(uintptr_t masks, int64_t n, int64_t h, int64_t w, int64_t stride_n,
                              int64_t stride_h, int64_t stride_w, int64_t rows_per_segment,
                              uintptr_t segment_offsets, uintptr_t starts, uintptr_t stream);

// Step 4: counts (uint32, total_counts) from the starts; mask i owns starts
// [start_offsets[i], start_offsets[i + 1]) and counts [count_offsets[i], count_offsets[i + 1])
// (int64 arrays of n + 1).
void run_lengths(uintptr_t starts, uintptr_t start_offsets, uintptr_t count_offsets, int64_t n,
                 int64_t total_counts, int64_t pixels, uintptr_t counts, uintptr_t stream);

// Decode: out (uint8, n x h x w, C order) from run ends (uint32; mask i owns
// ends[end_offsets[i], end_offsets[i + 1]), int64 offsets of n + 1).
void decode(uintptr_t ends, uintptr_t end_offsets, int64_t n, int64_t h, int64_t w, uintptr_t out,
            uintptr_t stream);

}  // namespace rle_cuda
}  // namespace lens_fast
