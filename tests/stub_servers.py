"""Loopback HTTP stubs for the APIs feedback.py calls: OpenAI chat completions and Perspective comments:analyze.

Each stub runs a ThreadingHTTPServer on 127.0.0.1 (a free port) in a daemon thread and asks a `behave` function what
to do with each request. behave(text, n) gets the request's text (the chat prompt / the comment) and n, how many
requests with that same text came before (0 on the first), so "429 then success" is per item and does not depend on
the order concurrent requests arrive in. It returns a reply (chat: the message content str; Perspective: the toxicity
float) or an action dict:
    {"status": 429, "headers": {"Retry-After": "0.01"}}   an error status (optional "headers", "json" body)
    {"raw": b"<html>oops"}                                 200 with a body that is not the API's JSON
    {"reset": True}                                        close the TCP connection with a RST, no reply
    {"sleep": 2.0, "reply": ...}                           wait, then reply (past a client's timeout)
Use as a context manager:  with openai_stub(lambda text, n: "Harmful") as stub: ... stub.url, stub.requests
"""

import collections
import json
import socket
import struct
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Stub:
    """A running stub: .url, .requests (count), .log [(path, {lower-case header: value}, body dict)], .close()."""

    def __init__(self, route, behave, latency=0.0):
        self.route, self.behave, self.latency = route, behave, latency
        self.requests, self.log, self.seen, self.lock = (
            0,
            [],
            collections.Counter(),
            threading.Lock(),
        )
        stub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as real APIs
            # one buffered write per reply: no 40 ms delayed-ACK stall
            disable_nagle_algorithm, wbufsize = True, -1

            def log_message(self, *a):  # quiet
                pass

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                try:
                    req = json.loads(body)
                except ValueError:
                    req = {}
                status, headers, payload, reset = stub.handle(self.path, dict(self.headers), req)
                if reset:
                    # SO_LINGER 0 makes close() send a RST: the client sees "connection reset by peer"
                    self.connection.setsockopt(
                        socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
                    )
                    self.connection.close()
                    self.close_connection = True
                    return
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        # a client that timed out and left is not a stub failure
        self.server.handle_error = lambda *a: None
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def handle(self, path, headers, req):
        text = self.route.text(req)
        with self.lock:
            self.requests += 1
            self.log.append((path, {k.lower(): v for k, v in headers.items()}, req))
            n, self.seen[text] = self.seen[text], self.seen[text] + 1
        if self.latency:
            time.sleep(self.latency)
        if not self.route.accepts(path, headers):
            return (
                404,
                {"Content-Type": "application/json"},
                b'{"error": {"message": "not found"}}',
                False,
            )
        action = self.behave(text, n)
        if isinstance(action, dict) and "sleep" in action:
            time.sleep(action["sleep"])
            action = action.get("reply", "")
        if isinstance(action, dict) and action.get("reset"):
            return 0, {}, b"", True
        if isinstance(action, dict) and "raw" in action:
            return 200, {"Content-Type": "application/json"}, action["raw"], False
        if isinstance(action, dict) and "status" in action:
            err = json.dumps(
                action.get("json", {"error": {"message": "stub error", "code": action["status"]}})
            )
            return (
                action["status"],
                {"Content-Type": "application/json", **action.get("headers", {})},
                err.encode(),
                False,
            )
        return (
            200,
            {"Content-Type": "application/json"},
            json.dumps(self.route.reply(req, action)).encode(),
            False,
        )

    @property
    def url(self):
        return f"http://127.0.0.1:{self.port}{self.route.prefix}"

    def close(self):
        self.server.shutdown()
        self.server.server_close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class _Chat:
    prefix = "/v1"

    @staticmethod
    def text(req):
        return "\n".join(
            m.get("content") or "" for m in req.get("messages") or [] if isinstance(m, dict)
        )

    @staticmethod
    def accepts(path, headers):
        return path.rstrip("/").endswith("/chat/completions")

    @staticmethod
    def reply(req, content):
        n_in = len(_Chat.text(req).split())
        return {
            "id": "chatcmpl-stub",
            "object": "chat.completion",
            "created": 0,
            "model": req.get("model", "stub"),
            "choices": [
                {
                    "index": 0,
                    "finish_reason": "stop",
                    "message": {"role": "assistant", "content": content},
                }
            ],
            "usage": {
                "prompt_tokens": n_in,
                "completion_tokens": len(str(content).split()),
                "total_tokens": n_in + len(str(content).split()),
            },
        }


class _Perspective:
    prefix = ""

    @staticmethod
    def text(req):
        return (req.get("comment") or {}).get("text", "")

    @staticmethod
    def accepts(path, headers):
        return path.split("?")[0].endswith("/v1alpha1/comments:analyze")

    @staticmethod
    def reply(req, value):
        return {
            "attributeScores": {
                "TOXICITY": {"summaryScore": {"value": value, "type": "PROBABILITY"}}
            },
            "languages": ["en"],
        }


def openai_stub(behave, latency=0.0):
    """Chat-completions stub; base_url for the openai client is stub.url (ends in /v1)."""
    return Stub(_Chat, behave, latency)


def perspective_stub(behave, latency=0.0):
    """Perspective stub; set PERSPECTIVE_API_URL=stub.url."""
    return Stub(_Perspective, behave, latency)


def judge_target(text):
    """The (x, y) a feedback.py judge prompt is about: the text after its last "### Dialogue" marker."""
    return text.rsplit("### Dialogue", 1)[-1]
