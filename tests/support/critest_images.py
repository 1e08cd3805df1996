"""The images critest (and kubelet) pull, built here from Debian packages and pushed to a local registry.

shimd's registry mirrors send registry.k8s.io, k8s.gcr.io, gcr.io and docker.io to that registry, so the
clients use the images' public names unchanged. Each image is a stand-in with what critest asserts of it:
- busybox: Debian's dynamically linked busybox, every applet a hard link (a separate program, as in the
  real image, so masked paths and execs behave as there), with the libraries it needs;
- nginx / httpd / hostnet-nginx: a small static HTTP server named like the real one (`pidof nginx`);
- nonewprivs: a setuid-root program printing its effective uid;
- the cri-tools test images: busybox plus a file named after the image (distinct ids), and USER variants.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from tests.support import images as img
from tests.support.images import Entry

REPO = Path(__file__).resolve().parents[2]
CACHE = REPO / ".tools" / "images"
PROGRAMS = Path(__file__).resolve().parent / "programs"
HOST_PROGRAMS = ("/usr/bin/ipcs", "/usr/bin/pgrep")

E2E = "registry.k8s.io/e2e-test-images"
CRI_TOOLS = "gcr.io/k8s-staging-cri-tools"
# The registries whose names the clients use; shimd mirrors each of them to the local registry.
MIRRORED = ("registry.k8s.io", "k8s.gcr.io", "gcr.io", "docker.io")

PASSWD = (b"root:x:0:0:root:/root:/bin/sh\n"
          b"daemon:x:1:1:daemon:/usr/sbin:/bin/false\n"
          b"bin:x:2:2:bin:/bin:/bin/false\n"
          b"www-data:x:33:33:www-data:/var/www:/bin/false\n"
          b"user1:x:5001:5001::/home/user1:/bin/sh\n"
          b"user2:x:5002:5002::/home/user2:/bin/sh\n"
          b"nobody:x:65534:65534:nobody:/home:/bin/false\n")
GROUP = (b"root:x:0:\n"
         b"daemon:x:1:\n"
         b"bin:x:2:\n"
         b"wheel:x:10:root\n"
         b"www-data:x:33:\n"
         b"users:x:100:\n"
         b"user1:x:5001:\n"
         b"user2:x:5002:\n"
         b"group1:x:5003:user1,user2\n"
         b"nogroup:x:65534:\n")


def _run(argv: list[str], cwd: Path | None = None) -> None:
    subprocess.run(argv, cwd=cwd, check=True, capture_output=True, timeout=300)


@cache
def _debian_busybox() -> Path:
    """Debian's dynamic busybox, fetched as a package (it conflicts with busybox-static, so not installed)."""
    root = CACHE / "busybox-deb"
    binary = root / "bin" / "busybox"
    if binary.is_file():
        return binary
    CACHE.mkdir(parents=True, exist_ok=True)
    debs = CACHE / "debs"
    shutil.rmtree(debs, ignore_errors=True)
    debs.mkdir()
    _run(["apt-get", "download", "busybox"], cwd=debs)
    deb = next(debs.glob("busybox_*.deb"))
    tmp = root.with_suffix(".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    _run(["dpkg-deb", "-x", str(deb), str(tmp)])
    shutil.rmtree(root, ignore_errors=True)
    tmp.rename(root)
    return binary


@cache
def _program(name: str) -> bytes:
    """A static build of tests/support/programs/NAME.c."""
    CACHE.mkdir(parents=True, exist_ok=True)
    out = CACHE / name
    src = PROGRAMS / f"{name}.c"
    if not out.is_file() or out.stat().st_mtime < src.stat().st_mtime:
        _run(["gcc", "-static", "-O2", "-o", str(out), str(src)])
    return out.read_bytes()


def _shared_libs(binary: Path) -> list[str]:
    """Absolute paths of the libraries `binary` loads (ldd's resolution on this host)."""
    out = subprocess.run(["ldd", str(binary)], check=True, capture_output=True, text=True, timeout=30).stdout
    libs = []
    for line in out.splitlines():
        parts = line.split()
        path = parts[2] if "=>" in parts and len(parts) > 2 else parts[0]
        if path.startswith("/"):
            libs.append(path)
    return libs


def _dirs(*paths: str) -> list[Entry]:
    return [Entry("dir", p, mode=0o755) for p in paths]


@cache
def busybox_layer() -> img.Layer:
    binary = _debian_busybox()
    applets = subprocess.run([str(binary), "--list"], check=True, capture_output=True, text=True,
                             timeout=30).stdout.split()
    entries = _dirs("bin", "etc", "lib", "lib/x86_64-linux-gnu", "lib64", "home", "proc", "sys", "dev",
                    "var", "var/run", "var/www", "usr", "usr/bin", "usr/sbin", "usr/local", "usr/local/bin")
    entries += [Entry("dir", "tmp", mode=0o1777), Entry("dir", "root", mode=0o700)]
    entries.append(Entry("file", "bin/busybox", binary.read_bytes(), mode=0o755))
    entries += [Entry("hardlink", f"bin/{a}", target="bin/busybox") for a in sorted(set(applets))
                if a != "busybox" and "/" not in a]
    # Debian's busybox has no ipcs or pgrep applet (critest runs `ipcs -m` and `pgrep sleep`): the host's.
    libs = set(_shared_libs(binary))
    for program in HOST_PROGRAMS:
        entries.append(Entry("file", program.lstrip("/"), Path(program).read_bytes(), mode=0o755))
        libs.update(_shared_libs(Path(program)))
    for lib in sorted(libs):
        entries.append(Entry("file", lib.lstrip("/"), Path(lib).resolve().read_bytes(), mode=0o755))
    entries += [Entry("file", "etc/passwd", PASSWD), Entry("file", "etc/group", GROUP),
                Entry("file", "etc/hostname", b"busybox\n")]
    return img.make_layer(entries)


def _image(*extra: list[Entry], cmd: list[str] | None = None, config: dict[str, object] | None = None
           ) -> img.Manifest:
    layers = [busybox_layer()] + [img.make_layer(e) for e in extra if e]
    return img.make_image(layers, cmd=cmd or ["sh"], extra_config=config)


def _web_server(name: str, port: int, pidfile: str = "") -> img.Manifest:
    """A server named `name` (its process name) answering 200 on `port`. Its last argument puts "master
    process" in its command line, where critest looks for nginx's master."""
    path = f"usr/sbin/{name}"
    cmd = [f"/{path}", str(port), pidfile or "-", f"{name}: master process"]
    return _image([Entry("file", path, _program("webserver"), mode=0o755)], cmd=cmd)


def _user_image(user: str, extra: list[Entry] | None = None) -> img.Manifest:
    return _image(extra or [], config={"User": user})


@dataclass(frozen=True)
class Pushed:
    """Public reference -> digest of the manifest pushed for it."""

    digests: dict[str, str]


def catalogue() -> dict[str, img.Manifest]:
    """Every public reference the conformance clients pull, and the image behind it."""
    same = _image([Entry("file", "test-image-tags", b"tags\n")])
    busybox = _image()
    pause = img.make_image([img.make_layer([Entry("file", "pause", _program("pause"), mode=0o755)])],
                           cmd=["/pause"])
    default_user = b"default-user:x:1000:1000::/home/default-user:/bin/sh\n"
    predefined = _image([Entry("file", "etc/passwd", PASSWD + default_user),
                         Entry("file", "etc/group", GROUP + b"default-user:x:1000:\n"
                               b"group-defined-in-image:x:50000:default-user\n")], config={"User": "1000"})
    out: dict[str, img.Manifest] = {
        f"{E2E}/busybox:1.29-2": busybox,
        f"{E2E}/nginx:1.14-2": _web_server("nginx", 80, "/var/run/nginx.pid"),
        f"{E2E}/httpd:2.4.39-4": _web_server("httpd", 80),
        f"{E2E}/nonewprivs:1.3": _image([Entry("file", "usr/local/bin/nnp", _program("euid"), mode=0o4755)],
                                        cmd=["/usr/local/bin/nnp"]),
        "registry.k8s.io/pause:3.9": pause,
        "registry.k8s.io/pause:3.10": pause,
        "registry.k8s.io/pause:3.10.1": pause,
        f"{CRI_TOOLS}/hostnet-nginx-amd64:latest": _web_server("nginx", 12003),
        f"{CRI_TOOLS}/test-image-predefined-group:latest": predefined,
        f"{CRI_TOOLS}/test-image-user-uid:latest": _user_image("1002"),
        f"{CRI_TOOLS}/test-image-user-username:latest": _user_image("www-data"),
        f"{CRI_TOOLS}/test-image-user-uid-group:latest": _user_image("1003:users"),
        f"{CRI_TOOLS}/test-image-user-username-group:latest": _user_image("www-data:users"),
        "docker.io/library/busybox:latest": busybox,
        "docker.io/library/busybox:1.35": busybox,
    }
    for name in ("test-image-1", "test-image-2", "test-image-3", "test-image-latest"):
        out[f"{CRI_TOOLS}/{name}:latest"] = _image([Entry("file", name, f"{name}\n".encode())])
    out[f"{CRI_TOOLS}/test-image-tag:test"] = _image([Entry("file", "test-image-tag", b"test\n")])
    out[f"{CRI_TOOLS}/test-image-tag:all"] = _image([Entry("file", "test-image-tag", b"all\n")])
    for tag in ("1", "2", "3"):
        out[f"{CRI_TOOLS}/test-image-tags:{tag}"] = same
    return out


def mirror_path(reference: str) -> tuple[str, str]:
    """("repository on the mirror", "tag") for a public reference: the mirror serves the registry's paths."""
    name, tag = reference.rsplit(":", 1)
    host, repo = name.split("/", 1)
    if host == "docker.io" and "/" not in repo:
        repo = f"library/{repo}"
    return repo, tag


def push_all(client: img.PushClient) -> Pushed:
    digests = {}
    for ref, manifest in catalogue().items():
        repo, tag = mirror_path(ref)
        client.push_image(repo, tag, manifest)
        digests[ref] = manifest.digest
    return Pushed(digests)


def mirrors_toml(registry_url: str) -> str:
    """shimd config sending every mirrored registry to `registry_url` (plain HTTP)."""
    return "".join(f'[registries.hosts."{host}"]\nmirrors = ["{registry_url}"]\n' for host in MIRRORED)
