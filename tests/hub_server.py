# Copyright 2026 The trl_ddrl Authors. Licensed under the Apache License, Version 2.0.
"""
A small in-memory Hugging Face Hub for tests: the HTTP endpoints that `huggingface_hub` 2.x calls to create a model
repo, commit files to it (`upload_folder` / `create_commit`) and download from it (`model_info`, `hf_hub_download`,
`snapshot_download`, hence `DiffusionPipeline.from_pretrained`).

The upload protocol followed (see `huggingface_hub/_commit_api.py`):

1. `POST /api/repos/create` with `{"name", "organization", ...}` answers `{"url"}`; 409 (with `url`) if it exists.
2. `POST /api/validate-yaml` checks the README front matter before hashing.
3. `POST /api/models/{repo_id}/preupload/{revision}` with `{"files": [{"path", "sample", "size"}]}` answers, per file,
   `uploadMode` (always `"regular"` here, so no LFS/Xet storage is needed), `shouldIgnore` and `oid` (the git blob
   SHA-1 of the file already in the repo, which lets the client drop unchanged files from a commit).
4. `POST /api/models/{repo_id}/commit/{revision}`: an NDJSON body, a `header` line (`summary`, `description`,
   optional `parentCommit`) then `file` (base64 content), `deletedFile` and `deletedFolder` lines; answers
   `{"commitOid", "commitUrl", "pullRequestUrl"}`.

Each commit is kept with the files it added, so tests can check what every push contained. Requests to paths this
server does not implement are recorded in `FakeHub.unhandled` and answered 404.
"""

import base64
import contextlib
import hashlib
import json
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote

import uvicorn
import yaml
from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse


def git_blob_sha1(content: bytes) -> str:
    """The git object id of a blob, as `huggingface_hub.utils.sha.git_hash` computes it."""
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


@dataclass
class Commit:
    oid: str
    summary: str
    description: str
    added: dict[str, bytes]
    deleted: list[str]
    tree: dict[str, bytes]


@dataclass
class Repo:
    repo_id: str
    private: bool
    commits: list[Commit] = field(default_factory=list)
    files: dict[str, bytes] = field(default_factory=dict)

    @property
    def head(self) -> str:
        return self.commits[-1].oid if self.commits else "0" * 40

    def tree(self, revision: str) -> dict[str, bytes] | None:
        """The files at `revision` (`main` or a commit id), or `None` if there is no such revision."""
        revision = unquote(revision)
        if revision in ("main", self.head):
            return self.files
        return next((commit.tree for commit in self.commits if commit.oid == revision), None)


class FakeHub:
    """In-memory model repos, served by `app` (a FastAPI application) with `serve()`."""

    def __init__(self, token: str = "hf_fake"):
        self.token = token
        self.repos: dict[str, Repo] = {}
        self.unhandled: list[str] = []
        self._lock = threading.Lock()
        self.app = self._build_app()

    # ---- in-process helpers for tests --------------------------------------------------------------------------

    def add_folder(self, repo_id: str, folder: str | Path, summary: str = "Initial commit") -> Repo:
        """Create `repo_id` holding every file of `folder` (what a test would otherwise upload first)."""
        folder = Path(folder)
        files = {
            path.relative_to(folder).as_posix(): path.read_bytes() for path in folder.rglob("*") if path.is_file()
        }
        with self._lock:
            repo = self.repos.setdefault(repo_id, Repo(repo_id, private=False))
            self._commit(repo, summary, "", files, [])
        return repo

    def write_repo(self, repo_id: str, directory: str | Path) -> Path:
        """Write the files at the head of `repo_id` into `directory`."""
        directory = Path(directory)
        for path, content in self.repos[repo_id].files.items():
            target = directory / path
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(content)
        return directory

    # ---- protocol -------------------------------------------------------------------------------------------------

    def _commit(
        self, repo: Repo, summary: str, description: str, added: dict[str, bytes], deleted: list[str]
    ) -> Commit:
        digest = hashlib.sha1(repo.head.encode() + summary.encode())
        for path in sorted(added):
            digest.update(path.encode() + b"\0" + added[path])
        for path in deleted:
            digest.update(b"-" + path.encode())
        files = dict(repo.files)
        for path in deleted:
            prefix = path.rstrip("/") + "/"
            for existing in [p for p in files if p == path or p.startswith(prefix)]:
                del files[existing]
        files.update(added)
        commit = Commit(digest.hexdigest(), summary, description, added, deleted, files)
        repo.files = files
        repo.commits.append(commit)
        return commit

    @staticmethod
    def _error(status: int, message: str, code: str | None = None) -> JSONResponse:
        headers = {"X-Error-Code": code, "X-Error-Message": message} if code else {"X-Error-Message": message}
        return JSONResponse({"error": message}, status_code=status, headers=headers)

    def _authorized(self, request: Request) -> bool:
        return request.headers.get("authorization") == f"Bearer {self.token}"

    def _repo(self, namespace: str, name: str) -> Repo | None:
        return self.repos.get(f"{namespace}/{name}")

    def _repo_info(self, repo: Repo, files: dict[str, bytes]) -> dict:
        return {
            "_id": hashlib.sha1(repo.repo_id.encode()).hexdigest()[:24],
            "id": repo.repo_id,
            "modelId": repo.repo_id,
            "author": repo.repo_id.split("/")[0],
            "sha": repo.head,
            "private": repo.private,
            "disabled": False,
            "gated": False,
            "downloads": 0,
            "likes": 0,
            "tags": [],
            "lastModified": "2026-01-01T00:00:00.000Z",
            "createdAt": "2026-01-01T00:00:00.000Z",
            "siblings": [{"rfilename": path} for path in sorted(files)],
        }

    def _build_app(self) -> FastAPI:
        app = FastAPI()

        @app.post("/api/repos/create")
        async def create_repo(request: Request):
            if not self._authorized(request):
                return self._error(401, "Invalid credentials in Authorization header")
            payload = await request.json()
            if payload.get("type", "model") != "model":
                return self._error(400, "This test hub only hosts model repos")
            namespace = payload.get("organization") or "tester"
            repo_id = f"{namespace}/{payload['name']}"
            url = f"{str(request.base_url).rstrip('/')}/{repo_id}"
            with self._lock:
                if repo_id in self.repos:
                    return JSONResponse({"error": "You already created this model repo", "url": url}, status_code=409)
                self.repos[repo_id] = Repo(repo_id, private=payload.get("visibility") == "private")
            return {"url": url, "name": repo_id, "id": self.repos[repo_id].repo_id}

        @app.post("/api/validate-yaml")
        async def validate_yaml(request: Request):
            content = (await request.json())["content"]
            if content.startswith("---"):
                front_matter = content.split("---", 2)[1]
                try:
                    metadata = yaml.safe_load(front_matter)
                except yaml.YAMLError as error:
                    return JSONResponse({"errors": [{"message": str(error)}], "warnings": []}, status_code=400)
                if not isinstance(metadata, dict):
                    return JSONResponse(
                        {"errors": [{"message": "metadata must be a mapping"}], "warnings": []}, status_code=400
                    )
            return {"errors": [], "warnings": []}

        @app.post("/api/models/{namespace}/{name}/preupload/{revision}")
        async def preupload(namespace: str, name: str, revision: str, request: Request):
            if not self._authorized(request):
                return self._error(401, "Invalid credentials in Authorization header")
            repo = self._repo(namespace, name)
            if repo is None:
                return self._error(404, "Repository not found", "RepoNotFound")
            if unquote(revision) != "main":
                return self._error(404, f"Invalid rev id: {revision}", "RevisionNotFound")
            files = (await request.json())["files"]
            return {
                "files": [
                    {
                        "path": file["path"],
                        "uploadMode": "regular",
                        "shouldIgnore": False,
                        "oid": git_blob_sha1(repo.files[file["path"]]) if file["path"] in repo.files else None,
                    }
                    for file in files
                ],
                "commitOid": repo.head,
            }

        @app.post("/api/models/{namespace}/{name}/commit/{revision}")
        async def commit(namespace: str, name: str, revision: str, request: Request):
            if not self._authorized(request):
                return self._error(401, "Invalid credentials in Authorization header")
            repo = self._repo(namespace, name)
            if repo is None:
                return self._error(404, "Repository not found", "RepoNotFound")
            if unquote(revision) != "main" or request.query_params.get("create_pr"):
                return self._error(400, "This test hub only commits to the main branch")
            if not request.headers.get("content-type", "").startswith("application/x-ndjson"):
                return self._error(400, "The commit payload must be application/x-ndjson")
            lines = [json.loads(line) for line in (await request.body()).splitlines() if line.strip()]
            if not lines or lines[0]["key"] != "header":
                return self._error(400, "The first NDJSON line must be the commit header")
            header = lines[0]["value"]
            added, deleted = {}, []
            for line in lines[1:]:
                key, value = line["key"], line["value"]
                if key == "file" and value.get("encoding") == "base64":
                    added[value["path"]] = base64.b64decode(value["content"])
                elif key in ("deletedFile", "deletedFolder"):
                    deleted.append(value["path"])
                else:
                    return self._error(400, f"Unsupported commit operation {key!r} (this hub answers 'regular' only)")
            with self._lock:
                parent = header.get("parentCommit")
                if parent is not None and parent != repo.head:
                    return self._error(412, "A commit has happened since. Please refresh and try again.")
                new = self._commit(repo, header["summary"], header.get("description", ""), added, deleted)
            return {
                "success": True,
                "commitOid": new.oid,
                "commitUrl": f"{str(request.base_url).rstrip('/')}/{repo.repo_id}/commit/{new.oid}",
                "pullRequestUrl": None,
            }

        @app.get("/api/models/{namespace}/{name}")
        @app.get("/api/models/{namespace}/{name}/revision/{revision}")
        async def model_info(namespace: str, name: str, request: Request, revision: str = "main"):
            repo = self._repo(namespace, name)
            if repo is None:
                return self._error(404, "Repository not found", "RepoNotFound")
            files = repo.tree(revision)
            if files is None:
                return self._error(404, f"Invalid rev id: {revision}", "RevisionNotFound")
            return self._repo_info(repo, files)

        @app.get("/api/models/{namespace}/{name}/tree/{revision}")
        @app.get("/api/models/{namespace}/{name}/tree/{revision}/{path:path}")
        async def tree(namespace: str, name: str, revision: str, path: str = "", recursive: bool = False):
            repo = self._repo(namespace, name)
            if repo is None:
                return self._error(404, "Repository not found", "RepoNotFound")
            files = repo.tree(revision)
            if files is None:
                return self._error(404, f"Invalid rev id: {revision}", "RevisionNotFound")
            prefix = unquote(path).strip("/") + "/" if path else ""
            entries, folders = [], set()
            for file_path in sorted(files):
                if not file_path.startswith(prefix):
                    continue
                parts = file_path[len(prefix) :].split("/")
                for depth in range(1, len(parts) if recursive else min(2, len(parts))):
                    folders.add(prefix + "/".join(parts[:depth]))
                if recursive or len(parts) == 1:
                    content = files[file_path]
                    entries.append(
                        {"type": "file", "oid": git_blob_sha1(content), "size": len(content), "path": file_path}
                    )
            if prefix and not entries and not folders:
                return self._error(404, f"{path} does not exist", "EntryNotFound")
            folder_entries = [
                {"type": "directory", "oid": hashlib.sha1(p.encode()).hexdigest(), "size": 0, "path": p}
                for p in sorted(folders)
            ]
            return folder_entries + entries

        @app.api_route("/{namespace}/{name}/resolve/{revision}/{path:path}", methods=["GET", "HEAD"])
        async def resolve(namespace: str, name: str, revision: str, path: str, request: Request):
            repo = self._repo(namespace, name)
            if repo is None:
                return self._error(404, "Repository not found", "RepoNotFound")
            files = repo.tree(revision)
            if files is None:
                return self._error(404, f"Invalid rev id: {revision}", "RevisionNotFound")
            if path not in files:
                return self._error(404, "Entry not found", "EntryNotFound")
            content = files[path]
            headers = {"X-Repo-Commit": repo.head, "ETag": f'"{git_blob_sha1(content)}"'}
            if request.method == "HEAD":
                headers["Content-Length"] = str(len(content))
                return Response(status_code=200, headers=headers)
            return Response(content, media_type="application/octet-stream", headers=headers)

        @app.api_route("/{rest:path}", methods=["GET", "HEAD", "POST", "PUT", "DELETE", "PATCH"])
        async def unhandled(rest: str, request: Request):
            self.unhandled.append(f"{request.method} /{rest}")
            return self._error(404, f"{request.method} /{rest} is not implemented by the test hub")

        return app


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def serve(hub: FakeHub) -> Iterator[str]:
    """Serve `hub` with uvicorn in a daemon thread on a free 127.0.0.1 port; yields its URL (the `HF_ENDPOINT`)."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(hub.app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the test hub server did not start")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
