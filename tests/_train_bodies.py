"""Rank bodies for the trainer's multi-process tests (spawned processes import this module)."""
import torch
import torch.distributed as dist

from xlmr_mp.config import OptimConfig


def _tiny_net():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 3))


def _batches(step):
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(4, 6, generator=g), torch.randn(4, 3, generator=g)


def _run(net, opt, reducer, steps, rows):
    """Each step: the global batch is 4 rows; this process handles `rows` in micro-batches of 1."""
    for s in range(steps):
        x, y = _batches(s)
        if reducer is not None:
            reducer.start_step(len(rows))
        for i in rows:
            loss = ((net(x[i:i + 1]) - y[i:i + 1]) ** 2).sum() / 4.0
            loss.backward()
        if reducer is not None:
            reducer.finish()
        opt.step()
        opt.zero_grad()


def dp_reference(steps):
    from xlmr_mp.parallel.data_parallel import DistributedAdamW
    net = _tiny_net()
    opt = DistributedAdamW(list(net.named_parameters()), OptimConfig(lr=1e-2))
    _run(net, opt, None, steps, rows=[0, 1, 2, 3])
    return {n: p.detach().clone() for n, p in net.named_parameters()}


def dp_rank_body(rank, world_size, steps, zero):
    from xlmr_mp.parallel.data_parallel import DistributedAdamW, GradReducer
    net = _tiny_net()
    named = list(net.named_parameters())
    reducer = GradReducer([p for _, p in named], None, bucket_mb=1e-4)  # tiny buckets: several of them
    assert len(reducer.buckets) > 1
    opt = DistributedAdamW(named, OptimConfig(lr=1e-2), dp_group=None, shard=zero)
    _run(net, opt, reducer, steps, rows=[2 * rank, 2 * rank + 1])
    out = {n: p.detach().clone() for n, p in net.named_parameters()}
    out["__owned__"] = list(opt.state_by_name().keys())
    return out
