"""A loopback emulator of the Hugging Face Hub's HTTP protocol (the LFS-era upload path and the
download endpoints), for tests. Standard library only; binds 127.0.0.1 and prints its port.

    python3 tests/support/hub_emulator.py [--port N] [--token T] [--part-size BYTES] [--part-keys padded|plain]

Upload: POST /api/repos/create (a bare name goes under `user`), GET /api/whoami-v2, /api/validate-yaml, /api/models/{repo}/preupload/{rev},
/{repo}.git/info/lfs/objects/batch (basic, or multipart above --part-size, with the part URLs under
zero-padded keys "00001", "00002", ... as servers in the wild send them, "1", "2", ... with
--part-keys plain, or with --part-keys gap the right count of padded keys but part 2 left out and N+1 added), PUT objects/parts,
multipart completion, verify, and the NDJSON commit, which is applied atomically or not at all.
Like the Hub it refuses non-LFS files over 10 MiB and binary non-LFS files over 1 MB.
Download: /api/models/{repo}[/revision/{rev}], /api/models/{repo}/tree/{rev}, HEAD/GET /{repo}/resolve/{rev}/{path}.
Test controls: POST /_test/faults {"rules": [{"method", "path_contains", "action": "status"|"drop"|"truncate", "status", "count", "range"}],
"refuse_auth": bool}; GET /_test/log (requests seen).
"""
import base64
import fnmatch
import hashlib
import json
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlparse

LFS_PATTERNS = ["*.7z", "*.arrow", "*.bin", "*.bz2", "*.ckpt", "*.ftz", "*.gz", "*.h5", "*.joblib", "*.lfs.*",
                "*.mlmodel", "*.model", "*.msgpack", "*.npy", "*.npz", "*.onnx", "*.ot", "*.parquet", "*.pb",
                "*.pickle", "*.pkl", "*.pt", "*.pth", "*.rar", "*.safetensors", "*.tar.*", "*.tflite", "*.tgz",
                "*.wasm", "*.xz", "*.zip", "*.zst", "*tfevents*"]
MAX_REGULAR = 10 * 1024 * 1024
MAX_REGULAR_BINARY = 1_000_000


class Hub:
    def __init__(self, token, part_size, part_keys="padded"):
        self.lock = threading.Lock()
        self.token = token
        self.part_size = part_size
        self.part_keys = part_keys
        self.repos = {}      # repo_id -> {"private": bool, "refs": {rev: sha}, "commits": {sha: {path: entry}}}
        self.objects = {}    # sha256 -> bytes
        self.parts = {}      # sha256 -> {part_number: bytes}
        self.rules = []
        self.refuse_auth = False
        self.log = []


def is_binary(data):
    return b"\0" in data[:8192]


def git_blob_sha1(data):
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def make_handler(hub):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):
            pass

        # ---- plumbing -------------------------------------------------------------------
        def body(self):
            n = int(self.headers.get("Content-Length") or 0)
            return self.rfile.read(n) if n else b""

        def send(self, status, payload=b"", headers=None, content_type="application/json"):
            if isinstance(payload, (dict, list)):
                payload = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(payload)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            if self.command != "HEAD":
                if getattr(self, "cut_body", False):
                    # An injected "truncate" fault: half the body, then the connection drops.
                    self.wfile.write(payload[: len(payload) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    self.connection.shutdown(2)
                    return
                self.wfile.write(payload)

        def error(self, status, message):
            self.send(status, {"error": message}, {"X-Error-Message": message})

        def authorized(self):
            auth = self.headers.get("Authorization", "")
            if hub.refuse_auth or not auth.startswith("Bearer ") or (hub.token and auth[7:] != hub.token):
                self.error(401, "Invalid credentials in Authorization header")
                return False
            return True

        def fault(self):
            """Applies the first matching fault rule; True if the request was consumed."""
            with hub.lock:
                for rule in hub.rules:
                    if (rule.get("count", 1) > 0 and rule.get("method", self.command) == self.command and rule["path_contains"] in self.path
                            and rule.get("range", self.headers.get("Range", "")) == self.headers.get("Range", "")):
                        rule["count"] = rule.get("count", 1) - 1
                        break
                else:
                    return False
            if rule["action"] == "truncate":  # served, but only half the body arrives
                self.cut_body = True
                return False
            if rule["action"] == "drop":
                n = int(self.headers.get("Content-Length") or 0)
                self.rfile.read(min(n, 4096))  # take part of the body, then vanish
                self.close_connection = True
                self.connection.shutdown(2)
                return True
            self.body()
            self.error(rule.get("status", 500), "injected fault")
            return True

        def handle_any(self):
            url = urlparse(self.path)
            with hub.lock:
                hub.log.append({"method": self.command, "path": url.path, "time": time.time(), "range": self.headers.get("Range", "")})
            if url.path.startswith("/_test/"):
                return self.control(url.path)
            if self.fault():
                return
            parts = [unquote(p) for p in url.path.strip("/").split("/")]
            query = parse_qs(url.query)
            try:
                self.route(parts, query)
            except KeyError as e:
                self.error(404, f"not found: {e}")

        do_GET = do_POST = do_PUT = do_HEAD = handle_any

        def control(self, path):
            if path == "/_test/faults" and self.command == "POST":
                cfg = json.loads(self.body() or b"{}")
                with hub.lock:
                    hub.rules = cfg.get("rules", [])
                    hub.refuse_auth = cfg.get("refuse_auth", False)
                return self.send(200, {})
            if path == "/_test/log":
                with hub.lock:
                    return self.send(200, list(hub.log))
            self.error(404, "unknown control")

        # ---- routes ---------------------------------------------------------------------
        def route(self, p, q):
            c = self.command
            if c == "POST" and p[:3] == ["api", "repos", "create"]:
                return self.create_repo()
            if c == "GET" and p[:2] == ["api", "whoami-v2"]:
                if not self.authorized():
                    return
                return self.send(200, {"type": "user", "name": "user", "auth": {"type": "access_token"}})
            if c == "POST" and p[:2] == ["api", "validate-yaml"]:
                self.body()
                return self.send(200, {})
            if p[:2] == ["api", "models"] and len(p) >= 4:
                repo = f"{p[2]}/{p[3]}"
                rest = p[4:]
                if c == "POST" and rest[:1] == ["preupload"]:
                    return self.preupload(repo, "/".join(rest[1:]) or "main")
                if c == "POST" and rest[:1] == ["branch"]:
                    return self.create_branch(repo, "/".join(rest[1:]))
                if c == "POST" and rest[:1] == ["commit"]:
                    return self.commit(repo, "/".join(rest[1:]) or "main")
                if c == "GET" and rest[:1] == ["revision"]:
                    return self.model_info(repo, "/".join(rest[1:]))
                if c == "GET" and rest[:1] == ["tree"]:
                    return self.tree(repo, "/".join(rest[1:]))
                if c == "GET" and not rest:
                    return self.model_info(repo, "main")
            if c == "POST" and len(p) == 6 and p[1].endswith(".git") and p[2:] == ["info", "lfs", "objects", "batch"]:
                return self.lfs_batch(f"{p[0]}/{p[1][:-4]}")
            if p[:1] == ["_lfs"]:
                return self.lfs(p[1:])
            if c in ("GET", "HEAD") and len(p) >= 5 and p[2] == "resolve":
                return self.resolve(f"{p[0]}/{p[1]}", p[3], "/".join(p[4:]))
            self.error(404, f"no route for {c} {self.path}")

        def create_repo(self):
            if not self.authorized():
                return
            req = json.loads(self.body())
            repo = f"{req.get('organization') or 'user'}/{req['name']}"
            with hub.lock:
                if repo in hub.repos:
                    # The Hub's 409 reply names the existing repo's URL.
                    message = "You already created this model repo"
                    return self.send(409, {"error": message, "url": f"http://{self.headers['Host']}/{repo}"}, {"X-Error-Message": message})
                hub.repos[repo] = {"private": bool(req.get("private") or req.get("visibility") == "private"),
                                   "refs": {"main": "0" * 40}, "commits": {"0" * 40: {}}}
            self.send(200, {"url": f"http://{self.headers['Host']}/{repo}", "name": repo})

        def create_branch(self, repo, branch):
            if not self.authorized():
                return
            self.body()
            with hub.lock:
                r = self.repo(repo)
                if branch in r["refs"]:
                    return self.error(409, "Reference already exists")
                r["refs"][branch] = r["refs"]["main"]
            self.send(200, {})

        def repo(self, repo):
            if repo not in hub.repos:
                raise KeyError(repo)
            return hub.repos[repo]

        def files_at(self, repo, rev):
            r = self.repo(repo)
            sha = r["refs"].get(rev, rev)
            return sha, r["commits"][sha]

        def preupload(self, repo, rev):
            if not self.authorized():
                return
            req = json.loads(self.body())
            _, files = self.files_at(repo, rev)
            out = []
            for f in req["files"]:
                sample = base64.b64decode(f["sample"])
                lfs = f["size"] > 0 and (any(fnmatch.fnmatch(f["path"].split("/")[-1], pat) for pat in LFS_PATTERNS)
                                         or f["size"] > MAX_REGULAR or (is_binary(sample) and f["size"] > MAX_REGULAR_BINARY))
                entry = {"path": f["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False}
                if f["path"] in files:
                    entry["oid"] = files[f["path"]]["oid"]
                out.append(entry)
            self.send(200, {"files": out})

        def lfs_batch(self, repo):
            if not self.authorized():
                return
            self.repo(repo)
            req = json.loads(self.body())
            host = f"http://{self.headers['Host']}"
            objects = []
            for o in req["objects"]:
                oid, size = o["oid"], o["size"]
                if oid in hub.objects:
                    objects.append({"oid": oid, "size": size})  # already stored: no actions
                    continue
                verify = {"href": f"{host}/_lfs/{oid}/verify", "header": {}}
                if size > hub.part_size and "multipart" in req.get("transfers", ["basic"]):
                    n = -(-size // hub.part_size)
                    header = {"chunk_size": str(hub.part_size)}
                    spelling = "{:d}" if hub.part_keys == "plain" else "{:05d}"
                    numbers = [i for i in range(1, n + 2) if i != 2] if hub.part_keys == "gap" else range(1, n + 1)
                    header.update({spelling.format(i): f"{host}/_lfs/{oid}/part/{i}" for i in numbers})
                    upload = {"href": f"{host}/_lfs/{oid}/complete", "header": header}
                else:
                    upload = {"href": f"{host}/_lfs/{oid}"}
                objects.append({"oid": oid, "size": size, "authenticated": True, "actions": {"upload": upload, "verify": verify}})
            self.send(200, {"transfer": "basic", "objects": objects}, content_type="application/vnd.git-lfs+json")

        def lfs(self, p):
            oid = p[0]
            if self.command == "PUT" and len(p) == 1:
                data = self.body()
                if hashlib.sha256(data).hexdigest() != oid:
                    return self.error(400, "sha256 mismatch")
                with hub.lock:
                    hub.objects[oid] = data
                return self.send(200, b"", {"ETag": f'"{oid}"'})
            if self.command == "PUT" and p[1:2] == ["part"]:
                data = self.body()
                with hub.lock:
                    hub.parts.setdefault(oid, {})[int(p[2])] = data
                return self.send(200, b"", {"ETag": f'"{hashlib.md5(data).hexdigest()}"'})
            if self.command == "POST" and p[1:2] == ["complete"]:
                req = json.loads(self.body())
                with hub.lock:
                    stored = hub.parts.get(oid, {})
                    try:
                        for part in req["parts"]:
                            if f'"{hashlib.md5(stored[part["partNumber"]]).hexdigest()}"' != part["etag"]:
                                return self.error(400, f"etag mismatch for part {part['partNumber']}")
                        data = b"".join(stored[part["partNumber"]] for part in sorted(req["parts"], key=lambda x: x["partNumber"]))
                    except KeyError as e:
                        return self.error(400, f"missing part {e}")
                    if hashlib.sha256(data).hexdigest() != oid:
                        return self.error(400, "sha256 mismatch after completion")
                    hub.objects[oid] = data
                    hub.parts.pop(oid, None)
                return self.send(200, {})
            if self.command == "POST" and p[1:2] == ["verify"]:
                if not self.authorized():
                    return
                req = json.loads(self.body())
                ok = oid in hub.objects and len(hub.objects[oid]) == req["size"]
                return self.send(200 if ok else 404, {} if ok else {"error": "object not found"})
            self.error(404, "unknown lfs route")

        def commit(self, repo, rev):
            if not self.authorized():
                return
            lines = [json.loads(line) for line in self.body().decode().splitlines() if line.strip()]
            if not lines or lines[0].get("key") != "header":
                return self.error(400, "first line must be the header")
            with hub.lock:
                r = self.repo(repo)
                parent = r["refs"].get(rev) or r["refs"]["main"]
                files = dict(r["commits"][parent])
                for line in lines[1:]:
                    v = line["value"]
                    if line["key"] == "file":
                        data = base64.b64decode(v["content"])
                        if len(data) > MAX_REGULAR or (is_binary(data) and len(data) > MAX_REGULAR_BINARY):
                            return self.error(400, f"Your push was rejected because it contains files larger than 10 MiB "
                                                   f"or binary files over 1 MB ({v['path']}). Please use https://git-lfs.github.com/")
                        files[v["path"]] = {"data": data, "oid": git_blob_sha1(data), "size": len(data), "lfs": None}
                    elif line["key"] == "lfsFile":
                        if v["oid"] not in hub.objects or len(hub.objects[v["oid"]]) != v["size"]:
                            return self.error(400, f"LFS object {v['oid']} for {v['path']} was not uploaded")
                        files[v["path"]] = {"data": None, "oid": v["oid"], "size": v["size"], "lfs": v["oid"]}
                    elif line["key"] == "deletedFile":
                        files.pop(v["path"], None)
                    else:
                        return self.error(400, f"unsupported operation {line['key']}")
                sha = hashlib.sha1(json.dumps([parent, sorted((k, f["oid"]) for k, f in files.items()), lines[0]], sort_keys=True).encode()).hexdigest()
                r["commits"][sha] = files
                r["refs"][rev] = sha
            host = f"http://{self.headers['Host']}"
            self.send(200, {"commitUrl": f"{host}/{repo}/commit/{sha}", "commitOid": sha, "pullRequestUrl": None})

        def model_info(self, repo, rev):
            sha, files = self.files_at(repo, rev or "main")
            self.send(200, {"id": repo, "modelId": repo, "sha": sha, "private": self.repo(repo)["private"],
                            "siblings": [{"rfilename": path} for path in sorted(files)]})

        def tree(self, repo, rev):
            sha, files = self.files_at(repo, rev.split("/")[0] or "main")
            out = []
            for path, f in sorted(files.items()):
                entry = {"type": "file", "path": path, "size": f["size"], "oid": f["oid"] if not f["lfs"] else git_blob_sha1(b"")}
                if f["lfs"]:
                    entry["lfs"] = {"oid": f["lfs"], "size": f["size"], "pointerSize": 134}
                out.append(entry)
            self.send(200, out)

        def resolve(self, repo, rev, path):
            sha, files = self.files_at(repo, rev)
            f = files[path]
            data = f["data"] if f["data"] is not None else hub.objects[f["lfs"]]
            headers = {"ETag": f'"{f["oid"]}"', "X-Repo-Commit": sha, "Accept-Ranges": "bytes"}
            if f["lfs"]:
                headers.update({"X-Linked-Etag": f'"{f["lfs"]}"', "X-Linked-Size": str(f["size"])})
            status, total = 200, len(data)
            wanted = self.headers.get("Range", "")
            if wanted.startswith("bytes=") and total:
                start, _, end = wanted[6:].partition("-")
                start = int(start or 0)
                end = min(int(end) if end else total - 1, total - 1)
                data = data[start:end + 1]
                status = 206
                headers["Content-Range"] = f"bytes {start}-{end}/{total}"
            self.send(status, data, headers, content_type="application/octet-stream")

    return Handler


class Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):
        if not isinstance(sys.exc_info()[1], ConnectionError):  # clients closing idle keep-alives
            super().handle_error(request, client_address)


def main():
    args = sys.argv[1:]
    opt = lambda name, default: type(default)(args[args.index(name) + 1]) if name in args else default  # noqa: E731
    hub = Hub(opt("--token", ""), opt("--part-size", 5 * 1024 * 1024), opt("--part-keys", "padded"))
    server = Server(("127.0.0.1", opt("--port", 0)), make_handler(hub))
    print(server.server_address[1], flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
