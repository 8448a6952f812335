"""Secrets in what we print, save and log: URIs that carry credentials, and secret variables.

A URI's credentials are found by parsing it (``urllib.parse``), not by a pattern over the text:

- userinfo of any form before the host: ``https://TOKEN@host``, ``s3://KEY:SECRET@bucket`` (but
  ``abfs://container@account`` names a container), and a
  password holding a ``/`` (``postgresql://u:Pa55/w0rd@host/db``), which ends the authority for
  ``urlsplit``: its tell-tale is an authority whose port does not parse (``u:Pa55``) followed by
  an ``@``, and the userinfo is then everything up to that ``@``;
- tokens in the query or fragment, by parameter name (``token=``, ``access_token=``, ``sig=``,
  ``X-Amz-Signature=`` ...: ``SECRET_QUERY_KEYS``).

``redact`` replaces each with ``***`` wherever a URI appears in a text (a message, an error);
``redact_tree`` does it in every string of a JSON-like value (a run's state before it is
saved, MLflow params). The spec refuses such URIs outright (``credential_paths``).

``secret_env_warning`` is the one warning for secrets put into a runtime_env (the executor's
``ORCHESTRATOR_FORWARD_SECRETS=1`` and ``orchestrator submit --env``): Ray's state API and
dashboard show every task's and job's environment.
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import parse_qsl, urlsplit

__all__ = ["redact", "redact_tree", "has_credentials", "credential_paths", "is_secret_env",
           "secret_env_warning", "SECRET_QUERY_KEYS"]

SECRET_QUERY_KEYS = frozenset({
    "token", "access_token", "refresh_token", "id_token", "auth", "auth_token", "apikey", "api_key", "key",
    "password", "passwd", "pwd", "secret", "client_secret", "sig", "signature", "session_token",
    "x-amz-signature", "x-amz-credential", "x-amz-security-token", "x-goog-signature", "x-goog-credential",
    "googleaccessid", "awsaccesskeyid", "sv_token",
})
"""Query (or fragment) parameters whose value is a credential, lowercase."""

# Where a URI starts in free text (the parsing below decides what in it is a credential); it
# runs to the next whitespace or quote.
_URI_START = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>`]+")
MASK = "***"


# Schemes whose userinfo names a container, not a user (abfs://container@account.dfs...):
# a secret there only with a ":".
_CONTAINER_SCHEMES = frozenset({"abfs", "abfss", "wasb", "wasbs"})


def _userinfo_end(uri: str) -> int:
    """The index of the ``@`` ending the userinfo in ``uri``, or -1 if it has none."""
    parts = urlsplit(uri)
    start = uri.index("://") + 3
    if "@" in parts.netloc:
        userinfo = parts.netloc[:parts.netloc.rindex("@")]
        if parts.scheme.lower() in _CONTAINER_SCHEMES and ":" not in userinfo:
            return -1
        return start + len(userinfo)
    try:
        parts.port  # noqa: B018 - raises when the authority's "port" is not a number
        return -1
    except ValueError:  # "u:Pa55" of u:Pa55/w0rd@host: a password that holds a "/"
        stop = min((i for i in (uri.find("?", start), uri.find("#", start)) if i >= 0), default=len(uri))
        return uri.rfind("@", start, stop)


def _redact_params(text: str) -> str:
    """``text`` (a query or fragment) with the values of secret parameters masked."""
    out = []
    for pair in text.split("&"):
        name, sep, _ = pair.partition("=")
        secret = bool(sep) and any(k.lower() in SECRET_QUERY_KEYS for k, _ in parse_qsl(name + "=x"))
        out.append(f"{name}={MASK}" if secret else pair)
    return "&".join(out)


def redact_uri(uri: str) -> str:
    """``uri`` with its userinfo and secret query/fragment values replaced by ``***``."""
    try:
        end = _userinfo_end(uri)
    except ValueError:  # not parseable as a URL (an unclosed "[" host): hide the authority
        return uri[:uri.index("://") + 3] + MASK
    if end >= 0:
        uri = uri[:uri.index("://") + 3] + MASK + uri[end:]
    head, sep, fragment = uri.partition("#")
    base, qsep, query = head.partition("?")
    if qsep:
        base = f"{base}?{_redact_params(query)}"
    return base + (f"#{_redact_params(fragment)}" if sep else "")


def redact(text: str) -> str:
    """``text`` with the credentials of every URI in it replaced by ``***``."""
    return _URI_START.sub(lambda m: redact_uri(m[0]), text)


def has_credentials(text: str) -> bool:
    return redact(text) != text


def redact_tree(value: Any) -> Any:
    """A copy of a JSON-like ``value`` with every string redacted (keys included)."""
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {redact_tree(k): redact_tree(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [redact_tree(v) for v in value]
    return value


def credential_paths(node: Any, path: str = "") -> list[str]:
    """YAML paths of the strings in ``node`` that hold a URI with credentials."""
    if isinstance(node, dict):
        return [p for k, v in node.items() for p in credential_paths(v, f"{path}.{k}" if path else str(k))]
    if isinstance(node, list):
        return [p for i, v in enumerate(node) for p in credential_paths(v, f"{path}[{i}]")]
    return [path] if isinstance(node, str) and has_credentials(node) else []


_SECRET_NAME = re.compile(r"TOKEN|SECRET|PASSWORD|PASSWD|CREDENTIAL|API_?KEY|ACCESS_KEY|PRIVATE_KEY|AUTH|SIGNATURE",
                          re.IGNORECASE)


def is_secret_env(name: str, value: str = "") -> bool:
    """Whether a variable looks like it holds a secret: by its name (a path to a credentials
    file, ``*_FILE``/``*_PATH``, is not one), or a value that is a URI with credentials."""
    by_name = bool(_SECRET_NAME.search(name)) and not name.upper().endswith(("_FILE", "_PATH", "_DIR"))
    return by_name or has_credentials(value)


def secret_env_warning(names: list[str], where: str) -> str | None:
    """The warning for secret variables ``names`` going into ``where`` (a runtime_env), or None."""
    if not names:
        return None
    return (f"warning: {', '.join(sorted(names))}: secret values go into {where}, readable by anyone with "
            "access to Ray's state API or dashboard; prefer credential files or the nodes' instance profile")
