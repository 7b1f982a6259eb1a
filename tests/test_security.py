"""TLS, mutual TLS and bearer tokens, with certificates made at test time.

One router of its own (one rank) serves mutual TLS and bearer-token auth
together: no client certificate is refused by the handshake, a certificate
without a token gets UNAUTHENTICATED, a certificate and a token work, and
Health needs no token. Plain TLS (no client certificate) is checked on the
router's own gRPC server with no ranks behind it.
"""

from __future__ import annotations

import datetime
import ipaddress
from collections.abc import AsyncIterator, Awaitable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc

from dprouter.v1 import generate_pb2, generate_pb2_grpc, ranks_pb2, ranks_pb2_grpc
from router.app import build_server, serve_port
from router.auth import TOKENS_ENV, load_tokens
from router.config import TlsConfig, parse_args
from router.dispatcher import Dispatcher
from router.health import RouterHealth
from router.metrics import Metrics
from tests.conftest import TINY_MODEL, tiny_spec
from tools.local_cluster import LocalCluster, free_port

FILE_TOKEN = "token-from-file"
ENV_TOKENS = ("env-token-a", "env-token-b")
GOOD = generate_pb2.GenerateRequest(
    prompt="secure", sampling=generate_pb2.SamplingParams(max_tokens=4, temperature=0)
)
SERVING = health_pb2.HealthCheckResponse.SERVING


@dataclass(frozen=True)
class Pki:
    """PEM bytes of a CA, a server certificate for localhost and 127.0.0.1, and
    a client certificate, all signed by the CA; the files in `directory`."""

    directory: Path
    ca: bytes
    client_key: bytes
    client_cert: bytes

    def path(self, name: str) -> str:
        return str(self.directory / name)


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _certificate(
    name: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: tuple[x509.Name, ec.EllipticCurvePrivateKey] | None,
    extensions: list[x509.ExtensionType],
) -> x509.Certificate:
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    issuer_name, issuer_key = issuer or (subject, key)
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=issuer is None, path_length=None), critical=True)
    )
    for extension in extensions:
        builder = builder.add_extension(extension, critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def make_pki(directory: Path) -> Pki:
    ca_key = _key()
    ca = _certificate("dprouter test CA", ca_key, None, [])
    signer = (ca.subject, ca_key)
    server_key, client_key = _key(), _key()
    server = _certificate(
        "localhost",
        server_key,
        signer,
        [
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
        ],
    )
    client = _certificate(
        "test client",
        client_key,
        signer,
        [x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH])],
    )
    pem = serialization.Encoding.PEM
    pki = Pki(directory, ca.public_bytes(pem), _pem_key(client_key), client.public_bytes(pem))
    (directory / "ca.pem").write_bytes(pki.ca)
    (directory / "server.pem").write_bytes(server.public_bytes(pem))
    (directory / "server.key").write_bytes(_pem_key(server_key))
    return pki


def with_client_cert(pki: Pki) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(pki.ca, pki.client_key, pki.client_cert)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def secure_cluster(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    tokens_file = pki.directory / "tokens"
    tokens_file.write_text(f"{FILE_TOKEN}\n\n")
    flags = [
        "--tls-cert", pki.path("server.pem"),
        "--tls-key", pki.path("server.key"),
        "--tls-client-ca", pki.path("ca.pem"),
        "--auth-tokens-file", str(tokens_file),
    ]  # fmt: skip
    spec = tiny_spec(
        "security",
        tmp_path_factory,
        ranks=1,
        router_flags=flags,
        env={TOKENS_ENV: ",".join(ENV_TOKENS)},
        # wait_serving's Health checks go over mutual TLS, with no token.
        credentials=with_client_cert(pki),
    )
    with LocalCluster(spec).serving(timeout=300) as cluster:
        yield cluster


@pytest.fixture
async def mtls_channel(secure_cluster: LocalCluster, pki: Pki) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.secure_channel(
        secure_cluster.spec.listen, with_client_cert(pki)
    ) as channel:
        yield channel


def bearer(token: str) -> tuple[tuple[str, str]]:
    return (("authorization", f"Bearer {token}"),)


async def test_health_needs_no_token(mtls_channel: grpc.aio.Channel) -> None:
    health = health_pb2_grpc.HealthStub(mtls_channel)
    reply = await health.Check(health_pb2.HealthCheckRequest(service=""))
    assert reply.status == SERVING


@pytest.mark.parametrize("token", [FILE_TOKEN, *ENV_TOKENS])
async def test_a_client_cert_and_a_token_stream_a_generation(
    mtls_channel: grpc.aio.Channel, token: str
) -> None:
    generate = generate_pb2_grpc.GenerateServiceStub(mtls_channel)
    responses = [r async for r in generate.Generate(GOOD, metadata=bearer(token))]
    assert len(responses) > 1  # streamed, not one reply
    assert responses[-1].usage.completion_tokens == 4


@pytest.mark.parametrize(
    "metadata",
    [(), bearer("wrong"), bearer(""), (("authorization", FILE_TOKEN),)],
    ids=["no token", "wrong token", "empty token", "no Bearer scheme"],
)
async def test_without_a_valid_token_every_service_is_unauthenticated(
    mtls_channel: grpc.aio.Channel, metadata: tuple[tuple[str, str], ...]
) -> None:
    generate = generate_pb2_grpc.GenerateServiceStub(mtls_channel)
    ranks = ranks_pb2_grpc.RanksServiceStub(mtls_channel)
    calls: list[Awaitable[object]] = [
        generate.Complete(generate_pb2.CompleteRequest(request=GOOD), metadata=metadata),
        ranks.ListRanks(ranks_pb2.ListRanksRequest(), metadata=metadata),
        ranks.DrainRank(ranks_pb2.DrainRankRequest(rank=0), metadata=metadata),
        ranks.ResumeRank(ranks_pb2.ResumeRankRequest(rank=0), metadata=metadata),
        ranks.ExplainRoute(ranks_pb2.ExplainRouteRequest(request=GOOD), metadata=metadata),
    ]
    for call in calls:
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await call
        assert raised.value.code() == grpc.StatusCode.UNAUTHENTICATED, raised.value.details()
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        async for _ in generate.Generate(GOOD, metadata=metadata):
            pass
    assert raised.value.code() == grpc.StatusCode.UNAUTHENTICATED
    # Still serving, and the refused DrainRank drained nothing.
    listed = await ranks.ListRanks(ranks_pb2.ListRanksRequest(), metadata=bearer(FILE_TOKEN))
    assert listed.ranks[0].state == ranks_pb2.RANK_STATE_SERVING


async def test_no_client_certificate_is_refused(secure_cluster: LocalCluster, pki: Pki) -> None:
    credentials = grpc.ssl_channel_credentials(pki.ca)
    async with grpc.aio.secure_channel(secure_cluster.spec.listen, credentials) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
    assert raised.value.code() == grpc.StatusCode.UNAVAILABLE, raised.value.details()


async def test_a_plaintext_client_is_refused(secure_cluster: LocalCluster) -> None:
    async with grpc.aio.insecure_channel(secure_cluster.spec.listen) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
    assert raised.value.code() == grpc.StatusCode.UNAVAILABLE, raised.value.details()


async def test_a_client_certificate_of_another_ca_is_refused(
    secure_cluster: LocalCluster, pki: Pki, tmp_path: Path
) -> None:
    stranger = make_pki(tmp_path)
    credentials = grpc.ssl_channel_credentials(pki.ca, stranger.client_key, stranger.client_cert)
    async with grpc.aio.secure_channel(secure_cluster.spec.listen, credentials) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
    assert raised.value.code() == grpc.StatusCode.UNAVAILABLE, raised.value.details()


async def test_plain_tls_serves_a_client_that_trusts_the_ca(pki: Pki) -> None:
    """TLS without --tls-client-ca, on the router's gRPC server with no ranks:
    a client with the CA and no certificate gets through, a plaintext one not."""
    listen = f"127.0.0.1:{free_port()}"
    config = parse_args(
        ["--model", str(TINY_MODEL), "--listen", listen,
         "--tls-cert", pki.path("server.pem"), "--tls-key", pki.path("server.key")]
    )  # fmt: skip
    assert config.tls == TlsConfig(pki.path("server.pem"), pki.path("server.key"), None)
    health = RouterHealth()
    server = build_server(Dispatcher(Metrics()), health, config)
    serve_port(server, config)
    await server.start()
    await health.starting(1)
    try:
        credentials = grpc.ssl_channel_credentials(pki.ca)
        async with grpc.aio.secure_channel(listen, credentials) as channel:
            reply = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=5
            )
            assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING  # no ranks
        async with grpc.aio.insecure_channel(listen) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(service=""), timeout=5
                )
            assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        await server.stop(grace=None)


def test_tokens_come_from_the_file_and_the_environment(tmp_path: Path) -> None:
    tokens_file = tmp_path / "tokens"
    tokens_file.write_text("one\n\n  two  \n")
    assert load_tokens(str(tokens_file), " three,,four") == {"one", "two", "three", "four"}
    assert load_tokens(None, None) == frozenset()
