"""A test-only HTTP proxy in front of an inference server.

It forwards every request to the upstream server, records each request and
answer as one JSON line (so a test can read the prompt ids the server
received), and answers 503 instead of forwarding every Nth completion
request (so a test can check that prefgen retries through them). As a
misbehaving server it can also rewrite what the upstream answers: every
served model's `owned_by` (`--owned-by TEXT`), the token ids of every
completion (`--token-ids JSON`), or drop every completion's log-probabilities
(`--no-logprobs`). As a rate-limited hosted API it answers 429 with
`Retry-After: S` to every Nth completion (`--too-many-every N --retry-after
S`) and closes the connection without answering every Mth
(`--drop-every M`). Each record carries when the request arrived and the
bearer token it came with.

    python3 tests/openai_proxy.py --upstream http://127.0.0.1:8080 --port 9000 --log log.jsonl --fail-every 3
"""

import argparse
import json
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--upstream", required=True)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--log", required=True)
    ap.add_argument("--fail-every", type=int, default=0)
    ap.add_argument("--owned-by")
    ap.add_argument("--token-ids", type=json.loads)
    ap.add_argument("--no-logprobs", action="store_true")
    ap.add_argument("--too-many-every", type=int, default=0)
    ap.add_argument("--retry-after", default="1")
    ap.add_argument("--drop-every", type=int, default=0)
    args = ap.parse_args()
    lock = threading.Lock()
    completions = [0]

    def record(entry):
        with lock, open(args.log, "a") as f:
            f.write(json.dumps(entry) + "\n")

    def parsed(raw):
        try:
            return json.loads(raw)
        except ValueError:
            return None

    def rewritten(path, status, body):
        answer = parsed(body)
        if status != 200 or not isinstance(answer, dict):
            return body
        if args.owned_by is not None and path.endswith("/models"):
            for model in answer.get("data", []):
                model["owned_by"] = args.owned_by
        elif args.token_ids is not None and path.endswith("/completions"):
            answer.setdefault("__verbose", {})["tokens"] = args.token_ids
            for choice in answer.get("choices", []):
                if "token_ids" in choice:
                    choice["token_ids"] = args.token_ids
        elif args.no_logprobs and path.endswith("/completions"):
            for choice in answer.get("choices", []):
                choice.pop("logprobs", None)
        else:
            return body
        return json.dumps(answer).encode()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def answer(self, status, body, headers=()):
            self.send_response(status)
            for name, value in headers:
                self.send_header(name, value)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def forward(self, method):
            raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            entry = {"method": method, "path": self.path, "body": parsed(raw), "time": time.time(),
                     "auth": self.headers.get("Authorization")}
            if method == "POST" and self.path.endswith("/completions"):
                with lock:
                    completions[0] += 1
                    n = completions[0]
                every = lambda k: k and n % k == 0
                if every(args.fail_every):
                    body = b'{"error": {"code": 503, "message": "the proxy is busy"}}'
                    record({**entry, "status": 503, "response": parsed(body)})
                    return self.answer(503, body)
                if every(args.too_many_every):
                    body = b'{"error": {"code": 429, "message": "rate limit reached"}}'
                    record({**entry, "status": 429, "response": parsed(body)})
                    return self.answer(429, body, [("Retry-After", args.retry_after)])
                if every(args.drop_every):
                    record({**entry, "status": 0, "response": None})
                    self.close_connection = True
                    return
            req = urllib.request.Request(args.upstream + self.path, data=raw if method == "POST" else None,
                                         method=method, headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(req, timeout=600) as r:
                    status, body = r.status, r.read()
            except urllib.error.HTTPError as e:
                status, body = e.code, e.read()
            except OSError as e:
                status, body = 502, json.dumps({"error": {"message": f"upstream: {e}"}}).encode()
            body = rewritten(self.path, status, body)
            record({**entry, "status": status, "response": parsed(body)})
            self.answer(status, body)

        def do_GET(self):
            self.forward("GET")

        def do_POST(self):
            self.forward("POST")

    ThreadingHTTPServer(("127.0.0.1", args.port), Handler).serve_forever()


if __name__ == "__main__":
    main()
