"""Local Kafka (KRaft), Redis and MLflow on loopback: install, start, stop, status; idempotent."""
from __future__ import annotations

import base64
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from recstream.settings import Settings

REPO_ROOT = Path(__file__).resolve().parent.parent
KAFKA_POM = REPO_ROOT / "deploy" / "kafka" / "pom.xml"


class ServiceError(RuntimeError):
    pass


def port_open(port: int, host: str = "127.0.0.1", timeout_s: float = 0.5) -> bool:
    with socket.socket() as s:
        s.settimeout(timeout_s)
        return s.connect_ex((host, port)) == 0


def wait_for(what: str, ready: Callable[[], bool], timeout_s: float, log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if ready():
            return
        time.sleep(0.25)
    tail = ""
    if log and log.exists():
        tail = "\n--- last lines of " + str(log) + " ---\n" + "\n".join(log.read_text(errors="replace").splitlines()[-30:])
    raise ServiceError(f"{what} not ready after {timeout_s:.0f} s{tail}")


@dataclass
class Service:
    name: str
    port: int
    home: Path

    @property
    def pid_file(self) -> Path:
        return self.home / "run" / f"{self.name}.pid"

    @property
    def log_file(self) -> Path:
        return self.home / "logs" / f"{self.name}.log"

    def own_pid(self) -> int | None:
        """The pid we started, if that process still lives."""
        try:
            pid = int(self.pid_file.read_text())
            os.kill(pid, 0)
            return pid
        except (FileNotFoundError, ValueError, ProcessLookupError, PermissionError):
            return None

    def spawn(self, argv: list[str], env: dict[str, str] | None = None) -> int:
        self.pid_file.parent.mkdir(parents=True, exist_ok=True)
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_file, "ab") as log:
            proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    start_new_session=True, env={**os.environ, **(env or {})})
        self.pid_file.write_text(str(proc.pid))
        return proc.pid

    def stop(self, timeout_s: float = 30) -> bool:
        pid = self.own_pid()
        if pid is None:
            self.pid_file.unlink(missing_ok=True)
            return False
        os.killpg(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and self.own_pid() is not None:
            _reap(pid)
            time.sleep(0.2)
        if self.own_pid() is not None:
            os.killpg(pid, signal.SIGKILL)
        self.pid_file.unlink(missing_ok=True)
        return True

    def status(self) -> str:
        pid = self.own_pid()
        listening = port_open(self.port)
        if pid and listening:
            return f"running (pid {pid}, port {self.port})"
        if pid:
            return f"starting or stuck (pid {pid}, port {self.port} closed)"
        if listening:
            return f"port {self.port} in use by a process we did not start (reused)"
        return "stopped"


def _reap(pid: int) -> None:
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


# -- install ------------------------------------------------------------------------------------

def kafka_libs(s: Settings) -> Path:
    return s.home_dir / "kafka" / "libs"


def install(s: Settings, say: Callable[[str], None] = print) -> None:
    """Fetch what the local services need: Kafka jars by Maven, redis-server by apt."""
    libs = kafka_libs(s)
    if not any(libs.glob("kafka_2.13-*.jar")):
        if not shutil.which("mvn"):
            raise ServiceError("Maven (mvn) is needed to fetch the Kafka jars: apt-get install maven")
        say(f"fetching Kafka jars with Maven into {libs} ...")
        subprocess.run(["mvn", "-q", "-B", "-f", str(KAFKA_POM), "dependency:copy-dependencies",
                        f"-Dlibs.dir={libs.resolve()}"], check=True)
    if not shutil.which("redis-server"):
        if os.geteuid() != 0 or not shutil.which("apt-get"):
            raise ServiceError("redis-server is missing: install Debian's redis-server package")
        say("installing redis-server with apt-get ...")
        subprocess.run(["apt-get", "update", "-qq"], check=True)
        subprocess.run(["apt-get", "install", "-y", "-qq", "redis-server"], check=True,
                       env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})


# -- Kafka --------------------------------------------------------------------------------------

KAFKA_PROPERTIES = """\
# Written by `recstream services up`: single-node KRaft, broker and controller in one process.
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@127.0.0.1:{controller_port}
listeners=PLAINTEXT://127.0.0.1:{port},CONTROLLER://127.0.0.1:{controller_port}
advertised.listeners=PLAINTEXT://127.0.0.1:{port}
controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAINTEXT
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT
log.dirs={data}
num.partitions=1
default.replication.factor=1
min.insync.replicas=1
offsets.topic.replication.factor=1
offsets.topic.num.partitions=8
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
group.initial.rebalance.delay.ms=0
# Faust creates its changelog and reply topics itself; ours are created by `recstream topics create`.
auto.create.topics.enable=true
log.retention.hours=168
"""

LOG4J2 = """\
Configuration:
  status: warn
  Appenders:
    Console:
      name: STDOUT
      PatternLayout:
        pattern: "[%d] %p %m (%c)%n"
  Loggers:
    Root:
      level: WARN
      AppenderRef:
        - ref: STDOUT
    Logger:
      - name: kafka.server.KafkaRaftServer
        level: INFO
      - name: kafka.server.BrokerServer
        level: INFO
"""


def _java() -> str:
    java = shutil.which("java")
    if not java:
        raise ServiceError("Java 17+ is needed for Kafka: apt-get install openjdk-17-jre-headless")
    return java


def kafka_up(s: Settings, say: Callable[[str], None] = print) -> None:
    svc = Service("kafka", s.kafka_port, s.home_dir)
    if port_open(s.kafka_port):
        say(f"kafka: already listening on {s.kafka_port}")
        return
    libs = kafka_libs(s)
    if not any(libs.glob("kafka_2.13-*.jar")):
        raise ServiceError(f"no Kafka jars in {libs}: run `recstream services install` first")
    root = (s.home_dir / "kafka").resolve()
    data, conf = root / "data", root / "config"
    conf.mkdir(parents=True, exist_ok=True)
    props = conf / "server.properties"
    props.write_text(KAFKA_PROPERTIES.format(port=s.kafka_port, controller_port=s.kafka_controller_port, data=data))
    (conf / "log4j2.yaml").write_text(LOG4J2)
    classpath = f"{libs.resolve()}/*"
    jvm = [_java(), f"-Xmx{s.kafka_heap_mb}m", f"-Xms{min(256, s.kafka_heap_mb)}m",
           f"-Dlog4j2.configurationFile={conf / 'log4j2.yaml'}", f"-Dkafka.logs.dir={root / 'logs'}", "-cp", classpath]
    if not (data / "meta.properties").exists():
        cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).rstrip(b"=").decode()
        say(f"kafka: formatting storage in {data} (cluster {cluster_id})")
        # --cluster-id=ID in one argument: a base64 id may start with "-" (1 in 64), which the tool's
        # argument parser would take for an option
        subprocess.run(jvm + ["kafka.tools.StorageTool", "format", f"--cluster-id={cluster_id}", "--config", str(props)],
                       check=True, stdout=subprocess.DEVNULL)
    pid = svc.spawn(jvm + ["kafka.Kafka", str(props)])
    say(f"kafka: started pid {pid}, waiting for the broker ...")
    wait_for("kafka", lambda: port_open(s.kafka_port) and _kafka_answers(s), 90, svc.log_file)
    say(f"kafka: ready on 127.0.0.1:{s.kafka_port}")


def _kafka_answers(s: Settings) -> bool:
    """A metadata round trip through aiokafka: the port alone opens before the broker serves."""
    import asyncio

    from aiokafka.admin import AIOKafkaAdminClient

    async def probe() -> bool:
        admin = AIOKafkaAdminClient(bootstrap_servers=s.kafka_bootstrap, request_timeout_ms=3000)
        try:
            await admin.start()
            await admin.list_topics()
            return True
        except Exception:
            return False
        finally:
            await admin.close()

    # Not asyncio.run: it leaves the thread with no current event loop (set_event_loop(None)), and this
    # runs inside processes that have one (the test session's, when `up` had to start Kafka).
    loop = asyncio.new_event_loop()
    try:
        return loop.run_until_complete(probe())
    finally:
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()


# -- Redis --------------------------------------------------------------------------------------

def redis_up(s: Settings, say: Callable[[str], None] = print) -> None:
    svc = Service("redis", s.redis_port, s.home_dir)
    if port_open(s.redis_port):
        say(f"redis: already listening on {s.redis_port} (reused)")
        return
    server = shutil.which("redis-server")
    if not server:
        raise ServiceError("redis-server is missing: run `recstream services install` first")
    data = (s.home_dir / "redis").resolve()
    data.mkdir(parents=True, exist_ok=True)
    # Features are rebuilt from Kafka, so snapshots are enough (appendonly would cost throughput),
    # and a failed snapshot must not stop the feature writes.
    svc.spawn([server, "--bind", "127.0.0.1", "--port", str(s.redis_port), "--dir", str(data),
               "--daemonize", "no", "--save", "60 1000", "--stop-writes-on-bgsave-error", "no",
               "--protected-mode", "yes"])
    wait_for("redis", lambda: port_open(s.redis_port), 20, svc.log_file)
    say(f"redis: ready on 127.0.0.1:{s.redis_port}")


# -- MLflow -------------------------------------------------------------------------------------

def mlflow_up(s: Settings, say: Callable[[str], None] = print) -> None:
    svc = Service("mlflow", s.mlflow_port, s.home_dir)
    if port_open(s.mlflow_port):
        say(f"mlflow: already listening on {s.mlflow_port}")
        return
    root = (s.home_dir / "mlflow").resolve()
    (root / "artifacts").mkdir(parents=True, exist_ok=True)
    mlflow = Path(sys.executable).with_name("mlflow")
    svc.spawn([str(mlflow), "server", "--host", "127.0.0.1", "--port", str(s.mlflow_port), "--workers", "1",
               "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
               "--artifacts-destination", str(root / "artifacts")])
    say("mlflow: started, waiting for /health ...")
    wait_for("mlflow", lambda: _http_ok(f"{s.mlflow_tracking_uri}/health"), 120, svc.log_file)
    say(f"mlflow: ready on {s.mlflow_tracking_uri} (sqlite registry, artifacts in {root / 'artifacts'})")


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as r:
            return r.status == 200
    except OSError:
        return False


# -- all ----------------------------------------------------------------------------------------

def services(s: Settings) -> list[Service]:
    return [Service("kafka", s.kafka_port, s.home_dir), Service("redis", s.redis_port, s.home_dir),
            Service("mlflow", s.mlflow_port, s.home_dir)]


def up(s: Settings, say: Callable[[str], None] = print, with_mlflow: bool = True) -> None:
    redis_up(s, say)
    kafka_up(s, say)
    if with_mlflow:
        mlflow_up(s, say)


def down(s: Settings, say: Callable[[str], None] = print) -> None:
    """Stop only what `up` started (pid files); services found already running are left alone."""
    for svc in reversed(services(s)):
        say(f"{svc.name}: {'stopped' if svc.stop() else 'not started by us, left alone'}")
    from cli.redis_cluster import nodes  # the tests' Redis Cluster (cluster-up), if we started it
    for svc in nodes(s):
        if svc.own_pid() is not None and svc.stop():
            say(f"{svc.name}: stopped")


def status(s: Settings) -> dict[str, str]:
    return {svc.name: svc.status() for svc in services(s)}
