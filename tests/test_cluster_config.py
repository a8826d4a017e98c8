"""cluster.yaml validates against the cluster-launcher schema of the installed Ray, and pins our Ray version."""

import copy
import re
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cluster_cfg() -> dict:
    return yaml.safe_load((REPO / "cluster.yaml").read_text())


def test_cluster_yaml_passes_launcher_schema(cluster_cfg):
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(cluster_cfg))
    validate_config(prepared)
    types = prepared["available_node_types"]
    assert types[prepared["head_node_type"]]["resources"] == {"CPU": 0}
    gpu_types = [name for name in types if name != prepared["head_node_type"]]
    assert len(gpu_types) >= 2, "a single-GPU type for sweeps and a multi-GPU type for training"


def test_schema_check_is_real(cluster_cfg):
    from jsonschema.exceptions import ValidationError
    from ray.autoscaler._private.util import prepare_config, validate_config

    bad = copy.deepcopy(cluster_cfg)
    bad["available_node_types"]["gpu_1x"]["max_wrkers"] = 3
    with pytest.raises(ValidationError, match="max_wrkers"):
        validate_config(prepare_config(bad))


def test_cluster_image_matches_pinned_ray(cluster_cfg):
    import ray

    pinned = re.search(r'"ray\[[^\]]*\]==([\d.]+)"', (REPO / "pyproject.toml").read_text()).group(1)
    assert pinned == ray.__version__
    assert cluster_cfg["docker"]["image"].startswith(f"rayproject/ray:{pinned}-py311")
    assert any("pip install" in c and "diffseg" in c for c in cluster_cfg["setup_commands"])


def test_cluster_installs_this_checkout_and_shares_storage(cluster_cfg):
    """The checkout is synced and installed on every node; data, checkpoints and MLflow share one bucket and one
    tracking server; the dashboard port is the one the README forwards."""
    (repo_mount,) = [dst for dst, src in cluster_cfg["file_mounts"].items() if src == "."]
    assert any(f"pip install -q -e {repo_mount}" in c for c in cluster_cfg["setup_commands"])
    assert {".venv", "runs", "mlflow.db", ".git"} <= set(cluster_cfg["rsync_exclude"])
    text = (REPO / "cluster.yaml").read_text()
    assert len(set(re.findall(r"s3://([\w.-]+)/", text))) == 1, "one bucket for data, checkpoints and MLflow"
    assert any("s3://" in c and "/home/ray/data" in c for c in cluster_cfg["setup_commands"])  # the data
    assert any(
        "mlflow server" in c and "--artifacts-destination s3://" in c for c in cluster_cfg["head_setup_commands"]
    )
    for key in ("head_setup_commands", "worker_setup_commands"):
        assert any("export MLFLOW_TRACKING_URI=http://" in c for c in cluster_cfg[key]), key
    assert any("--dashboard-port=8265" in c for c in cluster_cfg["head_start_ray_commands"])
    head = cluster_cfg["head_node_type"]
    for name, node in cluster_cfg["available_node_types"].items():
        if name != head:  # workers reach the bucket through an instance profile
            assert "IamInstanceProfile" in node["node_config"], name


def _all_commands(cfg: dict) -> list[str]:
    keys = ("initialization_commands", "setup_commands", "head_setup_commands", "worker_setup_commands",
            "head_start_ray_commands", "worker_start_ray_commands")  # fmt: skip
    return [c for k in keys for c in cfg.get(k, [])]


def test_cluster_has_an_explicit_security_group(cluster_cfg):
    """Every node type names its security group, so the launcher never creates its default one (which opens SSH to
    0.0.0.0/0: ray/autoscaler/_private/aws/config.py, _create_default_ssh_inbound_rules); nor does the file ask the
    launcher for any rule open to the world."""
    groups = set()
    for name, node in cluster_cfg["available_node_types"].items():
        ids = node["node_config"].get("SecurityGroupIds")
        assert ids and all(isinstance(i, str) and i.startswith("sg-") for i in ids), name
        groups.add(tuple(ids))
    assert len(groups) == 1, "one group for every node (node-to-node traffic is allowed within it)"
    rules = cluster_cfg["provider"].get("security_group", {}).get("IpPermissions", [])
    assert not any(r.get("CidrIp") in ("0.0.0.0/0", "::/0") for rule in rules for r in rule.get("IpRanges", []))


def _flag_value(command: str, flag: str) -> str | None:
    m = re.search(rf"{re.escape(flag)}[ =](\"[^\"]*\"|'[^']*'|\S+)", command)
    return m.group(1).strip("\"'") if m else None


def test_services_are_not_bound_to_every_interface(cluster_cfg):
    """The MLflow server (no auth) listens on the head's private address, the dashboard on loopback; nothing binds
    0.0.0.0."""
    commands = _all_commands(cluster_cfg)
    (mlflow,) = [c for c in commands if "mlflow server" in c]
    host = _flag_value(mlflow, "--host")
    assert host is not None, "mlflow server without --host"
    assert host not in ("0.0.0.0", "::", "[::]", "*", "") and "hostname -I" in host  # the head's private address
    (head_start,) = [c for c in cluster_cfg["head_start_ray_commands"] if "ray start --head" in c]
    assert _flag_value(head_start, "--dashboard-host") in ("127.0.0.1", "localhost")
    assert not any("0.0.0.0" in c for c in commands)


def test_token_file_is_owner_only(cluster_cfg):
    """The Ray token is copied to every node (each needs it to join) and made 0600 before anything else runs."""
    (token,) = [dst for dst, src in cluster_cfg["file_mounts"].items() if "auth_token" in str(src)]
    first = cluster_cfg["setup_commands"][0]
    assert f"chmod 600 {token}" in first and f"chmod 700 {str(Path(token).parent)}" in first
