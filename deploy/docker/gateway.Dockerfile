# The gateway (`procrop gateway`): FastAPI on uvicorn. It validates, stores and queues requests and
# reads job records; the models run in the worker images, so this image has no torch.
FROM python:3.11-slim-bookworm
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 PROCROP_HOME=/var/lib/procrop
RUN useradd --uid 10001 --user-group --home-dir /var/lib/procrop --create-home procrop
WORKDIR /app
# The gateway's own dependencies, floors as in pyproject.toml (tests/deploy checks they agree);
# the project itself goes in with --no-deps, which keeps torch and the model libraries out.
RUN pip install "fastapi>=0.115" "uvicorn[standard]>=0.30" "python-multipart>=0.0.9" \
    "pydantic>=2.7" "pydantic-settings>=2.4" "celery[redis]>=5.7,<5.8" "redis>=5" "minio>=7.2" \
    "pymilvus>=3.0,<4" "prometheus-client>=0.20" "pillow>=10.3" "numpy>=1.26" "click>=8.1" \
    "tqdm>=4.66"
COPY pyproject.toml README.md ./
COPY shared ./shared
COPY services ./services
COPY procrop ./procrop
RUN pip install --no-deps .
USER 10001
ENV PROCROP_GATEWAY__HOST=0.0.0.0 PROCROP_GATEWAY__PORT=8080
EXPOSE 8080
ENTRYPOINT ["procrop"]
CMD ["gateway"]
