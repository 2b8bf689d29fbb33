# syntax=docker/dockerfile:1
# One image for every recstream process (topics, workers, api, trainer) and for the MLflow
# server in docker-compose.yml. The entry point is the `recstream` command; pass a subcommand.
#   docker build -t recstream:local .
#   docker run --rm recstream:local settings
FROM python:3.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# pyspark (batch/) starts a JVM: Java 17 is what the stack was checked with (shared/STACK_FACTS.md).
# procps: Spark's launch scripts call `ps`. The man1 folder: slim images leave out /usr/share/man,
# and the JRE's postinst registers man pages there (harmless if it already exists).
RUN mkdir -p /usr/share/man/man1 \
 && apt-get update \
 && apt-get install -y --no-install-recommends openjdk-17-jre-headless procps libopenblas0-pthread \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /app

# Dependencies first, in their own layer, read from pyproject.toml: editing the code then does not
# re-download the ~2 GB stack. The list is [project].dependencies plus the `cpu` extra (faiss-cpu).
COPY pyproject.toml ./
RUN python -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; \
print('\n'.join(p['dependencies'] + p['optional-dependencies']['cpu']))" > /tmp/requirements.txt \
 && pip install --no-cache-dir -r /tmp/requirements.txt \
 && rm /tmp/requirements.txt

# The project itself. One COPY per folder: `COPY a b ./` would merge their contents into ./.
# README.m[d]: a wildcard may match nothing, so the build does not need a README to exist yet
# (pyproject.toml is named again because the legacy builder refuses a COPY that matches nothing).
COPY pyproject.toml README.m[d] ./
COPY recstream ./recstream
COPY schemas ./schemas
COPY streams ./streams
COPY agents ./agents
COPY serving ./serving
COPY batch ./batch
COPY models ./models
COPY cli ./cli
COPY deploy ./deploy
RUN pip install --no-cache-dir ".[cpu]" \
 && rm -rf build *.egg-info

# Run as a non-root user. /data is RECSTREAM_HOME_DIR (Faust RocksDB tables, scratch files);
# /mlflow is where the compose file's MLflow server keeps its sqlite database and artifacts.
# Both are created here, owned by the user, so that named volumes mounted on them inherit it.
RUN useradd --create-home --uid 10001 recstream \
 && mkdir -p /data /mlflow/artifacts \
 && chown -R recstream:recstream /data /mlflow
USER recstream
ENV RECSTREAM_HOME_DIR=/data
VOLUME /data

ENTRYPOINT ["recstream"]
CMD ["--help"]
