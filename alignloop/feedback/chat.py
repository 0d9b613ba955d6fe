"""Drafts for the chat task from any OpenAI-compatible `/v1/chat/completions`: ours (`alignloop serve`),
vLLM's, or a hosted provider's. No torch here.

The URL is part of a project's settings, so a request to it is one the app's server makes on an
admin's word: server-side request forgery (RELIABILITY W8) unless checked. Before connecting, the host
is resolved and every address must be public (not loopback, private, link-local, shared, multicast,
reserved or unspecified, also when wrapped in IPv6) unless the operator allow-listed the host name or a
network holding the address (`ALIGNLOOP_APP_MODEL_HOSTS`, e.g. `localhost,10.0.0.0/8,vllm.internal`).
The request then goes to the address that was checked (the Host header and TLS SNI keep the name, so
certificates are still verified against it): a DNS answer that changes between check and connect
(rebinding) cannot move it. Redirects are not followed, environment proxies are not used, and answers
are read up to a size cap.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import httpx

ENV_MODEL_HOSTS = "ALIGNLOOP_APP_MODEL_HOSTS"
MAX_RESPONSE_BYTES = 8_000_000
"""Largest answer read from a model server (n drafts of a few thousand tokens fit many times over)."""
_HOSTNAME = re.compile(r"(?=.{1,253}$)([a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?)(\.[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?)*")
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class ChatError(RuntimeError):
    """No drafts: the message says why in words an admin can act on (never contains the API key)."""


class HostRefused(ChatError):
    """The URL's host is not public and not allow-listed (W8); nothing was sent."""


@dataclass(frozen=True)
class Draft:
    """One response of the model, with what produced it."""

    text: str
    model: str
    """The model name the server answered with (the requested name when it gave none)."""
    version: str | None
    """The server's `system_fingerprint`: for `alignloop serve`, a hash of the weights; None when not given."""
    finish_reason: str | None
    """"stop" (EOS or a stop string), "length" (max_tokens reached), or what the server said."""


@dataclass(frozen=True)
class Target:
    """A checked URL and the addresses a request to it may connect to."""

    url: httpx.URL
    addresses: tuple[str, ...]


# ----------------------------------------------------------------------------------------------
# The allow-list (W8)


def parse_model_hosts(raw: str) -> tuple[str, ...]:
    """Allow-list entries from a comma-separated setting: host names (exact, case-insensitive), IP
    addresses, or networks in CIDR form. ValueError names a malformed entry."""
    entries = []
    for part in raw.split(","):
        entry = part.strip().lower().removeprefix("[").removesuffix("]").rstrip(".")
        if not entry:
            continue
        if _network(entry) is None and not _HOSTNAME.fullmatch(entry):
            raise ValueError(f"{ENV_MODEL_HOSTS}: {part.strip()!r} is neither a host name, an IP address nor a CIDR network")
        entries.append(entry)
    return tuple(entries)


def model_hosts_from_env(environ: Mapping[str, str] | None = None) -> tuple[str, ...]:
    """The operator's allow-list from `ALIGNLOOP_APP_MODEL_HOSTS` (empty: public addresses only)."""
    return parse_model_hosts((os.environ if environ is None else environ).get(ENV_MODEL_HOSTS, ""))


def _network(entry: str) -> IPNetwork | None:
    try:
        return ipaddress.ip_network(entry, strict=False)
    except ValueError:
        return None


def is_public(address: IPAddress) -> bool:
    """Whether an address is globally routable, looking inside IPv4-mapped, 6to4 and NAT64 IPv6 forms
    (`::ffff:127.0.0.1` is loopback)."""
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return is_public(address.ipv4_mapped)
        if address.sixtofour is not None:
            return is_public(address.sixtofour)
        if address in _NAT64:
            return is_public(ipaddress.IPv4Address(int(address) & 0xFFFFFFFF))
    return address.is_global and not address.is_multicast


def _resolve(host: str, port: int) -> list[str]:
    """Every address the system resolver gives for `host` (an IP literal gives itself)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as err:
        raise ChatError(f"cannot resolve the model server's host {host!r}: {err}") from None
    return list(dict.fromkeys(str(info[4][0]).split("%")[0] for info in infos))  # no IPv6 zone ids


def check_url(url: str, allowed_hosts: Sequence[str] = ()) -> Target:
    """Parse and check a model server URL against the allow-list; HostRefused when it may not be used.

    Allowed: an http(s) URL without credentials whose host name is listed, or whose every resolved
    address is public or inside a listed address or network.
    """
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, TypeError) as err:
        raise HostRefused(f"not a valid URL: {url!r} ({err})") from None
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise HostRefused(f"the model URL must be http:// or https:// with a host, got {url!r}")
    if parsed.userinfo:
        raise HostRefused("the model URL must not contain a user name or password; use the API key setting")
    host = parsed.host.lower().rstrip(".")
    entries = parse_model_hosts(",".join(allowed_hosts))
    networks = [net for net in map(_network, entries) if net is not None]
    addresses = _resolve(host, parsed.port or (443 if parsed.scheme == "https" else 80))
    if host not in entries:
        for text in addresses:
            address = ipaddress.ip_address(text)
            if not is_public(address) and not any(address in net for net in networks):
                raise HostRefused(f"the model host {host!r} resolves to {address}, which is not a public address; "
                                  f"an operator can allow it in {ENV_MODEL_HOSTS}")
    return Target(parsed, tuple(addresses))


# ----------------------------------------------------------------------------------------------
# The request


def chat_url(base_url: str) -> str:
    """The completions endpoint under an OpenAI-style base URL (`http://host:8001/v1`); a URL that
    already ends in `/chat/completions` is kept."""
    base = base_url.strip().rstrip("/")
    return base if base.endswith("/chat/completions") else base + "/chat/completions"


def _error_message(response: httpx.Response, body: bytes) -> str:
    """The server's own error message (OpenAI's `{"error": {"message"}}`, or a `detail`), else its text."""
    try:
        payload = json.loads(body)
        message = payload.get("error", {}).get("message") if isinstance(payload.get("error"), dict) else None
        message = message or payload.get("detail") or payload.get("error")
    except (ValueError, AttributeError):
        message = None
    text = str(message) if message else body.decode("utf-8", "replace").strip()
    return f"the model server answered {response.status_code}: {text[:500] or response.reason_phrase}"


def _read(response: httpx.Response) -> dict[str, Any]:
    """The JSON body of a successful answer, read up to MAX_RESPONSE_BYTES; ChatError otherwise."""
    if 300 <= response.status_code < 400:
        raise ChatError(f"the model server answered {response.status_code} redirecting to "
                        f"{response.headers.get('location')!r}; redirects are not followed: set the final URL")
    body = bytearray()
    for block in response.iter_bytes():
        body += block
        if len(body) > MAX_RESPONSE_BYTES:
            raise ChatError(f"the model server's answer is larger than {MAX_RESPONSE_BYTES} bytes")
    if response.status_code >= 400:
        raise ChatError(_error_message(response, bytes(body)))
    try:
        payload = json.loads(body)
    except ValueError:
        raise ChatError("the model server's answer is not JSON (is the URL an OpenAI-compatible /v1?)") from None
    if not isinstance(payload, dict):
        raise ChatError("the model server's answer is not a JSON object")
    return payload


def _send(target: Target, body: dict[str, Any], headers: dict[str, str], timeout: float,
          transport: httpx.BaseTransport | None) -> dict[str, Any]:
    """POST to each checked address in turn until one connects (a host may resolve to an IPv6 address
    nothing listens on); the Host header and SNI carry the original name."""
    extensions = {"sni_hostname": target.url.host} if target.url.scheme == "https" else {}
    headers = {**headers, "Host": target.url.netloc.decode("ascii")}
    last: Exception | None = None
    with httpx.Client(transport=transport, timeout=httpx.Timeout(timeout, connect=min(timeout, 10.0)),
                      follow_redirects=False, trust_env=False) as client:
        for address in target.addresses:
            request = client.build_request("POST", target.url.copy_with(host=address), json=body, headers=headers,
                                           extensions=extensions)
            try:
                response = client.send(request, stream=True)
                try:
                    return _read(response)
                finally:
                    response.close()
            except (httpx.ConnectError, httpx.ConnectTimeout) as err:
                last = err
            except httpx.TimeoutException:
                raise ChatError(f"the model server did not answer within {timeout:g} s") from None
            except httpx.HTTPError as err:
                raise ChatError(f"request to the model server failed: {type(err).__name__}: {err}") from None
    raise ChatError(f"cannot connect to the model server {target.url.host!r}: {last}")


def _storable(text: str) -> str:
    """Text with each NUL character replaced by U+FFFD: PostgreSQL cannot store NUL, and a small model's
    byte-level tokens can decode to one. Done on both databases, so exports are the same."""
    return text.replace("\x00", "\ufffd")


def _text_or_none(value: Any) -> str | None:
    """An optional field of the answer as storable text (a server may send a number, or nothing)."""
    return _storable(str(value)) if value else None


def _index(choice: Any) -> int:
    """A choice's `index` for sorting (0 when missing or not a number, as a one-choice answer has)."""
    index = choice.get("index") if isinstance(choice, dict) else None
    return index if isinstance(index, int) else 0


def _drafts(payload: dict[str, Any], model: str, n: int) -> list[Draft]:
    """The answer's choices as drafts, in index order, as storable text; ChatError when it is not a chat
    completion."""
    choices = payload.get("choices")
    if not isinstance(choices, list):
        raise ChatError("the model server's answer has no `choices` list")
    drafts = []
    for choice in sorted(choices, key=_index):
        message = choice.get("message") if isinstance(choice, dict) else None
        content = message.get("content") if isinstance(message, dict) else None
        if not isinstance(content, str):
            raise ChatError("a choice in the model server's answer has no text content")
        drafts.append(Draft(_storable(content), _text_or_none(payload.get("model")) or model,
                            _text_or_none(payload.get("system_fingerprint")), _text_or_none(choice.get("finish_reason"))))
    if len(drafts) != n:
        raise ChatError(f"asked for {n} drafts and the model server gave {len(drafts)} (does it support n > 1?)")
    return drafts


def complete(
    base_url: str,
    model: str,
    messages: Sequence[Mapping[str, str]],
    n: int = 1,
    *,
    api_key: str | None = None,
    temperature: float | None = None,
    top_p: float | None = None,
    max_tokens: int | None = None,
    stop: str | list[str] | None = None,
    seed: int | None = None,
    timeout: float = 60.0,
    allowed_hosts: Sequence[str] = (),
    transport: httpx.BaseTransport | None = None,
) -> list[Draft]:
    """`n` drafts answering `messages` from the OpenAI-compatible server at `base_url` (e.g.
    `http://gpu-box:8001/v1`). Parameters left None are not sent (the server's defaults apply).
    `allowed_hosts` is the operator's allow-list (`model_hosts_from_env()`); `transport` is for tests.
    Raises HostRefused before sending anything to a refused host, ChatError for every other failure."""
    if n < 1:
        raise ValueError("n must be >= 1")
    target = check_url(chat_url(base_url), allowed_hosts)
    optional = {"temperature": temperature, "top_p": top_p, "max_tokens": max_tokens, "stop": stop, "seed": seed}
    body = {"model": model, "messages": [dict(m) for m in messages], "n": n,
            **{k: v for k, v in optional.items() if v is not None}}
    headers = {"Accept": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    return _drafts(_send(target, body, headers, timeout, transport), model, n)
