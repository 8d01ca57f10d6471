# omniflow, CPU image: the runtime, the model stack with the CPU build of torch, the nodes and graphs.
#
#   docker build -t omniflow:cpu .
#   docker run --rm -v omniflow-weights:/var/lib/omniflow omniflow:cpu omniflow fetch --demo
#   docker run --rm -p 8765:8765 -v omniflow-weights:/var/lib/omniflow omniflow:cpu \
#       omniflow run graphs/serve.yaml --set gateway.host=0.0.0.0
#
# Weights are not in the image: they live in $OMNIFLOW_HOME (/var/lib/omniflow), a volume
# (`omniflow export k8s` mounts a PersistentVolumeClaim there). The GPU variant: Dockerfile.cuda.
FROM python:3.11-slim-bookworm

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    OMNIFLOW_HOME=/var/lib/omniflow

WORKDIR /opt/omniflow
# What the package build reads first (pyproject, README), then the packages: a change to a graph or
# a node does not reinstall torch.
COPY pyproject.toml README.md ./
COPY omniflow/ omniflow/
COPY nodes/ nodes/
COPY train/ train/
COPY benchmarks/ benchmarks/
# The README's CPU install: torch's CPU build from PyTorch's CPU index, onnxruntime (CPU),
# openai-whisper without triton; [web] for the gateway.
RUN pip install '.[cpu,web]' --extra-index-url https://download.pytorch.org/whl/cpu \
 && pip install --no-deps openai-whisper \
 && python -c "import torch, onnxruntime, whisper; assert torch.version.cuda is None, torch.version.cuda"
COPY graphs/ graphs/
COPY examples/ examples/

# An unprivileged user (the UID the Kubernetes export runs pods as) owning the weights directory.
RUN useradd --uid 10001 --user-group --home-dir /home/omniflow --create-home omniflow \
 && mkdir -p "$OMNIFLOW_HOME" && chown omniflow:omniflow "$OMNIFLOW_HOME"
USER 10001
VOLUME ["/var/lib/omniflow"]
EXPOSE 8765
CMD ["omniflow", "--help"]
