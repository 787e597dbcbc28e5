# A stand-in for prom/prometheus, for CI machines that reach no image registry:
# Debian's prometheus package on the Debian image .ci/containers.sh makes. It
# runs like the official image (entrypoint prometheus, user nobody, data in
# /prometheus), so deploy/docker-compose.yml's prometheus service runs it as is.
ARG DEBIAN_IMAGE
FROM ${DEBIAN_IMAGE}

ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
# Debian's package as bookworm has it today, unpinned: a stand-in for CI, kept
# current by Debian's security updates; the product runs prom/prometheus:v2.53.3.
# hadolint ignore=DL3008
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends prometheus \
    && rm -rf /var/lib/apt/lists/* \
    && mkdir -p /prometheus \
    && chown nobody:nogroup /prometheus

# nobody:nogroup, by number, as the official image runs it.
USER 65534:65534
WORKDIR /prometheus
EXPOSE 9090
ENTRYPOINT ["/usr/bin/prometheus"]
CMD ["--config.file=/etc/prometheus/prometheus.yml", "--storage.tsdb.path=/prometheus"]
