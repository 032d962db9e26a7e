# The MQTT broker of demuon telemetry (`demuon compose --mqtt`, `demuon watch`): Debian's mosquitto
# with docker/mosquitto.conf, built without a registry on the same base as the peer image.
#
#   make image            # tags demuon-mosquitto:latest (base: demuon-base:bookworm-amd64)
#   docker build -f docker/mosquitto.Dockerfile --build-arg BASE=debian:bookworm-slim \
#     -t demuon-mosquitto:latest .        # with a registry
#
# The config sits where the eclipse-mosquitto image keeps it (/mosquitto/config/mosquitto.conf),
# so a compose file may mount its own there. apt reads deb.debian.org over plain HTTP (signed
# indexes): no TLS inside the build.
ARG BASE=debian:bookworm-slim
FROM ${BASE}
RUN apt-get update -qq \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends mosquitto >/dev/null \
 && rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin /var/cache/apt/archives/*.deb \
 && mkdir -p /mosquitto/config
COPY docker/mosquitto.conf /mosquitto/config/mosquitto.conf
EXPOSE 1883
USER mosquitto
CMD ["/usr/sbin/mosquitto", "-c", "/mosquitto/config/mosquitto.conf"]
