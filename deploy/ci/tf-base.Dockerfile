# A stand-in for tensorflow/tensorflow:2.21.0-gpu, for CI machines that reach
# Debian's and PyPI's package registries but no image registry. .ci/containers.sh
# builds it on a Debian image it makes with mmdebstrap, then builds
# deploy/Dockerfile on it unchanged (TF_IMAGE=this image). CPU only: no CUDA.
#
# The build context holds only ca-certificates/: the host's extra trusted CA
# certificates (/usr/local/share/ca-certificates), as behind a TLS-intercepting
# corporate proxy, so apt and pip in this image and in images built on it trust
# what the host trusts.
ARG DEBIAN_IMAGE
FROM ${DEBIAN_IMAGE}

# An image built with `docker import` has no PATH of its own. /opt/venv first:
# `python3 -m pip install` and `ntrain` in deploy/Dockerfile use the venv, as
# they use the system Python in TensorFlow's image (Debian's is externally managed).
ENV PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

COPY ca-certificates/ /usr/local/share/ca-certificates/
# Debian's Python and CA certificates as bookworm has them, unpinned: the real
# base (tensorflow/tensorflow) brings its own; the Python packages are pinned.
# hadolint ignore=DL3008
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        ca-certificates python3 python3-venv \
    && rm -rf /var/lib/apt/lists/* \
    && update-ca-certificates \
    && printf '[global]\ncert = /etc/ssl/certs/ca-certificates.crt\n' > /etc/pip.conf \
    && python3 -m venv /opt/venv

# The version deploy/Dockerfile's base pins; pyproject.toml asks for >=2.21,<2.22.
RUN python3 -m pip install tensorflow==2.21.0 \
    && python3 -c "import tensorflow as tf; print('tensorflow', tf.__version__)"
