"""A local Redis Cluster on loopback (three masters, no replicas) from Debian's redis-server: start, stop, status; idempotent."""
from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable

import redis

from cli.services import Service, ServiceError, port_open, wait_for
from recstream.settings import Settings

BUS_OFFSET = 10_000   # a cluster node also listens on its port + 10000 (the cluster bus)


def nodes(s: Settings) -> list[Service]:
    return [Service(f"redis-cluster-{p}", p, s.home_dir) for p in s.redis_cluster_port_list]


def cluster_info(port: int) -> dict[str, str]:
    """CLUSTER INFO of one node ({} when it does not answer)."""
    try:
        with redis.Redis(host="127.0.0.1", port=port, socket_timeout=2, decode_responses=True) as r:
            raw = r.execute_command("CLUSTER", "INFO")
    except redis.RedisError:
        return {}
    if isinstance(raw, dict):
        return {k: str(v) for k, v in raw.items()}
    return dict(line.split(":", 1) for line in raw.splitlines() if ":" in line)


def formed(s: Settings) -> bool:
    """Every node answers cluster_state:ok and knows every master (so none is a stray single node)."""
    want = len(s.redis_cluster_port_list)
    for port in s.redis_cluster_port_list:
        info = cluster_info(port)
        if info.get("cluster_state") != "ok" or int(info.get("cluster_size", 0)) != want:
            return False
    return True


def cluster_up(s: Settings, say: Callable[[str], None] = print) -> None:
    """Start the masters not yet listening, join them into one cluster unless they already are, wait until ok."""
    ports = s.redis_cluster_port_list
    if len(ports) < 3:
        raise ServiceError("a Redis Cluster needs at least three masters: set RECSTREAM_REDIS_CLUSTER_PORTS")
    server = shutil.which("redis-server")
    if not server:
        raise ServiceError("redis-server is missing: run `recstream services install` first")
    for svc in nodes(s):
        if port_open(svc.port):
            if not cluster_info(svc.port):   # a plain Redis, another cluster's bus port, another service
                raise ServiceError(f"port {svc.port} is taken by something that is not a Redis Cluster node: "
                                   f"choose other RECSTREAM_REDIS_CLUSTER_PORTS")
            continue
        if port_open(svc.port + BUS_OFFSET):
            raise ServiceError(f"port {svc.port + BUS_OFFSET}, the cluster bus of node {svc.port}, is taken (perhaps by "
                               f"another cluster's node {svc.port}): choose other RECSTREAM_REDIS_CLUSTER_PORTS")
        data = (s.home_dir / "redis-cluster" / str(svc.port)).resolve()
        data.mkdir(parents=True, exist_ok=True)
        # nodes.conf in the data folder remembers the node's id and slots: a restarted node rejoins.
        svc.spawn([server, "--bind", "127.0.0.1", "--port", str(svc.port), "--dir", str(data),
                   "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                   "--cluster-node-timeout", "5000", "--daemonize", "no", "--save", "60 1000",
                   "--appendonly", "no", "--stop-writes-on-bgsave-error", "no", "--protected-mode", "yes"])
        wait_for(svc.name, lambda p=svc.port: port_open(p), 20, svc.log_file)
        say(f"redis cluster: node started on 127.0.0.1:{svc.port}")
    if not formed(s):
        assigned = [int(cluster_info(p).get("cluster_slots_assigned", 0)) for p in ports]
        if not any(assigned):   # fresh nodes: form the cluster (nodes that hold slots are converging)
            say(f"redis cluster: creating it from {', '.join(map(str, ports))} ...")
            subprocess.run(["redis-cli", "--cluster", "create", *(f"127.0.0.1:{p}" for p in ports),
                            "--cluster-replicas", "0", "--cluster-yes"], check=True, stdout=subprocess.DEVNULL)
        wait_for("redis cluster", lambda: formed(s), 60, nodes(s)[0].log_file)
    say(f"redis cluster: ok on 127.0.0.1:{', '.join(map(str, ports))} (redis://127.0.0.1:{ports[0]}/0)")


def cluster_down(s: Settings, say: Callable[[str], None] = print) -> None:
    """Stop the nodes we started (pid files); their data folders stay, so cluster-up rejoins them."""
    for svc in nodes(s):
        say(f"{svc.name}: {'stopped' if svc.stop() else 'not started by us, left alone'}")


def cluster_status(s: Settings) -> dict[str, str]:
    out = {svc.name: svc.status() for svc in nodes(s)}
    out["redis-cluster"] = "ok" if formed(s) else "not formed"
    return out


def url(s: Settings) -> str:
    """redis_url for the local cluster (its first master)."""
    return f"redis://127.0.0.1:{s.redis_cluster_port_list[0]}/0"
