# autopar: CPU image by default, CUDA by build argument. The default command trains the LLaMA example
# (a random tiny model on the bundled corpus, about a minute on CPU).
#   docker build -t autopar .                                   # CPU wheel of torch
#   docker build -t autopar:cu128 --build-arg TORCH_INDEX=cu128 .   # CUDA wheel (bundles the CUDA runtime)
#   docker run --rm autopar
#   docker run --rm --gpus all autopar:cu128 torchrun --standalone --nproc-per-node 2 \
#       examples/llama/train_llama.py --config examples/llama/tiny.toml
ARG PYTHON_IMAGE=python:3.11-slim-bookworm
FROM ${PYTHON_IMAGE}

# which torch wheel: "cpu", or a CUDA tag of download.pytorch.org/whl such as cu128
ARG TORCH_INDEX=cpu
ARG TORCH_VERSION=2.13.0

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN useradd --create-home --uid 1000 autopar
WORKDIR /opt/autopar

# torch first, from the index of the chosen variant, so installing autopar never swaps it
RUN pip install "torch==${TORCH_VERSION}" --index-url "https://download.pytorch.org/whl/${TORCH_INDEX}"

COPY --chown=autopar pyproject.toml README.md ./
COPY --chown=autopar autopar autopar
COPY --chown=autopar solver solver
COPY --chown=autopar codegen codegen
COPY --chown=autopar runtime_kernels runtime_kernels
# the project itself (its dependencies are ranged in pyproject.toml; torch is already there)
# hadolint ignore=DL3013
RUN pip install ".[train,highs]"

COPY --chown=autopar examples examples

USER 1000
CMD ["python", "examples/llama/train_llama.py", "--config", "examples/llama/tiny.toml"]
