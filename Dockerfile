# One image for every service of docker-compose.yml: the supervisor and each
# stage replica run it with a different command (see `zpipe export compose`).
FROM python:3.11-slim
WORKDIR /app
ENV PYTHONUNBUFFERED=1
COPY pyproject.toml README.md ./
COPY zpipe ./zpipe
RUN pip install --no-cache-dir .
COPY services ./services
CMD ["zpipe", "--help"]
