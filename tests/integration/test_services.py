import subprocess
import sys

import redis

from recstream import services


def test_every_service_answers(stack):
    assert redis.Redis.from_url(stack.redis_url).ping() is True
    assert services._kafka_answers(stack)
    assert services._http_ok(f"{stack.mlflow_tracking_uri}/health")


def test_up_is_idempotent_and_status_reports(stack):
    before = {svc.name: svc.own_pid() for svc in services.services(stack)}
    out = subprocess.run([sys.executable, "-m", "recstream.cli", "services", "up"], capture_output=True, text=True,
                         check=True).stdout
    assert "kafka: already listening" in out and "redis: already listening" in out
    assert {svc.name: svc.own_pid() for svc in services.services(stack)} == before
    status = subprocess.run([sys.executable, "-m", "recstream.cli", "services", "status"],
                            capture_output=True, text=True, check=True).stdout
    assert "kafka" in status and "stopped" not in status
