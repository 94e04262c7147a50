"""The multi-rank tests of tests/mpi on thread ranks (resist_mpi.comm.thread), at 2 and 4 ranks, in
the unit tier: the comm contract, and the exact-value tests of the exchange, the groups and the
compressed averages. Each test function runs on every rank thread with a ThreadComm as its comm
fixture, every parametrized case of it; the same files also run on real ranks (mpi and torch at 2
and 4 ranks, tests/e2e/test_mpi_suites.py; horovod under horovodrun, tests/e2e/test_horovod_launch.py).

Left to real ranks, by name below: what asks the launcher (test_world_matches_launcher), what
patches a module for every rank at once (monkeypatch would be shared by the threads), and the torch
backend's own allgather.
"""
import importlib.util
import inspect
import itertools
from pathlib import Path

import pytest
import torch

from resist_mpi.comm.thread import run_ranks

MPI_DIR = Path(__file__).resolve().parents[1] / "mpi"
FILES = {  # file -> tests that stay on real ranks only
    "test_comm_contract.py": {"test_world_matches_launcher", "test_torch_allgather_sends_what_its_counters_count"},
    "test_resist_exchange.py": {"test_assignments_come_from_rank_0_a_batch_per_broadcast"},
    "test_groups.py": set(),
    "test_compression.py": set(),
}
COMM_FIXTURES = ("c", "comm")


def _load(name):
    spec = importlib.util.spec_from_file_location(f"mpi_on_threads_{name[:-3]}", MPI_DIR / name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _grid(fn):
    """[(id, kwargs)] of every case of fn's @pytest.mark.parametrize marks."""
    axes = []
    for mark in getattr(fn, "pytestmark", []):
        if mark.name != "parametrize":
            continue
        names, values = mark.args[0], mark.args[1]
        names = [n.strip() for n in names.split(",")] if isinstance(names, str) else list(names)
        ids = mark.kwargs.get("ids")
        axis = []
        for i, v in enumerate(values):
            v = v.values if hasattr(v, "values") and hasattr(v, "marks") else (v if len(names) > 1 else (v,))
            axis.append((str(ids[i]) if ids else "-".join(map(str, v)), dict(zip(names, v))))
        axes.append(axis)
    return [("-".join(i for i, _ in combo), {k: v for _, kw in combo for k, v in kw.items()})
            for combo in itertools.product(*axes)]


def _cases():
    out = []
    for name, real_only in FILES.items():
        module = _load(name)
        for test, fn in vars(module).items():
            if not test.startswith("test_") or not inspect.isfunction(fn) or test in real_only:
                continue
            params = list(inspect.signature(fn).parameters)
            comm_arg = next(p for p in params if p in COMM_FIXTURES)
            fixtures = {p for p in params if p != comm_arg}
            for case, kwargs in _grid(fn):
                assert fixtures == set(kwargs), f"{name}::{test} needs fixtures {fixtures - set(kwargs)}"
                out.append(pytest.param(fn, comm_arg, kwargs, id=f"{name[5:-3]}::{test[5:]}" + (f"[{case}]" if case else "")))
    return out


@pytest.mark.parametrize("size", [2, 4])
@pytest.mark.parametrize("fn, comm_arg, kwargs", _cases())
def test_mpi_file_on_thread_ranks(fn, comm_arg, kwargs, size):
    torch.set_num_threads(1)
    run_ranks(size, lambda c: fn(**kwargs, **{comm_arg: c}))
