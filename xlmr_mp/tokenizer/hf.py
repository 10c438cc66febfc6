"""Hugging Face tokenizer files for our tokenizer, giving our ids: `save_hf_tokenizer(tok, DIR)`.

Writes DIR/sentencepiece.bpe.model (the SentencePiece model), DIR/tokenizer.json (a `tokenizers`
Unigram tokenizer built from it), tokenizer_config.json and special_tokens_map.json, so
`AutoTokenizer.from_pretrained(DIR)` works on the directory alone.

Why a tokenizer.json of our own: transformers' XLM-R tokenizer, built from the .model file alone,
has no byte fallback (where we give byte pieces <0xE4><0xB8>... it gives <unk>) and uses the
formula id = piece + 1 whatever dictionary we used. The tokenizer.json here lists the pieces in our
dictionary's id order, with byte fallback when the SentencePiece model has it, and mirrors the
model's normaliser spec (character map, extra-whitespace removal, dummy prefix, whitespace
escaping). `check_hf_tokenizer` encodes probe texts both ways and raises when any id differs.
"""
from __future__ import annotations

import json
import os
from typing import Iterable, Optional

from xlmr_mp.tokenizer.spm import MASK_PIECE, SPECIAL_PIECES, TokenizerError

SPM_FILE = "sentencepiece.bpe.model"
DICT_FILE = "sentencepiece.bpe.dict.txt"     # beside SPM_FILE: XLMRTokenizer finds it there

# Probe texts for the id check: Latin, Cyrillic, CJK (rare characters go to byte pieces), Arabic,
# Devanagari, emoji, odd whitespace, digits.
PROBE_TEXTS = ["The city river goes to the market.", "Люди читают книгу сегодня.", "人们 城市 河流 学校。",
               "鑫龘齉靐 饕餮 魑魅魍魉 𠀀𪚥", "لوگ شہر دریا بازار۔", "लोग शहर नदी बाज़ार।", "😀 ☃ ǅ ∮ 𝔘 ünïcödé",
               "  extra   spaces  here ", "2024-11-30 12:00", "ＦＵＬＬ　ＷＩＤＴＨ ﬁ"]


def _proto(model_path: str):
    try:
        from sentencepiece import sentencepiece_model_pb2 as pb
    except ImportError as e:  # protobuf is missing
        raise TokenizerError(f"exporting the tokenizer needs protobuf (pip install protobuf): {e}") from None
    m = pb.ModelProto()
    with open(model_path, "rb") as f:
        m.ParseFromString(f.read())
    return m


def build_hf_tokenizer(tok):
    """A `tokenizers.Tokenizer` that encodes like `tok` (an XLMRTokenizer), ids included."""
    from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import Unigram
    proto = _proto(tok.model_path)
    if proto.trainer_spec.model_type != 1:
        raise TokenizerError(f"{tok.model_path}: only SentencePiece unigram models can be exported "
                             f"(model_type {proto.trainer_spec.model_type})")
    ns = proto.normalizer_spec
    if proto.trainer_spec.treat_whitespace_as_suffix:
        raise TokenizerError(f"{tok.model_path}: treat_whitespace_as_suffix models cannot be exported")
    vocab = [(p, 0.0) for p in SPECIAL_PIECES]
    for i in range(4, tok.vocab_size - 1):
        spm_id = int(tok._to_spm[i])
        vocab.append((proto.pieces[spm_id].piece, float(proto.pieces[spm_id].score)))
    vocab.append((MASK_PIECE, 0.0))
    t = Tokenizer(Unigram(vocab, unk_id=tok.unk_id, byte_fallback=bool(proto.trainer_spec.byte_fallback)))
    norm = []
    if ns.precompiled_charsmap:
        norm.append(normalizers.Precompiled(ns.precompiled_charsmap))
    if ns.remove_extra_whitespaces:
        norm += [normalizers.Replace(Regex(r"\A +| +\z"), ""), normalizers.Replace(Regex(" {2,}"), " ")]
    if ns.add_dummy_prefix:
        norm.append(normalizers.Prepend(" "))
    if ns.escape_whitespaces:
        norm.append(normalizers.Replace(" ", "\u2581"))
    t.normalizer = normalizers.Sequence(norm)
    user = [p.piece for p in proto.pieces if p.type == 4]
    if user:   # SentencePiece emits user-defined pieces whole
        import re
        pattern = "|".join(re.escape(p) for p in sorted(user, key=len, reverse=True))
        t.pre_tokenizer = pre_tokenizers.Split(Regex(pattern), behavior="isolated")
    dec = [decoders.Replace("\u2581", " ")]
    if proto.trainer_spec.byte_fallback:
        dec.append(decoders.ByteFallback())
    dec.append(decoders.Fuse())
    if ns.add_dummy_prefix:
        dec.append(decoders.Strip(content=" ", left=1, right=0))
    t.decoder = decoders.Sequence(dec)
    t.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>",
        special_tokens=[("<s>", tok.bos_id), ("</s>", tok.eos_id)])
    from tokenizers import AddedToken
    t.add_special_tokens([AddedToken(p, special=True, normalized=False) for p in SPECIAL_PIECES]
                         + [AddedToken(MASK_PIECE, special=True, normalized=False, lstrip=True)])
    return t


def check_hf_tokenizer(tok, hf_tokenizer, texts: Optional[Iterable[str]] = None) -> None:
    """TokenizerError naming the first text on which `hf_tokenizer` (transformers) and `tok` disagree."""
    for text in list(texts if texts is not None else PROBE_TEXTS):
        ours = tok.encode(text, add_bos=True, add_eos=True)
        theirs = list(hf_tokenizer(text)["input_ids"])
        if ours != theirs:
            raise TokenizerError(f"the exported Hugging Face tokenizer gives other ids than {tok.model_path} on "
                                 f"{text!r}: {theirs[:12]} vs ours {ours[:12]}; the export cannot represent "
                                 f"this tokenizer")


def save_hf_tokenizer(tok, out_dir: str, check: bool = True) -> None:
    """Write the tokenizer files into `out_dir` (an existing directory, e.g. the temporary one of an
    HF export), then reload them with transformers and check the ids on PROBE_TEXTS."""
    import shutil
    shutil.copyfile(tok.model_path, os.path.join(out_dir, SPM_FILE))
    if tok.dict_path:
        shutil.copyfile(tok.dict_path, os.path.join(out_dir, DICT_FILE))
    build_hf_tokenizer(tok).save(os.path.join(out_dir, "tokenizer.json"))
    specials = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "sep_token": "</s>",
                "pad_token": "<pad>", "cls_token": "<s>", "mask_token": "<mask>"}
    config = dict(specials, tokenizer_class="PreTrainedTokenizerFast", model_max_length=512,
                  clean_up_tokenization_spaces=False, add_prefix_space=True)
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
        json.dump(config, f, indent=2)
    with open(os.path.join(out_dir, "special_tokens_map.json"), "w") as f:
        json.dump(specials, f, indent=2)
    if check:
        from transformers import AutoTokenizer
        check_hf_tokenizer(tok, AutoTokenizer.from_pretrained(out_dir))
