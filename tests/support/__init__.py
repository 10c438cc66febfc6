"""Test support library: the multi-process harness and the rank bodies, fixtures and data the tests share.

    harness         run_distributed / run_scenarios: real gloo ranks in spawned processes
    *_bodies        module-level rank bodies (picklable) per area: train, model, pipeline, sp, data, ...
    corpus          tiny indexed datasets written directly (write_corpus)
    prep            run the tools/ scripts, train a tiny SentencePiece model

A scenario of run_scenarios is (body name, {keyword: value}): each body is called as
body(rank, world_size, **keywords).
"""
