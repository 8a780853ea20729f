#!/bin/sh
# Run vmbackup's container once (cron, a CI job, by hand). The config and the password
# file are mounted read-only; the backups land in /srv/backups on the host.
# The password file must be readable by the container's user (uid 10001) and by no one
# else: chown 10001 /etc/vmbackup/xapi.pw && chmod 600 /etc/vmbackup/xapi.pw
exec docker run --rm --name vmbackup \
  -v /srv/backups:/backups \
  -v /etc/vmbackup/vmbackup.cfg:/etc/vmbackup/vmbackup.cfg:ro \
  -v /etc/vmbackup/xapi.pw:/run/secrets/xapi-password:ro \
  vmbackup:latest "$@"
