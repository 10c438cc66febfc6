// The address-based entry points of xlmr_mp._C (bound from bindings.cpp's module): the encoder
// layer, the input embeddings and the masked-LM head as single C++ calls, and the BLAS they use.
// They take raw addresses (uintptr_t) of float32 / int64 C-contiguous tensors that the Python
// wrappers (xlmr_mp/kernels/{encoder_layer,embeddings,mlm_head}_cpu.py) allocated or checked, 0 for
// an absent optional one: a call passes about 20 of them, and an int argument costs a small fraction
// of what a numpy view does (bench/results/README.md).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <array>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "blas_cpu.h"
#include "embeddings_cpu.h"
#include "encoder_layer_cpu.h"
#include "mlm_head_cpu.h"
#include "small_gemm_cpu.h"

namespace py = pybind11;
using namespace xlmr_mp;

namespace {

using Addr = std::uintptr_t;
template <typename T>
T* at(Addr a) { return reinterpret_cast<T*>(a); }

LayerShape layer_shape(const std::array<int64_t, 5>& d) {
  require_cpu_kernels("encoder_layer");
  for (int64_t v : d)
    if (v < 1) throw std::invalid_argument("encoder_layer: shape (B, S, H, heads, F) must be positive");
  return LayerShape{d[0], d[1], d[2], d[3], d[4]};
}

// Each layer's twelve parameters (T = const float) or gradients (T = float) from their addresses,
// 12 a layer in LayerTensors order.
template <typename T>
std::vector<LayerTensors<T>> layer_tensors(const std::vector<Addr>& a, int layers) {
  if (layers < 1) throw std::invalid_argument("encoder: layers must be >= 1, got " + std::to_string(layers));
  if (static_cast<int64_t>(a.size()) != 12 * int64_t(layers))
    throw std::invalid_argument("encoder: " + std::to_string(a.size()) + " parameter addresses for " +
                                std::to_string(layers) + " layers (12 a layer)");
  for (Addr v : a)
    if (!v) throw std::invalid_argument("encoder: a parameter address is 0 (every weight and bias is needed)");
  std::vector<LayerTensors<T>> out(layers);
  for (int l = 0; l < layers; ++l) {
    const Addr* q = a.data() + 12 * l;
    out[l] = LayerTensors<T>{at<T>(q[0]), at<T>(q[1]), at<T>(q[2]), at<T>(q[3]), at<T>(q[4]),  at<T>(q[5]),
                             at<T>(q[6]), at<T>(q[7]), at<T>(q[8]), at<T>(q[9]), at<T>(q[10]), at<T>(q[11])};
  }
  return out;
}

// Per layer its dropout mask (0: none); all 0: null.
std::vector<const float*> masks(const std::vector<Addr>& a, int layers) {
  if (a.empty()) return {};
  if (static_cast<int64_t>(a.size()) != layers)
    throw std::invalid_argument("encoder: " + std::to_string(a.size()) + " mask addresses for " +
                                std::to_string(layers) + " layers (one a layer, 0 for none)");
  std::vector<const float*> out(layers);
  for (int l = 0; l < layers; ++l) out[l] = at<const float>(a[l]);
  return out;
}

const float* const* or_null(const std::vector<const float*>& v) { return v.empty() ? nullptr : v.data(); }

void py_encoder_forward(const std::array<int64_t, 5>& shape, int layers, Addr x, Addr key_bias,
                        const std::vector<Addr>& params, const std::vector<Addr>& keep_a,
                        const std::vector<Addr>& keep_f, double eps, Addr ws, Addr out, int threads) {
  const LayerShape s = layer_shape(shape);
  const auto p = layer_tensors<const float>(params, layers);
  const auto ka = masks(keep_a, layers), kf = masks(keep_f, layers);
  py::gil_scoped_release nogil;
  encoder_forward(s, layers, at<const float>(x), at<const float>(key_bias), p.data(), or_null(ka), or_null(kf),
                  static_cast<float>(eps), at<float>(ws), at<float>(out), threads);
}

void py_encoder_backward(const std::array<int64_t, 5>& shape, int layers, Addr grad_out, Addr x,
                         const std::vector<Addr>& params, const std::vector<Addr>& keep_a,
                         const std::vector<Addr>& keep_f, Addr ws, Addr dx, const std::vector<Addr>& grads,
                         int threads, bool accumulate) {
  const LayerShape s = layer_shape(shape);
  const auto p = layer_tensors<const float>(params, layers);
  const auto g = layer_tensors<float>(grads, layers);
  const auto ka = masks(keep_a, layers), kf = masks(keep_f, layers);
  py::gil_scoped_release nogil;
  encoder_backward(s, layers, at<const float>(grad_out), at<const float>(x), p.data(), or_null(ka), or_null(kf),
                   at<const float>(ws), at<float>(dx), g.data(), accumulate, threads);
}

py::tuple py_mlm_head_loss_labels(const std::array<int64_t, 4>& shape, Addr h, Addr labels, int64_t ignore,
                                  int64_t offset, const std::array<Addr, 6>& params, double eps,
                                  const std::array<Addr, 7>& grads, int threads) {
  require_cpu_kernels("mlm_head_loss_labels");
  for (int i = 0; i < 4; ++i)
    if (shape[i] < 1) throw std::invalid_argument("mlm_head_loss_labels: shape (T, H, V, chunk) must be positive");
  for (int i = 0; i < 5; ++i)
    if (!params[i]) throw std::invalid_argument("mlm_head_loss_labels: a parameter address is 0 (only the decoder bias may be)");
  const HeadShape s{0, shape[1], shape[2], shape[3]};
  const HeadParams p{at<const float>(params[0]), at<const float>(params[1]), at<const float>(params[2]),
                     at<const float>(params[3]), at<const float>(params[4]), at<const float>(params[5])};
  const HeadGrads g{at<float>(grads[0]), at<float>(grads[1]), at<float>(grads[2]), at<float>(grads[3]),
                    at<float>(grads[4]), at<float>(grads[5]), at<float>(grads[6])};
  int64_t count = 0;
  double total;
  {
    py::gil_scoped_release nogil;
    total = mlm_head_loss_labels(s, shape[0], at<const float>(h), at<const int64_t>(labels), ignore, offset, p,
                                 static_cast<float>(eps), g, threads, &count);
  }
  return py::make_tuple(total, count);
}

EmbeddingShape embedding_shape(const std::array<int64_t, 6>& d) {
  require_cpu_kernels("embeddings");
  for (int i = 0; i < 5; ++i)
    if (d[i] < 1) throw std::invalid_argument("embeddings: shape (B, S, H, vocab, positions, pad) must be positive");
  return EmbeddingShape{d[0], d[1], d[2], d[3], d[4], d[5]};
}

void py_embeddings_forward(const std::array<int64_t, 6>& shape, Addr ids, const std::array<Addr, 5>& params,
                           Addr keep, double eps, const std::array<Addr, 5>& outputs, int threads) {
  const EmbeddingShape s = embedding_shape(shape);
  for (Addr a : params)
    if (!a) throw std::invalid_argument("embeddings_forward: a parameter address is 0");
  py::gil_scoped_release nogil;
  embeddings_forward(s, at<const int64_t>(ids), at<const float>(params[0]), at<const float>(params[1]),
                     at<const float>(params[2]), at<const float>(params[3]), at<const float>(params[4]),
                     at<const float>(keep), static_cast<float>(eps), at<int64_t>(outputs[0]), at<float>(outputs[1]),
                     at<float>(outputs[2]), at<float>(outputs[3]), at<float>(outputs[4]), threads);
}

void py_embeddings_backward(const std::array<int64_t, 6>& shape, Addr grad, Addr ids, Addr pos, Addr keep,
                            Addr ln_weight, const std::array<Addr, 3>& saved, const std::array<Addr, 4>& grads,
                            int threads) {
  const EmbeddingShape s = embedding_shape(shape);
  py::gil_scoped_release nogil;
  embeddings_backward(s, at<const float>(grad), at<const int64_t>(ids), at<const int64_t>(pos), at<const float>(keep),
                      at<const float>(ln_weight), at<const float>(saved[0]), at<const float>(saved[1]),
                      at<const float>(saved[2]), at<float>(grads[0]), at<float>(grads[1]), at<float>(grads[2]),
                      at<float>(grads[3]), threads);
}

}  // namespace

void bind_cpu_fast_path(py::module_& m) {
  m.def("set_blas_sgemm", [](Addr fn) { set_blas_sgemm(reinterpret_cast<SgemmFn>(fn)); }, py::arg("address"),
        "The encoder layer's GEMM: the address of the Fortran BLAS sgemm_ (LP64) torch itself calls.");
  m.def("scratch_kept_floats", &scratch_kept_floats, py::arg("slot"),
        "Floats the calling thread keeps in scratch slot (0 layer, 1 head, 2 embeddings, 3 layer gradient parts, 4 transposed weights, 5 head gradient parts) "
        "between calls.");
  m.def("blas_sgemm_selftest", &blas_sgemm_selftest,
        "One small product through the sgemm set against plain loops (False: none set, or another ABI).");
  m.def("encoder_workspace_floats", [](const std::array<int64_t, 5>& d, int layers) {
          return encoder_workspace_floats(LayerShape{d[0], d[1], d[2], d[3], d[4]}, layers); },
        py::arg("shape"), py::arg("layers"),
        "Floats of encoder_forward's saved activations for `layers` layers of shape (B, S, H, heads, F).");
  m.def("small_gemm", [](bool ta, int64_t M, int64_t N, int64_t K, Addr a, int64_t lda, Addr b, int64_t ldb,
                         bool accumulate, Addr c, int64_t ldc, Addr bias) {
          require_cpu_kernels("small_gemm");
          if (M < 0 || N < 0 || K < 0) throw std::invalid_argument("small_gemm: M, N, K must be >= 0");
          small_gemm(ta, M, N, K, at<const float>(a), lda, at<const float>(b), ldb, accumulate, at<float>(c), ldc,
                     at<const float>(bias));
        }, py::arg("ta"), py::arg("M"), py::arg("N"), py::arg("K"), py::arg("a"), py::arg("lda"), py::arg("b"),
        py::arg("ldb"), py::arg("accumulate"), py::arg("c"), py::arg("ldc"), py::arg("bias"),
        "Row-major C [M, N] = op(A) B (+ bias) (+ C with accumulate), op(A) = A [M, K] or (ta) A [K, M]^T, "
        "B [K, N]: the encoder layer's single-threaded register-tiled GEMM (addresses; bias 0 for none).");
  m.def("encoder_small_products", [](const std::array<int64_t, 5>& d, int layers, int threads, bool backward) {
          return encoder_small_products(LayerShape{d[0], d[1], d[2], d[3], d[4]}, layers, threads, backward); },
        py::arg("shape"), py::arg("layers"), py::arg("threads"), py::arg("backward"),
        "Whether a call of `layers` layers of shape (B, S, H, heads, F) at `threads` threads runs its products "
        "through small_gemm (else the BLAS sgemm).");
  m.def("encoder_parts", [](const std::array<int64_t, 5>& d, int layers, int threads, bool backward) {
          return encoder_parts(LayerShape{d[0], d[1], d[2], d[3], d[4]}, layers, threads, backward); },
        py::arg("shape"), py::arg("layers"), py::arg("threads"), py::arg("backward"),
        "Parts (ranges of batch rows, one a thread) a call of `layers` layers of shape (B, S, H, heads, F) is cut "
        "into; 1: one pass with threaded kernels and GEMMs.");
  m.def("encoder_forward", &py_encoder_forward, py::arg("shape"), py::arg("layers"), py::arg("x"),
        py::arg("key_bias"), py::arg("params"), py::arg("keep_a"), py::arg("keep_f"), py::arg("eps"), py::arg("ws"),
        py::arg("out"), py::arg("threads") = 1,
        "Internal (addresses of float32 C-contiguous tensors): `layers` post-LN encoder layers' forward, out [B*S, H] "
        "from x, params 12 a layer, keep_a / keep_f one mask a layer (0: none) or empty, workspace ws "
        "(encoder_workspace_floats) for the backward. See csrc/encoder_layer_cpu.h.");
  m.def("encoder_backward", &py_encoder_backward, py::arg("shape"), py::arg("layers"), py::arg("grad_out"),
        py::arg("x"), py::arg("params"), py::arg("keep_a"), py::arg("keep_f"), py::arg("ws"), py::arg("dx"),
        py::arg("grads"), py::arg("threads") = 1, py::arg("accumulate") = false,
        "Internal (addresses): dx and every layer's twelve parameter gradients (written, or added to with "
        "accumulate) of encoder_forward.");
  m.def("embeddings_forward", &py_embeddings_forward, py::arg("shape"), py::arg("ids"), py::arg("params"),
        py::arg("keep"), py::arg("eps"), py::arg("outputs"), py::arg("threads") = 1,
        "Internal (addresses): keep * LayerNorm(word[ids] + token_type + position[pos(ids)]); outputs (pos, y, out, "
        "mean, rstd). See csrc/embeddings_cpu.h.");
  m.def("embeddings_backward", &py_embeddings_backward, py::arg("shape"), py::arg("grad"), py::arg("ids"),
        py::arg("pos"), py::arg("keep"), py::arg("ln_weight"), py::arg("saved"), py::arg("grads"),
        py::arg("threads") = 1,
        "Internal (addresses): the word and position gradients (added to) and the LayerNorm's (written).");
  m.def("mlm_head_parts", &mlm_head_parts, py::arg("rows"), py::arg("hidden"), py::arg("vocab"), py::arg("threads"),
        "Parts (one a thread) mlm_head_loss_labels cuts `rows` masked rows into, with gradients.");
  m.def("mlm_head_loss_labels", &py_mlm_head_loss_labels, py::arg("shape"), py::arg("h"), py::arg("labels"),
        py::arg("ignore"), py::arg("offset"), py::arg("params"), py::arg("eps"), py::arg("grads"),
        py::arg("threads") = 1,
        "Internal (addresses): mlm_head_loss over the rows of h [T, H] whose label != ignore (gathered here), "
        "grads[0] the whole dh [T, H]; returns (loss sum, masked rows). See csrc/mlm_head_cpu.h.");
}
