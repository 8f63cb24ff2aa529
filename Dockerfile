# geobouncer: PostgreSQL connection pooler, PgBouncer-compatible.
#   docker build -t geobouncer .
#   docker run -p 6432:6432 -v "$PWD/conf:/etc/geobouncer:ro" geobouncer
# The config directory must hold geobouncer.ini (pgbouncer.ini format) and the
# auth_file it names; set listen_addr = 0.0.0.0 (or *) to be reachable from outside.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /opt/geobouncer

# Dependencies first: this layer is rebuilt only when requirements.txt changes.
COPY requirements.txt ./
RUN pip install -r requirements.txt

COPY setup.py ./
COPY geobouncer ./geobouncer
RUN pip install --no-deps . \
    && useradd --system --create-home --home-dir /home/geobouncer --shell /usr/sbin/nologin geobouncer \
    && mkdir -p /etc/geobouncer /var/run/geobouncer /var/log/geobouncer \
    && chown geobouncer:geobouncer /var/run/geobouncer /var/log/geobouncer

USER geobouncer
WORKDIR /home/geobouncer
EXPOSE 6432

CMD ["geobouncer", "-c", "/etc/geobouncer/geobouncer.ini"]
