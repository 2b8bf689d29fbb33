#!/usr/bin/env bash
# Installs what a fresh machine lacks, idempotently: Debian packages (Java, Maven, Redis, Chromium),
# the Python virtual environment in .venv, and the Kafka broker's jars in .local/kafka/libs.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
# a JDK: the Java example (examples/java) runs from source, which needs the compiler (jdk.compiler)
command -v javac >/dev/null || need+=(openjdk-17-jdk-headless)
command -v mvn >/dev/null || need+=(maven)
command -v redis-server >/dev/null || need+=(redis-server)
command -v chromium >/dev/null || need+=(chromium)   # the dashboard's browser test (Playwright)
# a native BLAS and LAPACK for Spark ALS (netlib loads libblas.so.3 and liblapack.so.3; without them it falls back
# to pure Java and prints "netlib-blas: dlopen(libblas.so.3) failed")
ldconfig -p | grep -q 'liblapack\.so\.3 ' || need+=(libopenblas0-pthread)
if [ ${#need[@]} -gt 0 ]; then
  echo "== apt-get install ${need[*]}"
  sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${need[@]}" >/dev/null
fi

python=${PYTHON:-}
if [ -z "$python" ]; then
  for candidate in python3.11 python3.12 python3; do
    if command -v "$candidate" >/dev/null && "$candidate" -c 'import sys; sys.exit(not (3, 11) <= sys.version_info[:2] < (3, 13))'; then
      python=$candidate; break
    fi
  done
fi
[ -n "$python" ] || { echo "Python 3.11 or 3.12 is needed (set PYTHON=...)" >&2; exit 1; }

# FAISS: the GPU build where a GPU is present, else the CPU build; the code is the same.
faiss=cpu
command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1 && faiss=gpu

stamp=.venv/.installed-$faiss
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  echo "== Python environment in .venv ($python, faiss-$faiss)"
  [ -x .venv/bin/python ] || "$python" -m venv .venv
  .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q -e ".[$faiss,dev]"
  rm -f .venv/.installed-*
  touch "$stamp"
fi

echo "== Kafka jars (Maven) and Redis"
.venv/bin/recstream services install
