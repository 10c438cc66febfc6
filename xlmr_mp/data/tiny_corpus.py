"""A small built-in multilingual corpus for the demo and for tests: `make_tiny_corpus(out_dir)`.

Seven languages in five scripts (Latin: en fr sw, Cyrillic: ru, CJK: zh, Arabic: ur,
Devanagari: hi), sentences generated from small embedded word lists, with per-language sizes
spread ~10x (en largest, sw smallest) so alpha sampling has a visible effect. The layout is the
one tools/preprocess_data.py and tools/train_spm.py read: `<lang>.txt`, UTF-8, one sentence per
line, one blank line between documents. Every language of two or more documents has at least one
that the preprocessor puts in the validation split (under its default --split 98,1,1 and --seed, or
the split given), so validation reports every language.
"""
from __future__ import annotations

import os
import random
from typing import Dict, Iterable, Optional

from xlmr_mp.data.split import DEFAULT_SEED, DEFAULT_SPLIT, document_split, parse_split

from xlmr_mp.atomic import atomic_write

# words, sentence-final punctuation, whether words are joined with spaces, capitalise first word
_LANGS = {
    "en": ("the a people city river market school government water children morning night "
           "history language music village road country family work money book house time "
           "year world health news week study report small large new old early late green "
           "red quickly often never always together again today yesterday goes reads writes "
           "builds sees finds opens closes teaches learns travels speaks grows sells buys "
           "with from about after before under over between into through and but because",
           ".", True, True),
    "fr": ("le la les un une des ville rivière marché école gouvernement eau enfants matin nuit "
           "histoire langue musique village route pays famille travail argent livre maison temps "
           "année monde santé nouvelles semaine étude rapport petit grand nouveau vieux vert "
           "rouge souvent jamais toujours ensemble encore aujourd'hui hier va lit écrit construit "
           "voit trouve ouvre ferme enseigne apprend voyage parle grandit vend achète avec depuis "
           "après avant sous entre et mais parce que où été élève forêt",
           ".", True, True),
    "sw": ("watu mji mto soko shule serikali maji watoto asubuhi usiku historia lugha muziki kijiji "
           "barabara nchi familia kazi pesa kitabu nyumba wakati mwaka dunia afya habari wiki "
           "ripoti kidogo kikubwa mpya zamani kijani nyekundu mara nyingi kamwe pamoja tena leo "
           "jana anaenda anasoma anaandika anajenga anaona anapata anafungua anafundisha "
           "anajifunza anasafiri anazungumza anakua anauza ananunua na kutoka kuhusu baada kabla",
           ".", True, True),
    "ru": ("люди город река рынок школа правительство вода дети утро ночь история язык музыка "
           "деревня дорога страна семья работа деньги книга дом время год мир здоровье новости "
           "неделя исследование доклад маленький большой новый старый зелёный красный часто "
           "никогда всегда вместе снова сегодня вчера идёт читает пишет строит видит находит "
           "открывает закрывает учит учится путешествует говорит растёт продаёт покупает с из о "
           "после до под над между и но потому что",
           ".", True, True),
    "zh": ("人们 城市 河流 市场 学校 政府 水 孩子 早上 晚上 历史 语言 音乐 村庄 道路 国家 家庭 工作 "
           "钱 书 房子 时间 年 世界 健康 新闻 星期 研究 报告 小 大 新 旧 绿色 红色 经常 从不 总是 "
           "一起 又 今天 昨天 去 读 写 建设 看见 找到 打开 关闭 教 学习 旅行 说 成长 卖 买 和 从 "
           "关于 以后 以前 在 之间 但是 因为 我们 他们 这个 那个 非常 已经",
           "。", False, False),
    "ur": ("لوگ شہر دریا بازار اسکول حکومت پانی بچے صبح رات تاریخ زبان موسیقی گاؤں سڑک ملک "
           "خاندان کام پیسے کتاب گھر وقت سال دنیا صحت خبریں ہفتہ مطالعہ رپورٹ چھوٹا بڑا نیا پرانا "
           "سبز سرخ اکثر کبھی نہیں ہمیشہ ساتھ پھر آج کل جاتا پڑھتا لکھتا بناتا دیکھتا پاتا کھولتا "
           "سکھاتا سیکھتا سفر بولتا بیچتا خریدتا کے ساتھ سے بارے بعد پہلے اور لیکن کیونکہ ہے",
           "۔", True, False),
    "hi": ("लोग शहर नदी बाज़ार स्कूल सरकार पानी बच्चे सुबह रात इतिहास भाषा संगीत गाँव सड़क देश "
           "परिवार काम पैसा किताब घर समय साल दुनिया स्वास्थ्य खबर सप्ताह अध्ययन रिपोर्ट छोटा बड़ा "
           "नया पुराना हरा लाल अक्सर कभी नहीं हमेशा साथ फिर आज कल जाता पढ़ता लिखता बनाता देखता "
           "पाता खोलता सिखाता सीखता यात्रा बोलता बेचता खरीदता के साथ से बारे बाद पहले और लेकिन "
           "क्योंकि है",
           "।", True, False),
}

# sentences per language at scale=1: a ~10x spread between the largest and the smallest
DEFAULT_SIZES = {"en": 800, "fr": 500, "ru": 400, "zh": 300, "hi": 200, "ur": 120, "sw": 80}


def tiny_languages() -> list:
    """Codes of the built-in languages."""
    return list(DEFAULT_SIZES)


def _sentence(rng: random.Random, words: list, end: str, spaced: bool, capital: bool) -> str:
    n = rng.randint(4, 14)
    ws = [rng.choice(words) for _ in range(n)]
    if rng.random() < 0.3:  # numbers occur in real text too
        ws.insert(rng.randrange(len(ws)), str(rng.randint(1, 2030)))
    if capital:
        ws[0] = ws[0][:1].upper() + ws[0][1:]
    if rng.random() < 0.25 and len(ws) > 5:
        ws[len(ws) // 2] += "，" if not spaced else ","
    text = (" " if spaced else "").join(ws)
    return text + (end if rng.random() > 0.1 else ("?" if spaced else "？"))


def tiny_documents(lang: str, n_sentences: int, seed: int = 0) -> Iterable[list]:
    """Documents (lists of 1-8 sentences) of `lang`, n_sentences in total, deterministic in seed."""
    if lang not in _LANGS:
        raise ValueError(f"unknown tiny-corpus language {lang!r}; choose from {', '.join(_LANGS)}")
    words_s, end, spaced, capital = _LANGS[lang]
    words = words_s.split()
    rng = random.Random(f"{seed}-{lang}")
    left = n_sentences
    while left > 0:
        k = min(left, rng.randint(1, 8))
        yield [_sentence(rng, words, end, spaced, capital) for _ in range(k)]
        left -= k


def _with_validation_document(docs: list, lang: str, seed: int, valid_split: str, split_seed: int) -> list:
    """`docs`, with the first sentence of the last document redrawn (same language, same length of the
    corpus) until that document lands in the validation split, when none of them does."""
    cumulative = parse_split(valid_split)
    if len(docs) < 2 or any(document_split(d[0], split_seed, cumulative) == 1 for d in docs):
        return docs
    words_s, end, spaced, capital = _LANGS[lang]
    rng = random.Random(f"{seed}-{lang}-valid")
    for _ in range(100_000):
        first = _sentence(rng, words_s.split(), end, spaced, capital)
        if document_split(first, split_seed, cumulative) == 1:
            return docs[:-1] + [[first] + docs[-1][1:]]
    raise RuntimeError(f"tiny corpus: no {lang} sentence lands in the validation split {valid_split!r}")


def make_tiny_corpus(out_dir: str, languages: Optional[Iterable[str]] = None, scale: float = 1.0,
                     seed: int = 0, sizes: Optional[Dict[str, int]] = None, valid_split: str = DEFAULT_SPLIT,
                     split_seed: int = DEFAULT_SEED) -> Dict[str, str]:
    """Write `<out_dir>/<lang>.txt` for the tiny corpus; return {lang: path}.

    `scale` multiplies the default per-language sentence counts; `sizes` overrides them. Each
    language of two or more documents gets a validation document under tools/preprocess_data.py's
    `--split valid_split --seed split_seed` (its defaults unless given). Files are written to a
    temporary name and renamed when complete.
    """
    langs = list(languages) if languages is not None else tiny_languages()
    sizes = dict(sizes) if sizes is not None else {l: max(1, int(round(DEFAULT_SIZES.get(l, 100) * scale)))
                                                    for l in langs}
    os.makedirs(out_dir, exist_ok=True)
    paths = {}
    for lang in langs:
        path = os.path.join(out_dir, f"{lang}.txt")
        with atomic_write(path, encoding="utf-8") as f:
            docs = _with_validation_document(list(tiny_documents(lang, sizes[lang], seed)), lang, seed,
                                             valid_split, split_seed)
            for d, doc in enumerate(docs):
                if d:
                    f.write("\n")
                f.write("\n".join(doc) + "\n")
        paths[lang] = path
    return paths


def make_heldout_sentences(out_dir: str, languages: Optional[Iterable[str]] = None, n_sentences: int = 24,
                           seed: int = 99) -> Dict[str, str]:
    """Write `<out_dir>/<lang>.txt`, one sentence per line, drawn with another seed than the corpus
    (held-out text in the layout `xlmr-evaluate mbpc --data` and a study's flores200_devtest/ read);
    return {lang: path}."""
    langs = list(languages) if languages is not None else tiny_languages()
    os.makedirs(out_dir, exist_ok=True)
    paths = {}
    for lang in langs:
        paths[lang] = os.path.join(out_dir, f"{lang}.txt")
        with atomic_write(paths[lang], encoding="utf-8") as f:
            f.write("\n".join(s for d in tiny_documents(lang, n_sentences, seed=seed) for s in d) + "\n")
    return paths
