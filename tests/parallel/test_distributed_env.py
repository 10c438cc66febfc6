"""Rank/world discovery from torchrun, SLURM, Open MPI and PMI variables."""
from xlmr_mp.distributed import _first_slurm_host, discover_env


def test_torchrun_wins():
    e = discover_env({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "SLURM_PROCID": "0",
                      "SLURM_NTASKS": "2", "MASTER_ADDR": "h1", "MASTER_PORT": "1234"})
    assert (e.rank, e.world_size, e.local_rank, e.source, e.master_addr, e.master_port) == (3, 8, 1, "torchrun", "h1", 1234)


def test_slurm():
    e = discover_env({"SLURM_PROCID": "5", "SLURM_NTASKS": "16", "SLURM_LOCALID": "1",
                      "SLURM_JOB_NODELIST": "gpu[012-015,020]", "SLURM_JOB_ID": "4242"})
    assert (e.rank, e.world_size, e.local_rank, e.source) == (5, 16, 1, "slurm")
    assert e.master_addr == "gpu012" and e.master_port == 20000 + 4242
    e = discover_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_JOB_ID": "19999"})
    assert 20000 <= e.master_port < 32768       # below Linux's ephemeral ports, which outgoing connections take


def test_slurm_hostlist_forms():
    assert _first_slurm_host("node7") == "node7"
    assert _first_slurm_host("a[3,5-6],b1") == "a3"


def test_openmpi_and_pmi():
    e = discover_env({"OMPI_COMM_WORLD_RANK": "2", "OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_LOCAL_RANK": "0"})
    assert (e.rank, e.world_size, e.source) == (2, 4, "mpi")
    e = discover_env({"PMI_RANK": "1", "PMI_SIZE": "2", "MPI_LOCALRANKID": "1"})
    assert (e.rank, e.world_size, e.local_rank, e.source) == (1, 2, 1, "pmi")


def test_single_process():
    e = discover_env({})
    assert (e.rank, e.world_size, e.source) == (0, 1, "single")


def test_bad_value_names_variable():
    import pytest
    with pytest.raises(RuntimeError, match="SLURM_PROCID"):
        discover_env({"SLURM_PROCID": "x", "SLURM_NTASKS": "2"})
