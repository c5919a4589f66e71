import os
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_wbcatt_shards(tmp_path_factory) -> Path:
    """Shards of a 4/2/4-image synthetic WBCAtt release (64 px): enough for one training step."""
    from tests.fixtures.data import synthetic_shards

    return synthetic_shards(tmp_path_factory.mktemp("tiny-wbcatt"), seed=3, n_train=4, n_val=2, n_test=4)


@pytest.fixture(scope="session")
def table1_run(tmp_path_factory) -> dict:
    """One local run of table 1 on the tiny config (tests.fixtures.workflow.run_table1), shared by
    the end-to-end tests and the SLURM test (which compares its own jobs' files with these). Once
    per session also under pytest-xdist: it lives in the directory the workers share."""
    from tests.fixtures.workflow import shared_table1_run

    base = tmp_path_factory.getbasetemp()
    return shared_table1_run((base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "table1-run")


def pytest_configure(config):
    # Under pytest-xdist the workers share the machine's cores: torch's default of one thread per
    # core in every worker oversubscribes them (OpenMP threads spinning for a core).
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        import torch

        from medift.settings import available_cpus

        torch.set_num_threads(max(1, available_cpus() // workers))


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook, which reads the groups
def pytest_collection_modifyitems(items):
    for item in items:
        # End-to-end workflow runs and the SLURM cluster run the DAG: they belong to the slow tier too.
        if item.get_closest_marker("e2e") or item.get_closest_marker("slurm"):
            item.add_marker(pytest.mark.slow)
        # The tests that open the shared table-1 run's work directory go to one pytest-xdist worker
        # (`--dist loadgroup`, as .ci/test runs them): one copies it while another reads it.
        if "table1_run" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.xdist_group("table1_run"))
    # The longest first (a stable sort: the files' order within each class). Under xdist the
    # workers take tests in this order: the shared run's group on one, the other end-to-end runs
    # and then the SLURM run (which waits for the shared run to compare) on the other, and short
    # tests last, so that both workers stay busy to the end.
    items.sort(key=_start_order)


def _start_order(item) -> int:
    if "table1_run" in getattr(item, "fixturenames", ()):
        return 0
    if item.get_closest_marker("slurm"):
        return 2
    if item.get_closest_marker("e2e"):
        return 1
    return 3 if item.get_closest_marker("slow") else 4
