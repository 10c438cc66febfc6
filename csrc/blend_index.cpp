// Blended (language, block) index of the XLM-R language sampler, in linear time.
//
// Language i has integer weight w_i (sum W = total_weight, w_i ~ q_i * W) and offset o_i in
// [0, W). Its k-th draw (k = 0, 1, ...) sits in bucket floor((k * W + o_i) / w_i); the blended
// stream is every draw of every language ordered by (bucket, language). Buckets advance by one
// sample on average, so any prefix of T samples holds q_i * T +- 1 draws of language i, and
// the stream is a pure function of (weights, offsets, seed): any window is built on its own.
// Draw k of language i is block feistel_{seed, i, epoch}(k mod n_i) with epoch = k div n_i:
// a fresh pseudo-random permutation of the language's n_i blocks on every pass.
// Python reference: xlmr_mp/data/blend.py (blend_window_reference).
#include "blend_index.h"

#include <algorithm>
#include <stdexcept>
#include <vector>

namespace xlmr_mp {
namespace {

typedef unsigned __int128 u128;

// 4-round (unbalanced) Feistel network on [0, 2^b), b = max(2, ceil(log2 n)), cycle-walked down
// to [0, n) (under 2 steps on average). Left half a = b/2 bits, right half c = b - a bits.
struct Feistel {
  uint64_t n = 0, mask_a = 0, mask_c = 0;
  int c = 1;
  uint64_t rk[4] = {0, 0, 0, 0};

  void init(uint64_t n_, uint64_t seed, uint64_t lang, uint64_t epoch) {
    n = n_;
    int b = 2;
    while (b < 62 && (1ULL << b) < n) ++b;
    const int a = b / 2;
    c = b - a;
    mask_a = (1ULL << a) - 1;
    mask_c = (1ULL << c) - 1;
    const uint64_t key = mix64(mix64(mix64(seed) ^ lang) ^ epoch);
    for (int r = 0; r < 4; ++r) rk[r] = mix64(key + static_cast<uint64_t>(r));
  }
  static inline uint64_t round_fn(uint64_t x, uint64_t k) {
    const uint64_t z = (x ^ k) * 0x9e3779b97f4a7c15ULL;
    return z ^ (z >> 32);
  }
  inline uint64_t once(uint64_t x) const {
    uint64_t left = x >> c, right = x & mask_c;  // (a bits, c bits)
    uint64_t t = left ^ (round_fn(right, rk[0]) & mask_a);
    left = right; right = t;                        // (c, a)
    t = left ^ (round_fn(right, rk[1]) & mask_c);
    left = right; right = t;                        // (a, c)
    t = left ^ (round_fn(right, rk[2]) & mask_a);
    left = right; right = t;                        // (c, a)
    t = left ^ (round_fn(right, rk[3]) & mask_c);
    left = right; right = t;                        // (a, c)
    return (left << c) | right;
  }
  inline uint64_t operator()(uint64_t x) const {
    if (n <= 1) return 0;
    do {
      x = once(x);
    } while (x >= n);
    return x;
  }
};

// Number of draws of a language in buckets [0, bucket).
inline uint64_t draws_before(uint64_t w, uint64_t off, uint64_t total, uint64_t bucket) {
  const u128 num = static_cast<u128>(bucket) * w;
  if (num <= off) return 0;
  return static_cast<uint64_t>((num - off + total - 1) / total);
}

}  // namespace

uint64_t feistel_permute(uint64_t x, uint64_t n, uint64_t seed, uint64_t lang, uint64_t epoch) {
  Feistel f;
  f.init(n, seed, lang, epoch);
  return f(x);
}

uint64_t blend_rank(const uint64_t* weights, const uint64_t* offsets, int64_t n_lang,
                    uint64_t total_weight, uint64_t bucket) {
  uint64_t r = 0;
  for (int64_t i = 0; i < n_lang; ++i) r += draws_before(weights[i], offsets[i], total_weight, bucket);
  return r;
}

uint64_t phase_draws_before(uint64_t w, int64_t off, uint64_t total, uint64_t bucket) {
  if (bucket == 0 || w == 0) return 0;
  const __int128 num = static_cast<__int128>(static_cast<u128>(bucket) * w) - off;
  if (num <= 0) return 0;
  return static_cast<uint64_t>((num + total - 1) / total);
}

uint64_t blend_phase_rank(const uint64_t* weights, const int64_t* offsets, int64_t n_lang,
                          uint64_t total_weight, uint64_t bucket) {
  uint64_t r = 0;
  for (int64_t i = 0; i < n_lang; ++i) r += phase_draws_before(weights[i], offsets[i], total_weight, bucket);
  return r;
}

namespace {
// The largest bucket B with rank(B) <= position (rank(B) >= B - n_lang - 1 when the offsets are
// in [0, W); owed draws (offsets < 0) only raise the rank, so the bound holds for phases too).
uint64_t last_bucket_at_or_before(const uint64_t* weights, const int64_t* offsets, int64_t n_lang,
                                  uint64_t total_weight, uint64_t position) {
  uint64_t lo = 0, hi = position + static_cast<uint64_t>(n_lang) + 2;
  while (hi - lo > 1) {
    const uint64_t mid = lo + (hi - lo) / 2;
    if (blend_phase_rank(weights, offsets, n_lang, total_weight, mid) <= position) lo = mid; else hi = mid;
  }
  return lo;
}
}  // namespace

void blend_phase_counts(const uint64_t* weights, const int64_t* offsets, int64_t n_lang,
                        uint64_t total_weight, uint64_t position, uint64_t* out_counts) {
  const uint64_t b = last_bucket_at_or_before(weights, offsets, n_lang, total_weight, position);
  uint64_t pos = 0;
  for (int64_t i = 0; i < n_lang; ++i) {
    out_counts[i] = phase_draws_before(weights[i], offsets[i], total_weight, b);
    pos += out_counts[i];
  }
  // the rest sits in bucket b, in language order (a language owed draws may have several there)
  for (int64_t i = 0; i < n_lang && pos < position; ++i) {
    const uint64_t in_b = phase_draws_before(weights[i], offsets[i], total_weight, b + 1) - out_counts[i];
    const uint64_t take = std::min<uint64_t>(in_b, position - pos);
    out_counts[i] += take;
    pos += take;
  }
}

template <typename LangT, typename BlockT>
void blend_window_phase(const uint64_t* weights, const int64_t* offsets, const uint64_t* kbase,
                        const uint64_t* n_blocks, int64_t n_lang, uint64_t total_weight, uint64_t seed,
                        uint64_t start, uint64_t count, LangT* out_lang, BlockT* out_block,
                        uint32_t* out_epoch) {
  if (count == 0) return;
  uint64_t bucket = last_bucket_at_or_before(weights, offsets, n_lang, total_weight, start);
  uint64_t pos = blend_phase_rank(weights, offsets, n_lang, total_weight, bucket);

  // Per-language cursor: next local draw j (global draw k = kbase + j), j * W + o = q * w + r
  // (q may be < 0 for draws owed from earlier phases: they sit in bucket 0), and the block
  // permutation of its pass.
  struct Cursor { int64_t q; uint64_t r, qstep, rstep, j, epoch; Feistel perm; };
  std::vector<Cursor> cur(static_cast<size_t>(n_lang));
  for (int64_t i = 0; i < n_lang; ++i) {
    Cursor& c = cur[i];
    const uint64_t w = weights[i];
    if (w == 0) continue;
    const uint64_t local = phase_draws_before(w, offsets[i], total_weight, bucket);
    const __int128 num = static_cast<__int128>(static_cast<u128>(local) * total_weight) + offsets[i];
    __int128 q = num / static_cast<__int128>(w), r = num % static_cast<__int128>(w);
    if (r < 0) { r += w; --q; }  // floor division
    c.q = static_cast<int64_t>(q);
    c.r = static_cast<uint64_t>(r);
    c.qstep = total_weight / w;
    c.rstep = total_weight % w;
    const uint64_t k = (kbase ? kbase[i] : 0) + local;
    c.epoch = k / n_blocks[i];
    c.j = k % n_blocks[i];
    c.perm.init(n_blocks[i], seed, static_cast<uint64_t>(i), c.epoch);
  }

  const uint64_t max_window = 1ULL << 16;
  std::vector<uint32_t> slot(max_window + 1);
  std::vector<uint32_t> item_bucket;
  std::vector<LangT> item_lang, sorted_lang;
  std::vector<BlockT> item_block, sorted_block;
  std::vector<uint32_t> item_epoch, sorted_epoch;
  const uint64_t end = start + count;
  while (pos < end) {
    // buckets [bucket, bucket + window) hold >= window - n_lang draws: enough for what is left
    const uint64_t window = std::min<uint64_t>(max_window, end - pos + static_cast<uint64_t>(n_lang) + 1);
    const int64_t bucket_end = static_cast<int64_t>(bucket + window);
    item_bucket.clear();
    item_lang.clear();
    item_block.clear();
    item_epoch.clear();
    std::fill(slot.begin(), slot.begin() + window + 1, 0u);
    for (int64_t i = 0; i < n_lang; ++i) {
      const uint64_t w = weights[i];
      if (w == 0) continue;
      Cursor& c = cur[i];
      const uint64_t n = n_blocks[i];
      while (c.q < bucket_end) {
        const uint32_t local = c.q < 0 ? 0u : static_cast<uint32_t>(static_cast<uint64_t>(c.q) - bucket);
        item_bucket.push_back(local);
        item_lang.push_back(static_cast<LangT>(i));
        item_block.push_back(static_cast<BlockT>(c.perm(c.j)));
        if (out_epoch) item_epoch.push_back(static_cast<uint32_t>(c.epoch));
        ++slot[local + 1];
        c.q += static_cast<int64_t>(c.qstep);
        c.r += c.rstep;
        if (c.r >= w) { c.r -= w; ++c.q; }
        if (++c.j == n) {
          c.j = 0;
          ++c.epoch;
          c.perm.init(n, seed, static_cast<uint64_t>(i), c.epoch);
        }
      }
    }
    // Stable counting sort by bucket: ties keep language order.
    for (uint64_t b = 0; b < window; ++b) slot[b + 1] += slot[b];
    const size_t n_items = item_bucket.size();
    sorted_lang.resize(n_items);
    sorted_block.resize(n_items);
    if (out_epoch) sorted_epoch.resize(n_items);
    for (size_t t = 0; t < n_items; ++t) {
      const uint32_t p = slot[item_bucket[t]]++;
      sorted_lang[p] = item_lang[t];
      sorted_block[p] = item_block[t];
      if (out_epoch) sorted_epoch[p] = item_epoch[t];
    }
    const uint64_t first = pos < start ? start - pos : 0;
    for (uint64_t t = first; t < n_items && pos + t < end; ++t) {
      out_lang[pos + t - start] = sorted_lang[t];
      out_block[pos + t - start] = sorted_block[t];
      if (out_epoch) out_epoch[pos + t - start] = sorted_epoch[t];
    }
    pos += n_items;
    bucket = static_cast<uint64_t>(bucket_end);
  }
}

template <typename LangT, typename BlockT>
void blend_window(const uint64_t* weights, const uint64_t* offsets, const uint64_t* n_blocks,
                  int64_t n_lang, uint64_t total_weight, uint64_t seed, uint64_t start,
                  uint64_t count, LangT* out_lang, BlockT* out_block, uint32_t* out_epoch) {
  // the static index is the one-phase case: offsets in [0, W), every language from draw 0
  std::vector<int64_t> signed_offsets(offsets, offsets + n_lang);
  blend_window_phase<LangT, BlockT>(weights, signed_offsets.data(), nullptr, n_blocks, n_lang, total_weight,
                                    seed, start, count, out_lang, out_block, out_epoch);
}

#define XLMR_MP_BLEND_INSTANCE(L, B)                                                              \
  template void blend_window<L, B>(const uint64_t*, const uint64_t*, const uint64_t*, int64_t,      \
                                   uint64_t, uint64_t, uint64_t, uint64_t, L*, B*, uint32_t*);      \
  template void blend_window_phase<L, B>(const uint64_t*, const int64_t*, const uint64_t*,          \
                                         const uint64_t*, int64_t, uint64_t, uint64_t, uint64_t,    \
                                         uint64_t, L*, B*, uint32_t*);
XLMR_MP_BLEND_INSTANCE(uint8_t, uint32_t)
XLMR_MP_BLEND_INSTANCE(uint8_t, int64_t)
XLMR_MP_BLEND_INSTANCE(uint16_t, uint32_t)
XLMR_MP_BLEND_INSTANCE(uint16_t, int64_t)

}  // namespace xlmr_mp
