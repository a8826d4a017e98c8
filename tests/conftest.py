"""Shared fixtures: the `../shared` folder (skipped cleanly when absent), GPU auto-skip, quiet Ray/MLflow env."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Set before anything starts Ray or MLflow: Ray workers inherit the environment.
for _k, _v in {
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS": "0",
    "RAY_DATA_DISABLE_PROGRESS_BARS": "1",
    "MLFLOW_DISABLE_TELEMETRY": "1",
    "TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S": "0",
    "RAY_AUTH_MODE": "disabled",
    # the jobs the tests start as subprocesses run tiny models too (one thread is fastest; see one_torch_thread)
    "OMP_NUM_THREADS": "1",
}.items():
    os.environ.setdefault(_k, _v)

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("DIFFSEG_SHARED", REPO.parent / "shared"))


RAY_GROUP = "ray"  # the xdist group of every test that starts Ray (`slow`): one worker runs them, one at a time


@pytest.hookimpl(tryfirst=True)  # before xdist reads the groups
def pytest_collection_modifyitems(config, items):
    """GPU tests skip without CUDA. Under `make test`'s two xdist workers (`-n 2 --dist loadgroup`): the tests that
    start Ray (`slow`) form one group, run one after another by one worker, first (they are the longer half), so that
    two Ray instances never share the 2 cores nor a `ray start` cluster; every other test keeps to its module's group
    (its module fixtures are built once), and the other worker runs those."""
    import torch

    skip_gpu = None if torch.cuda.is_available() else pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if skip_gpu is not None and "gpu" in item.keywords:
            item.add_marker(skip_gpu)
        group = RAY_GROUP if "slow" in item.keywords else item.nodeid.split("::", 1)[0]
        item.add_marker(pytest.mark.xdist_group(group))
    items.sort(key=lambda item: "slow" not in item.keywords)  # stable: collection order within each half


@pytest.fixture(autouse=True, scope="session")
def one_torch_thread():
    """Tests run tiny models: one intra-op thread is fastest, and several threads spinning against each other on a
    shared 2-core machine made tiny-model steps up to 30x slower. (Ray workers get OMP_NUM_THREADS=1 anyway.)"""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True, scope="session")
def private_state_key(tmp_path_factory):
    """Sweep-state signing (diffseg.core.trust) uses a per-user key file: tests use their own, never ~/.config's. Set in
    the environment, so job subprocesses inherit it."""
    from diffseg.core.trust import KEY_ENV

    before = os.environ.get(KEY_ENV)
    os.environ[KEY_ENV] = str(tmp_path_factory.mktemp("trust") / "state.key")
    yield
    if before is None:
        os.environ.pop(KEY_ENV, None)
    else:
        os.environ[KEY_ENV] = before


@pytest.fixture(autouse=True, scope="session")
def mlflow_store(tmp_path_factory):
    """Every job is an MLflow run: a test that does not choose a store writes to a throwaway SQLite file, never to
    ./mlflow.db of the checkout. Set in the environment, so job subprocesses and Ray workers inherit it."""
    if os.environ.get("MLFLOW_TRACKING_URI"):
        yield
        return
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"
    yield
    os.environ.pop("MLFLOW_TRACKING_URI", None)


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    if not SHARED.is_dir():
        pytest.skip(f"{SHARED} is absent")
    return SHARED


@pytest.fixture(scope="session")
def reference_dir(shared_dir) -> Path:
    path = shared_dir / "reference"
    if not path.is_dir():
        pytest.skip(f"{path} is absent")
    return path


@pytest.fixture(scope="session")
def data_dir(shared_dir) -> Path:
    path = shared_dir / "data"
    if not path.is_dir():
        pytest.skip(f"{path} is absent")
    return path


@pytest.fixture(scope="module")
def label_ray():
    """A local 2-CPU Ray with this checkout's code, for the Ray Data jobs (extract features, comparisons)."""
    import ray

    from diffseg.core.runtime import code_runtime_env

    ray.init(
        address="local", num_cpus=2, num_gpus=0, include_dashboard=False, object_store_memory=200 * 1024**2,
        runtime_env=code_runtime_env(),
    )  # fmt: skip
    yield
    ray.shutdown()
