"""SentencePiece tokenizer with the fairseq / Hugging Face XLM-R dictionary ids."""
from xlmr_mp.tokenizer.spm import (BOS_ID, EOS_ID, PAD_ID, UNK_ID, TokenizerError, XLMRTokenizer,
                                   dict_path_for, read_fairseq_dict, write_fairseq_dict)

__all__ = ["XLMRTokenizer", "TokenizerError", "BOS_ID", "PAD_ID", "EOS_ID", "UNK_ID",
           "dict_path_for", "read_fairseq_dict", "write_fairseq_dict"]
