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

template <typename LangT, typename BlockT>
void blend_window(const uint64_t* weights, const uint64_t* offsets, const uint64_t* n_blocks,
                  int64_t n_lang, uint64_t total_weight, uint64_t seed, uint64_t start,
                  uint64_t count, LangT* out_lang, BlockT* out_block, uint32_t* out_epoch) {
  if (count == 0) return;
  // First bucket: the largest B with rank(B) <= start (rank(B) is within n_lang of B).
  uint64_t lo = 0, hi = start + static_cast<uint64_t>(n_lang) + 2;
  while (hi - lo > 1) {
    const uint64_t mid = lo + (hi - lo) / 2;
    if (blend_rank(weights, offsets, n_lang, total_weight, mid) <= start) lo = mid; else hi = mid;
  }
  uint64_t bucket = lo;
  uint64_t pos = blend_rank(weights, offsets, n_lang, total_weight, bucket);

  // Per-language cursor: next draw k, k * W + o = q * w + r, and the block permutation of its pass.
  struct Cursor { uint64_t k, q, r, qstep, rstep, j, epoch; Feistel perm; };
  std::vector<Cursor> cur(static_cast<size_t>(n_lang));
  for (int64_t i = 0; i < n_lang; ++i) {
    Cursor& c = cur[i];
    const uint64_t w = weights[i];
    c.k = draws_before(w, offsets[i], total_weight, bucket);
    if (w == 0) continue;
    const u128 num = static_cast<u128>(c.k) * total_weight + offsets[i];
    c.q = static_cast<uint64_t>(num / w);
    c.r = static_cast<uint64_t>(num % w);
    c.qstep = total_weight / w;
    c.rstep = total_weight % w;
    c.epoch = c.k / n_blocks[i];
    c.j = c.k % n_blocks[i];
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
    const uint64_t bucket_end = bucket + window;
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
        const uint32_t local = static_cast<uint32_t>(c.q - bucket);
        item_bucket.push_back(local);
        item_lang.push_back(static_cast<LangT>(i));
        item_block.push_back(static_cast<BlockT>(c.perm(c.j)));
        if (out_epoch) item_epoch.push_back(static_cast<uint32_t>(c.epoch));
        ++slot[local + 1];
        ++c.k;
        c.q += c.qstep;
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
    bucket = bucket_end;
  }
}

#define XLMR_MP_BLEND_INSTANCE(L, B)                                                              \
  template void blend_window<L, B>(const uint64_t*, const uint64_t*, const uint64_t*, int64_t,      \
                                   uint64_t, uint64_t, uint64_t, uint64_t, L*, B*, uint32_t*);
XLMR_MP_BLEND_INSTANCE(uint8_t, uint32_t)
XLMR_MP_BLEND_INSTANCE(uint8_t, int64_t)
XLMR_MP_BLEND_INSTANCE(uint16_t, uint32_t)
XLMR_MP_BLEND_INSTANCE(uint16_t, int64_t)

}  // namespace xlmr_mp
