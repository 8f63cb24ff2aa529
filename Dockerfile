# geobouncer: PostgreSQL connection pooler, PgBouncer-compatible.
#
#   docker build -t geobouncer .
#   docker compose up --build          # with a PostgreSQL primary and replica: docker-compose.yml
#
# The image reads /etc/geobouncer/geobouncer.ini (pgbouncer.ini format) and the
# auth_file it names from a mounted directory. deploy/docker/ is a working example
# (listen_addr = *, no Unix socket, servers reached by the compose services' names);
# to run the image by hand next to the compose file's PostgreSQL servers:
#
#   docker compose up -d primary replica
#   docker run --rm -p 6432:6432 --network geobouncer_default \
#       -v "$PWD/deploy/docker:/etc/geobouncer:ro" geobouncer
#
# For your own servers, mount a directory whose geobouncer.ini listens on * and
# names hosts the container can reach. SIGHUP (`docker kill -s HUP`) reloads the
# config; SIGTERM stops accepting and waits for clients to leave. The HEALTHCHECK
# opens a TCP connection to GEOBOUNCER_PORT (6432; set it if listen_port differs).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    GEOBOUNCER_PORT=6432

WORKDIR /opt/geobouncer

# Only the runtime dependencies (setup.py's install_requires), at the versions
# requirements.txt pins: no test tools in the image.
COPY requirements.txt setup.py ./
COPY geobouncer ./geobouncer
RUN pip install -c requirements.txt . \
    && useradd --system --uid 10001 --user-group --no-create-home --shell /usr/sbin/nologin geobouncer \
    && mkdir -p /etc/geobouncer \
    && rm -rf /opt/geobouncer/build /opt/geobouncer/*.egg-info

USER 10001:10001
WORKDIR /tmp
EXPOSE 6432

HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
    CMD python -c "import os, socket; socket.create_connection(('127.0.0.1', int(os.environ['GEOBOUNCER_PORT'])), 2).close()"

CMD ["geobouncer", "/etc/geobouncer/geobouncer.ini"]
