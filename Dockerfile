# Arbor's image: the official Ray image of the pinned series with Arbor installed.
#   docker build -t arbor:0.1.0 .
# The build stage turns the source into a wheel; the final stage installs only binary
# wheels, so it needs no compiler and adds no build tools to the Ray image.

FROM python:3.11.11-slim-bookworm AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY arbor ./arbor
RUN python -m pip install --no-cache-dir "setuptools>=77" wheel \
    && python -m pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

# Ray 2.60.0 on Python 3.11, the Python version Arbor is tested with.
FROM rayproject/ray:2.60.0-py311
COPY --from=build /wheels /tmp/wheels
# --only-binary makes pip fail instead of compiling when a dependency has no wheel.
RUN pip install --no-cache-dir --only-binary=:all: /tmp/wheels/arbor-*.whl \
    && rm -rf /tmp/wheels
# The Serve application builder named by the RayService's Serve config.
COPY k8s/image/arbor_serve_app.py /home/ray/arbor-serve/arbor_serve_app.py
ENV PYTHONPATH=/home/ray/arbor-serve \
    ARBOR_LOG_FORMAT=json
# The ray user (uid 1000) of the base image; the pod security context requires a non-root uid.
USER 1000:100
WORKDIR /home/ray
