"""A local stand-in for the Hugging Face hub's HTTP API, as far as creating a repo and committing files go.

The endpoints huggingface_hub's `HfApi.create_repo` and `HfApi.create_commit` call: POST /api/repos/create,
POST /api/models/{repo}/preupload/{revision} (every file inline: uploadMode "regular") and POST
/api/models/{repo}/commit/{revision} (the ndjson commit: a header line, then one line per file with its
base64 content). Repos and their files live in memory (`FakeHub.repos`), with every request's auth header
recorded, so tests assert on the bytes that arrived. Served by uvicorn on a free local port in a thread.
"""

from __future__ import annotations

import base64
import hashlib
import json
import socket
import threading
import time

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse


class FakeHub:
    def __init__(self) -> None:
        self.repos: dict[str, dict] = {}  # repo id -> {"private": bool, "files": {path: bytes}, "commits": [...]}
        self.auth: list[str | None] = []
        self.app = FastAPI()
        self._routes()
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> FakeHub:
        self.thread.start()
        deadline = time.time() + 20
        while not self.server.started:
            if time.time() > deadline:
                raise RuntimeError("the fake hub did not start")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)

    def _routes(self) -> None:
        app = self.app

        @app.post("/api/repos/create")
        async def create(request: Request):
            body = await request.json()
            self.auth.append(request.headers.get("authorization"))
            repo = f"{body['organization']}/{body['name']}" if body.get("organization") else body["name"]
            if repo in self.repos:
                return JSONResponse({"error": "You already created this model repo", "url": f"{self.endpoint}/{repo}"},
                                    status_code=409)
            private = body.get("visibility", "private" if body.get("private") else "public") == "private"
            self.repos[repo] = {"private": private, "files": {}, "commits": []}
            return {"url": f"{self.endpoint}/{repo}", "name": repo}

        @app.post("/api/validate-yaml")
        async def validate_yaml(request: Request):
            """The model card's front matter must be YAML mapping (the real hub checks much more)."""
            import re

            import yaml

            content = (await request.json())["content"]
            m = re.match(r"^---\n(.*?)\n---\n", content, re.S)
            try:
                ok = m is not None and isinstance(yaml.safe_load(m.group(1)), dict)
            except yaml.YAMLError:
                ok = False
            if not ok:
                return JSONResponse({"errors": [{"message": "no valid YAML front matter"}]}, status_code=400)
            return {"errors": [], "warnings": []}

        @app.post("/api/models/{namespace}/{name}/preupload/{revision}")
        async def preupload(namespace: str, name: str, revision: str, request: Request):
            body = await request.json()
            if f"{namespace}/{name}" not in self.repos:
                return JSONResponse({"error": "Repository not found"}, status_code=404)
            return {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                              for f in body["files"]]}

        @app.post("/api/models/{namespace}/{name}/commit/{revision}")
        async def commit(namespace: str, name: str, revision: str, request: Request):
            repo = f"{namespace}/{name}"
            if repo not in self.repos:
                return JSONResponse({"error": "Repository not found"}, status_code=404)
            self.auth.append(request.headers.get("authorization"))
            lines = [json.loads(line) for line in (await request.body()).decode().splitlines() if line.strip()]
            header = next(item["value"] for item in lines if item["key"] == "header")
            for item in lines:
                if item["key"] == "file":
                    self.repos[repo]["files"][item["value"]["path"]] = base64.b64decode(item["value"]["content"])
            oid = hashlib.sha1(json.dumps(lines).encode()).hexdigest()
            self.repos[repo]["commits"].append({"summary": header["summary"], "oid": oid})
            return {"commitUrl": f"{self.endpoint}/{repo}/commit/{oid}", "commitOid": oid, "success": True}
