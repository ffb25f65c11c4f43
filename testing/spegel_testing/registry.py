# -*- test-case-name: tests.e2e.test_rig_real -*-
"""
An upstream registry for tests: the distribution project's C{docker-registry} on loopback.

It keeps its storage in its own directory, so it can be stopped (to prove a pull was served by
spegel, not by it) and started again on the same port with the same content.  Images are pushed
with the distribution HTTP API (blob upload, then manifests), streaming big blobs from disk.
"""

from __future__ import annotations

import http.client
import os
import shutil
import tempfile
import urllib.parse

from attrs import define, field

from spegel_testing.images import MANIFEST_MEDIA_TYPES, Blob, TestImage
from spegel_testing.netns import Host
from spegel_testing.ports import free_port
from spegel_testing.process import ManagedProcess, RunsOneProcess, wait_for

DOCKER_REGISTRY = "docker-registry"

_CONFIG = """\
version: 0.1
log:
  level: warn
  accesslog:
    disabled: {access_log_disabled}
storage:
  filesystem:
    rootdirectory: {storage}
  delete:
    enabled: true
http:
  addr: {address}:{port}
"""


class RegistryError(Exception):
    """
    The registry answered a push or query with an unexpected status.
    """


@define(eq=False)
class UpstreamRegistry(RunsOneProcess):
    """
    A C{docker-registry} serving plain HTTP on C{address}:C{port}.

    @ivar base_dir: owns the storage, the config and the log.
    @ivar port: TCP port; a free one when not given, kept across restarts.
    @ivar address: the IPv4 address it listens on: loopback, or the host's address on a rig
        network (L{spegel_testing.netns}) so nodes in their own namespaces reach it.
    @ivar netns: the rig host (network namespace) it runs in, or L{None}; give it that host's
        address as C{address}.
    @ivar access_log: whether the registry logs every request (useful when debugging a pull).
    """

    base_dir: str = field(factory=lambda: tempfile.mkdtemp(prefix="spegel-registry-"))
    port: int = field(factory=free_port)
    address: str = "127.0.0.1"
    name: str = "registry"
    netns: Host | None = None
    access_log: bool = True
    _process: ManagedProcess | None = field(default=None, init=False)

    @property
    def host(self) -> str:
        """
        C{<address>:<port>}: the registry part of image references, and the C{ns} spegel sees.
        """
        return f"{self.address}:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    @property
    def storage_dir(self) -> str:
        return os.path.join(self.base_dir, "storage")

    @property
    def log_path(self) -> str:
        return os.path.join(self.base_dir, "registry.log")

    def ref(self, repo: str, tag_or_digest: str) -> str:
        """
        The image reference C{<address>:<port>/<repo>:<tag>} (or C{@<digest>}).
        """
        separator = "@" if ":" in tag_or_digest else ":"
        return f"{self.host}/{repo}{separator}{tag_or_digest}"

    def start(self, timeout: float = 20.0) -> None:
        """
        Start serving (on the same port and storage as before, if started before) and wait until
        C{GET /v2/} answers 200.
        """
        os.makedirs(self.storage_dir, exist_ok=True)
        config_path = os.path.join(self.base_dir, "config.yml")
        with open(config_path, "w") as f:
            f.write(
                _CONFIG.format(
                    storage=self.storage_dir,
                    address=self.address,
                    port=self.port,
                    access_log_disabled="false" if self.access_log else "true",
                )
            )
        args = [DOCKER_REGISTRY, "serve", config_path]
        self._process = ManagedProcess(
            name=self.name, args=self.netns.command(args) if self.netns is not None else args, log_path=self.log_path
        )
        self._process.start()
        wait_for(self._answers, timeout=timeout, what=f"{self.name} on {self.url}", process=self._process)

    def _answers(self) -> bool:
        try:
            status, _, _ = self.request("GET", "/v2/", timeout=1)
        except OSError:
            return False
        return status == 200

    def stop(self, timeout: float = 10.0) -> None:
        """
        Stop serving; the storage is kept.
        """
        if self._process is not None:
            self._process.stop(timeout)

    def kill(self) -> None:
        if self._process is not None:
            self._process.kill()

    def cleanup(self) -> None:
        """
        Kill the registry and delete its directory.
        """
        self.kill()
        shutil.rmtree(self.base_dir, ignore_errors=True)

    def log_tail(self, lines: int = 40) -> str:
        if self._process is None:
            return f"---- {self.name}: never started ----"
        return self._process.log_tail(lines)

    def request(
        self,
        method: str,
        path: str,
        *,
        body: bytes | Blob | None = None,
        headers: dict[str, str] | None = None,
        timeout: float = 60.0,
    ) -> tuple[int, dict[str, str], bytes]:
        """
        One HTTP request to the registry; a L{Blob} body is streamed from its file.

        @return: status, headers (lower-cased names), body.
        """
        connection = http.client.HTTPConnection(self.address, self.port, timeout=timeout, blocksize=1 << 20)
        try:
            headers = dict(headers or {})
            if isinstance(body, Blob):
                headers["Content-Length"] = str(body.size)
                with body.open() as f:
                    connection.request(method, path, body=f, headers=headers)
                    response = connection.getresponse()
            else:
                if body is not None:
                    headers["Content-Length"] = str(len(body))
                connection.request(method, path, body=body, headers=headers)
                response = connection.getresponse()
            data = response.read()
            return response.status, {k.lower(): v for k, v in response.getheaders()}, data
        finally:
            connection.close()

    def has_blob(self, repo: str, digest: str) -> bool:
        status, _, _ = self.request("HEAD", f"/v2/{repo}/blobs/{digest}")
        return status == 200

    def push_blob(self, repo: str, blob: Blob) -> None:
        """
        Upload one blob (monolithic upload: POST, then PUT with the digest), unless present.
        """
        if self.has_blob(repo, blob.digest):
            return
        status, headers, data = self.request("POST", f"/v2/{repo}/blobs/uploads/")
        if status != 202:
            raise RegistryError(f"starting upload of {blob.digest} to {repo}: {status} {data[:500]!r}")
        location = urllib.parse.urlsplit(headers["location"])
        query = location.query + ("&" if location.query else "") + urllib.parse.urlencode({"digest": blob.digest})
        status, _, data = self.request(
            "PUT",
            f"{location.path}?{query}",
            body=blob,
            headers={"Content-Type": "application/octet-stream"},
        )
        if status != 201:
            raise RegistryError(f"uploading {blob.digest} to {repo}: {status} {data[:500]!r}")

    def push_manifest(self, repo: str, reference: str, manifest: Blob) -> None:
        """
        PUT a manifest or index under C{reference} (a tag or its digest).
        """
        status, headers, data = self.request(
            "PUT",
            f"/v2/{repo}/manifests/{reference}",
            body=manifest.read(),
            headers={"Content-Type": manifest.media_type},
        )
        if status != 201:
            raise RegistryError(f"putting manifest {manifest.digest} as {repo}:{reference}: {status} {data[:500]!r}")
        if headers.get("docker-content-digest") not in (None, manifest.digest):
            raise RegistryError(
                f"registry stored {repo}:{reference} as {headers['docker-content-digest']}, not {manifest.digest}"
            )

    def push_image(self, repo: str, tag: str | None, image: TestImage) -> str:
        """
        Push every blob of C{image}, its manifests by digest, and its root under C{tag} (only by
        digest when C{tag} is L{None}).

        @return: the reference to pull (C{127.0.0.1:<port>/<repo>:<tag>}, or C{@<digest>}).
        """
        for blob in (*image.layers, *image.configs):
            self.push_blob(repo, blob)
        if image.is_index:
            for manifest in image.manifests:
                self.push_manifest(repo, manifest.digest, manifest)
        self.push_manifest(repo, tag if tag is not None else image.digest, image.root)
        return self.ref(repo, tag if tag is not None else image.digest)

    def manifest_digest(self, repo: str, reference: str) -> str:
        """
        The digest the registry reports for C{repo}:C{reference}.

        @raise RegistryError: when it does not have it.
        """
        status, headers, _ = self.request(
            "HEAD", f"/v2/{repo}/manifests/{reference}", headers={"Accept": ", ".join(sorted(MANIFEST_MEDIA_TYPES))}
        )
        if status != 200:
            raise RegistryError(f"HEAD {repo}:{reference}: {status}")
        return headers["docker-content-digest"]
