"""Passwords in tracking URIs (http://user:password@host) never reach a log line, a param, a tag or a link.

Light on purpose (standard library only): conf/config.yaml installs `MaskSecrets` as a filter of Hydra's
logging, which every command sets up before anything else.
"""

from __future__ import annotations

import logging
import re
from urllib.parse import urlsplit, urlunsplit

_PASSWORD_IN_URI = re.compile(r"(?<=://)([^:/@\s]+):([^@/\s]+)@")


def mask_secrets(text: str) -> str:
    """Replace the password of any user:password@ in URIs, so it never reaches logs, params or tags."""
    return _PASSWORD_IN_URI.sub(r"\1:***@", text)


class MaskSecrets(logging.Filter):
    """A logging filter (installed in conf/config.yaml) so no log line shows a password from a URI."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        masked = mask_secrets(message)
        if masked != message:
            record.msg, record.args = masked, None
        return True


def without_credentials(url: str) -> str:
    """The server's address without user:password@ (and without a trailing slash)."""
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc.rpartition("@")[2], parts.path.rstrip("/"), "", ""))
