"""Who a call comes from (its principal), so that per-client limits (the session quota) hold per client.

In order of trust:
1. ``mtls:<subject>``: the client certificate's subject DN (its subject alternative names when the subject is
   empty) when the server runs mutual TLS; the handshake has verified it against the client CA, so the client
   cannot choose it. Metadata is then ignored: a client must not be able to claim another's identity.
2. ``metadata:<value>``: the ``x-textgen-principal`` request metadata, only when the server is told to trust it
   (``trust_principal_metadata``, off by default): set by a trusted proxy or gateway in front of the server (an API
   key's owner, a user id). It is only as trustworthy as that proxy: a client that reaches the server directly
   could send any value (and rotate it to escape its quota), so such a proxy must replace what clients send.
3. ``ip:<address>``: the peer's IP address without the port, so anonymous clients on different hosts do not share
   a quota (all loopback addresses, IPv4 and IPv6, and Unix sockets are one principal, ``ip:loopback``: a local
   client may reach the server over either). Behind a proxy every client has the proxy's address: let the proxy
   set the metadata.

The prefixes keep the three namespaces apart, so metadata cannot impersonate an address or a certificate."""

from __future__ import annotations

import ipaddress
from urllib.parse import unquote

import grpc

from textgen.client import PRINCIPAL_METADATA_KEY
from textgen.errors import InvalidInputError

MAX_PRINCIPAL_CHARS = 128  # principals are kept per session and echoed in messages: bounded like any field
LOOPBACK = "ip:loopback"


def principal_of(context: grpc.aio.ServicerContext, trust_metadata: bool = False) -> str:
    """The principal of the call ``context`` belongs to (see the module's docstring)."""
    auth = context.auth_context()
    subject = b",".join(auth.get("x509_subject") or auth.get("x509_subject_alternative_name") or ())
    if subject:
        return "mtls:" + subject.decode("utf-8", "replace")
    if not trust_metadata:
        return address_principal(context.peer())
    sent = [v for k, v in (context.invocation_metadata() or ()) if k == PRINCIPAL_METADATA_KEY]
    if len(sent) > 1:  # a proxy that appends rather than replaces would let the client's own value through
        raise InvalidInputError(f"{PRINCIPAL_METADATA_KEY}: sent {len(sent)} times; give it once")
    if sent and sent[0]:
        value = sent[0] if isinstance(sent[0], str) else sent[0].decode("utf-8", "replace")
        if len(value) > MAX_PRINCIPAL_CHARS:
            raise InvalidInputError(
                f"{PRINCIPAL_METADATA_KEY}: {len(value)} characters exceed the maximum of {MAX_PRINCIPAL_CHARS}"
            )
        return "metadata:" + value
    return address_principal(context.peer())


def address_principal(peer: str) -> str:
    """``ip:<address>`` for a gRPC peer string (``ipv4:10.0.0.7:51234``, ``ipv6:[2001:db8::1]:51234``)."""
    scheme, _, rest = peer.partition(":")
    if scheme not in ("ipv4", "ipv6"):
        return LOOPBACK if scheme.startswith("unix") else "peer:" + peer[:MAX_PRINCIPAL_CHARS]
    host = unquote(rest).rpartition(":")[0].strip("[]")  # the port goes; some builds percent-encode the brackets
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return "peer:" + peer[:MAX_PRINCIPAL_CHARS]
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped  # a dual-stack listener sees IPv4 clients as ::ffff:a.b.c.d
    return LOOPBACK if ip.is_loopback else f"ip:{ip}"
