"""The orchestrator's HTTP API: JSON in and out, a bearer token on every request.

Operator API (``--listen``, loopback by default; the operator token)::

    GET  /v1/status                      where each broker runs, the running job, the queue
    GET  /v1/hosts                       the inventory's hosts, draining or not, who is on them
    POST /v1/migrate {"to": H, "broker": B, "method": "cold"}   202 queued | 409 busy | 404 | 422
    POST /v1/drain {"host": H}           move every broker off H and keep them off
    POST /v1/undrain {"host": H}
    POST /v1/pause  /  POST /v1/resume   hold the queue (a running move runs on)
    GET  /v1/jobs/ID                     one job and its outcome
    GET  /v1/history?limit=N             the audit log's last N records (JSON lines)
    GET  /metrics                        Prometheus text
    POST /v1/triggers                    (what brokers call, see below)

Trigger listener (``--triggers``, off unless given; where brokers reach the orchestrator):
only ``POST /v1/triggers`` with the trigger token (or the operator's), the body
:mod:`broker.forward` sends.  A broker holds only the trigger token, so a broker that is
taken over can ask for moves (which the policies still judge), never drain or reorder.

Wrong or missing tokens get 401, answered later with every failure of that address (up to
3 s, one at a time: :class:`broker.throttle.FailureBackoff`) and logged once a minute.
Bodies are at most :data:`MAX_BODY` bytes; a connection gets :data:`REQUEST_TIMEOUT`
seconds; every answer closes the connection (HTTP/1.0); each listener serves at most
:data:`MAX_REQUESTS` at once and closes further connections at once, so a flood of one
listener (the trigger listener faces the edge network) costs bounded threads and never
starves the other.
"""

from __future__ import annotations

import hmac
import json
import logging
import threading
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from broker.throttle import FailureBackoff, LogWindow
from migration.scenario import METHODS

from .core import Decision, Job
from .metrics import OrchestratorCollector
from .service import Service

log = logging.getLogger("qmig.orchestrator")

MAX_BODY = 64 * 1024
REQUEST_TIMEOUT = 10.0
MAX_REQUESTS = 32  # requests in progress per listener (a thread each); more are closed
MAX_HINT = 1024
REFUSAL_STATUS = {"busy": HTTPStatus.CONFLICT, "unknown_broker": HTTPStatus.NOT_FOUND,
                  "unknown_host": HTTPStatus.NOT_FOUND}  # fmt: skip


class BadRequest(Exception):
    pass


class Api:
    """Both listeners of one service, with their tokens."""

    def __init__(self, service: Service, token: str, trigger_token: str) -> None:
        self.service = service
        self._tokens = {"operator": token.encode(), "trigger": trigger_token.encode()}
        self._backoff = FailureBackoff()
        self._refusing = threading.Lock()
        self._refusals = LogWindow(60.0)
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(OrchestratorCollector(service))
        self.servers: list[ThreadingHTTPServer] = []

    def listen(self, host: str, port: int, triggers_only: bool) -> tuple[str, int]:
        api = self

        class Handler(_Handler):
            owner = api
            only_triggers = triggers_only

        server = _BoundedServer((host, port), Handler)
        self.servers.append(server)
        threading.Thread(target=server.serve_forever, name=f"qmig-api-{port}",
                         daemon=True).start()  # fmt: skip
        bound = server.server_address
        return str(bound[0]), int(bound[1])

    def close(self) -> None:
        for server in self.servers:
            server.shutdown()
            server.server_close()
        self.servers.clear()

    def role(self, header: str | None) -> str | None:
        """Which token the ``Authorization`` header carries: operator, trigger or None."""
        if not header or not header.startswith("Bearer "):
            return None
        given = header[len("Bearer ") :].strip().encode()
        for role, token in self._tokens.items():
            if hmac.compare_digest(given, token):
                return role
        return None

    def refuse(self, peer: str) -> None:
        delay = self._backoff.failed(peer, time.monotonic())
        held = self._refusals.hit(time.monotonic())
        if held is not None:
            log.warning("API: refused %s: wrong or missing token (%d more since the last such "
                        "line)", peer, held)  # fmt: skip
        with self._refusing:
            time.sleep(delay)

    def metrics(self) -> bytes:
        return generate_latest(self.registry)


class _BoundedServer(ThreadingHTTPServer):
    """A thread per request, at most :data:`MAX_REQUESTS` at once."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler]) -> None:
        super().__init__(address, handler)
        self._slots = threading.BoundedSemaphore(MAX_REQUESTS)
        self._full = LogWindow(60.0)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            if self._full.hit(time.monotonic()) is not None:
                log.warning("API: %d requests in progress; closing new connections",
                            MAX_REQUESTS)  # fmt: skip
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()


class _Handler(BaseHTTPRequestHandler):
    owner: Api
    only_triggers: bool
    protocol_version = "HTTP/1.0"
    timeout = REQUEST_TIMEOUT
    server_version = "qmig-orchestrator"

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("API %s: " + format, self.client_address[0], *args)

    # ------------------------------------------------------------------ plumbing
    def _send(self, status: int, body: Any, content_type: str = "application/json") -> None:
        data = body if isinstance(body, bytes) else (json.dumps(body, default=str) + "\n").encode()
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        if status == HTTPStatus.UNAUTHORIZED:
            self.send_header("WWW-Authenticate", 'Bearer realm="qmig-orchestrator"')
        self.end_headers()
        self.wfile.write(data)

    def _body(self) -> dict[str, Any]:
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            raise BadRequest("bad Content-Length") from None
        if length > MAX_BODY:
            raise BadRequest(f"body longer than {MAX_BODY} bytes")
        raw = self.rfile.read(length) if length else b"{}"
        try:
            data = json.loads(raw)
        except (ValueError, RecursionError):
            raise BadRequest("body is not JSON") from None
        if not isinstance(data, dict):
            raise BadRequest("body must be a JSON object")
        return data

    def _authorized(self, need: str) -> bool:
        role = self.owner.role(self.headers.get("Authorization"))
        if role == "operator" or (role == "trigger" and need == "trigger"):
            self.owner._backoff.succeeded(self.client_address[0])
            return True
        if role is None:
            self.owner.refuse(self.client_address[0])
            self._send(HTTPStatus.UNAUTHORIZED, {"error": "unauthorized"})
        else:
            self._send(HTTPStatus.FORBIDDEN, {"error": "the trigger token may only send triggers"})
        return False

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def _dispatch(self, verb: str) -> None:
        url = urlsplit(self.path)
        path = url.path.rstrip("/") or "/"
        is_trigger = verb == "POST" and path == "/v1/triggers"
        if self.only_triggers and not is_trigger:
            self._send(
                HTTPStatus.NOT_FOUND, {"error": "this listener takes only POST /v1/triggers"}
            )
            return
        if not self._authorized("trigger" if is_trigger else "operator"):
            return
        try:
            status, body = self._route(verb, path, parse_qs(url.query))
        except BadRequest as exc:
            status, body = HTTPStatus.BAD_REQUEST, {"error": str(exc)}
        if isinstance(body, bytes):
            self._send(status, body, CONTENT_TYPE_LATEST)
        else:
            self._send(status, body)

    # ------------------------------------------------------------------ routes
    def _route(self, verb: str, path: str, query: dict[str, list[str]]) -> tuple[int, Any]:
        service = self.owner.service
        by = f"api {self.client_address[0]}"
        if verb == "GET":
            if path == "/v1/status":
                return HTTPStatus.OK, service.status()
            if path == "/v1/hosts":
                return HTTPStatus.OK, {"hosts": service.hosts()}
            if path == "/v1/history":
                limit = _int(query.get("limit", ["100"])[0], "limit")
                return HTTPStatus.OK, {"history": service.history(limit)}
            if path.startswith("/v1/jobs/"):
                job = service.job(_int(path.rsplit("/", 1)[1], "job id"))
                if job is None:
                    return HTTPStatus.NOT_FOUND, {"error": "no such job"}
                return HTTPStatus.OK, job
            if path == "/metrics":
                return HTTPStatus.OK, self.owner.metrics()
        elif verb == "POST":
            if path == "/v1/triggers":
                return self._trigger(self._body())
            body = self._body()
            if path == "/v1/migrate":
                method = body.get("method", "cold")
                if method not in METHODS:
                    raise BadRequest(f"method must be one of {', '.join(METHODS)}")
                broker = body.get("broker")
                if broker is not None and not isinstance(broker, str):
                    raise BadRequest("broker must be a string")
                return _queued(*service.migrate(broker, _text(body, "to"), method, by))
            if path == "/v1/drain":
                decisions = service.drain(_text(body, "host"), by)
                if decisions[0].kind == "refused":
                    return _refused(decisions[0])
                return HTTPStatus.ACCEPTED, {"decisions": [d.as_dict() for d in decisions]}
            if path == "/v1/undrain":
                decision = service.undrain(_text(body, "host"), by)
                if decision.kind == "refused":
                    return _refused(decision)
                return HTTPStatus.OK, {"decision": decision.as_dict()}
            if path in ("/v1/pause", "/v1/resume"):
                decision = service.pause(path == "/v1/pause", by)
                return HTTPStatus.OK, {"decision": decision.as_dict()}
        return HTTPStatus.NOT_FOUND, {"error": f"no {verb} {path}"}

    def _trigger(self, body: dict[str, Any]) -> tuple[int, Any]:
        broker = _text(body, "broker")
        hint = body.get("hint", "")
        if not isinstance(hint, str) or len(hint) > MAX_HINT:
            raise BadRequest(f"hint must be a string of at most {MAX_HINT} characters")
        client = body.get("client_id") or "?"
        user = body.get("username")
        at = body.get("at")
        requested_at = float(at) if isinstance(at, int | float) and not isinstance(at, bool) \
            else None  # fmt: skip
        by = f"client {client}" + (f" (user {user})" if user else "")
        detail = {k: body.get(k) for k in ("broker", "client_id", "username", "from", "reason",
                                           "hint", "at")}  # fmt: skip
        decision, job = self.owner.service.trigger(broker, hint, by, requested_at, detail)
        if job is None:  # heard and judged: not the broker's error, so not an HTTP error
            return HTTPStatus.OK, {"decision": decision.as_dict()}
        return _queued(decision, job)


def _queued(decision: Decision, job: Job | None) -> tuple[int, Any]:
    if job is None:
        return _refused(decision)
    return HTTPStatus.ACCEPTED, {"decision": decision.as_dict(), "job": job.as_dict()}


def _refused(decision: Decision) -> tuple[int, Any]:
    status = REFUSAL_STATUS.get(decision.reason, HTTPStatus.UNPROCESSABLE_ENTITY)
    return status, {"error": decision.reason, "decision": decision.as_dict()}


def _text(body: dict[str, Any], key: str) -> str:
    value = body.get(key)
    if not isinstance(value, str) or not value.strip():
        raise BadRequest(f"{key} must be a non-empty string")
    return value.strip()


def _int(text: str, what: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise BadRequest(f"{what} must be an integer") from None
