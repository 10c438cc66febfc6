"""The installed commands (their list: setup.py `console_scripts`); each module has `main(argv=None) -> int`.

    xlmr-train            xlmr_mp.train            pretraining (= python -m xlmr_mp.train)
    xlmr-preprocess       cli/preprocess_data.py   corpus -> MMIDIDX datasets
    xlmr-train-spm        cli/train_spm.py         SentencePiece vocabulary
    xlmr-merge            cli/merge_datasets.py    concatenate datasets
    xlmr-evaluate         cli/evaluate.py          mBPC, retrieval, zero-shot transfer
    xlmr-study            cli/study.py             scaling and schedule studies
    xlmr-convert          cli/convert_checkpoint.py  Hugging Face <-> xlmr_mp, resharding
    xlmr-plan             cli/plan.py              memory and step time of a layout
    xlmr-compile-kernels  cli/compile_kernels.py   compile-only check of csrc/cuda (a source checkout)
    xlmr-download-cc100   cli/download_cc100.py    CC-100 languages

`python tools/<module>.py` runs the same main (tools/ holds thin wrappers).
"""
from __future__ import annotations

import os


def source_root() -> str:
    """The source checkout the package is imported from (an editable install: the folder above
    xlmr_mp/); the current directory when the package is installed from a wheel (no checkout)."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    return root if os.path.isfile(os.path.join(root, "setup.py")) else os.getcwd()
