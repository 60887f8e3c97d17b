# One image for every service of docker-compose.yml: the supervisor and each
# stage replica run it with a different command (see `zpipe export compose`).
#
#   docker compose build                          # from PyPI, on python:3.11-slim
#   docker build --target zpipe -t zpipe:0.1.0 .  # zpipe alone, for `zpipe export dockerfile`
#   pip wheel --wheel-dir wheelhouse . && podman build --network none .   # offline
#
# With a wheelhouse/ folder in the build context (zpipe and all its dependencies
# as wheels) nothing is downloaded. zpipe goes into a virtual environment,
# /opt/zpipe, which also works on a base whose system Python refuses pip
# (PEP 668, Debian's python3); only that environment reaches the images, the
# sources and wheels of the build stage do not.
ARG BASE=python:3.11-slim

FROM ${BASE} AS build
# Spelled out: an imported base (mmdebstrap | podman import) has no PATH at all.
ENV PATH=/opt/zpipe/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
RUN python3 -m venv /opt/zpipe
WORKDIR /src
COPY . .
RUN if [ -d wheelhouse ]; then \
        pip install --no-cache-dir --no-index --find-links wheelhouse zpipe; \
    else \
        pip install --no-cache-dir .; \
    fi \
    && zpipe --version

# The zpipe image: zpipe on PATH, no stages. Not root: uid 10001 (zpipe) owns /app.
FROM ${BASE} AS zpipe
ENV PATH=/opt/zpipe/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    PYTHONUNBUFFERED=1
RUN useradd --uid 10001 --user-group --no-create-home --home-dir /app \
        --shell /usr/sbin/nologin zpipe \
    && install -d -o 10001 -g 10001 /app
COPY --from=build /opt/zpipe /opt/zpipe
WORKDIR /app
USER 10001
CMD ["zpipe", "--help"]

# The example (the default target). Its stages write under services/
# (services/out/detections.jsonl, dead letters), so uid 10001 owns it; out/ is
# made here so that a volume mounted there starts with that owner.
FROM zpipe
COPY --chown=10001:10001 services ./services
RUN mkdir -p services/out
CMD ["zpipe", "--help"]
