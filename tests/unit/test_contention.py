"""The settings every launch of the tests gets for sharing the cores (helpers.SHARED_CORES), and
benchmarks/contention.py's two environments, which must differ in exactly those."""
from helpers import SHARED_CORES, benchmark_module, mpi_env

contention = benchmark_module("contention")


def test_launches_share_the_cores_unless_the_user_says_otherwise(monkeypatch):
    for key in SHARED_CORES:
        monkeypatch.delenv(key, raising=False)
    env = mpi_env()
    assert {k: env[k] for k in SHARED_CORES} == {"OMPI_MCA_hwloc_base_binding_policy": "none",
                                                   "OMPI_MCA_mpi_yield_when_idle": "1"}
    monkeypatch.setenv("OMPI_MCA_hwloc_base_binding_policy", "core")
    assert mpi_env()["OMPI_MCA_hwloc_base_binding_policy"] == "core"  # the user's setting wins
    assert mpi_env(OMPI_MCA_mpi_yield_when_idle="0")["OMPI_MCA_mpi_yield_when_idle"] == "0"


def test_the_benchmark_compares_open_mpis_own_placement_with_the_shared_settings(monkeypatch):
    monkeypatch.setenv("OMPI_MCA_mpi_yield_when_idle", "1")  # set by the caller: still left out
    own, shared = contention.environment(False), contention.environment(True)
    assert not SHARED_CORES.keys() & own.keys()
    assert {k: shared[k] for k in SHARED_CORES} == SHARED_CORES
    assert {k: v for k, v in shared.items() if k not in SHARED_CORES} == own
