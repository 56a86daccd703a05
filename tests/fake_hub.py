"""A fake Hugging Face Hub for the tests: a local HTTP server answering the few routes
huggingface_hub uses to download files (revision info, tree, resolve), optionally slowly."""

from __future__ import annotations

import contextlib
import hashlib
import http.server
import json
import re
import threading
import time


@contextlib.contextmanager
def serving_hub(files: dict, monkeypatch, *, chunk_delay_s: float = 0.0, chunk: int = 1 << 20):
    """Serve `files` (name -> bytes) as one Hub repo at HF_ENDPOINT; yields (url, requests seen).
    chunk_delay_s: a pause after every `chunk` bytes of a file (a slow download)."""
    commit = "c" * 40
    seen: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def send(self, body: bytes, head: bool, ctype="application/octet-stream", extra=()):
            self.send_response(200)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            for k, v in extra:
                self.send_header(k, v)
            self.end_headers()
            if not head:
                for start in range(0, len(body), chunk):
                    self.wfile.write(body[start:start + chunk])
                    if chunk_delay_s:
                        time.sleep(chunk_delay_s)

        def answer(self, head: bool):
            path = self.path.split("?")[0]
            seen.append(f"{self.command} {path}")
            if path == "/":
                return self.send(b"", head)
            if re.match(r"^/api/models/.+?/revision/", path):
                info = {"id": "x", "sha": commit, "siblings": [{"rfilename": f} for f in files]}
                return self.send(json.dumps(info).encode(), head, "application/json")
            if re.match(r"^/api/models/.+?/tree/", path):
                tree = [{"type": "file", "path": f, "size": len(b), "oid": hashlib.sha1(b).hexdigest()}
                        for f, b in files.items()]
                return self.send(json.dumps(tree).encode(), head, "application/json")
            m = re.match(r"^/.+?/resolve/[^/]+/(.+)$", path) or re.match(r"^/releases/(.+)$", path)
            if m and m[1] in files:
                body = files[m[1]]
                return self.send(body, head, extra=[("X-Repo-Commit", commit),
                                                    ("ETag", f'"{hashlib.sha1(body).hexdigest()}"')])
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def do_HEAD(self):
            self.answer(True)

        def do_GET(self):
            self.answer(False)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    for var in ("HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    from huggingface_hub import constants
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)   # in case it was set at import
    url = f"http://127.0.0.1:{server.server_address[1]}"
    monkeypatch.setenv("HF_ENDPOINT", url)
    try:
        yield url, seen
    finally:
        server.shutdown()
        server.server_close()
