# vmbackup in a container, for backups taken from outside the pool (XAPI over HTTPS).
#
#   docker build -t vmbackup .
#   docker run --rm -v /srv/backups:/backups \
#     -v /etc/vmbackup/vmbackup.cfg:/etc/vmbackup/vmbackup.cfg:ro \
#     -v /etc/vmbackup/xapi.pw:/run/secrets/xapi-password:ro vmbackup
#
# Nothing secret is in the image: the config and the password file are mounted at run
# time (examples/). The pool's certificate is checked as the config says: tls_fingerprint
# (a pin) or tls_ca_file (a CA bundle, mounted too).
FROM python:3.12.8-slim-bookworm

# XenAPI is vmbackup's one dependency; pinned so that a rebuild gives the same image.
ARG XENAPI_VERSION=26.21.1

# The run's user: not root, no shell, owns /backups.
RUN useradd --uid 10001 --user-group --no-create-home --home-dir /backups \
        --shell /usr/sbin/nologin vmbackup \
 && install -d -o vmbackup -g vmbackup -m 0700 /backups /etc/vmbackup

# The one file and what `pip install .` reads; installed, then the sources removed.
COPY pyproject.toml README.md LICENSE vmbackup.py /tmp/vmbackup-src/
RUN pip install --no-cache-dir --no-compile /tmp/vmbackup-src "XenAPI==${XENAPI_VERSION}" \
 && rm -rf /tmp/vmbackup-src

USER vmbackup
WORKDIR /backups
VOLUME ["/backups"]
ENTRYPOINT ["vmbackup"]
CMD ["-c", "/etc/vmbackup/vmbackup.cfg"]
