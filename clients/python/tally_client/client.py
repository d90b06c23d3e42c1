"""The client: a node list, deadlines, retries on the next node, leader hints, and a change stream
that resumes by itself. The same semantics as the Rust `tally-client` (client/src/lib.rs)."""

import threading
import time
from typing import Iterable, List, Optional, Sequence

import grpc

from tally_client import types as t
from tally_client._pb import ledger_pb2 as pb
from tally_client._pb import ledger_pb2_grpc as pb_grpc

MESSAGE_BYTES_MAX = 64 << 20
"""Messages up to this size are sent and accepted (a full batch of 8189 events is ~2 MiB)."""
BACKOFF_MIN_S = 0.020
BACKOFF_MAX_S = 0.100
LEADER_HEADER = "x-tally-leader"
"""Set by a node on a reply to a request it forwarded to the leader: the leader's address."""

# Another node, or the same one later, may answer differently.
RETRYABLE = frozenset(
    [
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.CANCELLED,
    ]
)


class TallyError(Exception):
    """A call that failed; `code` is the gRPC status code, `details` the node's message."""

    def __init__(self, code: grpc.StatusCode, details: str):
        super().__init__("%s: %s" % (code.name, details))
        self.code = code
        self.details = details


class Rejected(TallyError):
    """The request is wrong and retrying will not help (INVALID_ARGUMENT, PERMISSION_DENIED...)."""


class Unavailable(TallyError):
    """No node answered before the deadline. For a write the outcome is unknown: it may or may
    not have been applied. Send it again with the same ids: OK or EXISTS then both mean that it is
    in the ledger (a refusal such as EXCEEDS_CREDITS answers ID_ALREADY_FAILED)."""


def _read(path: Optional[str], what: str) -> Optional[bytes]:
    if path is None:
        return None
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise ValueError("cannot read %s (%s): %s" % (path, what, e)) from None
    wanted = b"PRIVATE KEY-----" if what == "key" else b"-----BEGIN CERTIFICATE-----"
    if wanted not in data:
        raise ValueError("%s (%s) holds no PEM %s" % (path, what, "private key" if what == "key" else "certificate"))
    return data


def _check_address(address: str) -> None:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit() or int(port) > 65535:
        raise ValueError("'%s' is not host:port: write each node's client door as host:port, e.g. 127.0.0.1:7101" % address)


class Client:
    """A client of a tally cluster.

    `nodes` are the nodes' client doors (host:port), any of which may be down. Every call has a
    deadline of `timeout_s`; a call that fails because a node is unreachable, has no leader yet,
    or timed out is retried on the next node with backoff until the deadline. One attempt gets at
    most half the deadline, so that a node that hangs does not use it all. The client remembers
    the node that answered last (or the leader a follower named) and starts there.

    TLS by default: `ca` is the cluster's CA certificate (PEM file), `cert` and `key` a client
    certificate and its key, when the caller proves who it is. `insecure=True` talks plaintext to
    a cluster started with `--insecure`.

    Thread-safe: one client may serve many threads.
    """

    def __init__(
        self,
        nodes: Sequence[str],
        ca: Optional[str] = None,
        cert: Optional[str] = None,
        key: Optional[str] = None,
        insecure: bool = False,
        timeout_s: float = 5.0,
    ):
        if isinstance(nodes, str):
            nodes = [n for n in nodes.split(",") if n]
        if not nodes:
            raise ValueError("no node addresses given")
        for address in nodes:
            _check_address(address)
        if (cert is None) != (key is None):
            raise ValueError("give both cert and key, or neither")
        options = [
            ("grpc.max_send_message_length", MESSAGE_BYTES_MAX),
            ("grpc.max_receive_message_length", MESSAGE_BYTES_MAX),
            # A node that comes back is tried again soon.
            ("grpc.initial_reconnect_backoff_ms", 100),
            ("grpc.max_reconnect_backoff_ms", 1000),
        ]
        if insecure:
            if ca is not None or cert is not None:
                raise ValueError("insecure=True talks plaintext: give no ca, cert or key")
            make = lambda address: grpc.insecure_channel(address, options=options)  # noqa: E731
        else:
            if ca is None:
                raise ValueError("TLS needs the cluster's CA (ca=...), or insecure=True for a cluster started with --insecure")
            credentials = grpc.ssl_channel_credentials(
                root_certificates=_read(ca, "ca"), private_key=_read(key, "key"), certificate_chain=_read(cert, "cert")
            )
            make = lambda address: grpc.secure_channel(address, credentials, options=options)  # noqa: E731
        self._nodes = list(nodes)
        self._channels = [make(address) for address in self._nodes]
        self._stubs = [pb_grpc.LedgerStub(channel) for channel in self._channels]
        self._preferred = 0
        self._lock = threading.Lock()
        self.timeout_s = timeout_s

    @property
    def nodes(self) -> List[str]:
        return list(self._nodes)

    def close(self) -> None:
        for channel in self._channels:
            channel.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _call(self, method: str, request):
        """Calls `method` on one node after another until one answers or the deadline passes."""
        deadline = time.monotonic() + self.timeout_s
        backoff = BACKOFF_MIN_S
        with self._lock:
            node = self._preferred % len(self._nodes)
        last = TallyError(grpc.StatusCode.UNAVAILABLE, "no attempt made")
        attempt = 0
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            budget = min(left, self.timeout_s / 2) if len(self._nodes) > 1 else left
            try:
                reply, call = getattr(self._stubs[node], method).with_call(request, timeout=budget)
            except grpc.RpcError as error:
                status = TallyError(error.code(), error.details() or "")
                if error.code() not in RETRYABLE:
                    raise Rejected(status.code, status.details) from None
                last = status
            else:
                leader = dict(call.initial_metadata() or ()).get(LEADER_HEADER)
                with self._lock:
                    self._preferred = self._nodes.index(leader) if leader in self._nodes else node
                return reply
            node = (node + 1) % len(self._nodes)
            attempt += 1
            # A full round of nodes failed: pause before the next round.
            if attempt % len(self._nodes) == 0:
                time.sleep(max(0.0, min(backoff, deadline - time.monotonic())))
                backoff = min(backoff * 2, BACKOFF_MAX_S)
        # Start the next call elsewhere: this node did not answer.
        with self._lock:
            self._preferred = node
        raise Unavailable(last.code, "no node answered in time (last error: %s)" % last.details)

    def create_accounts(self, accounts: Iterable[t.Account]) -> List[t.CreateAccountResult]:
        """Creates 1 to 8189 accounts; one result per account, in order."""
        request = pb.CreateAccountsRequest(accounts=[t.to_pb(a, pb.Account) for a in accounts])
        reply = self._call("CreateAccounts", request)
        return [t.CreateAccountResult(t.CreateAccountStatus(r.status), r.timestamp) for r in reply.results]

    def create_transfers(self, transfers: Iterable[t.Transfer]) -> List[t.CreateTransferResult]:
        """Creates 1 to 8189 transfers (posts and voids included); one result per transfer. A
        transfer already created answers EXISTS: retrying with the same ids moves nothing twice."""
        request = pb.CreateTransfersRequest(transfers=[t.to_pb(x, pb.Transfer) for x in transfers])
        reply = self._call("CreateTransfers", request)
        return [t.CreateTransferResult(t.CreateTransferStatus(r.status), r.timestamp) for r in reply.results]

    def lookup_accounts(
        self, ids: Iterable[int], consistency: t.ReadConsistency = t.ReadConsistency.LINEARIZABLE
    ) -> List[t.Account]:
        """The accounts found, in the order asked; ids not found are absent."""
        request = pb.LookupAccountsRequest(ids=t.ids_to_pb(list(ids)), consistency=consistency)
        return [t.from_pb(a, t.Account) for a in self._call("LookupAccounts", request).accounts]

    def lookup_transfers(
        self, ids: Iterable[int], consistency: t.ReadConsistency = t.ReadConsistency.LINEARIZABLE
    ) -> List[t.Transfer]:
        """The transfers found, in the order asked; ids not found are absent."""
        request = pb.LookupTransfersRequest(ids=t.ids_to_pb(list(ids)), consistency=consistency)
        return [t.from_pb(x, t.Transfer) for x in self._call("LookupTransfers", request).transfers]

    def get_account_transfers(self, filter: t.AccountFilter) -> t.Page:
        """One account's transfers: a page of `Transfer`s."""
        reply = self._call("GetAccountTransfers", t.to_pb(filter, pb.AccountFilter))
        return t.Page([t.from_pb(x, t.Transfer) for x in reply.transfers], reply.resume_timestamp)

    def get_account_balances(self, filter: t.AccountFilter) -> t.Page:
        """One account's balance history (accounts with the HISTORY flag): a page of
        `AccountBalance`s."""
        reply = self._call("GetAccountBalances", t.to_pb(filter, pb.AccountFilter))
        return t.Page([t.from_pb(b, t.AccountBalance) for b in reply.balances], reply.resume_timestamp)

    def query_accounts(self, filter: t.QueryFilter) -> t.Page:
        """Accounts selected by their fields: a page of `Account`s."""
        reply = self._call("QueryAccounts", t.to_pb(filter, pb.QueryFilter))
        return t.Page([t.from_pb(a, t.Account) for a in reply.accounts], reply.resume_timestamp)

    def query_transfers(self, filter: t.QueryFilter) -> t.Page:
        """Transfers selected by their fields (find a payment by its reference): a page of
        `Transfer`s."""
        reply = self._call("QueryTransfers", t.to_pb(filter, pb.QueryFilter))
        return t.Page([t.from_pb(x, t.Transfer) for x in reply.transfers], reply.resume_timestamp)

    def subscribe_changes(self, from_timestamp: int = 0) -> "Changes":
        """Every applied event from `from_timestamp` on, then each new one: an iterator that does
        not end. When its node fails it resumes by itself, on any node, from the last event + 1,
        so every event comes exactly once. It raises `Unavailable` only when no node serves the
        stream for `timeout_s`."""
        return Changes(self, from_timestamp)


class Changes:
    """The change stream of `Client.subscribe_changes`. `node` is the node serving it now."""

    def __init__(self, client: Client, from_timestamp: int):
        self._client = client
        self.next_timestamp = from_timestamp
        self.node: Optional[str] = None
        self._stream = None
        self._closed = False

    def __iter__(self):
        return self

    def close(self) -> None:
        self._closed = True
        if self._stream is not None:
            self._stream.cancel()

    def __next__(self) -> t.ChangeEvent:
        client = self._client
        deadline = None
        backoff = BACKOFF_MIN_S
        with client._lock:
            node = client._preferred % len(client._nodes)
        failures = 0
        last = "no attempt made"
        while not self._closed:
            if self._stream is None:
                request = pb.SubscribeChangesRequest(timestamp_min=self.next_timestamp)
                self._stream = client._stubs[node].SubscribeChanges(request)
                self.node = client._nodes[node]
            try:
                event = next(self._stream)
            except StopIteration:
                last = "the node ended the stream"
            except grpc.RpcError as error:
                if self._closed:
                    break
                if error.code() not in RETRYABLE and error.code() != grpc.StatusCode.INTERNAL:
                    raise Rejected(error.code(), error.details() or "") from None
                last = error.details() or error.code().name
            else:
                self.next_timestamp = event.timestamp + 1
                return t.change_from_pb(event)
            # The stream broke (its node stopped, or cut off): resume on the next node.
            self._stream = None
            self.node = None
            if deadline is None:
                deadline = time.monotonic() + client.timeout_s
            elif time.monotonic() > deadline:
                raise Unavailable(grpc.StatusCode.UNAVAILABLE, "no node serves the change stream (last error: %s)" % last)
            node = (node + 1) % len(client._nodes)
            failures += 1
            if failures % len(client._nodes) == 0:
                time.sleep(backoff)
                backoff = min(backoff * 2, BACKOFF_MAX_S)
        raise StopIteration
