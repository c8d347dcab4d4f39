# Every ProCrop worker (`procrop worker QUEUE`), the queue a build argument:
#   docker build -f deploy/docker/worker.Dockerfile --build-arg QUEUE=crop -t procrop-cropper .
#   embed     composition tokens and index vectors (lite or SAM encoder) and, in the paper
#             profile, BLIP captions and text embeddings                                  GPU
#   retrieve  top-K composition queries from Milvus                                       CPU
#   index     ingesting collections into Milvus, batch by batch                           CPU
#   crop      the crop model and its post-processing (ranked, diverse crops; exact ratios) GPU
#   outpaint  ControlNet out-painting for CAD dataset generation                          GPU
FROM python:3.11-slim-bookworm
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 PROCROP_HOME=/var/lib/procrop \
    HF_HOME=/var/lib/procrop/huggingface TORCH_HOME=/var/lib/procrop/torch
RUN useradd --uid 10001 --user-group --home-dir /var/lib/procrop --create-home procrop
WORKDIR /app
# Every layer up to the queue is the same for all queues, so the worker images share them. torch
# first: the pinned CUDA build also runs on CPU. The dependencies next, from pyproject.toml alone,
# so a code change rebuilds only the layers from the code on.
RUN pip install "torch==2.14.1" "torchvision==0.29.1"
COPY pyproject.toml ./
RUN python -c "import tomllib; project = tomllib.load(open('pyproject.toml', 'rb'))['project']; \
print(*project['dependencies'], sep='\n')" > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt && rm /tmp/requirements.txt
COPY README.md ./
COPY shared ./shared
COPY services ./services
COPY procrop ./procrop
RUN pip install .
USER 10001
# The queue last: only these small layers differ between the worker images. A build without a
# known queue fails here (the queues are shared/queue.py's).
ARG QUEUE
RUN python -c "import os, sys, shared.queue as q; os.environ.get('QUEUE') in q.QUEUES or \
sys.exit('build with --build-arg QUEUE=<queue>, one of: ' + ' '.join(q.QUEUES))"
ENV PROCROP_WORKER_QUEUE=$QUEUE
# No arguments: `procrop worker $PROCROP_WORKER_QUEUE`; with arguments, `procrop ARGS` as before
# (e.g. `index s3://... --collection pro`, deploy/k8s/index-job.yaml). The shell execs procrop:
# procrop is PID 1 and gets `docker stop`'s SIGTERM itself (Celery then finishes its task).
ENTRYPOINT ["sh", "-c", "[ \"$#\" -gt 0 ] || set -- worker \"$PROCROP_WORKER_QUEUE\"; exec procrop \"$@\"", "procrop"]
CMD []
