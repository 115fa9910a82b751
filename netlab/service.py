"""The daemon's service tree: one :class:`NetlabService` holding one child per service.

Each service module provides a builder, ``build(config, reactor) -> INetlabService``,
registered by dotted name in :data:`SERVICE_BUILDERS`.  The base classes here
do what every service needs: listen on its endpoint when the daemon starts
(synchronously, so a port that is taken stops start-up with one clear line),
log where it listens, stop listening on shutdown, and take a new
configuration on reload.
"""

from __future__ import annotations

import importlib
import os
import re
import socket
from collections.abc import Callable, Sequence
from typing import Any

from twisted.application.service import IService, MultiService, Service
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import (
    IListeningPort,
    IProtocolFactory,
    IReactorUDP,
)
from twisted.internet.protocol import DatagramProtocol
from twisted.logger import ILogObserver, Logger
from twisted.python.components import Componentized
from zope.interface import Attribute, implementer

from netlab.config import NetlabConfig
from netlab.errors import ConfigError
from netlab.logs import NetlabLogObserver
from netlab.systemd import (
    ActivationError,
    adopt_datagram_socket,
    check_stream_socket,
    inherited_socket,
)
from netlab.tls import (
    BulkTLSFactory,
    TLSListeningReactor,
    server_connection_creator,
    server_tls_options,
)

log = Logger(namespace="netlab")


class ServiceStartError(Exception):
    """A service could not start (its one-line message says why and what to do)."""


class INetlabService(IService):
    """A netlab service: a Twisted service that can take a new configuration."""

    listening_address: Any = Attribute(
        "The address the service listens on once started (an IAddress), or None."
    )

    def reconfigure(config: NetlabConfig) -> Sequence[str]:
        """Apply what can change while running from a new, valid configuration.

        Returns human-readable descriptions (``"[file] endpoint"``) of the
        changed settings that only a restart applies.
        """


def describe_address(address: Any) -> str:
    """``127.0.0.1:8021`` for IPv4/IPv6 addresses, ``repr`` otherwise."""
    host = getattr(address, "host", None)
    port = getattr(address, "port", None)
    if host is None or port is None:
        return str(address)
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def changed_restart_keys(old: Any, new: Any, section: str) -> list[str]:
    """The keys of one section that differ and are not marked ``live``."""
    from netlab.config import keys

    return [
        f"[{section}] {info.name}"
        for info in keys(section)
        if not info.live and getattr(old, info.name) != getattr(new, info.name)
    ]


def systemd_datagram_sockets(
    service: str, name: str, count: int
) -> list[socket.socket]:
    """``count`` sockets on the UDP socket systemd passed as ``name``, checked as
    :func:`netlab.systemd.adopt_datagram_socket` checks it, for a service that
    shares it with helper processes.  The inherited descriptor is closed."""
    try:
        descriptor, first = inherited_socket(name, socket.SOCK_DGRAM)
    except ActivationError as error:
        raise ServiceStartError(f"[{service}] {error}") from None
    try:
        return [first] + [
            socket.socket(fileno=os.dup(descriptor)) for _ in range(count - 1)
        ]
    finally:
        os.close(descriptor)


@implementer(INetlabService)
class ListeningService(Service):
    """Base for services that own one listening port.

    Subclasses implement :meth:`listen` and :meth:`apply`.
    """

    section_name: str = ""

    def __init__(self, config: NetlabConfig, reactor: Any) -> None:
        self.config = config
        self.reactor = reactor
        self.name = self.section_name
        self.port: IListeningPort | None = None

    @property
    def section(self) -> Any:
        return self.config.section(self.section_name)

    @property
    def listening_address(self) -> Any:
        return self.port.getHost() if self.port is not None else None

    def listen(self) -> IListeningPort:
        """Open the listening socket (synchronously)."""
        raise NotImplementedError

    def apply(self, config: NetlabConfig) -> None:
        """Take over the ``live`` settings of a new configuration."""

    def privilegedStartService(self) -> None:
        # Listening here, before twistd sheds privileges, also means a port
        # that is taken stops start-up instead of leaving a half-started daemon.
        super().privilegedStartService()
        try:
            self.port = self.listen()
        except CannotListenError as error:
            reason = error.socketError
            detail = getattr(reason, "strerror", None) or str(reason)
            raise ServiceStartError(
                f"[{self.name}] cannot listen on {self.section.endpoint}: {detail}; "
                "is another program using that port?"
            ) from None
        log.info(
            "{service} service listening on {address}",
            event="netlab.listening",
            service=self.name,
            address=describe_address(self.port.getHost()),
        )

    def stopService(self) -> Deferred[None] | None:
        super().stopService()
        port, self.port = self.port, None
        if port is None:
            return None
        stopped = port.stopListening()
        return stopped if isinstance(stopped, Deferred) else None

    def reconfigure(self, config: NetlabConfig) -> Sequence[str]:
        name = self.section_name
        restart = changed_restart_keys(self.section, config.section(name), name)
        self.apply(config)
        self.config = config
        return restart


class StreamListeningService(ListeningService):
    """A TCP service listening on a Twisted endpoint string."""

    def factory(self) -> IProtocolFactory:
        """The protocol factory for incoming connections."""
        raise NotImplementedError

    def listen(self) -> IListeningPort:
        address = self.config.listen_address(self.section_name)
        if address.kind == "systemd":
            assert address.name is not None
            try:
                check_stream_socket(address.name, address.options["domain"])
            except ActivationError as error:
                raise ServiceStartError(f"[{self.name}] {error}") from None
        description: str = self.section.endpoint
        factory = self.factory()
        reactor = self.reactor
        if address.tls and "privateKey" not in address.options:
            # TLS with [tls]'s certificate: Twisted listens (on a port or
            # systemd's socket) and netlab's bulk TLS transport wraps each
            # connection (see netlab.tls).
            tls = self.config.tls
            if tls.certificate is None or tls.private_key is None:
                raise ServiceStartError(
                    f"[{self.name}] endpoint uses TLS but [tls] certificate and "
                    "private_key are not set"
                )
            try:
                options = server_tls_options(tls.certificate, tls.private_key)
            except (OSError, ValueError) as error:
                raise ServiceStartError(f"[{self.name}] [tls]: {error}") from None
            factory = BulkTLSFactory(
                server_connection_creator(options), False, factory, clock=reactor
            )
            description = (
                "tcp" + description[len("ssl") :]
                if address.kind == "ssl"
                else _NETLAB_TLS_OPTION.sub("", description)
            )
        elif address.kind == "ssl":
            # An ssl: endpoint naming its own key and certificate: Twisted
            # parses them, and TLSListeningReactor serves them with netlab's
            # bulk TLS transport.
            reactor = TLSListeningReactor(self.reactor)
        try:
            endpoint = serverFromString(reactor, description)
        except (ValueError, OSError) as error:
            raise ServiceStartError(f"[{self.name}] endpoint: {error}") from None
        listening = endpoint.listen(factory)
        ports: list[IListeningPort] = []
        failures: list[Any] = []
        listening.addCallbacks(ports.append, failures.append)
        if failures:
            failures[0].raiseException()
        if not ports:  # Every stream endpoint netlab accepts listens synchronously.
            raise ServiceStartError(f"[{self.name}] endpoint did not listen at once")
        return ports[0]


class DatagramListeningService(ListeningService):
    """A UDP service on netlab's ``udp:`` or ``systemd:name=`` endpoint string."""

    def protocol(self) -> DatagramProtocol:
        """The protocol that receives the service's datagrams."""
        raise NotImplementedError

    #: Datagrams up to this size are read whole; set above the application's
    #: limit so oversize input is seen (and refused), never silently truncated.
    max_packet_size: int = 65535

    def listen(self) -> IListeningPort:
        address = self.config.listen_address(self.section_name)
        if address.kind == "systemd":
            assert address.name is not None
            return self._adopt(address.name)
        assert address.port is not None
        reactor: IReactorUDP = self.reactor
        return reactor.listenUDP(
            address.port,
            self.protocol(),
            interface=address.interface or "",
            maxPacketSize=self.max_packet_size,
        )

    def _adopt(self, name: str) -> IListeningPort:
        try:
            return adopt_datagram_socket(
                self.reactor, name, self.protocol(), self.max_packet_size
            )
        except ActivationError as error:
            raise ServiceStartError(f"[{self.name}] {error}") from None


#: netlab's own option on systemd: stream endpoints, unknown to Twisted.
_NETLAB_TLS_OPTION = re.compile(r":tls=(?:yes|no)(?=:|$)")


#: Builders of the services, by name.  ``None``: known to the configuration
#: but not part of this release (enabling it is a configuration error).
SERVICE_BUILDERS: dict[str, str | None] = {
    "file": "netlab.file.service:build",
    "command": None,
    "time": "netlab.time.service:build",
    "chat": "netlab.chat.service:build",
}


def builder(name: str) -> Callable[[NetlabConfig, Any], INetlabService]:
    """Import the builder of service ``name``."""
    target = SERVICE_BUILDERS[name]
    if target is None:
        raise ConfigError(
            "this service is not available in this netlab release; set enabled = false",
            section=name,
            key="enabled",
        )
    module_name, _, function = target.partition(":")
    return getattr(importlib.import_module(module_name), function)  # type: ignore[no-any-return]


def check_available(config: NetlabConfig) -> None:
    """Refuse a configuration that enables a service this release lacks."""
    for name in config.enabled_services():
        try:
            builder(name)
        except ConfigError as error:
            error.path = str(config.path) if config.path else None
            raise ConfigError(
                error.reason, path=error.path, section=name, key="enabled"
            ) from None


class NetlabService(MultiService):
    """The root of the daemon: one child per enabled service."""

    def __init__(
        self,
        config: NetlabConfig,
        reactor: Any,
        log_observer: NetlabLogObserver | None = None,
    ) -> None:
        super().__init__()
        self.config = config
        self.reactor = reactor
        self.log_observer = log_observer
        for name in config.enabled_services():
            builder(name)(config, reactor).setServiceParent(self)

    def setServiceParent(self, parent: Any) -> None:
        # twistd asks the application for an ILogObserver component before it
        # falls back to its own text observer; this is how [netlab] log_format
        # and log_level take effect (twistd --logger still wins).
        if (
            self.log_observer is not None
            and isinstance(parent, Componentized)
            and parent.getComponent(ILogObserver) is None
        ):
            parent.setComponent(ILogObserver, self.log_observer)
        super().setServiceParent(parent)

    def privilegedStartService(self) -> None:
        state = self.config.netlab.state_directory
        state.mkdir(mode=0o700, parents=True, exist_ok=True)
        super().privilegedStartService()

    def reconfigure(self, config: NetlabConfig) -> list[str]:
        """Apply a new, valid configuration; return what needs a restart."""
        restart = changed_restart_keys(self.config.netlab, config.netlab, "netlab")
        restart += changed_restart_keys(self.config.tls, config.tls, "tls")
        if self.log_observer is not None:
            self.log_observer.set_level(config.netlab.log_level)
        for name in config.enabled_services():
            if name not in self.namedServices:
                restart.append(f"[{name}] enabled")
        for child in self:
            # Other children (the daemon's lifecycle) have no section to apply.
            if not INetlabService.providedBy(child):
                continue
            if not config.section(child.name).enabled:
                restart.append(f"[{child.name}] enabled")
            else:
                restart.extend(child.reconfigure(config))
        self.config = config
        return restart
