"""A small Hugging Face Hub on 127.0.0.1 for the download tests: the endpoints huggingface_hub calls, served from
in-memory repositories, with faults to order.

- `GET /api/models/{repo}/revision/{rev}[?blobs=true]`: the repository's commit and files (`HfApi.model_info`);
- `GET /api/models/{repo}/tree/{rev}[/{path}]`: the file listing `snapshot_download` reads;
- `HEAD|GET /{repo}/resolve/{rev}/{file}`: the file, with the headers `hf_hub_download` needs (`X-Repo-Commit`,
  `ETag`, and for LFS files `X-Linked-Etag` = sha256 and `X-Linked-Size`) and `Range` requests (206).

Faults: `cut_once[file] = n` sends only the first n bytes of the next full GET of `file`, then drops the connection
(the response still promises all of it); `corrupt.add(file)` serves `file` with one byte changed (size unchanged).
`requests` logs (method, path, Range header) of every request.
"""
import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlparse

COMMIT = "0123456789abcdef0123456789abcdef01234567"
LFS_SUFFIXES = (".pth", ".bin", ".safetensors", ".model")


def is_lfs(path):
    return path.endswith(LFS_SUFFIXES)


def git_blob_id(data):
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class FakeHub:
    """`repos`: {repo_id: {path: bytes}}, all at commit COMMIT (also named 'main')."""

    def __init__(self, repos):
        self.repos = repos
        self.cut_once = {}
        self.corrupt = set()
        self.requests = []
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self):
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._server.shutdown()
        self._server.server_close()

    def entry(self, path, data):
        info = {"type": "file", "path": path, "size": len(data), "oid": git_blob_id(data)}
        if is_lfs(path):
            info["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
        return info


def _handler(hub):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as huggingface_hub's client expects

        def log_message(self, *args):
            pass

        def _split(self, path):
            """(repo_id, rest) for a path that starts with a known repository id."""
            for repo_id in hub.repos:
                if path.startswith(repo_id + "/"):
                    return repo_id, path[len(repo_id) + 1:]
            return None, path

        def _json(self, obj, status=200):
            body = json.dumps(obj).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            if status >= 400:
                self.send_header("X-Error-Code", "RepoNotFound" if status == 404 else "Error")
            self.end_headers()
            self.wfile.write(body)

        def _not_found(self, what):
            body = json.dumps({"error": what}).encode()
            self.send_response(404)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.send_header("X-Error-Code", "EntryNotFound")
            self.send_header("X-Repo-Commit", COMMIT)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def do_HEAD(self):
            self.do_GET()

        def do_GET(self):
            url = urlparse(self.path)
            path = unquote(url.path).lstrip("/")
            hub.requests.append((self.command, path, self.headers.get("Range")))
            if path.startswith("api/models/"):
                return self._api(path[len("api/models/"):], parse_qs(url.query))
            repo_id, rest = self._split(path)
            if repo_id is None or not rest.startswith("resolve/"):
                return self._json({"error": "Repository not found"}, 404)
            revision, _, filename = rest[len("resolve/"):].partition("/")
            files = hub.repos[repo_id]
            if revision not in (COMMIT, "main") or filename not in files:
                return self._not_found(f"{filename} not in {repo_id}")
            return self._file(filename, files[filename])

        def _api(self, rest, query):
            repo_id, tail = self._split(rest)
            if repo_id is None:
                return self._json({"error": "Repository not found"}, 404)
            files = hub.repos[repo_id]
            kind, _, revision_path = tail.partition("/")
            revision, _, subpath = revision_path.partition("/")
            if revision not in (COMMIT, "main"):
                return self._json({"error": "Revision not found"}, 404)
            if kind == "revision":
                siblings = []
                for name, data in sorted(files.items()):
                    sibling = {"rfilename": name}
                    if query.get("blobs") == ["True"] or query.get("blobs") == ["true"]:
                        entry = hub.entry(name, data)
                        sibling.update(size=entry["size"], blobId=entry["oid"])
                        if "lfs" in entry:
                            sibling["lfs"] = {"sha256": entry["lfs"]["oid"], "size": entry["lfs"]["size"],
                                              "pointerSize": 134}
                    siblings.append(sibling)
                return self._json({"id": repo_id, "modelId": repo_id, "sha": COMMIT, "private": False,
                                   "siblings": siblings})
            if kind == "tree":
                names = sorted(n for n in files if not subpath or n.startswith(subpath.rstrip("/") + "/"))
                folders = sorted({"/".join(n.split("/")[:i]) for n in names for i in range(1, n.count("/") + 1)})
                listing = [{"type": "directory", "path": f, "oid": "0" * 40} for f in folders]
                return self._json(listing + [hub.entry(n, files[n]) for n in names])
            return self._json({"error": f"unknown endpoint {kind}"}, 404)

        def _file(self, filename, original):
            entry = hub.entry(filename, original)  # the headers describe the true file, whatever is sent
            data = bytes([original[0] ^ 0xFF]) + original[1:] if filename in hub.corrupt else original
            start = 0
            ranged = self.headers.get("Range")
            if ranged and ranged.startswith("bytes="):
                start = int(ranged[len("bytes="):].split("-")[0])
            body = data[start:]
            self.send_response(206 if ranged else 200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Accept-Ranges", "bytes")
            self.send_header("X-Repo-Commit", COMMIT)
            if "lfs" in entry:
                self.send_header("ETag", f'"{entry["lfs"]["oid"]}"')
                self.send_header("X-Linked-Etag", f'"{entry["lfs"]["oid"]}"')
                self.send_header("X-Linked-Size", str(len(data)))
            else:
                self.send_header("ETag", f'"{entry["oid"]}"')
            if ranged:
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            self.end_headers()
            if self.command == "HEAD":
                return
            cut = hub.cut_once.pop(filename, None) if not ranged else None
            if cut is not None:  # promise the whole body, send part of it, hang up
                self.wfile.write(body[:cut])
                self.wfile.flush()
                self.close_connection = True
                return
            self.wfile.write(body)

    return Handler

