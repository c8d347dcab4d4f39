# The outpainter worker (`procrop worker outpaint`, GPU): ControlNet out-painting for CAD dataset
# generation. Its tasks arrive with CAD generation; compose starts it only with `--profile cad`.
FROM python:3.11-slim-bookworm
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 PROCROP_HOME=/var/lib/procrop \
    HF_HOME=/var/lib/procrop/huggingface TORCH_HOME=/var/lib/procrop/torch
RUN useradd --uid 10001 --user-group --home-dir /var/lib/procrop --create-home procrop
WORKDIR /app
# The four worker images are built alike up to CMD, so they share every layer. torch first: the
# pinned CUDA build also runs on CPU. The dependencies next, from pyproject.toml alone, so a code
# change rebuilds only the last layer.
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
ENTRYPOINT ["procrop"]
CMD ["worker", "outpaint"]
