"""xlmr_mp: Megatron-style model-parallel pretraining of XLM-R-style multilingual masked LMs."""
__version__ = "0.1.0"


def load_model(path, **kwargs):
    """Load a checkpoint (any TP/PP layout) as a single-process model; see xlmr_mp.checkpoint.load."""
    from xlmr_mp.checkpoint.load import load_model as _load
    return _load(path, **kwargs)
