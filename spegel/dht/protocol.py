# -*- test-case-name: tests.unit.test_dht_protocol -*-
"""
The DHT's request/reply protocol over UDP, modelled on Twisted's C{DNSDatagramProtocol}.

Each outstanding request sits in a table C{txid -> _Pending}: a random 8-byte transaction id,
the L{Deferred} its caller waits on, the timeout call and the address asked.  A reply is
accepted only if its txid is pending I{and} it comes from that address with the reply kind
the request expects; anything else is dropped and counted, as are malformed, oversized,
unauthenticated or unknown datagrams.  Nothing a peer sends can raise into the reactor.

Not an amplifier
================
A UDP request's source address can be forged, so a reply may go to someone who never asked.
Until an address has shown it receives what is sent to it (it answered one of our requests:
the reply echoed a random txid only that address was sent), replies to it are at most
L{AMPLIFICATION_LIMIT} times the size of the request, trimmed of contacts and providers the
way an oversized reply is; and it is pinged, once, so that its next requests get full answers.
A forged source thus gets at most three bytes for each byte sent, and the ping, which is no
larger than a request.
"""

from __future__ import annotations

import secrets
from collections import Counter, OrderedDict
from typing import Callable, Protocol

from attrs import frozen
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.protocol import DatagramProtocol
from twisted.logger import Logger

from spegel.dht import wire
from spegel.dht.metrics import DHTMetrics
from spegel.dht.wire import Body, Kind, MalformedDatagram, Message, OversizedMessage

Address = tuple[str, int]

# Replies to an address not yet seen to answer are at most this many times the request's size.
AMPLIFICATION_LIMIT = 3
# Addresses remembered as answering, and pings in flight to check new ones: both bounded, so a
# flood of forged sources costs a fixed amount of memory.
VERIFIED_ADDRESSES = 16384
VERIFYING_AT_ONCE = 256

REPLY_KIND = {
    Kind.PING: Kind.PONG,
    Kind.FIND_NODE: Kind.NODES,
    Kind.ADD_PROVIDER: Kind.ADD_PROVIDER_ACK,
    Kind.GET_PROVIDERS: Kind.PROVIDERS,
}


class DHTError(Exception):
    """
    Base class of the DHT's request failures.
    """


class DHTTimeout(DHTError):
    """
    A request got no acceptable reply in time.
    """

    def __init__(self, kind: Kind, address: Address) -> None:
        super().__init__(f"{kind.name} to {address[0]}:{address[1]} timed out")
        self.kind = kind
        self.address = address


class DHTSendError(DHTError):
    """
    A request could not be sent (bad address, socket error, not listening).
    """


class MessageHandler(Protocol):
    def message_received(self, message: Message, address: Address) -> None:
        """
        Called for every accepted message (request or solicited reply): routing upkeep.
        """

    def handle_request(self, message: Message, address: Address) -> Body:
        """
        The body of the reply to a request.
        """


@frozen
class _Pending:
    deferred: Deferred[Message]
    timeout_call: IDelayedCall
    address: Address
    kind: Kind


def normalize_address(address: tuple) -> Address:
    """
    C{(host, port)} with a canonical IP text (IPv6 socket addresses come with flow info and
    scope, and IPv4 peers of a dual-stack socket look like C{::ffff:a.b.c.d}).
    """
    host, port = address[0], address[1]
    try:
        host = wire.normalize_host(host)
    except ValueError:
        pass
    return (host, port)


class DHTProtocol(DatagramProtocol):
    """
    @ivar metrics: where this node's datagrams are counted.
    @ivar dropped: per-instance count of dropped datagrams by reason (tests read this).
    @ivar sent: per-instance count of datagrams sent, by kind.
    """

    log = Logger()

    def __init__(
        self,
        node_id: bytes,
        clock: IReactorTime,
        handler: MessageHandler,
        *,
        metrics: DHTMetrics,
        secret: bytes | None = None,
        also_accepted: tuple[bytes, ...] = (),
        timeout: float = 0.5,
        randbytes: Callable[[int], bytes] = secrets.token_bytes,
    ) -> None:
        self.node_id = node_id
        self.clock = clock
        self.handler = handler
        self.metrics = metrics
        # Each datagram is counted; labels() takes a lock and hashes its arguments every call,
        # so the per-kind children are looked up once.
        self._sent_counters = {kind: metrics.datagrams_sent.labels(kind.name) for kind in Kind}
        self._received_counters = {kind: metrics.datagrams_received.labels(kind.name) for kind in Kind}
        self.secret = secret
        self.also_accepted = also_accepted
        self.timeout = timeout
        self.randbytes = randbytes
        self.pending: dict[bytes, _Pending] = {}
        self._verified: OrderedDict[Address, None] = OrderedDict()
        self._verifying: set[Address] = set()
        self.dropped: Counter[str] = Counter()
        self.sent: Counter[str] = Counter()
        self.received: Counter[str] = Counter()

    def stopProtocol(self) -> None:
        # The port is gone: nothing pending can be answered any more.
        for txid in list(self.pending):
            pending = self.pending.pop(txid)
            pending.timeout_call.cancel()
            pending.deferred.errback(DHTSendError("protocol stopped"))

    def request(self, address: Address, body: Body, timeout: float | None = None) -> Deferred[Message]:
        """
        Send the request C{body} to C{address}.

        @return: fires with the reply L{Message}, or fails with L{DHTTimeout} or
            L{DHTSendError}.  Cancelling it forgets the request.
        """
        address = normalize_address(address)
        txid = self.randbytes(wire.TXID_BYTES)
        while txid in self.pending:
            txid = self.randbytes(wire.TXID_BYTES)

        def cancel(d: Deferred[Message]) -> None:
            pending = self.pending.pop(txid, None)
            if pending is not None:
                pending.timeout_call.cancel()

        deferred: Deferred[Message] = Deferred(cancel)
        try:
            self._send(Message(txid, self.node_id, body), address)
        except (OSError, ValueError, TypeError, AttributeError) as e:
            deferred.errback(DHTSendError(f"{body.kind.name} to {address}: {e}"))
            return deferred

        def expire() -> None:
            pending = self.pending.pop(txid, None)
            if pending is not None:
                self.metrics.rpc_timeouts.labels(body.kind.name).inc()
                pending.deferred.errback(DHTTimeout(body.kind, address))

        call = self.clock.callLater(self.timeout if timeout is None else timeout, expire)
        self.pending[txid] = _Pending(deferred, call, address, body.kind)
        return deferred

    def _send(self, message: Message, address: Address, max_size: int = wire.MAX_DATAGRAM_SIZE) -> None:
        data = self._encode(message, max_size)
        if self.transport is None:
            raise OSError("not listening")
        self.transport.write(data, address)
        self.sent[message.kind.name] += 1
        self._sent_counters[message.kind].inc()

    def _encode(self, message: Message, max_size: int = wire.MAX_DATAGRAM_SIZE) -> bytes:
        body = message.body
        if isinstance(body, wire.Nodes):
            contacts = body.contacts
            return wire.fit(
                lambda n: Message(message.txid, message.sender_id, wire.Nodes(contacts[:n])),
                len(contacts),
                self.secret,
                max_size,
            )
        if isinstance(body, wire.Providers):
            providers, contacts = body.providers, body.contacts

            def make(n: int) -> Message:
                # Contacts go first: the providers are what the asker came for.
                kept = min(n, len(providers))
                trimmed = wire.Providers(providers[:kept], contacts[: n - kept])
                return Message(message.txid, message.sender_id, trimmed)

            return wire.fit(make, len(providers) + len(contacts), self.secret, max_size)
        return wire.encode(message, self.secret)

    def _drop(self, reason: str, address: tuple, detail: object = "") -> None:
        self.dropped[reason] += 1
        self.metrics.datagrams_dropped.labels(reason).inc()
        self.log.debug(
            "Dropped datagram from {address}: {reason} {detail}",
            address=address,
            reason=reason,
            detail=detail,
        )

    def datagramReceived(self, data: bytes, addr: tuple) -> None:
        try:
            self._datagram_received(data, addr)
        except Exception:
            # Belt and braces: a bug in handling one datagram must not reach the reactor.
            self._drop("internal_error", addr)
            self.log.failure("Error handling a datagram from {address}", address=addr)

    def _datagram_received(self, data: bytes, addr: tuple) -> None:
        try:
            message = wire.decode(data, self.secret, self.also_accepted)
        except MalformedDatagram as e:
            self._drop(e.reason, addr, e)
            return
        address = normalize_address(addr)
        if message.is_request:
            self._count_received(message)
            self.handler.message_received(message, address)
            self._reply(message, address, len(data))
            return
        pending = self.pending.get(message.txid)
        if pending is None:
            self._drop("unsolicited", addr)
            return
        if pending.address != address:
            self._drop("wrong_address", addr)
            return
        if REPLY_KIND[pending.kind] != message.kind:
            self._drop("unexpected_kind", addr)
            return
        del self.pending[message.txid]
        pending.timeout_call.cancel()
        self._count_received(message)
        self.handler.message_received(message, address)
        # After the handler saw it, so the routing table knows the sender.
        self._remember_verified(address, message.sender_id)
        pending.deferred.callback(message)

    def _count_received(self, message: Message) -> None:
        self.received[message.kind.name] += 1
        self._received_counters[message.kind].inc()

    def _reply(self, request: Message, address: Address, request_size: int) -> None:
        try:
            body = self.handler.handle_request(request, address)
        except Exception:
            self._drop("handler_error", address)
            self.log.failure("Error answering {kind} from {address}", kind=request.kind.name, address=address)
            return
        max_size = wire.MAX_DATAGRAM_SIZE
        if not self.is_verified(address):
            max_size = min(max_size, AMPLIFICATION_LIMIT * request_size)
            self._verify(address)
        try:
            self._send(Message(request.txid, self.node_id, body), address, max_size)
        except (OSError, OversizedMessage) as e:
            self.log.warn("Could not reply to {address}: {error}", address=address, error=e)

    def is_verified(self, address: Address) -> bool:
        """Whether C{address} answered one of our requests (lately)."""
        return address in self._verified

    def _remember_verified(self, address: Address, sender_id: bytes | None = None) -> None:
        first = address not in self._verified
        self._verified[address] = None
        self._verified.move_to_end(address)
        if first and sender_id is not None:
            verified = getattr(self.handler, "address_verified", None)
            if verified is not None:
                verified(address, sender_id)
        while len(self._verified) > VERIFIED_ADDRESSES:
            self._verified.popitem(last=False)

    def _verify(self, address: Address) -> None:
        # One ping per new address at a time, and a bounded number in all.
        if address in self._verifying or len(self._verifying) >= VERIFYING_AT_ONCE:
            return
        self._verifying.add(address)
        d = self.request(address, wire.Ping())
        d.addErrback(lambda failure: failure.trap(DHTError))
        d.addBoth(lambda _: self._verifying.discard(address))


