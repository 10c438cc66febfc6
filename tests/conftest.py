import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))
SHARED_CORPUS = os.path.abspath(os.path.join(ROOT, "..", "shared", "corpus"))


@pytest.fixture
def shared_corpus():
    """Path of ../shared/corpus; the test is skipped when it is not beside the checkout."""
    if not os.path.isdir(SHARED_CORPUS):
        pytest.skip("../shared/corpus not present")
    return SHARED_CORPUS
