// Python bindings of the COCO RLE core (rle.h): the rle_* functions of lens_fast._C, wrapped and
// validated by lens_fast/rle.py. Masks arrive as raw pointers with shapes and strides in bytes;
// RLE objects (dicts with 'size' and 'counts') are parsed here once, into an RleList.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <functional>
#include <stdexcept>
#include <string>
#include <tuple>
#include <vector>

#include "bindings.h"
#include "parallel.h"
#include "rle.h"
#include "rle_kernels.h"
#ifdef LENS_FAST_WITH_CUDA
#include "rle_cuda.h"
#endif

namespace lens_fast {
namespace rle {
namespace {

namespace py = pybind11;

// Parsed RLEs, all counts in one array.
struct RleList {
  std::vector<uint32_t> h, w;
  std::vector<size_t> begin, m;
  std::unique_ptr<uint32_t[]> data;
  size_t size() const { return h.size(); }
  RleView view(size_t i) const { return {h[i], w[i], data.get() + begin[i], m[i]}; }
  // (h, w) shared by every RLE; ValueError naming `name` otherwise.
  std::pair<uint32_t, uint32_t> common_size(const std::string& name) const {
    for (size_t i = 1; i < size(); ++i) {
      if (h[i] != h[0] || w[i] != w[0]) {
        throw py::value_error(name + ": all RLEs must have one size, got [" + std::to_string(h[0]) +
                              ", " + std::to_string(w[0]) + "] at index 0 and [" +
                              std::to_string(h[i]) + ", " + std::to_string(w[i]) + "] at index " +
                              std::to_string(i));
      }
    }
    return size() ? std::make_pair(h[0], w[0]) : std::make_pair(0u, 0u);
  }
};

std::string type_name(PyObject* obj) { return Py_TYPE(obj)->tp_name; }

// The value of `index`, a new reference to an int (released here); ValueError beyond 64 bits.
int64_t take_int64(PyObject* index, const std::string& what) {
  const py::object owned = py::reinterpret_steal<py::object>(index);
  const long long value = PyLong_AsLongLong(index);
  if (value == -1 && PyErr_Occurred()) {
    PyErr_Clear();
    throw py::value_error(what + " is out of range (it does not fit in 64 bits)");
  }
  return value;
}

int64_t to_int(PyObject* obj, const std::string& what) {
  PyObject* index = PyNumber_Index(obj);
  if (index == nullptr) {
    PyErr_Clear();
    throw py::type_error(what + " must be an integer, got " + type_name(obj));
  }
  return take_int64(index, what);
}

// One side (h or w) of a mask size, read as pycocotools reads it: an integer, or a real number
// (float, numpy float, Decimal, ...) truncated toward zero, as annotation files converted from
// other formats store heights and widths. NaN, infinities, negative values and values of 2^32 or
// more are a ValueError (pycocotools raises on most of them, but turns -0.5 into 0 and accepts
// 2^32, whose counts no longer fit); strings and other types a TypeError.
int64_t to_side(PyObject* obj, const std::string& what) {
  PyObject* index = PyNumber_Index(obj);
  if (index != nullptr) return take_int64(index, what);
  PyErr_Clear();
  const PyNumberMethods* number = Py_TYPE(obj)->tp_as_number;
  if (number == nullptr || number->nb_float == nullptr) {  // no __float__: str, None, ...
    throw py::type_error(what + " must be an integer or a real number, got " + type_name(obj));
  }
  const double value = PyFloat_AsDouble(obj);
  if (value == -1.0 && PyErr_Occurred()) {
    PyErr_Clear();
    throw py::type_error(what + " must be an integer or a real number, got " + type_name(obj));
  }
  if (!(value >= 0 && value < 4294967296.0)) {  // also NaN
    throw py::value_error(what + " = " + std::to_string(value) + " must be a number in [0, 2^32)");
  }
  return int64_t(value);
}

// (h, w) of a mask from two Python numbers (to_side), checked by check_size (ValueError naming `what`).
std::pair<uint32_t, uint32_t> to_size(PyObject* h, PyObject* w, const std::string& h_name,
                                      const std::string& w_name, const std::string& what) {
  const int64_t hv = to_side(h, h_name), wv = to_side(w, w_name);
  check_size(hv, wv, what);
  return {uint32_t(hv), uint32_t(wv)};
}

// Calls f(item) (an owned reference) for the items of an iterable, in order, while f returns true;
// false (error cleared) when obj is not iterable. len() is never asked, not even as a size hint,
// and nothing is sized from it. An exception raised by the iteration itself propagates.
template <typename F>
bool for_each_item(PyObject* obj, F&& f) {
  const py::object iterator = py::reinterpret_steal<py::object>(PyObject_GetIter(obj));
  if (!iterator) {
    PyErr_Clear();
    return false;
  }
  while (PyObject* item = PyIter_Next(iterator.ptr())) {
    if (!f(py::reinterpret_steal<py::object>(item))) break;
  }
  if (PyErr_Occurred()) throw py::error_already_set();
  return true;
}

// Appends uncompressed counts (an integer ndarray or any iterable of ints) to `out`; returns how
// many. Their number is the array's own size or what iteration gave, never len(): nothing is sized
// before Python code (__len__, __iter__, __index__) has run.
size_t read_count_list(PyObject* counts, const std::string& what, std::vector<uint32_t>& out) {
  const size_t first = out.size();
  auto put = [&](int64_t value) {
    if (value < 0 || value > int64_t(UINT32_MAX)) {
      throw py::value_error(what + "[" + std::to_string(out.size() - first) + "] = " +
                            std::to_string(value) + " is outside [0, 2^32)");
    }
    out.push_back(uint32_t(value));
  };
  if (py::isinstance<py::array>(counts)) {
    auto array = py::reinterpret_borrow<py::array>(counts);
    const char kind = array.dtype().kind();
    if ((kind != 'i' && kind != 'u') || array.ndim() != 1) {
      throw py::type_error(what + " must be 1-D integers, got dtype " +
                           std::string(py::str(array.dtype())) + " with " +
                           std::to_string(array.ndim()) + " dims");
    }
    // A base-class C-contiguous int64 copy or view: its size is the buffer's, whatever a subclass says.
    auto values = py::array_t<int64_t, py::array::c_style | py::array::forcecast>::ensure(array);
    if (!values) throw py::error_already_set();
    const int64_t* v = values.data();
    const size_t n = size_t(values.size());
    out.reserve(first + n);
    for (size_t j = 0; j < n; ++j) put(v[j]);
    return n;
  }
  const bool iterable = for_each_item(counts, [&](const py::object& item) {
    put(to_int(item.ptr(), what + "[" + std::to_string(out.size() - first) + "]"));
    return true;
  });
  if (!iterable) {
    throw py::type_error(what + " must be bytes, str or a list of ints, got " + type_name(counts));
  }
  return out.size() - first;
}

// dict[key] as an owned reference (null when absent), taken before any other Python code runs.
py::object dict_item(PyObject* dict, const char* key) {
  return py::reinterpret_borrow<py::object>(PyDict_GetItemString(dict, key));
}

// Parses a list of RLE dicts; counts may be compressed (bytes or str) or a list of ints. Errors
// name the argument `name` and the index.
RleList parse_rles(py::handle objs, const std::string& name, int num_threads) {
  std::vector<py::object> items;  // owned: Python code run below cannot free them
  if (!for_each_item(objs.ptr(), [&](py::object item) {
        items.push_back(std::move(item));
        return true;
      })) {
    throw py::type_error(name + " must be a list of RLE dicts, got " + type_name(objs.ptr()));
  }
  const size_t n = items.size();
  RleList rles;
  rles.h.resize(n);
  rles.w.resize(n);
  rles.begin.resize(n);
  rles.m.resize(n);
  struct Source {
    const char* text = nullptr;  // compressed counts, or nullptr for counts read into `listed`
    size_t length = 0;           // characters, or counts
    size_t listed_begin = 0;     // where in `listed` the counts are
  };
  std::vector<Source> sources(n);
  std::vector<py::object> keep_alive(n);  // the counts objects (immutable text), while the GIL is released
  std::vector<uint32_t> listed;           // uncompressed counts, read in full before anything is sized
  size_t total = 0;
  for (size_t i = 0; i < n; ++i) {
    const std::string where = name + "[" + std::to_string(i) + "]";
    PyObject* obj = items[i].ptr();
    if (!PyDict_Check(obj)) {
      throw py::type_error(where + " must be a dict with 'size' and 'counts', got " + type_name(obj));
    }
    // Owned before any other Python code runs (an __index__ below may change the dict).
    const py::object size = dict_item(obj, "size");
    keep_alive[i] = dict_item(obj, "counts");
    PyObject* counts = keep_alive[i].ptr();
    if (!size || counts == nullptr) {
      throw py::value_error(where + " must have keys 'size' and 'counts'");
    }
    std::vector<py::object> hw;  // up to 3 items: a third says the size is not [h, w]
    const bool iterable = for_each_item(size.ptr(), [&](py::object item) {
      hw.push_back(std::move(item));
      return hw.size() < 3;
    });
    if (!iterable || hw.size() != 2) throw py::value_error(where + "['size'] must be [h, w]");
    std::tie(rles.h[i], rles.w[i]) = to_size(hw[0].ptr(), hw[1].ptr(), where + "['size'][0]",
                                             where + "['size'][1]", where + "['size']");
    Source& source = sources[i];
    if (PyBytes_Check(counts)) {
      source.text = PyBytes_AS_STRING(counts);
      source.length = size_t(PyBytes_GET_SIZE(counts));
    } else if (PyUnicode_Check(counts)) {
      Py_ssize_t length = 0;
      source.text = PyUnicode_AsUTF8AndSize(counts, &length);
      if (source.text == nullptr) {
        PyErr_Clear();
        throw py::value_error(where + "['counts'] is not valid text");
      }
      source.length = size_t(length);
    } else {
      source.listed_begin = listed.size();
      source.length = read_count_list(counts, where + "['counts']", listed);
      try {
        check_counts(listed.data() + source.listed_begin, source.length, rles.h[i], rles.w[i]);
      } catch (const std::invalid_argument& e) {
        throw py::value_error(where + "['counts']: " + e.what());
      }
      rles.m[i] = source.length;
    }
    rles.begin[i] = total;
    total += std::max<size_t>(source.length, 1);
  }
  rles.data.reset(allocate<uint32_t>(std::max<size_t>(total, 1), false));
  for (size_t i = 0; i < n; ++i) {
    if (sources[i].text != nullptr) continue;
    const uint32_t* from = listed.data() + sources[i].listed_begin;
    std::copy(from, from + sources[i].length, rles.data.get() + rles.begin[i]);
  }
  py::gil_scoped_release release;
  parallel_for(int64_t(n), num_threads, [&](int64_t i) {
    const Source& source = sources[i];
    if (source.text == nullptr) return;
    try {
      rles.m[i] = string_to_counts(source.text, source.length, rles.h[i], rles.w[i],
                                   rles.data.get() + rles.begin[i]);
    } catch (const std::invalid_argument& e) {
      throw std::invalid_argument(name + "[" + std::to_string(i) + "]['counts']: " + e.what());
    }
  });
  return rles;
}

py::dict make_rle(uint32_t h, uint32_t w, const char* text, size_t length) {
  py::dict rle;
  py::list size(2);
  size[0] = py::int_(h);
  size[1] = py::int_(w);
  rle["size"] = size;
  rle["counts"] = py::bytes(text, length);
  return rle;
}

py::dict make_rle(uint32_t h, uint32_t w, const std::vector<uint32_t>& counts) {
  const std::string text = counts_to_string(counts.data(), counts.size());
  return make_rle(h, w, text.data(), text.size());
}

// Compresses n h x w RLEs into dicts, in parallel: counts_of(i, scratch) gives mask i's counts,
// written to `scratch` (a per-thread buffer it sizes) or found elsewhere.
py::list compress_all(int64_t n, uint32_t h, uint32_t w, int num_threads,
                      const std::function<RleView(int64_t, Scratch<uint32_t>&)>& counts_of) {
  std::vector<std::string> texts(size_t(std::max<int64_t>(n, 0)));
  {
    py::gil_scoped_release release;
    parallel_for(n, num_threads, [&](int64_t i) {
      thread_local Scratch<uint32_t> counts_buffer;
      thread_local Scratch<char> text_buffer;
      const RleView r = counts_of(i, counts_buffer);
      char* text = text_buffer.get(max_string_length(r.m));
      texts[size_t(i)].assign(text, counts_to_chars(r.counts, r.m, text));
    });
  }
  py::list out(texts.size());
  for (size_t i = 0; i < texts.size(); ++i) out[i] = make_rle(h, w, texts[i].data(), texts[i].size());
  return out;
}

py::list encode_binding(uintptr_t data, int64_t n, int64_t h, int64_t w, int64_t stride_n,
                        int64_t stride_h, int64_t stride_w, int num_threads) {
  check_size(h, w, "masks (h, w)");
  const auto* masks = reinterpret_cast<const uint8_t*>(data);
  const uint32_t hu = uint32_t(h), wu = uint32_t(w);
  return compress_all(n, hu, wu, num_threads, [&](int64_t i, Scratch<uint32_t>& scratch) {
    uint32_t* counts = scratch.get(max_counts(hu, wu));
    return RleView{hu, wu, counts, encode(masks + i * stride_n, hu, wu, stride_h, stride_w, counts)};
  });
}

py::list to_dicts(const RleList& rles) {
  py::list out(rles.size());
  for (size_t i = 0; i < rles.size(); ++i) {
    const RleView r = rles.view(i);
    const std::string text = counts_to_string(r.counts, r.m);
    out[i] = make_rle(r.h, r.w, text.data(), text.size());
  }
  return out;
}

void decode_binding(const RleList& rles, uintptr_t out, bool column_major, int num_threads) {
  auto* masks = reinterpret_cast<uint8_t*>(out);
  const auto size = rles.common_size("rles");
  const size_t pixels = size_t(size.first) * size.second;
  py::gil_scoped_release release;
  parallel_for(int64_t(rles.size()), num_threads, [&](int64_t i) {
    if (column_major) {
      decode_column_major(rles.view(i), masks + i * pixels);
    } else {
      decode_row_major(rles.view(i), masks + i * pixels);
    }
  });
}

py::array_t<uint32_t> area_binding(const RleList& rles) {
  py::array_t<uint32_t> out(py::ssize_t(rles.size()));
  uint32_t* a = out.mutable_data();
  for (size_t i = 0; i < rles.size(); ++i) a[i] = area(rles.view(i));
  return out;
}

py::array_t<double> to_bbox_binding(const RleList& rles) {
  py::array_t<double> out({py::ssize_t(rles.size()), py::ssize_t(4)});
  double* boxes = out.mutable_data();
  for (size_t i = 0; i < rles.size(); ++i) to_bbox(rles.view(i), boxes + 4 * i);
  return out;
}

// An (m, n) float64 array in Fortran order: element (d, g) at out[g * m + d], as pycocotools.
py::array_t<double> iou_matrix(size_t m, size_t n) {
  return py::array_t<double>({py::ssize_t(m), py::ssize_t(n)},
                             {py::ssize_t(sizeof(double)), py::ssize_t(sizeof(double) * m)});
}

const uint8_t* crowd_flags(const py::array_t<uint8_t>& iscrowd, size_t n) {
  if (size_t(iscrowd.size()) != n) {
    throw py::value_error("iscrowd must have one flag per gt (" + std::to_string(n) + "), got " +
                          std::to_string(iscrowd.size()));
  }
  return iscrowd.data();
}

std::vector<RleView> views(const RleList& rles) {
  std::vector<RleView> out(rles.size());
  for (size_t i = 0; i < rles.size(); ++i) out[i] = rles.view(i);
  return out;
}

py::array_t<double> iou_binding(const RleList& dt, const RleList& gt,
                                const py::array_t<uint8_t, py::array::c_style>& iscrowd,
                                int num_threads) {
  const size_t m = dt.size(), n = gt.size();
  const uint8_t* crowd = crowd_flags(iscrowd, n);
  py::array_t<double> out = iou_matrix(m, n);
  double* o = out.mutable_data();
  const std::vector<RleView> dt_views = views(dt), gt_views = views(gt);
  py::gil_scoped_release release;
  iou(dt_views.data(), m, gt_views.data(), n, crowd, o, num_threads);
  return out;
}

py::array_t<double> box_iou_binding(const py::array_t<double, py::array::c_style>& dt,
                                    const py::array_t<double, py::array::c_style>& gt,
                                    const py::array_t<uint8_t, py::array::c_style>& iscrowd) {
  const size_t m = size_t(dt.shape(0)), n = size_t(gt.shape(0));
  const uint8_t* crowd = crowd_flags(iscrowd, n);
  py::array_t<double> out = iou_matrix(m, n);
  box_iou(dt.data(), m, gt.data(), n, crowd, out.mutable_data());
  return out;
}

py::dict merge_binding(const RleList& rles, bool intersect) {
  const auto size = rles.common_size("rleObjs");
  if (rles.size() == 0) return make_rle(0, 0, "", 0);
  std::vector<uint32_t> merged;
  merge(views(rles).data(), rles.size(), intersect, merged);
  return make_rle(size.first, size.second, merged);
}

py::list from_polygons_binding(const py::list& polygons, int64_t h, int64_t w) {
  check_size(h, w, "(h, w)");
  py::list out(polygons.size());
  std::vector<uint32_t> counts;
  for (size_t i = 0; i < polygons.size(); ++i) {
    auto xy = py::array_t<double, py::array::c_style | py::array::forcecast>::ensure(polygons[i]);
    if (!xy) {
      PyErr_Clear();
      throw py::type_error("polygon " + std::to_string(i) + " must be a sequence of numbers");
    }
    try {
      from_polygon(xy.data(), size_t(xy.size()) / 2, uint32_t(h), uint32_t(w), counts);
    } catch (const std::invalid_argument& e) {
      throw py::value_error("polygon " + std::to_string(i) + ": " + e.what());
    }
    out[i] = make_rle(uint32_t(h), uint32_t(w), counts);
  }
  return out;
}

py::list from_boxes_binding(const py::array_t<double, py::array::c_style>& boxes, int64_t h,
                            int64_t w) {
  check_size(h, w, "(h, w)");
  py::list out(size_t(boxes.shape(0)));
  std::vector<uint32_t> counts;
  for (py::ssize_t i = 0; i < boxes.shape(0); ++i) {
    try {
      from_box(boxes.data(i, 0), uint32_t(h), uint32_t(w), counts);
    } catch (const std::invalid_argument& e) {
      throw py::value_error("box " + std::to_string(i) + ": " + e.what());
    }
    out[size_t(i)] = make_rle(uint32_t(h), uint32_t(w), counts);
  }
  return out;
}

// Run ends of every RLE (running sums of its counts, the last left out), concatenated into
// ends[offsets[i], offsets[i + 1]): the input of the GPU decoder and of rle_reference_decode.
void run_ends(const RleList& rles, uint32_t* ends, int64_t* offsets) {
  offsets[0] = 0;
  for (size_t i = 0; i < rles.size(); ++i) {
    const RleView r = rles.view(i);
    uint32_t sum = 0;
    int64_t o = offsets[i];
    for (size_t k = 0; k + 1 < r.m; ++k) ends[o++] = sum += r.counts[k];
    offsets[i + 1] = o;
  }
}

size_t total_run_ends(const RleList& rles) {
  size_t total = 0;
  for (size_t i = 0; i < rles.size(); ++i) total += rles.m[i] ? rles.m[i] - 1 : 0;
  return total;
}

py::tuple run_ends_binding(const RleList& rles) {
  py::array_t<uint32_t> ends(py::ssize_t(std::max<size_t>(total_run_ends(rles), 1)));
  py::array_t<int64_t> offsets(py::ssize_t(rles.size() + 1));
  run_ends(rles, ends.mutable_data(), offsets.mutable_data());
  return py::make_tuple(ends, offsets);
}

// Counts computed elsewhere (the GPU encoder): mask i has counts[offsets[i], offsets[i + 1]).
py::list counts_to_dicts_binding(uintptr_t counts_ptr, uintptr_t offsets_ptr, int64_t n, int64_t h,
                                 int64_t w, int num_threads) {
  check_size(h, w, "(h, w)");
  const auto* all = reinterpret_cast<const uint32_t*>(counts_ptr);
  const auto* offsets = reinterpret_cast<const int64_t*>(offsets_ptr);
  const uint32_t hu = uint32_t(h), wu = uint32_t(w);
  return compress_all(n, hu, wu, num_threads, [&](int64_t i, Scratch<uint32_t>&) {
    if (offsets[i + 1] < offsets[i]) throw std::invalid_argument("counts offsets must not decrease");
    const RleView r{hu, wu, all + offsets[i], size_t(offsets[i + 1] - offsets[i])};
    check_counts(r.counts, r.m, hu, wu);
    return r;
  });
}

// The GPU encoder's four steps, run on the CPU with the same per-element functions.
py::list reference_encode(uintptr_t data, int64_t n, int64_t h, int64_t w, int64_t stride_n,
                          int64_t stride_h, int64_t stride_w, int64_t rows_per_segment) {
  namespace k = rle_kernels;
  check_size(h, w, "masks (h, w)");
  if (rows_per_segment < 1) throw py::value_error("rows_per_segment must be >= 1");
  const auto* masks = reinterpret_cast<const uint8_t*>(data);
  const int64_t segments = h > 0 ? (h + rows_per_segment - 1) / rows_per_segment : 0;
  auto mask_ref = [&](int64_t i) { return k::MaskRef{masks + i * stride_n, h, w, stride_h, stride_w}; };
  // 1. run starts per segment, indexed (mask, x, segment): column-major order.
  std::vector<int64_t> offsets(size_t(n * w * segments) + 1, 0);
  for (int64_t i = 0; i < n; ++i)
    for (int64_t x = 0; x < w; ++x)
      for (int64_t s = 0; s < segments; ++s) {
        const int64_t y0 = s * rows_per_segment, y1 = std::min(h, y0 + rows_per_segment);
        offsets[size_t((i * w + x) * segments + s) + 1] = k::segment_run_starts(mask_ref(i), x, y0, y1);
      }
  // 2. scan.
  for (size_t j = 1; j < offsets.size(); ++j) offsets[j] += offsets[j - 1];
  // 3. write the starts.
  std::vector<uint32_t> starts(size_t(std::max<int64_t>(offsets.back(), 1)));
  for (int64_t i = 0; i < n; ++i)
    for (int64_t x = 0; x < w; ++x)
      for (int64_t s = 0; s < segments; ++s) {
        const int64_t y0 = s * rows_per_segment, y1 = std::min(h, y0 + rows_per_segment);
        k::write_segment_run_starts(mask_ref(i), x, y0, y1,
                                    starts.data() + offsets[size_t((i * w + x) * segments + s)]);
      }
  // 4. run lengths: mask i owns starts [start_offsets[i], start_offsets[i + 1]) and counts
  // [count_offsets[i], count_offsets[i + 1]), one more.
  std::vector<int64_t> start_offsets(size_t(n) + 1), count_offsets(size_t(n) + 1);
  for (int64_t i = 0; i <= n; ++i) {
    start_offsets[size_t(i)] = offsets[size_t(i * w * segments)];
    count_offsets[size_t(i)] = start_offsets[size_t(i)] + i;
  }
  std::vector<uint32_t> counts(size_t(count_offsets[size_t(n)]));
  for (int64_t j = 0; j < count_offsets[size_t(n)]; ++j) {
    const int64_t i = k::segment_of(count_offsets.data(), n, j);
    counts[size_t(j)] = k::run_length(starts.data() + start_offsets[size_t(i)],
                                      start_offsets[size_t(i) + 1] - start_offsets[size_t(i)],
                                      j - count_offsets[size_t(i)], uint32_t(h * w));
  }
  return counts_to_dicts_binding(reinterpret_cast<uintptr_t>(counts.data()),
                                 reinterpret_cast<uintptr_t>(count_offsets.data()), n, h, w, 1);
}

// The GPU decoder's per-pixel rule, run on the CPU: (N, H, W) C-order bytes at `out`.
void reference_decode(const RleList& rles, uintptr_t out) {
  const auto size = rles.common_size("rles");
  const int64_t h = size.first, w = size.second;
  std::vector<uint32_t> ends(total_run_ends(rles));
  std::vector<int64_t> offsets(rles.size() + 1);
  run_ends(rles, ends.data(), offsets.data());
  auto* masks = reinterpret_cast<uint8_t*>(out);
  for (size_t i = 0; i < rles.size(); ++i) {
    const uint32_t* e = ends.data() + offsets[i];
    const int64_t m = offsets[i + 1] - offsets[i];
    for (int64_t y = 0; y < h; ++y)
      for (int64_t x = 0; x < w; ++x)
        masks[(int64_t(i) * h + y) * w + x] = rle_kernels::value_at(e, m, uint32_t(x * h + y));
  }
}

void register_rle(py::module_& m) {
  py::class_<RleList>(m, "RleList", "Parsed COCO RLEs (rle_parse).")
      .def("__len__", &RleList::size)
      .def("common_size", &RleList::common_size, py::arg("name"),
           "(h, w) shared by all RLEs; ValueError naming `name` otherwise; (0, 0) when empty.");
  m.def(
      "rle_size",
      [](py::handle h, py::handle w, const std::string& h_name, const std::string& w_name,
         const std::string& what) {
        const auto size = to_size(h.ptr(), w.ptr(), h_name, w_name, what);
        return py::make_tuple(size.first, size.second);
      },
      py::arg("h"), py::arg("w"), py::arg("h_name"), py::arg("w_name"), py::arg("what"),
      "(h, w) as ints from integers or real numbers (truncated, as pycocotools); TypeError/ValueError "
      "naming them unless 0 <= h, w, h * w < 2^32.");
  m.def("rle_parse", &parse_rles, py::arg("objs"), py::arg("name"), py::arg("num_threads") = 0,
        "Parse a list of RLE dicts (counts: bytes, str or list of ints); ValueError on bad counts.");
  m.def("rle_encode", &encode_binding, py::arg("data"), py::arg("n"), py::arg("h"), py::arg("w"),
        py::arg("stride_n"), py::arg("stride_h"), py::arg("stride_w"), py::arg("num_threads") = 0,
        "Encode n masks of h x w bytes at address data (strides in bytes) to RLE dicts.");
  m.def("rle_to_dicts", &to_dicts, py::arg("rles"), "Compressed RLE dicts of parsed RLEs.");
  m.def("rle_decode", &decode_binding, py::arg("rles"), py::arg("out"), py::arg("column_major"),
        py::arg("num_threads") = 0,
        "Decode RLEs of one size into n * h * w bytes at address out, each mask in column-major "
        "(Fortran) or row-major (C) order.");
  m.def("rle_area", &area_binding, py::arg("rles"));
  m.def("rle_to_bbox", &to_bbox_binding, py::arg("rles"));
  m.def("rle_iou", &iou_binding, py::arg("dt"), py::arg("gt"), py::arg("iscrowd"),
        py::arg("num_threads") = 0);
  m.def("rle_box_iou", &box_iou_binding, py::arg("dt"), py::arg("gt"), py::arg("iscrowd"));
  m.def("rle_merge", &merge_binding, py::arg("rles"), py::arg("intersect"));
  m.def("rle_from_polygons", &from_polygons_binding, py::arg("polygons"), py::arg("h"), py::arg("w"));
  m.def("rle_from_boxes", &from_boxes_binding, py::arg("boxes"), py::arg("h"), py::arg("w"));
  m.def("rle_run_ends", &run_ends_binding, py::arg("rles"));
  m.def("rle_counts_to_dicts", &counts_to_dicts_binding, py::arg("counts"), py::arg("offsets"),
        py::arg("n"), py::arg("h"), py::arg("w"), py::arg("num_threads") = 0);
  m.def("rle_set_simd", &set_simd_enabled, py::arg("enabled"),
        "Use the AVX2 paths where the CPU has AVX2 (True, the default) or the portable ones (tests).");
  m.def("rle_reference_encode", &reference_encode, py::arg("data"), py::arg("n"), py::arg("h"),
        py::arg("w"), py::arg("stride_n"), py::arg("stride_h"), py::arg("stride_w"),
        py::arg("rows_per_segment"),
        "The GPU encoder's steps (csrc/rle_kernels.h) run on the CPU, for tests.");
  m.def("rle_reference_decode", &reference_decode, py::arg("rles"), py::arg("out"),
        "The GPU decoder's per-pixel rule (csrc/rle_kernels.h) run on the CPU, for tests.");
#ifdef LENS_FAST_WITH_CUDA
  m.def("rle_cuda_count_segments", &rle_cuda::count_segment_run_starts);
  m.def("rle_cuda_write_segments", &rle_cuda::write_segment_run_starts);
  m.def("rle_cuda_run_lengths", &rle_cuda::run_lengths);
  m.def("rle_cuda_decode", &rle_cuda::decode);
#endif
}

LENS_FAST_REGISTER(register_rle)

}  // namespace
}  // namespace rle
}  // namespace lens_fast
