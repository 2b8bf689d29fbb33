import subprocess
import sys

import redis

from cli import services


def test_every_service_answers(stack):
    assert redis.Redis.from_url(stack.redis_url).ping() is True
    assert services._kafka_answers(stack)
    assert services._http_ok(f"{stack.mlflow_tracking_uri}/health")


def test_up_is_idempotent_and_status_reports(stack):
    before = {svc.name: svc.own_pid() for svc in services.services(stack)}
    out = subprocess.run([sys.executable, "-m", "cli.main", "services", "up"], capture_output=True, text=True,
                         check=True).stdout
    assert "kafka: already listening" in out and "redis: already listening" in out
    assert {svc.name: svc.own_pid() for svc in services.services(stack)} == before
    status = subprocess.run([sys.executable, "-m", "cli.main", "services", "status"],
                            capture_output=True, text=True, check=True).stdout
    assert "kafka" in status and "stopped" not in status


def test_cluster_up_refuses_a_port_that_is_not_a_cluster_node(stack, tmp_path):
    """The plain Redis's port (or another cluster's bus port, node port + 10000) is not a node to join."""
    import dataclasses

    import pytest

    from cli import redis_cluster
    from cli.services import ServiceError

    s = dataclasses.replace(stack, home_dir=tmp_path, redis_cluster_ports=f"{stack.redis_port},1,2")
    with pytest.raises(ServiceError, match=f"port {stack.redis_port} is taken by something that is not a Redis Cluster node"):
        redis_cluster.cluster_up(s, say=lambda _: None)
