// The single pybind11 module xlmr_mp._C: the C++ side of the data pipeline's index building.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "attention_cpu.h"
#include "bias_gelu_cpu.h"
#include "blend_index.h"
#include "layernorm_cpu.h"
#include "xent_cpu.h"

namespace py = pybind11;
using namespace xlmr_mp;

void bind_cpu_fast_path(py::module_& m);  // bindings_fast_path.cpp

namespace {

template <typename T>
using CArr = py::array_t<T, py::array::c_style | py::array::forcecast>;

py::tuple py_pack_blocks(py::array sizes, CArr<int64_t> doc_index, int64_t block_size,
                         bool break_at_documents) {
  if (block_size < 1) throw std::invalid_argument("pack_blocks: block_size must be >= 1");
  std::vector<int64_t> starts, lengths;
  const bool in_place32 = sizes.dtype().is(py::dtype::of<int32_t>()) && (sizes.flags() & py::array::c_style);
  if (in_place32) {  // megatron's int32 sequence lengths, read without a copy (they can be huge)
    py::array_t<int32_t> s32 = sizes.cast<py::array_t<int32_t>>();
    py::gil_scoped_release nogil;
    pack_blocks<int32_t>(s32.data(), s32.size(), doc_index.data(), doc_index.size(), block_size,
                         break_at_documents, starts, lengths);
  } else {
    CArr<int64_t> s64 = sizes.cast<CArr<int64_t>>();
    py::gil_scoped_release nogil;
    pack_blocks<int64_t>(s64.data(), s64.size(), doc_index.data(), doc_index.size(), block_size,
                         break_at_documents, starts, lengths);
  }
  CArr<int64_t> s(static_cast<py::ssize_t>(starts.size())), l(static_cast<py::ssize_t>(lengths.size()));
  std::copy(starts.begin(), starts.end(), s.mutable_data());
  std::copy(lengths.begin(), lengths.end(), l.mutable_data());
  return py::make_tuple(s, l);
}

template <typename LangT, typename BlockT>
void run_blend(CArr<uint64_t>& w, CArr<uint64_t>& o, CArr<uint64_t>& n, uint64_t total, uint64_t seed,
               uint64_t start, py::array& out_lang, py::array& out_block, uint32_t* epoch) {
  auto* lang = static_cast<LangT*>(out_lang.mutable_data());
  auto* block = static_cast<BlockT*>(out_block.mutable_data());
  const uint64_t count = static_cast<uint64_t>(out_lang.size());
  py::gil_scoped_release nogil;
  blend_window<LangT, BlockT>(w.data(), o.data(), n.data(), w.size(), total, seed, start, count,
                              lang, block, epoch);
}

void py_blend_window(CArr<uint64_t> weights, CArr<uint64_t> offsets, CArr<uint64_t> n_blocks,
                     uint64_t total_weight, uint64_t seed, uint64_t start, py::array out_lang,
                     py::array out_block, py::object out_epoch) {
  if (weights.size() != offsets.size() || weights.size() != n_blocks.size())
    throw std::invalid_argument("blend_window: weights, offsets and n_blocks differ in length");
  if (out_lang.size() != out_block.size())
    throw std::invalid_argument("blend_window: out_lang and out_block differ in length");
  if (!(out_lang.flags() & py::array::c_style) || !(out_block.flags() & py::array::c_style) ||
      !out_lang.writeable() || !out_block.writeable())
    throw std::invalid_argument("blend_window: outputs must be writeable C-contiguous arrays");
  for (py::ssize_t i = 0; i < n_blocks.size(); ++i)
    if (weights.data()[i] > 0 && n_blocks.data()[i] == 0)
      throw std::invalid_argument("blend_window: a language with weight > 0 has no blocks");
  uint32_t* epoch = nullptr;
  if (!out_epoch.is_none()) {
    py::array e = out_epoch.cast<py::array>();
    if (!e.dtype().is(py::dtype::of<uint32_t>()) || e.size() != out_lang.size() ||
        !(e.flags() & py::array::c_style) || !e.writeable())
      throw std::invalid_argument("blend_window: out_epoch must be a writeable uint32 array like out_lang");
    epoch = static_cast<uint32_t*>(e.mutable_data());
  }
  const bool lang8 = out_lang.dtype().is(py::dtype::of<uint8_t>());
  const bool lang16 = out_lang.dtype().is(py::dtype::of<uint16_t>());
  const bool block32 = out_block.dtype().is(py::dtype::of<uint32_t>());
  const bool block64 = out_block.dtype().is(py::dtype::of<int64_t>());
  if (lang8 && block32) run_blend<uint8_t, uint32_t>(weights, offsets, n_blocks, total_weight, seed, start, out_lang, out_block, epoch);
  else if (lang8 && block64) run_blend<uint8_t, int64_t>(weights, offsets, n_blocks, total_weight, seed, start, out_lang, out_block, epoch);
  else if (lang16 && block32) run_blend<uint16_t, uint32_t>(weights, offsets, n_blocks, total_weight, seed, start, out_lang, out_block, epoch);
  else if (lang16 && block64) run_blend<uint16_t, int64_t>(weights, offsets, n_blocks, total_weight, seed, start, out_lang, out_block, epoch);
  else throw std::invalid_argument("blend_window: out_lang must be uint8/uint16 and out_block uint32/int64");
}

template <typename LangT, typename BlockT>
void run_blend_phase(CArr<uint64_t>& w, CArr<int64_t>& o, CArr<uint64_t>& k, CArr<uint64_t>& n, uint64_t total,
                     uint64_t seed, uint64_t start, py::array& out_lang, py::array& out_block, uint32_t* epoch) {
  auto* lang = static_cast<LangT*>(out_lang.mutable_data());
  auto* block = static_cast<BlockT*>(out_block.mutable_data());
  const uint64_t count = static_cast<uint64_t>(out_lang.size());
  py::gil_scoped_release nogil;
  blend_window_phase<LangT, BlockT>(w.data(), o.data(), k.data(), n.data(), w.size(), total, seed, start, count,
                                    lang, block, epoch);
}

void py_blend_window_phase(CArr<uint64_t> weights, CArr<int64_t> offsets, CArr<uint64_t> kbase,
                           CArr<uint64_t> n_blocks, uint64_t total_weight, uint64_t seed, uint64_t start,
                           py::array out_lang, py::array out_block, py::object out_epoch) {
  if (weights.size() != offsets.size() || weights.size() != n_blocks.size() || weights.size() != kbase.size())
    throw std::invalid_argument("blend_window_phase: weights, offsets, kbase and n_blocks differ in length");
  if (out_lang.size() != out_block.size())
    throw std::invalid_argument("blend_window_phase: out_lang and out_block differ in length");
  if (!(out_lang.flags() & py::array::c_style) || !(out_block.flags() & py::array::c_style) ||
      !out_lang.writeable() || !out_block.writeable())
    throw std::invalid_argument("blend_window_phase: outputs must be writeable C-contiguous arrays");
  for (py::ssize_t i = 0; i < n_blocks.size(); ++i)
    if (weights.data()[i] > 0 && n_blocks.data()[i] == 0)
      throw std::invalid_argument("blend_window_phase: a language with weight > 0 has no blocks");
  uint32_t* epoch = nullptr;
  if (!out_epoch.is_none()) {
    py::array e = out_epoch.cast<py::array>();
    if (!e.dtype().is(py::dtype::of<uint32_t>()) || e.size() != out_lang.size() ||
        !(e.flags() & py::array::c_style) || !e.writeable())
      throw std::invalid_argument("blend_window_phase: out_epoch must be a writeable uint32 array like out_lang");
    epoch = static_cast<uint32_t*>(e.mutable_data());
  }
  const bool lang8 = out_lang.dtype().is(py::dtype::of<uint8_t>());
  const bool lang16 = out_lang.dtype().is(py::dtype::of<uint16_t>());
  const bool block32 = out_block.dtype().is(py::dtype::of<uint32_t>());
  const bool block64 = out_block.dtype().is(py::dtype::of<int64_t>());
  if (lang8 && block32) run_blend_phase<uint8_t, uint32_t>(weights, offsets, kbase, n_blocks, total_weight, seed, start, out_lang, out_block, epoch);
  else if (lang8 && block64) run_blend_phase<uint8_t, int64_t>(weights, offsets, kbase, n_blocks, total_weight, seed, start, out_lang, out_block, epoch);
  else if (lang16 && block32) run_blend_phase<uint16_t, uint32_t>(weights, offsets, kbase, n_blocks, total_weight, seed, start, out_lang, out_block, epoch);
  else if (lang16 && block64) run_blend_phase<uint16_t, int64_t>(weights, offsets, kbase, n_blocks, total_weight, seed, start, out_lang, out_block, epoch);
  else throw std::invalid_argument("blend_window_phase: out_lang must be uint8/uint16 and out_block uint32/int64");
}

py::array_t<uint64_t> py_blend_phase_counts(CArr<uint64_t> weights, CArr<int64_t> offsets, uint64_t total_weight,
                                            uint64_t position) {
  if (weights.size() != offsets.size())
    throw std::invalid_argument("blend_phase_counts: weights and offsets differ in length");
  py::array_t<uint64_t> out(weights.size());
  blend_phase_counts(weights.data(), offsets.data(), weights.size(), total_weight, position, out.mutable_data());
  return out;
}

// One flat id array from per-sentence int32 buffers (SentencePiece's VectorBuffer, numpy arrays):
// ids remapped through `table`, `eos_id` (if >= 0) appended to each sentence, written in the
// dataset dtype. Returns (ids, lengths int64, number of ids equal to unk_id). Python reference:
// xlmr_mp/tokenizer/spm.py flatten_id_buffers_reference.
template <typename OutT>
void remap_into(const std::vector<Py_buffer>& views, const int32_t* table, int64_t table_size,
                int32_t eos_id, int32_t unk_id, OutT* out, int64_t* lengths, int64_t* n_unk, int64_t* bad_id) {
  int64_t pos = 0, unk = 0;
  for (size_t i = 0; i < views.size(); ++i) {
    const auto* src = static_cast<const int32_t*>(views[i].buf);
    const int64_t n = views[i].len / static_cast<int64_t>(sizeof(int32_t));
    for (int64_t k = 0; k < n; ++k) {
      const int32_t id = src[k];
      if (id < 0 || id >= table_size) { *bad_id = id; return; }
      const int32_t d = table[id];
      unk += (d == unk_id);
      out[pos++] = static_cast<OutT>(d);
    }
    if (eos_id >= 0) out[pos++] = static_cast<OutT>(eos_id);
    lengths[i] = n + (eos_id >= 0 ? 1 : 0);
  }
  *n_unk = unk;
}

py::tuple py_flatten_id_buffers(const py::sequence& buffers, CArr<int32_t> table, int32_t eos_id,
                                int32_t unk_id, const py::dtype& dtype) {
  const bool u16 = dtype.is(py::dtype::of<uint16_t>());
  if (!u16 && !dtype.is(py::dtype::of<int32_t>()))
    throw std::invalid_argument("flatten_id_buffers: dtype must be uint16 or int32");
  const size_t n = static_cast<size_t>(py::len(buffers));
  std::vector<Py_buffer> views;
  views.reserve(n);
  struct Release {  // release every view we hold, whatever happens
    std::vector<Py_buffer>& v;
    ~Release() { for (auto& b : v) PyBuffer_Release(&b); }
  } release{views};
  int64_t total = 0;
  for (size_t i = 0; i < n; ++i) {
    py::object item = buffers[i];
    Py_buffer view;
    if (PyObject_GetBuffer(item.ptr(), &view, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT) != 0) throw py::error_already_set();
    const bool ok = view.itemsize == 4 && view.format != nullptr &&
                    (std::string(view.format) == "i" || std::string(view.format) == "<i" ||
                     std::string(view.format) == "=i");
    views.push_back(view);
    if (!ok)
      throw std::invalid_argument("flatten_id_buffers: item " + std::to_string(i) + " is not an int32 buffer");
    total += view.len / 4 + (eos_id >= 0 ? 1 : 0);
  }
  py::array out = u16 ? py::array(py::dtype::of<uint16_t>(), total) : py::array(py::dtype::of<int32_t>(), total);
  py::array_t<int64_t> lengths(static_cast<py::ssize_t>(n));
  if (u16) {  // the caller checks that every table value fits; checked here too, cheaply
    bool fits = eos_id <= 65535;
    for (py::ssize_t k = 0; k < table.size() && fits; ++k) fits = table.data()[k] >= 0 && table.data()[k] <= 65535;
    if (!fits) throw std::invalid_argument("flatten_id_buffers: an id does not fit uint16; use int32");
  }
  int64_t n_unk = 0, bad_id = INT64_MIN;
  {
    py::gil_scoped_release nogil;
    if (u16)
      remap_into<uint16_t>(views, table.data(), table.size(), eos_id, unk_id,
                           static_cast<uint16_t*>(out.mutable_data()), lengths.mutable_data(), &n_unk, &bad_id);
    else
      remap_into<int32_t>(views, table.data(), table.size(), eos_id, unk_id,
                          static_cast<int32_t*>(out.mutable_data()), lengths.mutable_data(), &n_unk, &bad_id);
  }
  if (bad_id != INT64_MIN)
    throw std::invalid_argument("flatten_id_buffers: id " + std::to_string(bad_id) + " outside the table of " +
                                std::to_string(table.size()) + " entries");
  return py::make_tuple(out, lengths, n_unk);
}

using FArr = py::array_t<float, py::array::c_style>;

AttentionShape attention_shape(const FArr& qkv, const char* who) {
  if (qkv.ndim() != 5 || qkv.shape(3) != 3)
    throw std::invalid_argument(std::string(who) + ": qkv must be [B, S, heads, 3, D] float32, C-contiguous");
  return AttentionShape{qkv.shape(0), qkv.shape(1), qkv.shape(2), qkv.shape(4)};
}

void check_len(const py::array& a, int64_t n, const char* who, const char* what) {
  if (a.size() != n || !(a.flags() & py::array::c_style))
    throw std::invalid_argument(std::string(who) + ": " + what + " has the wrong size or is not C-contiguous");
}

// x [..., H] against a per-column vector v [H] (and the CPU check every kernel binding starts with).
void check_rows(const py::array& x, const py::array& v, const char* who, const char* xname, const char* vname) {
  require_cpu_kernels(who);
  if (x.ndim() < 1 || v.ndim() != 1 || x.shape(x.ndim() - 1) != v.size())
    throw std::invalid_argument(std::string(who) + ": " + xname + " must be [..., H] and " + vname +
                                " [H] (float32, C-contiguous)");
}

void py_attention_forward(FArr qkv, py::object key_bias, double scale, FArr out, FArr probs, int threads) {
  require_cpu_kernels("attention_forward");
  const AttentionShape s = attention_shape(qkv, "attention_forward");
  check_len(out, s.batch * s.seq * s.heads * s.head_dim, "attention_forward", "out");
  check_len(probs, s.batch * s.heads * s.seq * s.seq, "attention_forward", "probs");
  FArr kb;
  const float* kbp = nullptr;
  if (!key_bias.is_none()) {
    kb = key_bias.cast<FArr>();
    check_len(kb, s.batch * s.seq, "attention_forward", "key_bias ([B, S])");
    kbp = kb.data();
  }
  float* o = out.mutable_data();
  float* p = probs.mutable_data();
  py::gil_scoped_release nogil;
  attention_forward(s, qkv.data(), kbp, static_cast<float>(scale), o, p, threads);
}

void py_attention_backward(FArr qkv, FArr probs, FArr out, FArr grad_out, double scale, FArr grad_qkv, int threads) {
  require_cpu_kernels("attention_backward");
  const AttentionShape s = attention_shape(qkv, "attention_backward");
  const int64_t n_out = s.batch * s.seq * s.heads * s.head_dim;
  check_len(probs, s.batch * s.heads * s.seq * s.seq, "attention_backward", "probs");
  check_len(out, n_out, "attention_backward", "out");
  check_len(grad_out, n_out, "attention_backward", "grad_out");
  check_len(grad_qkv, qkv.size(), "attention_backward", "grad_qkv");
  float* g = grad_qkv.mutable_data();
  py::gil_scoped_release nogil;
  attention_backward(s, qkv.data(), probs.data(), out.data(), grad_out.data(), static_cast<float>(scale), g, threads);
}

// An array a kernel writes into, taken as a plain array and checked, not converted: a converted
// copy would take the result.
void check_writeable_f32(const py::array& a, const char* who, const char* what) {
  if (!a.dtype().is(py::dtype::of<float>()) || !(a.flags() & py::array::c_style) || !a.writeable())
    throw std::invalid_argument(std::string(who) + ": " + what + " must be a writeable float32 C-contiguous array");
}

void py_xent_rows(py::array logits, CArr<int64_t> target, FArr loss, int threads) {
  require_cpu_kernels("xent_rows");
  check_writeable_f32(logits, "xent_rows", "logits ([M, V])");
  if (logits.ndim() != 2) throw std::invalid_argument("xent_rows: logits must be [M, V]");
  const int64_t M = logits.shape(0), V = logits.shape(1);
  check_len(target, M, "xent_rows", "target ([M] int64)");
  check_len(loss, M, "xent_rows", "loss ([M] float32)");
  float* l = static_cast<float*>(logits.mutable_data());
  float* out = loss.mutable_data();
  py::gil_scoped_release nogil;
  xent_rows(l, target.data(), out, M, V, threads);
}

void py_bias_gelu_forward(FArr x, FArr bias, FArr y, int threads) {
  check_rows(x, bias, "bias_gelu_forward", "x", "bias");
  check_len(y, x.size(), "bias_gelu_forward", "y");
  const int64_t cols = bias.size(), rows = cols ? x.size() / cols : 0;
  float* out = y.mutable_data();
  py::gil_scoped_release nogil;
  bias_gelu_forward(x.data(), bias.data(), out, rows, cols, threads);
}

void py_bias_gelu_backward(FArr grad, FArr x, FArr bias, FArr dx, FArr dbias, int threads) {
  check_rows(x, bias, "bias_gelu_backward", "x", "bias");
  check_len(grad, x.size(), "bias_gelu_backward", "grad");
  check_len(dx, x.size(), "bias_gelu_backward", "dx");
  check_len(dbias, bias.size(), "bias_gelu_backward", "dbias");
  const int64_t cols = bias.size(), rows = cols ? x.size() / cols : 0;
  float* d = dx.mutable_data();
  float* db = dbias.mutable_data();
  py::gil_scoped_release nogil;
  bias_gelu_backward(grad.data(), x.data(), bias.data(), d, db, rows, cols, threads);
}

// An optional float32 array of n elements (or None), checked as check_writeable_f32 does.
const float* optional_rows(const py::object& o, FArr& keep_alive, int64_t n, const char* who, const char* what) {
  if (o.is_none()) return nullptr;
  check_writeable_f32(o.cast<py::array>(), who, what);
  keep_alive = o.cast<FArr>();
  check_len(keep_alive, n, who, what);
  return keep_alive.data();
}

void py_bdaln_forward(FArr x, py::object bias, FArr residual, py::object keep, FArr weight, FArr ln_bias, double eps,
                      FArr out, FArr y, FArr mean, FArr rstd, int threads) {
  const char* who = "bias_dropout_add_layernorm_forward";
  check_rows(x, weight, who, "x", "weight");
  const int64_t cols = weight.size(), rows = cols ? x.size() / cols : 0;
  FArr b, k;
  const float* bp = optional_rows(bias, b, cols, who, "bias ([H])");
  const float* kp = optional_rows(keep, k, x.size(), who, "keep (like x)");
  check_len(residual, x.size(), who, "residual (like x)");
  check_len(ln_bias, cols, who, "ln_bias ([H])");
  check_len(out, x.size(), who, "out (like x)");
  check_len(y, x.size(), who, "y (like x)");
  check_len(mean, rows, who, "mean ([rows])");
  check_len(rstd, rows, who, "rstd ([rows])");
  float *o = out.mutable_data(), *yp = y.mutable_data(), *m = mean.mutable_data(), *r = rstd.mutable_data();
  py::gil_scoped_release nogil;
  bias_dropout_add_layernorm_forward(x.data(), bp, residual.data(), kp, weight.data(), ln_bias.data(),
                                     static_cast<float>(eps), rows, cols, o, yp, m, r, threads);
}

void py_bdaln_backward(FArr grad, FArr y, py::object keep, FArr weight, FArr mean, FArr rstd, FArr dresidual,
                       py::object dx, FArr dweight, FArr dln_bias, py::object dbias, int threads) {
  const char* who = "bias_dropout_add_layernorm_backward";
  check_rows(y, weight, who, "y", "weight");
  const int64_t cols = weight.size(), rows = cols ? y.size() / cols : 0;
  FArr k, d, db;
  const float* kp = optional_rows(keep, k, y.size(), who, "keep (like y)");
  float* dxp = const_cast<float*>(optional_rows(dx, d, y.size(), who, "dx (like y)"));
  float* dbp = const_cast<float*>(optional_rows(dbias, db, cols, who, "dbias ([H])"));
  check_len(grad, y.size(), who, "grad (like y)");
  check_len(mean, rows, who, "mean ([rows])");
  check_len(rstd, rows, who, "rstd ([rows])");
  check_len(dresidual, y.size(), who, "dresidual (like y)");
  check_len(dweight, cols, who, "dweight ([H])");
  check_len(dln_bias, cols, who, "dln_bias ([H])");
  float *dr = dresidual.mutable_data(), *dw = dweight.mutable_data(), *dlb = dln_bias.mutable_data();
  py::gil_scoped_release nogil;
  bias_dropout_add_layernorm_backward(grad.data(), y.data(), kp, weight.data(), mean.data(), rstd.data(), rows, cols,
                                      dr, dxp, dw, dlb, dbp, threads);
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "xlmr_mp C++ helpers: data index building (packing, blended language index), id flattening, "
            "the AVX2 CPU kernels (attention, bias-GELU, bias-dropout-add-LayerNorm, cross-entropy rows)";
  m.def("pack_blocks", &py_pack_blocks, py::arg("sizes"), py::arg("doc_index"), py::arg("block_size"),
        py::arg("break_at_documents"),
        "Pack sentences into blocks of <= block_size tokens; returns (token starts, lengths).");
  m.def("blend_window", &py_blend_window, py::arg("weights"), py::arg("offsets"), py::arg("n_blocks"),
        py::arg("total_weight"), py::arg("seed"), py::arg("start"), py::arg("out_lang"),
        py::arg("out_block"), py::arg("out_epoch") = py::none(),
        "Fill out_lang/out_block (and out_epoch: pass over the language, uint32, if given) with blended stream positions [start, start + len(out_lang)).");
  m.def("blend_rank", [](CArr<uint64_t> w, CArr<uint64_t> o, uint64_t total, uint64_t bucket) {
          return blend_rank(w.data(), o.data(), w.size(), total, bucket);
        }, py::arg("weights"), py::arg("offsets"), py::arg("total_weight"), py::arg("bucket"),
        "Number of blended draws in buckets [0, bucket).");
  m.def("blend_window_phase", &py_blend_window_phase, py::arg("weights"), py::arg("offsets"), py::arg("kbase"),
        py::arg("n_blocks"), py::arg("total_weight"), py::arg("seed"), py::arg("start"), py::arg("out_lang"),
        py::arg("out_block"), py::arg("out_epoch") = py::none(),
        "Like blend_window for one phase of a scheduled blend: signed int64 offsets, global draw base kbase; "
        "start is the phase-local position.");
  m.def("blend_phase_rank", [](CArr<uint64_t> w, CArr<int64_t> o, uint64_t total, uint64_t bucket) {
          if (w.size() != o.size()) throw std::invalid_argument("blend_phase_rank: weights and offsets differ in length");
          return blend_phase_rank(w.data(), o.data(), w.size(), total, bucket);
        }, py::arg("weights"), py::arg("offsets"), py::arg("total_weight"), py::arg("bucket"),
        "Number of draws of a phase in its local buckets [0, bucket).");
  m.def("blend_phase_counts", &py_blend_phase_counts, py::arg("weights"), py::arg("offsets"),
        py::arg("total_weight"), py::arg("position"),
        "Draws of each language among a phase's local positions [0, position) (uint64 array).");
  m.def("flatten_id_buffers", &py_flatten_id_buffers, py::arg("buffers"), py::arg("table"), py::arg("eos_id"),
        py::arg("unk_id"), py::arg("dtype"),
        "(ids, lengths, n_unk): per-sentence int32 id buffers remapped through table, eos_id (>= 0) appended "
        "to each, concatenated in dtype (uint16 or int32).");
  m.def("feistel_permute", &feistel_permute, py::arg("x"), py::arg("n"), py::arg("seed"),
        py::arg("lang"), py::arg("epoch"),
        "Position of x under the block permutation of (seed, lang, epoch) on [0, n).");
  m.def("cpu_kernels_supported", &cpu_kernels_supported,
        "Whether the AVX2 CPU kernels are compiled in and this CPU has AVX2 and FMA.");
  m.def("cpu_parallel_backend", &cpu_parallel_backend,
        "How the CPU kernels use threads: 'openmp' (the process's OpenMP pool, torch's) or 'threads'.");
  m.def("attention_forward", &py_attention_forward, py::arg("qkv"), py::arg("key_bias"), py::arg("scale"),
        py::arg("out"), py::arg("probs"), py::arg("threads") = 1,
        "out [B, S, heads*D] = softmax(scale q k^T + key_bias) v from qkv [B, S, heads, 3, D] (float32); "
        "probs [B, heads, S, S] receives the probabilities. key_bias: [B, S] additive, or None.");
  m.def("attention_backward", &py_attention_backward, py::arg("qkv"), py::arg("probs"), py::arg("out"),
        py::arg("grad_out"), py::arg("scale"), py::arg("grad_qkv"), py::arg("threads") = 1,
        "grad_qkv [B, S, heads, 3, D] from grad_out [B, S, heads*D] and the forward's qkv, probs and out.");
  m.def("xent_rows", &py_xent_rows, py::arg("logits"), py::arg("target"), py::arg("loss"), py::arg("threads") = 1,
        "Per row of logits [M, V] (float32, in place): loss[i] = logsumexp(row) - row[target[i]] (no target term "
        "where target[i] is outside [0, V)), and the row becomes softmax(row) - onehot(target[i]).");
  m.def("bias_gelu_forward", &py_bias_gelu_forward, py::arg("x"), py::arg("bias"), py::arg("y"),
        py::arg("threads") = 1, "y = gelu(x + bias) (exact erf GELU; float32; x [..., H], bias [H]).");
  m.def("bias_gelu_backward", &py_bias_gelu_backward, py::arg("grad"), py::arg("x"), py::arg("bias"),
        py::arg("dx"), py::arg("dbias"), py::arg("threads") = 1,
        "dx = grad * gelu'(x + bias) and dbias = dx summed over rows (float32).");
  m.def("bias_dropout_add_layernorm_forward", &py_bdaln_forward, py::arg("x"), py::arg("bias"), py::arg("residual"),
        py::arg("keep"), py::arg("weight"), py::arg("ln_bias"), py::arg("eps"), py::arg("out"), py::arg("y"),
        py::arg("mean"), py::arg("rstd"), py::arg("threads") = 1,
        "out = LayerNorm(residual + keep * (x + bias)) over the last dim (float32); y receives the sum, "
        "mean / rstd its row statistics. bias [H] and keep (like x: 0 or 1/(1-p)) may be None.");
  m.def("bias_dropout_add_layernorm_backward", &py_bdaln_backward, py::arg("grad"), py::arg("y"), py::arg("keep"),
        py::arg("weight"), py::arg("mean"), py::arg("rstd"), py::arg("dresidual"), py::arg("dx"), py::arg("dweight"),
        py::arg("dln_bias"), py::arg("dbias"), py::arg("threads") = 1,
        "dresidual, dx (= dresidual * keep, or a copy of dresidual without keep; None: not written), dweight, dln_bias and dbias (None: not wanted) "
        "of the forward above.");

  bind_cpu_fast_path(m);  // bindings_fast_path.cpp
}
