"""Builders for small datasets and fixture archives used across the tests."""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import subprocess
import sys
import threading
import uuid
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import yaml
from PIL import Image

from pipeline import paths
from pipeline.config import Settings, parse_settings

PROJECT = Path(__file__).resolve().parents[1]


def jpeg_bytes(colour=(200, 30, 30), size=(40, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="JPEG")
    return buf.getvalue()


def tiny_params(**overrides) -> dict:
    """The project's params.yaml shrunk for tests, with nested overrides by dotted key."""
    raw = yaml.safe_load((PROJECT / "params.yaml").read_text())
    defaults = {
        "data.synthetic.n_images": 40, "data.synthetic.image_size": 48,
        "features.image_size": 71, "features.batch_size": 8, "features.rows_per_part": 8,
        # one runtime, not the default's measurement of all of them (tests of auto ask for it)
        "features.runtime": "tflite", "features.auto_rounds": 1, "features.calibration_images": 16,
        "train.epochs": 3, "train.units": 32, "train.embedding_dim": 16, "train.batch_size": 32,
        "evaluate.gallery_size": 4,
    }
    for key, value in {**defaults, **overrides}.items():
        node = raw
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return raw


def tiny_settings(**overrides) -> Settings:
    return parse_settings(tiny_params(**overrides))


def run_features(settings: Settings) -> None:
    """The feature stages in dvc.yaml order: backbone, every shard, the corrections people made
    (feedback: none unless the test stored some in ./feedback.db) and their shard, merge."""
    from pipeline import paths
    from pipeline.stages import backbone, features, feedback, merge_features

    backbone.run(settings)
    for shard in settings.features.shards:
        features.run(settings, shard)
    feedback.run(settings)
    features.run(settings, paths.FEEDBACK_SHARD)
    merge_features.run(settings)


def write_params(directory: Path, **overrides) -> Path:
    path = directory / "params.yaml"
    path.write_text(yaml.safe_dump(tiny_params(**overrides), sort_keys=False))
    return path


def write_flickr_dataset(root: Path, images: dict[str, bytes | None], token_lines: list[str] | bytes,
                         splits: dict[str, list[str]]) -> Path:
    """A dataset in the common layout: images (None = not written), token file, split lists."""
    (root / paths.IMAGES_SUBDIR).mkdir(parents=True, exist_ok=True)
    for name, data in images.items():
        if data is not None:
            (root / paths.IMAGES_SUBDIR / name).write_bytes(data)
    body = token_lines if isinstance(token_lines, bytes) else "".join(
        f"{line}\n" for line in token_lines).encode()
    (root / paths.TOKEN_FILE).write_bytes(body)
    for split, names in splits.items():
        (root / paths.SPLIT_FILES[split]).write_text("".join(f"{n}\n" for n in names))
    return root


def sh(cmd: list[str], cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    """Run a command with this venv's bin first on PATH and an MLflow store inside ``cwd``."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
           "MLFLOW_TRACKING_URI": f"sqlite:///{cwd}/mlflow.db"}
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if check and result.returncode:
        raise AssertionError(f"{cmd} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


def git_project(dest: Path, **param_overrides) -> Path:
    """A copy of the project's files (as git sees them) in a fresh git repo with one commit
    and tiny params: what a user has after `git clone`, shrunk for tests."""
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"],
                           cwd=PROJECT, capture_output=True, text=True, check=True).stdout.split()
    for rel in files:
        src = PROJECT / rel
        if src.is_file() and not rel.startswith(("tests/", "benchmarks/", "reports/")):
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    write_params(dest, **param_overrides)
    git = ["git", "-c", "user.email=test@localhost", "-c", "user.name=test"]
    sh(["git", "init", "-q"], dest)
    sh([*git, "add", "-A"], dest)
    sh([*git, "commit", "-qm", "init"], dest)
    return dest


def zip_bytes(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


class FixtureServer:
    """HTTP server on 127.0.0.1 serving in-memory files, with Range support.

    ``cut_once[path] = n`` makes the next full GET of ``path`` send only ``n`` bytes of the
    body and drop the connection, as a flaky network would."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.cut_once: dict[str, int] = {}
        self.requests: list[tuple[str, str | None]] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output quiet
                pass

            def do_GET(self):
                rng = self.headers.get("Range")
                server.requests.append((self.path, rng))
                body = server.files.get(self.path)
                if body is None:
                    self.send_error(404)
                    return
                start = 0
                if rng:
                    start = int(rng.split("=")[1].split("-")[0])
                    if start >= len(body):
                        self.send_response(416)
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
                else:
                    self.send_response(200)
                self.send_header("Content-Length", str(len(body) - start))
                self.end_headers()
                cut = server.cut_once.pop(self.path, None)
                payload = body[start:] if cut is None else body[start:start + cut]
                self.wfile.write(payload)
                if cut is not None:
                    self.close_connection = True

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def __enter__(self) -> "FixtureServer":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


POSTGRES = {"host": "127.0.0.1", "port": 5432, "user": "postgres"}
REDIS = ("127.0.0.1", 6379)


def missing_services() -> list[str]:
    """Which of the local Postgres and Redis the team tests need cannot be reached."""
    import socket

    import psycopg2

    missing = []
    try:
        psycopg2.connect(dbname="postgres", connect_timeout=5, **POSTGRES).close()
    except psycopg2.OperationalError as err:
        missing.append(f"PostgreSQL at {POSTGRES['host']}:{POSTGRES['port']} ({str(err).strip()})")
    try:
        with socket.create_connection(REDIS, timeout=5) as conn:
            conn.sendall(b"PING\r\n")
            if not conn.recv(16).startswith(b"+PONG"):
                missing.append(f"Redis at {REDIS[0]}:{REDIS[1]} (no PONG)")
    except OSError as err:
        missing.append(f"Redis at {REDIS[0]}:{REDIS[1]} ({err})")
    return missing


def postgres_admin(sql: str) -> None:
    """Run one statement (CREATE/DROP DATABASE) on the local PostgreSQL, outside a transaction."""
    import psycopg2

    conn = psycopg2.connect(dbname="postgres", connect_timeout=10, **POSTGRES)
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute(sql)
    finally:
        conn.close()


@contextlib.contextmanager
def fresh_postgres_database(purpose: str):
    """A new, empty database on the local PostgreSQL for one test (its SQLAlchemy URL), dropped after."""
    require_services()
    name = f"captioner_test_{uuid.uuid4().hex[:10]}_{purpose}"
    postgres_admin(f'CREATE DATABASE "{name}"')
    try:
        yield f"postgresql+psycopg2://postgres@127.0.0.1:5432/{name}"
    finally:
        postgres_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def require_services() -> None:
    """Skip (a laptop without them) or, with CAPTIONER_REQUIRE_SERVICES=1 (CI), fail."""
    import pytest

    missing = missing_services()
    if missing:
        reason = "team-stack test needs " + "; ".join(missing)
        if os.environ.get("CAPTIONER_REQUIRE_SERVICES") == "1":
            pytest.fail(reason + " and CAPTIONER_REQUIRE_SERVICES=1")
        pytest.skip(reason)


def installed(program: str, reason: str) -> str:
    """The path of a program a test needs: skip without it (a laptop), or fail with
    CAPTIONER_REQUIRE_SERVICES=1 (CI, where `make test` installs it)."""
    import shutil

    import pytest

    found = shutil.which(program)
    if not found:
        if os.environ.get("CAPTIONER_REQUIRE_SERVICES") == "1":
            pytest.fail(reason + " and CAPTIONER_REQUIRE_SERVICES=1")
        pytest.skip(reason)
    return found


def chromium() -> str:
    """Debian's chromium for the browser tests (`make test` installs it where it may)."""
    return installed("chromium", "browser test needs Debian's chromium (apt-get install chromium; "
                                 "`make test` does it as root)")


def exiftool() -> str:
    """ExifTool (Debian's libimage-exiftool-perl; `make setup` installs it where it may), the
    reader the metadata tests check the project's writes with."""
    return installed("exiftool", "metadata test needs ExifTool (apt-get install libimage-exiftool-perl; "
                                 "`make setup` does it as root)")


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def drop_files(page, files: dict[str, tuple[bytes, str]]) -> None:
    """A real drop event on the app page's drop zone carrying File objects (name -> (bytes,
    MIME type)), as a user's drag from the desktop."""
    payload = {n: (list(data), mime) for n, (data, mime) in files.items()}
    page.evaluate("""(files) => {
        const dt = new DataTransfer();
        for (const [name, [bytes, mime]] of Object.entries(files))
            dt.items.add(new File([new Uint8Array(bytes)], name, {type: mime}));
        const zone = document.getElementById('drop');
        zone.dispatchEvent(new DragEvent('drop', {dataTransfer: dt, bubbles: true, cancelable: true}));
    }""", payload)


def synthetic_photos(count: int, seed: int, size: int = 48) -> list[tuple[bytes, str]]:
    """New synthetic photos (in no dataset) with a true caption of each, as one person who
    corrects the model's captions would write them: always in the same words ("A red circle on
    the left on a blue background .") (JPEG bytes, caption)."""
    import random
    import re

    from pipeline.data.synthetic import make_scene

    style = re.compile(r"^An? \w+ (circle|square|triangle) .* on an? \w+ background \.$")
    rng, out = random.Random(seed), []
    while len(out) < count:
        image, captions = make_scene(rng, size)
        chosen = [c for c in captions if style.match(c)]
        if not chosen:
            continue
        captions = chosen
        buf = io.BytesIO()
        image.save(buf, format="JPEG", quality=95)
        out.append((buf.getvalue(), captions[0]))
    return out


def wait_for_http(url: str, proc, timeout_s: float, what: str) -> None:
    """Poll ``url`` until it answers 2xx (bounded); fail early with the process's stderr if
    ``proc`` (started with stderr=PIPE) exits first."""
    import time
    import urllib.request

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if 200 <= response.status < 300:
                    return
        except OSError:
            pass
        assert proc.poll() is None, f"{what} exited: {proc.stderr.read().decode()[-3000:]}"
        assert time.monotonic() < deadline, f"{what} did not answer {url} within {timeout_s:.0f} s"
        time.sleep(0.5)


def zip_bomb(unpacked: int, name: str = "Images/zeros.jpg") -> bytes:
    """A valid zip whose one member inflates to ``unpacked`` zero bytes (about 1000:1), with
    honest headers and a correct CRC: what check_zip's CRC test alone lets through."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as zf:
        with zf.open(name, "w") as member:
            chunk = bytes(16 << 20)
            for _ in range(unpacked // len(chunk)):
                member.write(chunk)
            member.write(bytes(unpacked % len(chunk)))
    return buf.getvalue()


def lying_zip(name: str, actual: int, declared: int) -> bytes:
    """A zip whose member inflates to ``actual`` bytes while its local and central headers
    declare ``declared``: a zip bomb that passes a check of the declared sizes."""
    import struct

    data = bytearray(zip_bomb(actual, name))
    with zipfile.ZipFile(io.BytesIO(bytes(data))) as zf:
        (info,) = zf.infolist()
        central = zf.start_dir
    for offset in (info.header_offset + 22, central + 24):  # "uncompressed size" of each header
        assert struct.unpack_from("<I", data, offset)[0] == actual
        struct.pack_into("<I", data, offset, declared)
    return bytes(data)
