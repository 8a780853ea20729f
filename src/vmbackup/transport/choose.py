"""Picking the transport a run uses (api or xe) from the settings.

Owns: make_transport.
Imports: errors, transport.api, transport.xe.
"""

import os

from vmbackup.errors import ConfigError, log
from vmbackup.transport.api import ApiTransport
from vmbackup.transport.xe import XeTransport, find_xe


def make_transport(config, xapi, password):
    """Return the transport for this run: xe on the pool host when xe exists, else api.

    Only xe needs the password (in its -pwf file); the API transport uses the session.
    `xe vm-export` cannot be throttled, so max_rate makes auto pick api.
    """
    name = config.transport
    xe_path = find_xe(config) if name in ("auto", "xe") else None
    if name == "auto":
        name = "xe" if (xapi.endpoint.is_local and xe_path and not config.max_rate) else "api"
    if name == "xe":
        if not xe_path or not os.access(xe_path, os.X_OK):
            raise ConfigError("transport=xe (%s): no xe binary found (xe_path=%s)"
                              % (config.where("transport"), config.xe_path or "-"))
        if config.max_rate:
            log.warning("max_rate is ignored by transport=xe (xe vm-export has no limit); "
                        "use transport=api to limit the exports")
        return XeTransport(xapi, config, password, xe_path)
    return ApiTransport(xapi, config)
