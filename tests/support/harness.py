"""Harness for real multi-process tests on gloo: spawn N ranks on free ports, gather results.

    def _body(rank, world_size, x):            # module-level, so it pickles
        ...; return some_picklable_value
    results = run_distributed(_body, world_size=2, args=(x,), timeout=300)

Each rank runs with torch.distributed initialised (gloo, CPU); its return value comes back in
`results[rank]`. A rank's exception fails the test with that rank's traceback; a hang fails it
after `timeout` seconds and kills every rank.
"""
from __future__ import annotations

import os
import pickle
import socket
import tempfile
import traceback

import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world_size, port, fn, args, outdir, init_pg):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size))
    import torch
    import torch.distributed as dist
    torch.set_num_threads(1)
    path = os.path.join(outdir, f"rank{rank}.pkl")
    try:
        if init_pg:
            dist.init_process_group("gloo", rank=rank, world_size=world_size)
        result = ("ok", fn(rank, world_size, *args))
    except BaseException:  # noqa: BLE001 - report any failure to the parent
        result = ("error", traceback.format_exc())
    with open(path + ".tmp", "wb") as f:
        pickle.dump(result, f)
    os.replace(path + ".tmp", path)
    if init_pg and dist.is_initialized():
        if result[0] == "ok":
            try:
                dist.barrier()
            except Exception:
                pass
        dist.destroy_process_group()


def run_distributed(fn, world_size: int, args: tuple = (), timeout: float = 300, init_pg: bool = True):
    """Run fn(rank, world_size, *args) in `world_size` spawned processes; return their results."""
    port = free_port()
    with tempfile.TemporaryDirectory() as outdir:
        ctx = mp.start_processes(_worker, args=(world_size, port, fn, args, outdir, init_pg),
                                 nprocs=world_size, join=False, start_method="spawn")
        try:
            import time
            deadline = time.monotonic() + timeout
            while not ctx.join(timeout=max(0.1, min(5.0, deadline - time.monotonic()))):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"distributed test timed out after {timeout}s")
        except mp.ProcessRaisedException:
            pass
        except mp.ProcessExitedException:
            pass
        finally:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
        results, errors = [], []
        for r in range(world_size):
            path = os.path.join(outdir, f"rank{r}.pkl")
            if not os.path.exists(path):
                errors.append(f"rank {r}: exited without a result (exit code {ctx.processes[r].exitcode})")
                results.append(None)
                continue
            with open(path, "rb") as f:
                status, value = pickle.load(f)
            if status == "error":
                errors.append(f"rank {r}:\n{value}")
                results.append(None)
            else:
                results.append(value)
        if errors:
            raise AssertionError("distributed test failed\n" + "\n".join(errors))
        return results


def _run_scenarios(rank, world_size, module_name, scenarios):
    import importlib
    mod = importlib.import_module(module_name)
    return [getattr(mod, name)(rank, world_size, **kwargs) for name, kwargs in scenarios]


def run_scenarios(module_name: str, world_size: int, scenarios: dict, timeout: float = 540) -> dict:
    """Run several {label: (body name in module_name, {keyword: value})} scenarios in one set of
    `world_size` processes (spawning is the slow part of multi-process tests); each body is called
    as body(rank, world_size, **keywords). Returns {label: [result per rank]}."""
    for label, scenario in scenarios.items():
        if not (isinstance(scenario, tuple) and len(scenario) == 2 and isinstance(scenario[1], dict)):
            raise TypeError(f"scenario {label!r}: give (body name, dict of keyword arguments), got {scenario!r}")
    per_rank = run_distributed(_run_scenarios, world_size, args=(module_name, list(scenarios.values())),
                               timeout=timeout)
    return {label: [r[i] for r in per_rank] for i, label in enumerate(scenarios)}
