// Index building for the multilingual MLM data pipeline (xlmr_mp/data/): sentence packing into
// blocks and the blended (language, block) index. Python references: xlmr_mp/data/packing.py and
// xlmr_mp/data/blend.py; tests/data/test_data_blend.py checks C++ == Python bit for bit.
#pragma once
#include <cstdint>
#include <vector>

namespace xlmr_mp {

// splitmix64 finaliser: the hash every key of the data pipeline is derived from.
inline uint64_t mix64(uint64_t x) {
  uint64_t z = x + 0x9e3779b97f4a7c15ULL;
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  return z ^ (z >> 31);
}

// Packs sentences (lengths `sizes`, documents given by `doc_index` = sentence start of each
// document plus the end) into blocks of at most `block_size` tokens; see packing.py.
// SizeT: int32_t (megatron's sequence_lengths, read in place) or int64_t.
template <typename SizeT>
void pack_blocks(const SizeT* sizes, int64_t n_sent, const int64_t* doc_index, int64_t n_doc_index,
                 int64_t block_size, bool break_at_documents,
                 std::vector<int64_t>& starts, std::vector<int64_t>& lengths);

// Blended stream positions [start, start + count): language, block and (if out_epoch is not
// null) the pass over its language of each; see blend.py.
template <typename LangT, typename BlockT>
void blend_window(const uint64_t* weights, const uint64_t* offsets, const uint64_t* n_blocks,
                  int64_t n_lang, uint64_t total_weight, uint64_t seed, uint64_t start,
                  uint64_t count, LangT* out_lang, BlockT* out_block, uint32_t* out_epoch);

uint64_t blend_rank(const uint64_t* weights, const uint64_t* offsets, int64_t n_lang,
                    uint64_t total_weight, uint64_t bucket);

// One phase of a scheduled blend (blend.py PhasedBlend): language i's local draw j is its global
// draw kbase[i] + j and sits in local bucket max(0, floor((j * W + offsets[i]) / weights[i]));
// offsets may be negative (draws owed from earlier phases, all in bucket 0) or >= W (a language
// ahead of its share). weights[i] == 0: the language is not active in the phase. kbase may be null.
template <typename LangT, typename BlockT>
void blend_window_phase(const uint64_t* weights, const int64_t* offsets, const uint64_t* kbase,
                        const uint64_t* n_blocks, int64_t n_lang, uint64_t total_weight, uint64_t seed,
                        uint64_t start, uint64_t count, LangT* out_lang, BlockT* out_block,
                        uint32_t* out_epoch);

// Draws of one language of a phase in its local buckets [0, bucket).
uint64_t phase_draws_before(uint64_t w, int64_t off, uint64_t total, uint64_t bucket);

// Number of draws of a phase in its local buckets [0, bucket).
uint64_t blend_phase_rank(const uint64_t* weights, const int64_t* offsets, int64_t n_lang,
                          uint64_t total_weight, uint64_t bucket);

// Draws of each language among a phase's local positions [0, position) into out_counts[n_lang].
void blend_phase_counts(const uint64_t* weights, const int64_t* offsets, int64_t n_lang,
                        uint64_t total_weight, uint64_t position, uint64_t* out_counts);

uint64_t feistel_permute(uint64_t x, uint64_t n, uint64_t seed, uint64_t lang, uint64_t epoch);

}  // namespace xlmr_mp
