# Prometheus from Debian's package, for test-override.yml: where Docker Hub (prom/prometheus) cannot be reached.
ARG BASE=liteasr-local/debian:bookworm
# hadolint ignore=DL3006
FROM ${BASE}
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends prometheus \
    && rm -rf /var/lib/apt/lists/* \
    && mkdir /prometheus \
    && chown prometheus:prometheus /prometheus
# The package's system user; its id is chosen when the package installs.
# hadolint ignore=DL3066
USER prometheus
ENTRYPOINT ["/usr/bin/prometheus"]
