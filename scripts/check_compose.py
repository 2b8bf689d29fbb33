"""CI check of docker-compose.yml where `docker compose` is missing: it parses, every service that
runs the project image calls a real `recstream` subcommand, and every dependency is a service."""
import sys
from pathlib import Path

import yaml

from cli.main import build_parser

compose = yaml.safe_load((Path(__file__).resolve().parent.parent / "docker-compose.yml").read_text())
services = compose["services"]
parser = build_parser()
problems = []
for name, svc in services.items():
    for dep in (svc.get("depends_on") or {}):
        if dep not in services:
            problems.append(f"{name}: depends on unknown service {dep}")
    if svc.get("image") == "recstream:local" and "planned" not in (svc.get("profiles") or []) and svc.get("entrypoint") is None:
        try:
            parser.parse_args(svc["command"])
        except SystemExit:
            problems.append(f"{name}: `recstream {' '.join(svc['command'])}` is not a valid command")
print("\n".join(problems) or f"docker-compose.yml: {len(services)} services check out")
sys.exit(1 if problems else 0)
