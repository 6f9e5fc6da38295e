"""`talk2dino serve` from the installed wheel, as a user starts it: for `.ci/wheel-check`.

    python .ci/wheel_serve_check.py VERSION IMAGE LOG -- talk2dino serve ARGS...

Starts the command on a free loopback port (``--host 127.0.0.1 --port N`` are appended), waits for /healthz,
fetches the web page and every /static/ file it references, /v1/models, posts IMAGE to /v1/segment (a
multipart upload: the `serve` extra's python-multipart), then stops the server with SIGTERM and requires
exit code 0. Talks to 127.0.0.1 only. The server's stderr goes to LOG. Exits 1 naming the failed check.
"""

from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

HOST = "127.0.0.1"
START_TIMEOUT_S = 120
STOP_TIMEOUT_S = 60


class CheckFailed(Exception):
    pass


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        return int(probe.getsockname()[1])


def get(base: str, path: str, *, timeout: float = 30) -> tuple[int, str, bytes]:
    request = urllib.request.Request(base + path)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.headers.get("content-type", ""), response.read()
    except urllib.error.HTTPError as err:
        return err.code, err.headers.get("content-type", ""), err.read()


def expect(condition: bool, what: str) -> None:
    if not condition:
        raise CheckFailed(what)
    print(f"  ok  {what.split(':')[0]}")


def multipart(fields: dict[str, str], file_field: str, file_path: Path) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    parts = []
    for name, value in fields.items():
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode())
    parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{file_field}"; '
                 f'filename="{file_path.name}"\r\nContent-Type: image/jpeg\r\n\r\n'.encode())
    parts.append(file_path.read_bytes() + b"\r\n")
    parts.append(f"--{boundary}--\r\n".encode())
    return b"".join(parts), f"multipart/form-data; boundary={boundary}"


def run_checks(base: str, version: str, image: Path) -> None:
    status, kind, body = get(base, "/healthz")
    health = json.loads(body)
    expect(status == 200 and health.get("status") == "ok" and health.get("version") == version,
           f"GET /healthz: {status} {health}")

    status, kind, body = get(base, "/")
    page = body.decode("utf-8", "replace")
    expect(status == 200 and kind.startswith("text/html") and "<html" in page.lower(),
           f"GET / (web page): {status} {kind} {page[:200]!r}")
    assets = sorted(set(re.findall(r'(?:src|href)="(/static/[^"]+)"', page)))
    expect(any(a.endswith(".js") for a in assets) and any(a.endswith(".css") for a in assets),
           f"page references /static/*.js and *.css: {assets}")
    for asset in assets:
        status, kind, body = get(base, asset)
        want = "javascript" if asset.endswith(".js") else "css" if asset.endswith(".css") else ""
        expect(status == 200 and len(body) > 0 and want in kind, f"GET {asset}: {status} {kind} {len(body)} bytes")

    status, kind, body = get(base, "/v1/models")
    models = json.loads(body)
    expect(status == 200 and models.get("loaded", {}).get("name") == "composed" and models.get("available"),
           f"GET /v1/models: {status} {str(models)[:300]}")

    status, kind, body = get(base, "/openapi.json")
    expect(status == 200 and "/v1/segment" in json.loads(body).get("paths", {}), f"GET /openapi.json: {status}")

    data, content_type = multipart({"labels": "rocket, smoke, sky", "label_png": "true"}, "image", image)
    request = urllib.request.Request(base + "/v1/segment", data=data, method="POST",
                                     headers={"Content-Type": content_type})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            status, answer = response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        status, answer = err.code, {"error": err.read().decode("utf-8", "replace")}
    names = [entry.get("name") for entry in answer.get("labels", [])]
    expect(status == 200 and names == ["rocket", "smoke", "sky"] and answer.get("size") == [427, 640]
           and answer.get("label_png"),
           f"POST /v1/segment (multipart upload of {image.name}): {status} {str(answer)[:300]}")


def main() -> int:
    version, image, log = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
    if sys.argv[4] != "--":
        raise SystemExit("usage: wheel_serve_check.py VERSION IMAGE LOG -- COMMAND...")
    port = free_port()
    command = [*sys.argv[5:], "--host", HOST, "--port", str(port)]
    base = f"http://{HOST}:{port}"
    print(f"  $ {' '.join(command)}")
    with log.open("w") as err_log:
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=err_log, stdin=subprocess.DEVNULL,
                                text=True)
        failure = None
        try:
            deadline = time.monotonic() + START_TIMEOUT_S
            while True:
                if proc.poll() is not None:
                    raise CheckFailed(f"server exited with code {proc.returncode} before answering")
                if time.monotonic() > deadline:
                    raise CheckFailed(f"server did not answer /healthz within {START_TIMEOUT_S} s")
                try:
                    if get(base, "/healthz", timeout=2)[0] == 200:
                        break
                except OSError:
                    pass
                time.sleep(0.25)
            print(f"  ok  server up on {base} after {START_TIMEOUT_S - (deadline - time.monotonic()):.1f} s")
            run_checks(base, version, image)
        except (CheckFailed, OSError, ValueError) as err:
            failure = f"{type(err).__name__}: {err}" if not isinstance(err, CheckFailed) else str(err)
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
            try:
                out, _ = proc.communicate(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                out, _ = proc.communicate()
                failure = failure or f"server still running {STOP_TIMEOUT_S} s after SIGTERM (killed)"
    if failure is None:
        if proc.returncode != 0:
            failure = f"server exited with code {proc.returncode} after SIGTERM, expected 0"
        elif out:
            failure = f"server wrote to stdout (logs belong on stderr): {out[:200]!r}"
        else:
            print("  ok  SIGTERM: server stopped, exit code 0")
    if failure is not None:
        print(f"  FAIL {failure}", file=sys.stderr)
        print(f"  --- server log ({log}), last lines:", file=sys.stderr)
        for line in log.read_text(errors="replace").splitlines()[-25:]:
            print(f"  | {line}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
