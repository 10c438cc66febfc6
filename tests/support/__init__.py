"""Test support library: what several test areas share (an area's own rank bodies sit beside its tests,
e.g. tests/parallel/pipeline_bodies.py; spawned ranks import them by module name, `tests.parallel.x`).

    harness         run_distributed / run_scenarios: real gloo ranks in spawned processes
    train_bodies    the trainer's rank bodies and tiny config (train, checkpoint, study, eval tests)
    model_bodies    tiny HF / TP model cases (model, parallel, checkpoint, eval tests)
    model_case      a tiny model and padded batch (kernels, model, train tests)
    host_syncs      counting host syncs with a TorchDispatchMode
    corpus          tiny indexed datasets written directly (write_corpus)
    prep            run the tools/ scripts, train a tiny SentencePiece model

A scenario of run_scenarios is (body name, {keyword: value}): each body is called as
body(rank, world_size, **keywords).
"""
