# A stand-in for prom/prometheus, for CI machines that reach no image registry:
# Debian's prometheus package on the Debian image .ci/containers.sh makes. It
# runs like the official image (entrypoint prometheus, user nobody, data in
# /prometheus), so deploy/docker-compose.yml's prometheus service runs it as is.
ARG DEBIAN_IMAGE
FROM ${DEBIAN_IMAGE}

ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends prometheus \
    && rm -rf /var/lib/apt/lists/* \
    && mkdir -p /prometheus \
    && chown nobody:nogroup /prometheus

USER nobody
WORKDIR /prometheus
EXPOSE 9090
ENTRYPOINT ["/usr/bin/prometheus"]
CMD ["--config.file=/etc/prometheus/prometheus.yml", "--storage.tsdb.path=/prometheus"]
