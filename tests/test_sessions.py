"""Sessions owned by principals: the store with an injected clock (quotas, own-LRU eviction, refusal when the
table is full, busy sessions never evicted or expired, expiry cost counted in sessions looked at), principals
from peers, metadata and mutual TLS, and the same through a real server on loopback."""

from __future__ import annotations

import datetime
import ipaddress
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from service.context import Context
from service.models import ModelRegistry, ServedModel
from service.principals import LOOPBACK, address_principal
from service.server import BackgroundServer
from service.sessions import Session, SessionStore
from service.settings import load_settings
from textgen.client import PRINCIPAL_METADATA_KEY, Client, RemoteError
from textgen.errors import FailedPreconditionError, NotFoundError, OverloadedError
from textgen.v1 import textgen_pb2 as pb
from textgen.v1 import textgen_pb2_grpc as pb_grpc

from live_server import CALL_TIMEOUT, Live, rpc_error, start_server

# what a caller learns of a session that is not its own, or not on this replica, or made up: all the same
_ABSENT = (
    "session 'ID' does not exist on this server (sessions live on the replica that created them: behind a "
    "balancer, carry a conversation as a snapshot, which any replica sharing the snapshot key continues)"
)


class Clock:
    """Time that moves only when a test says so."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def model(served_bundle: Path) -> ServedModel:
    return ModelRegistry.load(
        load_settings(bundle=served_bundle, providers=["CPUExecutionProvider"], intra_op_threads=1)
    ).get("")


class Store(SessionStore):
    """A store that keeps a log of the sessions it ended (through its ``on_end`` hook)."""

    def __init__(
        self, clock: Clock, max_sessions: int = 100, per: int | None = None, memory: int = 1 << 30, ttl: float = 60.0
    ) -> None:
        self.ended_log: list[tuple[Session, str]] = []
        super().__init__(max_sessions, memory, ttl, per, clock, lambda s, reason: self.ended_log.append((s, reason)))

    def idle(self) -> list[Session]:
        return [s for s in self._sessions.values() if not s.busy]


# -- the store --------------------------------------------------------------------------------------------------


def test_a_principal_over_its_quota_evicts_its_own_least_recently_used(model: ServedModel) -> None:
    clock = Clock()
    store = Store(clock, max_sessions=10, per=3)
    b = store.create(Context.fresh(model, 0), "B")
    a = [store.create(Context.fresh(model, i), "A") for i in range(3)]
    store.get(a[0].id, "A")  # a[1] is now A's least recently used
    a.append(store.create(Context.fresh(model, 9), "A"))
    assert [(s.id, r) for s, r in store.ended_log] == [(a[1].id, "evicted")]
    assert store.usage("A") == (3, 3 * a[0].nbytes) and store.usage("B") == (1, b.nbytes)
    with pytest.raises(NotFoundError, match="was evicted"):
        store.get(a[1].id, "A")
    for _ in range(20):  # flooding only ever costs A its own sessions
        store.create(Context.fresh(model, 0), "A")
    assert store.get(b.id, "B") is b and len(store) == 4 and store.bytes == 4 * b.nbytes


def test_busy_sessions_are_never_evicted(model: ServedModel) -> None:
    store = Store(Clock(), max_sessions=10, per=2)
    first, second = (store.create(Context.fresh(model, 0), "A") for _ in range(2))
    store.acquire(first.id, "A")  # the older one is generating: the younger idle one goes
    store.create(Context.fresh(model, 0), "A")
    assert store.ended_log == [(second, "evicted")]
    for s in store.idle():
        store.acquire(s.id, "A")
    with pytest.raises(OverloadedError, match=r"session quota reached: A holds 2 sessions.*every one of them is gen"):
        store.create(Context.fresh(model, 0), "A")
    assert len(store) == 2 and store.get(first.id, "A").busy


def test_a_full_table_refuses_rather_than_evicting_another_principal(model: ServedModel) -> None:
    store = Store(Clock(), max_sessions=4, per=4)
    b = store.create(Context.fresh(model, 0), "B")
    for _ in range(3):
        store.create(Context.fresh(model, 0), "A")
    for who in ("A", "B", "C"):
        with pytest.raises(OverloadedError, match=r"session table full \(4 of 4 sessions.*CloseSession"):
            store.create(Context.fresh(model, 0), who)
    assert len(store) == 4 and store.ended_log == [] and store.get(b.id, "B") is b
    store.close(b.id, "B")
    store.create(Context.fresh(model, 0), "C")  # room again


def test_a_principals_memory_share_follows_its_count_share(model: ServedModel) -> None:
    size = Context.fresh(model, 0).nbytes
    # 10 sessions, 5 per principal, memory for 4: a principal may hold half of it, two sessions' worth
    store = Store(Clock(), max_sessions=10, per=5, memory=4 * size + 1)
    assert store.memory_per_principal == (4 * size + 1) // 2
    made = [store.create(Context.fresh(model, 0), "A") for _ in range(3)]
    assert store.usage("A") == (2, 2 * size) and store.ended_log == [(made[0], "evicted")]
    too_small = Store(Clock(), max_sessions=10, per=1, memory=4 * size)
    with pytest.raises(OverloadedError, match="exceeds a client's share"):
        too_small.create(Context.fresh(model, 0), "A")


def test_another_principals_session_is_reported_as_nonexistent(model: ServedModel) -> None:
    store = Store(Clock())
    sid = store.create(Context.fresh(model, 0), "A").id
    made_up = "s_" + "x" * 24

    def message(fn: Callable[[str], object], session_id: str) -> str:
        with pytest.raises(NotFoundError) as info:
            fn(session_id)
        return str(info.value).replace(session_id, "ID")

    for fn in (lambda i: store.get(i, "B"), lambda i: store.acquire(i, "B"), lambda i: store.close(i, "B")):
        assert message(fn, sid) == message(fn, made_up) == _ABSENT
    store.close(sid, "A")
    assert message(lambda i: store.get(i, "A"), sid) == "session 'ID' was closed"  # its owner learns why
    assert message(lambda i: store.get(i, "B"), sid) == _ABSENT


def test_expiry_costs_the_sessions_it_ends_and_spares_busy_ones(model: ServedModel) -> None:
    clock = Clock()
    store = Store(clock, max_sessions=2000, per=2000, ttl=60.0)
    old = [store.create(Context.fresh(model, 0), "A") for _ in range(500)]
    busy = store.acquire(old[0].id, "A")
    clock.now += 30
    young = [store.create(Context.fresh(model, 0), "B") for _ in range(1000)]
    before = store.swept
    for _ in range(100):  # nothing stale: each call looks at one session
        store.get(young[-1].id, "B")
    assert store.swept - before == 100
    clock.now += 31  # the first 500 are stale now, one of them busy
    before = store.swept
    store.get(young[0].id, "B")
    assert store.swept - before == 499 + 1 and store.ended["expired"] == 499 and len(store) == 1001
    clock.now += 600
    assert busy.busy and store.get(busy.id, "A") is busy  # busy: never expired, whatever its age
    store.release(busy)
    clock.now += 59
    assert store.get(busy.id, "A") is busy  # its TTL runs from its release
    clock.now += 61
    with pytest.raises(NotFoundError, match="was expired"):
        store.get(busy.id, "A")


_OPS = st.lists(
    st.tuples(st.sampled_from(["create", "get", "acquire", "release", "close", "tick"]), st.integers(0, 2)),
    max_size=60,
)


@settings(max_examples=150, deadline=None)
@given(ops=_OPS, per=st.integers(1, 4))
def test_invariants_hold_under_any_sequence_of_calls(model: ServedModel, ops: list[tuple[str, int]], per: int) -> None:
    clock = Clock()
    store = Store(clock, max_sessions=6, per=per, ttl=10.0)
    size = Context.fresh(model, 0).nbytes
    mine: dict[str, list[Session]] = {"A": [], "B": [], "C": []}
    for op, who in ops:
        principal = "ABC"[who]
        ended_before = len(store.ended_log)
        try:
            if op == "create":
                mine[principal].append(store.create(Context.fresh(model, 0), principal))
                # a create ends only the creator's own sessions, and never a busy one
                assert all(s.principal == principal for s, r in store.ended_log[ended_before:] if r == "evicted")
            elif op == "tick":
                clock.now += 4
            elif mine[principal]:
                s = mine[principal][-1]
                if op == "release":
                    store.release(s)
                else:
                    getattr(store, op)(s.id, principal)
        except (NotFoundError, OverloadedError, FailedPreconditionError):
            pass
        assert all(not s.busy for s, _ in store.ended_log)
        live = list(store._sessions.values())
        assert len(live) <= 6 and store.bytes == len(live) * size
        for p in "ABC":
            count, nbytes = store.usage(p)
            assert count == sum(s.principal == p for s in live) <= per and nbytes == count * size


# -- principals ---------------------------------------------------------------------------------------------------


def test_address_principals() -> None:
    assert address_principal("ipv4:10.1.2.3:51234") == "ip:10.1.2.3"
    assert address_principal("ipv6:[2001:db8::1]:51234") == "ip:2001:db8::1"
    assert address_principal("ipv6:%5B2001:db8::1%5D:51234") == "ip:2001:db8::1"
    assert address_principal("ipv6:[::ffff:10.1.2.3]:51234") == "ip:10.1.2.3"
    for local in ("ipv4:127.0.0.1:1", "ipv4:127.0.0.2:1", "ipv6:[::1]:1", "unix:/tmp/s", "unix-abstract:x"):
        assert address_principal(local) == LOOPBACK


# -- through a real server ------------------------------------------------------------------------------------------


def _as(principal: str) -> tuple[tuple[str, str], ...]:
    return ((PRINCIPAL_METADATA_KEY, principal),)


def test_a_flooding_principal_cannot_evict_anothers_session(serve: Callable[..., Live]) -> None:
    live = serve(max_sessions=4, max_sessions_per_principal=3, trust_principal_metadata=True)
    with Client(f"127.0.0.1:{live.server.port}", timeout=CALL_TIMEOUT, principal="bob") as bob:
        kept = bob.create_session(seed=3).session_id
        expected = bob.generate("the ", session_id=kept, max_tokens=8, temperature=0).text

        def generate_as(principal: str, **fields: object) -> pb.GenerateResponse:
            request = pb.GenerateRequest(prompt="a", max_tokens=2, **fields)
            return live.stub.Generate(request, metadata=_as(principal), timeout=CALL_TIMEOUT)

        def create_as_alice() -> str:
            return live.stub.CreateSession(
                pb.CreateSessionRequest(), metadata=_as("alice"), timeout=CALL_TIMEOUT
            ).session_id

        flood = [create_as_alice() for _ in range(30)]  # alice's quota is 3: she evicts only her own
        assert live.on_loop(lambda: (len(live.server.app.sessions), live.server.app.sessions.ended["evicted"])) == (
            4,
            27,
        )
        err = rpc_error(generate_as, "alice", session_id=flood[0])
        assert err.code() == grpc.StatusCode.NOT_FOUND and "was evicted" in err.details()
        assert bob.generate(session_id=kept, max_tokens=5).complete.session_id == kept  # bob's still works

        # the table is full (4 of 4): bob is refused rather than alice's sessions being evicted, and vice versa
        with pytest.raises(RemoteError) as refused:
            bob.create_session()
        assert (
            refused.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED and "session table full" in refused.value.details
        )

        # alice cannot use, fork or close bob's session: for her it does not exist
        for call in (
            lambda sid: generate_as("alice", session_id=sid),
            lambda sid: live.stub.ForkSession(
                pb.ForkSessionRequest(session_id=sid), metadata=_as("alice"), timeout=CALL_TIMEOUT
            ),
            lambda sid: live.stub.CloseSession(
                pb.CloseSessionRequest(session_id=sid), metadata=_as("alice"), timeout=CALL_TIMEOUT
            ),
        ):
            errors = [rpc_error(call, sid) for sid in (kept, "s_madeup")]
            assert {e.code() for e in errors} == {grpc.StatusCode.NOT_FOUND}
            assert errors[0].details().replace(kept, "ID") == errors[1].details().replace("s_madeup", "ID")
        # nor can an anonymous client on the same host (its principal is its address)
        assert rpc_error(live.generate, "a", session_id=kept, max_tokens=2).code() == grpc.StatusCode.NOT_FOUND

        with pytest.raises(RemoteError) as refused:  # the table is full: a fork is a new session, refused too
            bob.fork_session(kept)
        assert refused.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        bob.close_session(kept)
        again = bob.create_session(seed=3).session_id
        assert bob.generate("the ", session_id=again, max_tokens=8, temperature=0).text == expected


def test_bad_principal_metadata_is_refused_naming_the_key(live_default: Live) -> None:
    for metadata, what in (
        (_as("x") + _as("y"), "sent 2 times"),
        (_as("x" * 129), "129 characters exceed the maximum of 128"),
    ):
        err = rpc_error(
            live_default.stub.CreateSession, pb.CreateSessionRequest(), metadata=metadata, timeout=CALL_TIMEOUT
        )
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert err.details().startswith(f"{PRINCIPAL_METADATA_KEY}: {what}")


@pytest.fixture
def live_default(serve: Callable[..., Live]) -> Live:
    return serve(trust_principal_metadata=True)


# -- mutual TLS -------------------------------------------------------------------------------------------------------


def _certificate(name: str, issuer: tuple | None = None, ca: bool = False) -> tuple[object, object, bytes, bytes]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    issuer_key, issuer_cert = issuer if issuer else (key, None)
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer_cert.subject if issuer_cert is not None else subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        # every certificate has the same names, so the identity must come from the subject
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
    )
    cert = builder.sign(issuer_key, hashes.SHA256())
    pem = cert.public_bytes(serialization.Encoding.PEM)
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return key, cert, pem, key_pem


@pytest.fixture(scope="module")
def mtls(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    ca_key, ca_cert, ca_pem, _ = _certificate("textgen test CA", ca=True)
    files = {"ca": ca_pem}
    for name in ("server", "alice", "bob"):
        _, _, files[name], files[f"{name}.key"] = _certificate(name, (ca_key, ca_cert))
    return files


@pytest.fixture
def mtls_server(served_bundle: Path, mtls: dict[str, bytes], tmp_path: Path) -> Iterator[BackgroundServer]:
    paths = {}
    for name in ("ca", "server", "server.key"):
        paths[name] = tmp_path / f"{name}.pem"
        paths[name].write_bytes(mtls[name])
    live = start_server(
        served_bundle, tls_cert_file=paths["server"], tls_key_file=paths["server.key"], tls_client_ca_file=paths["ca"]
    )
    yield live.server
    live.close()


def test_mutual_tls_identity_is_the_principal(mtls_server: BackgroundServer, mtls: dict[str, bytes]) -> None:
    def stub(name: str) -> tuple[grpc.Channel, pb_grpc.TextGenerationStub]:
        creds = grpc.ssl_channel_credentials(mtls["ca"], mtls[f"{name}.key"], mtls[name])
        channel = grpc.secure_channel(f"127.0.0.1:{mtls_server.port}", creds)
        return channel, pb_grpc.TextGenerationStub(channel)

    (alice_channel, alice), (bob_channel, bob) = stub("alice"), stub("bob")
    try:
        sid = alice.CreateSession(pb.CreateSessionRequest(), timeout=CALL_TIMEOUT).session_id
        owner = mtls_server.call(_owner_of, mtls_server, sid)
        assert owner == "mtls:CN=alice"
        # bob is bob whatever metadata he sends: under mutual TLS the certificate decides
        for metadata in (None, _as("alice"), _as(owner)):
            err = rpc_error(
                bob.Generate, pb.GenerateRequest(session_id=sid, max_tokens=2), metadata=metadata, timeout=CALL_TIMEOUT
            )
            assert err.code() == grpc.StatusCode.NOT_FOUND and "does not exist" in err.details()
        reply = alice.Generate(
            pb.GenerateRequest(session_id=sid, max_tokens=2), metadata=_as("bob"), timeout=CALL_TIMEOUT
        )
        assert reply.complete.session_id == sid
    finally:
        alice_channel.close()
        bob_channel.close()


async def _owner_of(server: BackgroundServer, sid: str) -> str:
    return server.app.sessions.get(sid).principal
