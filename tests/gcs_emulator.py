"""A real GCS JSON-API server on 127.0.0.1 for the tests: `gcp-storage-emulator` (pure Python), run
in this process. tensorstore (orbax), gcsfs (epath, fsspec) and google-cloud-storage all reach it
through their standard variables, which `Emulator.env` holds for subprocesses.

Where the emulator leaves out what real GCS does and our clients rely on, it is made to do it
(`_as_gcs_does`), and nothing else is changed:
* a media download carries the object's generation (`x-goog-generation`), which tensorstore reads
  to make its next conditional write (OCDBT's manifest, the run's lease);
* `ifGenerationMatch` on a media upload or a delete is enforced (0: only if absent; else the live
  generation), answering 412 Precondition Failed as GCS does;
* a bucket named in `FORBIDDEN_BUCKETS` answers every request 403 Forbidden, as GCS answers a
  caller without the bucket's IAM permission (the emulator has no authorization at all);
* a client that hangs up before its answer is sent (a retry, a stopped run) is not printed as a
  server traceback;
* in memory mode the emulator rewrote a JSON snapshot of every object's metadata after each
  change, for a reload from disk that an in-memory server never does (O(objects) per request):
  skipped.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import http.server
import os
import socket
import sys
import urllib.parse


@dataclasses.dataclass
class Emulator:
    port: int
    bucket: str
    server: object

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def env(self) -> dict:
        return {"STORAGE_EMULATOR_HOST": self.url, "TENSORSTORE_GCS_HTTP_URL": self.url,
                "GOOGLE_AUTH_TOKEN_FOR_TESTING": "x", "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
                "GOOGLE_CLOUD_PROJECT": "test"}

    def stop(self) -> None:
        self.server.stop()

    def start(self) -> None:
        """Serves again on the same port, with the objects it held when stopped."""
        from gcp_storage_emulator.server import APIThread

        self.server._api = APIThread("127.0.0.1", self.port, self.server._storage)
        self.server.start()


# Buckets that answer 403 to everything (see the module docstring); tests add and remove names.
FORBIDDEN_BUCKETS: set = set()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _live_generation(storage, bucket: str, name: str) -> str:
    from gcp_storage_emulator.exceptions import NotFound

    try:
        return str(storage.get_file_obj(bucket, name)["generation"])
    except NotFound:
        return "0"


def _precondition_fails(request, storage) -> bool:
    want = request.query.get("ifGenerationMatch")
    if not want:
        return False
    name = request.params.get("object_id") or (request.query.get("name") or [None])[0]
    if name is None:  # a multipart upload names the object in its body: not used by our clients
        return False
    return _live_generation(storage, request.params["bucket_name"], urllib.parse.unquote(name)) != want[0]


def _as_gcs_does() -> None:
    """See the module docstring: generations on downloads, preconditions, no metadata snapshot."""
    from http import HTTPStatus

    from gcp_storage_emulator import server as emu_server
    from gcp_storage_emulator import storage as emu_storage
    from gcp_storage_emulator.handlers import objects

    if getattr(emu_storage.Storage, "_as_gcs_does", False):
        return
    snapshot = emu_storage.Storage._write_config_to_file

    def write_config(self):
        if not self._store._use_memory:
            snapshot(self)

    def with_preconditions(handler):
        def handle(request, response, storage, *args, **kwargs):
            if _precondition_fails(request, storage):
                response.status = HTTPStatus.PRECONDITION_FAILED
                response.json({"error": {"code": 412, "message": "At least one of the pre-conditions you "
                                                                 "specified did not hold."}})
                return None
            return handler(request, response, storage, *args, **kwargs)
        return handle

    def with_generation(handler):
        def handle(request, response, storage, *args, **kwargs):
            out = handler(request, response, storage, *args, **kwargs)
            if response.status in (HTTPStatus.OK, HTTPStatus.PARTIAL_CONTENT):
                generation = _live_generation(storage, request.params["bucket_name"], request.params["object_id"])
                response["x-goog-generation"] = generation
                response["x-goog-metageneration"] = "1"
            return out
        return handle

    def with_permissions(handler):
        def handle(request, response, storage, *args, **kwargs):
            bucket = request.params.get("bucket_name")
            if bucket in FORBIDDEN_BUCKETS:
                response.status = HTTPStatus.FORBIDDEN
                response.json({"error": {"code": 403, "message": f"caller does not have storage.objects access to "
                                                                 f"the Google Cloud Storage bucket {bucket}."}})
                return None
            return handler(request, response, storage, *args, **kwargs)
        return handle

    wrapped = {objects.download: with_generation(objects.download), objects.insert: with_preconditions(objects.insert),
               objects.delete: with_preconditions(objects.delete)}
    for _, handlers in emu_server.HANDLERS:
        for method, fn in list(handlers.items()):
            handlers[method] = with_permissions(wrapped.get(fn, fn))
    # The router's fallback for uploads without the /upload prefix, and `get`'s `alt=media` branch,
    # call these through the module.
    objects.insert, objects.download = wrapped[objects.insert], wrapped[objects.download]
    emu_storage.Storage._write_config_to_file = write_config

    class QuietServer(http.server.HTTPServer):
        def handle_error(self, request, client_address):
            if not isinstance(sys.exc_info()[1], (BrokenPipeError, ConnectionResetError)):
                super().handle_error(request, client_address)

    def serve(thread):
        thread._httpd = QuietServer((thread._host, thread._port),
                                    functools.partial(emu_server.RequestHandler, thread._storage))
        thread.is_running.set()
        thread._httpd.serve_forever()

    emu_server.APIThread.run = serve
    emu_storage.Storage._as_gcs_does = True


def _serve(port: int, bucket: str):
    from gcp_storage_emulator.server import create_server

    _as_gcs_does()
    server = create_server("127.0.0.1", port, in_memory=True, default_bucket=bucket)
    server.start()
    return server


@contextlib.contextmanager
def running(bucket: str = "cid-test"):
    """The emulator on a free port, with this process's environment pointed at it."""
    port = _free_port()
    emu = Emulator(port, bucket, _serve(port, bucket))
    saved = {k: os.environ.get(k) for k in emu.env}
    os.environ.update(emu.env)
    try:
        yield emu
    finally:
        emu.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
