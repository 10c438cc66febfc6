// Sentence packing into blocks (fairseq TokenBlockDataset, break_mode complete / complete_doc),
// with sentences longer than a block split into block-size pieces. Python reference:
// xlmr_mp/data/packing.py (pack_blocks_reference).
#include "blend_index.h"

namespace xlmr_mp {

template <typename SizeT>
void pack_blocks(const SizeT* sizes, int64_t n_sent, const int64_t* doc_index, int64_t n_doc_index,
                 int64_t block_size, bool break_at_documents,
                 std::vector<int64_t>& starts, std::vector<int64_t>& lengths) {
  int64_t block_start = 0, filled = 0;
  int64_t next_doc = 1;  // doc_index[next_doc] = first sentence of the next document
  for (int64_t s = 0; s < n_sent; ++s) {
    if (break_at_documents) {
      while (next_doc < n_doc_index && doc_index[next_doc] <= s) {
        if (doc_index[next_doc] == s && filled > 0) {
          starts.push_back(block_start); lengths.push_back(filled);
          block_start += filled; filled = 0;
        }
        ++next_doc;
      }
    }
    int64_t len = static_cast<int64_t>(sizes[s]);
    if (filled > 0 && filled + len > block_size) {
      starts.push_back(block_start); lengths.push_back(filled);
      block_start += filled; filled = 0;
    }
    while (len > block_size) {  // filled == 0 here
      starts.push_back(block_start); lengths.push_back(block_size);
      block_start += block_size; len -= block_size;
    }
    filled += len;
  }
  if (filled > 0) { starts.push_back(block_start); lengths.push_back(filled); }
}

template void pack_blocks<int32_t>(const int32_t*, int64_t, const int64_t*, int64_t, int64_t, bool,
                                   std::vector<int64_t>&, std::vector<int64_t>&);
template void pack_blocks<int64_t>(const int64_t*, int64_t, const int64_t*, int64_t, int64_t, bool,
                                   std::vector<int64_t>&, std::vector<int64_t>&);

}  // namespace xlmr_mp
