"""Fixed token ids of the XLM-R dictionary (fairseq / Hugging Face layout), and the label that marks
a position the loss ignores. Dependency-free: every layer may import it.

    <s>=0  <pad>=1  </s>=2  <unk>=3   text pieces 4 .. V-2   <mask>=V-1

The ids of the text pieces and of <mask> depend on the dictionary: the tokenizer
(xlmr_mp.tokenizer.XLMRTokenizer) is the authority for them.
"""

BOS_ID = 0          # <s>: first token of every sequence
PAD_ID = 1          # <pad>: padding; also fairseq's padding_idx for the position offset
EOS_ID = 2          # </s>: ends every sentence
UNK_ID = 3          # <unk>
NUM_SPECIAL = 4     # ids below this are special (<mask>, the last id, is special too)
SPECIAL_PIECES = ("<s>", "<pad>", "</s>", "<unk>")
MASK_PIECE = "<mask>"
IGNORE_INDEX = -100  # label of positions without a masked-LM target
