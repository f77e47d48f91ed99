"""Registry authentication: credentials (option, ``IMAGE_PULL_AUTH``, ``~/.docker/config.json``), the
``WWW-Authenticate`` challenge, and Bearer tokens cached per scope until shortly before they expire."""

from __future__ import annotations

import base64
import binascii
import json
import os
import re
import shutil
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlencode

from .deadline import PermanentFailure
from .retry import TempFailure
from .transport import Transport, status_failure

DEFAULT_TOKEN_LIFETIME = 60.0  # distribution token spec: expires_in defaults to 60 s
TOKEN_MARGIN = 20.0  # refresh this long before expiry (at most half the lifetime)
_PARAM = re.compile(r'\s*([A-Za-z0-9_.-]+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s,]*))\s*,?')


@dataclass(frozen=True)
class Credentials:
    username: str
    password: str

    def basic(self) -> str:
        return "Basic " + base64.b64encode(f"{self.username}:{self.password}".encode()).decode()


def parse_auth(value: str) -> Credentials:
    """``user:pass`` or its base64 (the docker config ``auth`` form)."""
    text = value.strip()
    if ":" not in text:
        try:
            text = base64.b64decode(text, validate=True).decode()
        except (binascii.Error, UnicodeDecodeError):
            raise PermanentFailure("auth is neither user:password nor base64 of it") from None
        if ":" not in text:
            raise PermanentFailure("auth is neither user:password nor base64 of it")
    user, _, password = text.partition(":")
    return Credentials(user, password)


_DOCKER_HUB = {"docker.io", "index.docker.io", "registry-1.docker.io"}


def _host_of(key: str) -> str:
    key = key.strip()
    for prefix in ("https://", "http://"):
        if key.startswith(prefix):
            key = key[len(prefix) :]
    host = key.split("/", 1)[0].lower()
    return "docker.io" if host in _DOCKER_HUB else host


def docker_config_path() -> Path:
    base = os.environ.get("DOCKER_CONFIG")
    return Path(base) / "config.json" if base else Path.home() / ".docker" / "config.json"


def docker_credentials(host: str, path: str | os.PathLike[str] | None = None) -> Credentials | None:
    """Credentials for ``host`` (``name[:port]``) from a docker config: ``auths.<host>.auth`` (or
    ``username``/``password``), else a credential helper (``credHelpers.<host>`` or ``credsStore``)."""
    cfg_path = Path(path) if path is not None else docker_config_path()
    try:
        cfg = json.loads(cfg_path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise PermanentFailure(f"cannot read docker config {cfg_path}: {e}") from None
    host = _host_of(host)
    for key, entry in (cfg.get("auths") or {}).items():
        if _host_of(key) != host or not isinstance(entry, dict):
            continue
        if entry.get("auth"):
            return parse_auth(entry["auth"])
        if entry.get("username"):
            return Credentials(entry["username"], entry.get("password", ""))
    helpers = {_host_of(k): v for k, v in (cfg.get("credHelpers") or {}).items()}
    helper = helpers.get(host) or cfg.get("credsStore")
    server = "https://index.docker.io/v1/" if host == "docker.io" else host
    return _helper_credentials(helper, server) if helper else None


def _helper_credentials(helper: str, host: str) -> Credentials | None:
    exe = shutil.which(f"docker-credential-{helper}")
    if exe is None:
        return None
    try:
        out = subprocess.run([exe, "get"], input=host, capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise PermanentFailure(f"credential helper docker-credential-{helper} failed: {e}") from None
    if out.returncode != 0:
        return None  # "credentials not found in native keychain"
    try:
        data = json.loads(out.stdout)
        return Credentials(data["Username"], data["Secret"])
    except (ValueError, KeyError, TypeError):
        raise PermanentFailure(f"credential helper docker-credential-{helper} gave no usable JSON") from None


def parse_challenge(value: str) -> tuple[str, dict[str, str]]:
    """(scheme lowercased, params) of one ``WWW-Authenticate`` challenge."""
    scheme, _, rest = value.strip().partition(" ")
    params = {}
    for m in _PARAM.finditer(rest):
        raw = m.group(2)
        params[m.group(1).lower()] = re.sub(r"\\(.)", r"\1", raw) if raw is not None else m.group(3)
    return scheme.lower(), params


class RegistryAuth:
    """What ``Authorization`` to send, learnt from the registry's 401 challenge; thread-safe.

    Anonymous until challenged; then Basic with the credentials, or Bearer tokens from the challenge's realm
    (``GET realm?service=…&scope=…``, with Basic credentials if any), cached per scope."""

    def __init__(self, transport: Transport, credentials: Credentials | None = None, token: str | None = None) -> None:
        self.transport = transport
        self.credentials = credentials
        self.static_token = token
        self._scheme: str | None = None
        self._challenge: dict[str, str] = {}
        self._tokens: dict[str, tuple[str, float]] = {}
        self._lock = threading.Lock()
        self._fetch_lock = threading.Lock()

    def header(self, scope: str) -> dict[str, str]:
        """The Authorization header to send now for ``scope`` (empty before any challenge)."""
        if self.static_token:
            return {"Authorization": f"Bearer {self.static_token}"}
        with self._lock:
            if self._scheme == "basic" and self.credentials:
                return {"Authorization": self.credentials.basic()}
            if self._scheme == "bearer":
                cached = self._tokens.get(scope)
                if cached and cached[1] > time.monotonic():
                    return {"Authorization": f"Bearer {cached[0]}"}
        if self._scheme == "bearer":
            return {"Authorization": f"Bearer {self._fetch_token(scope)}"}
        return {}

    def challenged(self, www_authenticate: str | None, scope: str, sent: dict[str, str]) -> None:
        """React to a 401: remember the scheme, drop the token that was refused, or fail for good."""
        if not www_authenticate:
            raise PermanentFailure("HTTP 401 Unauthorized without a WWW-Authenticate challenge")
        scheme, params = parse_challenge(www_authenticate)
        with self._lock:
            if scheme == "bearer":
                if not params.get("realm"):
                    raise PermanentFailure(f"bearer challenge without realm: {www_authenticate!r}")
                refused = sent.get("Authorization", "")
                cached = self._tokens.get(scope)
                if cached and refused == f"Bearer {cached[0]}":
                    del self._tokens[scope]
                elif refused.startswith("Bearer ") and self._scheme == "bearer":
                    raise PermanentFailure("registry refused a fresh bearer token (HTTP 401)")
                self._scheme, self._challenge = "bearer", params
            elif scheme == "basic":
                if self.credentials is None:
                    raise PermanentFailure("registry needs credentials (Basic auth); none given")
                if sent.get("Authorization", "").startswith("Basic "):
                    raise PermanentFailure("registry refused the credentials (HTTP 401)")
                self._scheme = "basic"
            else:
                raise PermanentFailure(f"unsupported auth scheme {scheme!r}")

    def _fetch_token(self, scope: str) -> str:
        with self._fetch_lock:  # one token request at a time; others then find it cached
            with self._lock:
                cached = self._tokens.get(scope)
                if cached and cached[1] > time.monotonic():
                    return cached[0]
                params = dict(self._challenge)
            realm = params.pop("realm")
            query = {k: v for k, v in params.items() if k in ("service",)}
            query["scope"] = scope
            headers = {"Accept": "application/json"}
            if self.credentials:
                query["account"] = self.credentials.username
                headers["Authorization"] = self.credentials.basic()
            sep = "&" if "?" in realm else "?"
            resp = self.transport.request("GET", f"{realm}{sep}{urlencode(query)}", headers)
            if resp.status in (401, 403):
                resp.text()
                raise PermanentFailure(f"token service {realm} refused the credentials (HTTP {resp.status})")
            if resp.status != 200:
                raise status_failure(resp, f"from token service {realm}")
            body = resp.text(limit=1 << 20)
            try:
                data = json.loads(body)
                token = data.get("token") or data.get("access_token")
                lifetime = float(data.get("expires_in") or DEFAULT_TOKEN_LIFETIME)
            except (ValueError, AttributeError, TypeError):
                raise TempFailure(f"token service {realm} sent no JSON") from None
            if not token:
                raise PermanentFailure(f"token service {realm} sent no token")
            expiry = time.monotonic() + lifetime - min(TOKEN_MARGIN, lifetime / 2)
            with self._lock:
                self._tokens[scope] = (token, expiry)
            return token
