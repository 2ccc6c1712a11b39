"""A scripted OpenAI-compatible chat server on 127.0.0.1 for the judge tests (no network).

It answers `POST /v1/chat/completions` as a judge would, from the prompt alone: the answer that contains
the word "good" wins (`[[A]]` or `[[B]]` by its position), neither or both is a tie (`[[C]]`), and an answer
containing "mumble" gets a reply with no verdict. `fail_next` makes the next requests fail with the given
HTTP statuses first (429 carries `Retry-After: 0`). Every request is recorded.
"""

from __future__ import annotations

import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class FakeJudge:
    def __init__(self) -> None:
        self.requests: list[dict] = []
        self.fail_next: list[int] = []
        self.lock = threading.Lock()
        judge = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # keep test output clean
                pass

            def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with judge.lock:
                    judge.requests.append({"path": self.path, "body": body,
                                           "auth": self.headers.get("Authorization")})
                    status = judge.fail_next.pop(0) if judge.fail_next else 200
                if status != 200:
                    payload = json.dumps({"error": {"message": f"scripted failure {status}"}}).encode()
                    self.send_response(status)
                    if status == 429:
                        self.send_header("Retry-After", "0")
                else:
                    reply = judge.verdict(body["messages"][-1]["content"])
                    payload = json.dumps({"id": "x", "object": "chat.completion", "model": body["model"],
                                          "choices": [{"index": 0, "finish_reason": "stop",
                                                       "message": {"role": "assistant", "content": reply}}]}).encode()
                    self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)

    @staticmethod
    def verdict(prompt: str) -> str:
        a = re.search(r"\[Answer A\]\n(.*?)\n\n\[Answer B\]", prompt, re.S).group(1)
        b = re.search(r"\[Answer B\]\n(.*?)\n\nCompare", prompt, re.S).group(1)
        if "mumble" in a or "mumble" in b:
            return "I cannot decide."
        good_a, good_b = "good" in a, "good" in b
        v = "A" if good_a and not good_b else "B" if good_b and not good_a else "C"
        return f"Answer A says one thing, answer B another. Not [[B]] by default, but in the end:\n[[{v}]]"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def __enter__(self) -> "FakeJudge":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
