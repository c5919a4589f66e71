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
    the end-to-end test and the SLURM test (which compares its own jobs' files with these)."""
    from tests.fixtures.workflow import run_table1

    return run_table1(tmp_path_factory.mktemp("table1-run"))


def pytest_collection_modifyitems(items):
    # End-to-end workflow runs and the SLURM cluster run the DAG: they belong to the slow tier too.
    for item in items:
        if item.get_closest_marker("e2e") or item.get_closest_marker("slurm"):
            item.add_marker(pytest.mark.slow)
