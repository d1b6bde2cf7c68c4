# GPU image: NGC PyTorch (CUDA, NCCL, Transformer Engine, apex and flash-attn preinstalled) plus
# megatron-core and megatron-mod. The image's own torch is kept: requirements.txt pins a CPU
# torch for CPU hosts, so its torch / megatron-core lines are not installed here.
#
#   docker build -t megatron-mod .
#   docker run --gpus all --ipc=host --ulimit memlock=-1 -v /data:/data -it megatron-mod
ARG BASE_IMAGE=nvcr.io/nvidia/pytorch:25.09-py3
FROM ${BASE_IMAGE}

WORKDIR /workspace/megatron-mod
COPY requirements.txt pyproject.toml README.md ./
RUN grep -v -E '^(torch|megatron-core)==' requirements.txt > /tmp/requirements-gpu.txt \
    && pip install --no-cache-dir "megatron-core>=0.16,<0.20" -r /tmp/requirements-gpu.txt
COPY megatron_mod ./megatron_mod
COPY tools ./tools
COPY examples ./examples
COPY benchmarks ./benchmarks
RUN pip install --no-cache-dir --no-deps -e . \
    && python -c "import megatron_mod, megatron.core as m; print('megatron-core', m.__version__)"
