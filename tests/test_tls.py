"""TLS with certificates made by trustme: the ingress over HTTPS, rediss:// and tls:// (NATS)
against real servers, server certificates verified, client certificates required."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import ssl
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trustme

import surge
from surge.http import Server
from surge.transports import open_transport
from surge.transports.nats import NatsTransport
from surge.transports.redis import RedisTransport

from ._servers import PostgresServer, RabbitServer, free_port, nats_server, redis_server

pytestmark = pytest.mark.realtime


class Ping(surge.Event):
    __topic__ = "tls.ping"
    n: int


@dataclass(frozen=True)
class Pki:
    """A CA, a server certificate for 127.0.0.1, one for another name, a client's."""

    ca: trustme.CA
    ca_pem: str
    server_cert: str
    server_key: str
    wrong_cert: str
    wrong_key: str
    client_cert: str
    client_key: str
    stranger_cert: str
    stranger_key: str
    """A client certificate from another CA."""


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    ca = trustme.CA()
    files: dict[str, str] = {}

    def write(name: str, cert: trustme.LeafCert) -> None:
        chain, key = tmp_path / f"{name}.pem", tmp_path / f"{name}.key"
        for i, pem in enumerate(cert.cert_chain_pems):
            with chain.open("ab" if i else "wb") as f:
                f.write(pem.bytes())
        cert.private_key_pem.write_to_path(str(key))
        files[name] = str(chain)
        files[f"{name}_key"] = str(key)

    write("server", ca.issue_cert("127.0.0.1"))
    write("wrong", ca.issue_cert("elsewhere.example"))
    write("client", ca.issue_cert("client@surge.test"))
    write("stranger", trustme.CA().issue_cert("client@surge.test"))
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    return Pki(
        ca=ca,
        ca_pem=str(tmp_path / "ca.pem"),
        server_cert=files["server"],
        server_key=files["server_key"],
        wrong_cert=files["wrong"],
        wrong_key=files["wrong_key"],
        client_cert=files["client"],
        client_key=files["client_key"],
        stranger_cert=files["stranger"],
        stranger_key=files["stranger_key"],
    )


async def roundtrip(transport: surge.Transport) -> None:
    """One event through an App on ``transport``, seen by its handler."""
    app = surge.App("tls", transport=transport)
    got: asyncio.Future[int] = asyncio.get_running_loop().create_future()

    @app.on(Ping)
    async def handle(ev: Ping) -> None:
        if not got.done():
            got.set_result(ev.n)

    async with app:
        await app.publish(Ping(n=7))
        assert await asyncio.wait_for(got, 10) == 7


async def test_ingress_serves_https_and_requires_client_certificates(pki: Pki) -> None:
    """Server(tls_cert, tls_key) serves HTTPS that a client trusting the CA verifies; a
    client that does not trust it fails verification; with tls_ca, only clients with a
    certificate from that CA get an answer."""
    app = surge.App("shop")
    app.http.post("/ping", publish=Ping)

    async def get(port: int, ctx: ssl.SSLContext) -> bytes:
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=ctx, server_hostname="127.0.0.1"
        )
        try:
            writer.write(b"GET /healthz HTTP/1.1\r\nhost: 127.0.0.1\r\nconnection: close\r\n\r\n")
            return await reader.read()
        finally:
            writer.close()
            try:
                await writer.wait_closed()
            except (ssl.SSLError, ConnectionError):
                pass  # the server may drop a refused client before our close

    def context(client: tuple[str, str] | None = None) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=pki.ca_pem)
        if client is not None:
            ctx.load_cert_chain(*client)
        return ctx

    async with (
        app,
        Server(app, port=0, tls_cert=pki.server_cert, tls_key=pki.server_key) as plain,
        Server(
            app, port=0, tls_cert=pki.server_cert, tls_key=pki.server_key, tls_ca=pki.ca_pem
        ) as mutual,
    ):
        assert plain.url.startswith("https://")
        answer = await get(plain.port, context())
        assert answer.startswith(b"HTTP/1.1 200 OK")
        with pytest.raises(ssl.SSLCertVerificationError):
            await get(plain.port, ssl.create_default_context())
        assert (await get(mutual.port, context((pki.client_cert, pki.client_key)))).startswith(
            b"HTTP/1.1 200 OK"
        )
        for client in (None, (pki.stranger_cert, pki.stranger_key)):
            try:
                answer = await get(mutual.port, context(client))
            except (ssl.SSLError, ConnectionError):
                answer = b""
            assert answer == b"", client  # the handshake fails: no HTTP answer at all
    with pytest.raises(surge.ConfigurationError):
        Server(app, port=0, tls_cert=pki.server_cert)


async def test_rediss_verifies_the_server_and_presents_a_client_certificate(
    pki: Pki, tmp_path: Path
) -> None:
    """rediss:// round-trips with the CA and a client certificate; it is refused without the
    client certificate, with one from another CA, without trusting the CA, and when the
    server's certificate names another host."""
    client: dict[str, Any] = {"ssl_certfile": pki.client_cert, "ssl_keyfile": pki.client_key}
    for wrong_name in (False, True):
        port = free_port()
        cert, key = (
            (pki.wrong_cert, pki.wrong_key) if wrong_name else (pki.server_cert, pki.server_key)
        )
        extra = ("--port", "0", "--tls-port", str(port), "--tls-cert-file", cert,
                 "--tls-key-file", key, "--tls-ca-cert-file", pki.ca_pem,
                 "--tls-auth-clients", "yes")  # fmt: skip
        with redis_server(tmp_path / str(wrong_name), extra=extra):
            url = f"rediss://127.0.0.1:{port}/0"
            if wrong_name:
                bad = RedisTransport(url, ssl_ca_certs=pki.ca_pem, **client)
                with pytest.raises(surge.TransportError):
                    await bad.start()
                continue
            await roundtrip(RedisTransport(url, ssl_ca_certs=pki.ca_pem, **client))
            stranger: dict[str, Any] = {
                "ssl_certfile": pki.stranger_cert,
                "ssl_keyfile": pki.stranger_key,
            }
            options: dict[str, Any]
            for options in (
                {"ssl_ca_certs": pki.ca_pem},
                {"ssl_ca_certs": pki.ca_pem, **stranger},
                client,
            ):
                t = RedisTransport(url, reconnect_timeout=0.5, **options)
                with pytest.raises(surge.TransportError):
                    await t.start()


async def test_nats_tls_verifies_the_server_and_presents_a_client_certificate(
    pki: Pki, tmp_path: Path
) -> None:
    """tls:// to nats-server round-trips with the CA and a client certificate (verify:
    true); refused without the client certificate, with one from another CA, without
    trusting the CA, and when the server's certificate names another host."""
    for wrong_name in (False, True):
        cert, key = (
            (pki.wrong_cert, pki.wrong_key) if wrong_name else (pki.server_cert, pki.server_key)
        )
        conf = (
            f'tls {{ cert_file: "{cert}", key_file: "{key}", ca_file: "{pki.ca_pem}", '
            "verify: true, timeout: 2 }"
        )
        with nats_server(tmp_path / str(wrong_name), config=conf) as srv:
            url = f"tls://127.0.0.1:{srv.port}"
            good: dict[str, Any] = {
                "tls_ca": pki.ca_pem,
                "tls_cert": pki.client_cert,
                "tls_key": pki.client_key,
            }
            if wrong_name:
                with pytest.raises(surge.TransportError):
                    await NatsTransport(url, connect_timeout=2, **good).start()
                continue
            await roundtrip(NatsTransport(url, **good))
            refused: list[dict[str, Any]] = [
                {"tls_ca": pki.ca_pem},
                {"tls_ca": pki.ca_pem, "tls_cert": pki.stranger_cert, "tls_key": pki.stranger_key},
                {"tls_cert": pki.client_cert, "tls_key": pki.client_key},
            ]
            for options in refused:
                with pytest.raises(surge.TransportError):
                    await NatsTransport(url, connect_timeout=2, **options).start()


async def test_postgres_sslmode_verify_full_with_a_client_certificate(pki: Pki) -> None:
    """postgresql://...?sslmode=verify-full round-trips against a server that accepts only
    TLS connections authenticated by a client certificate (pg_hba 'hostssl ... cert'); it
    is refused without the client certificate, without trusting the CA, and in plain text."""
    root = Path(tempfile.mkdtemp(prefix="surge-pg-tls-"))
    server = PostgresServer(
        root,
        fsync=False,
        options=(
            "-c ssl=on",
            f"-c ssl_cert_file={root / 'server.pem'}",
            f"-c ssl_key_file={root / 'server.key'}",
            f"-c ssl_ca_file={root / 'ca.pem'}",
        ),
    )
    try:
        server.init()
        # the server checks its key's owner and mode; the client's certificate names
        # the database user (CN=surge)
        for name, src in (("server.pem", pki.server_cert), ("server.key", pki.server_key),
                          ("ca.pem", pki.ca_pem)):  # fmt: skip
            dest = root / name
            shutil.copy(src, dest)
            dest.chmod(0o600)
            if os.geteuid() == 0:
                shutil.chown(dest, "postgres", "postgres")
        (server.data / "pg_hba.conf").write_text(
            "local all all trust\nhostssl all surge 127.0.0.1/32 cert\n"
        )
        if os.geteuid() == 0:
            shutil.chown(server.data / "pg_hba.conf", "postgres", "postgres")
        server.start()
        user = pki.ca.issue_cert("surge", common_name="surge")
        cert, key = root / "surge.pem", root / "surge.key"
        user.cert_chain_pems[0].write_to_path(str(cert))
        user.private_key_pem.write_to_path(str(key))
        key.chmod(0o600)
        other_ca = root / "other-ca.pem"
        trustme.CA().cert_pem.write_to_path(str(other_ca))
        base = f"postgresql://surge@127.0.0.1:{server.port}/postgres?schema=tls"
        good = f"{base}&sslmode=verify-full&sslrootcert={pki.ca_pem}&sslcert={cert}&sslkey={key}"
        await roundtrip(open_transport(good))
        for url, why in (
            (f"{base}&sslmode=verify-full&sslrootcert={pki.ca_pem}", "certificate"),
            (
                f"{base}&sslmode=verify-full&sslrootcert={other_ca}&sslcert={cert}&sslkey={key}",
                "certificate verify",
            ),
            (f"{base}&sslmode=disable", "no encryption"),
        ):
            t = open_transport(url)
            # a refused login is a ConfigurationError, a failed handshake a TransportError
            with pytest.raises((surge.TransportError, surge.ConfigurationError), match=why):
                await t.start()
            await t.close()
    finally:
        with contextlib.suppress(RuntimeError):
            server.stop("immediate")
        shutil.rmtree(root, ignore_errors=True)


async def test_amqps_verifies_the_server_and_presents_a_client_certificate(
    pki: Pki, tmp_path: Path
) -> None:
    """amqps:// (aiormq's cafile / certfile / keyfile in the URL) against a RabbitMQ node with
    a TLS listener that requires client certificates: round trip; refused without the
    client certificate and when trusting another CA."""
    tls_port = free_port()
    conf = (
        f"listeners.ssl.default = {tls_port}\n"
        f"ssl_options.cacertfile = {pki.ca_pem}\n"
        f"ssl_options.certfile = {pki.server_cert}\n"
        f"ssl_options.keyfile = {pki.server_key}\n"
        "ssl_options.verify = verify_peer\n"
        "ssl_options.fail_if_no_peer_cert = true\n"
    )
    other_ca = tmp_path / "other-ca.pem"
    trustme.CA().cert_pem.write_to_path(str(other_ca))
    node = RabbitServer(tmp_path / "rabbit", extra_conf=conf)
    node.start()
    try:
        base = f"amqps://guest:guest@127.0.0.1:{tls_port}/?prefix=tls"
        client = f"&certfile={pki.client_cert}&keyfile={pki.client_key}"
        await roundtrip(open_transport(f"{base}&cafile={pki.ca_pem}{client}"))
        for url in (f"{base}&cafile={pki.ca_pem}", f"{base}&cafile={other_ca}{client}"):
            t = open_transport(url, connect_timeout=5.0)
            with pytest.raises(surge.TransportError):
                await t.start()
            await t.close()
    finally:
        node.stop()
