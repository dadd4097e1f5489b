"""Every process of a program run under `pipellm run` gets the interposer: children started by
fork, by fork+exec (Python or the C driver emulator), by multiprocessing's spawn and forkserver
start methods, and Ray workers, on a cluster whose nodes were started under `pipellm run` or
that a driver under `pipellm run` started itself. Each parent is launched with the real
`pipellm run` command; each child reports `pipellm.cc.status()` from inside and makes its own
driver-like calls through its libcrypto (ctypes AES-256-GCM, or the emulator), so the counters
checked are the child's and must have grown there."""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pipellm import cc

ROOT = Path(__file__).resolve().parent.parent
EMULATOR_ARGS = ["link", "check", "4"]
MESSAGES = 48  # what one report() of the child script encrypts (CHILD: MESSAGES)
_console = Path(sys.executable).with_name("pipellm")
# The launcher under test: the installed console script, else the same entry point by module.
PIPELLM = [str(_console)] if _console.is_file() else [sys.executable, "-m", "pipellm.cli"]

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux only")

CHILD = r'''
"""Written out and run by test_cc_children.py. report() encrypts MESSAGES predictable chunks
as the CUDA driver does (one AES-256-GCM context, Hopper-style masked-counter IVs, one Update
of a 256 KiB source per message, Final, GET_TAG) through this process's libcrypto, and says
what pipellm.cc.status() counted meanwhile; the other modes start children that do it."""

from __future__ import annotations

import ctypes
import hashlib
import json
import multiprocessing
import os
import subprocess
import sys
from typing import Any

import pipellm.cc as cc

CHUNK = 256 << 10
LAYERS = 3
MESSAGES = 48


def encrypt() -> tuple[str, bool]:
    """SHA-256 of every ciphertext and tag (equal with and without the interposer), and
    whether the libcrypto.so.3 this process got is the interposer."""
    lib = ctypes.CDLL("libcrypto.so.3")  # the interposer, where it is loaded
    vp, cp, ip = ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int
    lib.EVP_CIPHER_CTX_new.restype = vp
    lib.EVP_CIPHER_CTX_free.argtypes = [vp]
    lib.EVP_aes_256_gcm.restype = vp
    lib.EVP_EncryptInit_ex.argtypes = [vp, vp, vp, cp, cp]
    lib.EVP_EncryptUpdate.argtypes = [vp, vp, ctypes.POINTER(ip), vp, ip]
    lib.EVP_EncryptFinal_ex.argtypes = [vp, vp, ctypes.POINTER(ip)]
    lib.EVP_CIPHER_CTX_ctrl.argtypes = [vp, ip, ip, vp]
    key = hashlib.sha256(b"key").digest()
    mask = hashlib.sha256(b"iv mask").digest()[:12]
    layers = [
        ctypes.create_string_buffer(hashlib.sha256(bytes([i])).digest() * (CHUNK // 32), CHUNK)
        for i in range(LAYERS)
    ]
    bounce = ctypes.create_string_buffer(CHUNK + 16)
    tag = ctypes.create_string_buffer(16)
    n = ip(0)
    ctx = lib.EVP_CIPHER_CTX_new()
    assert lib.EVP_EncryptInit_ex(ctx, lib.EVP_aes_256_gcm(), None, key, None) == 1
    h = hashlib.sha256()
    for m in range(MESSAGES):
        counter = (m + 1).to_bytes(4, "little") + bytes(8)
        iv = bytes(a ^ b for a, b in zip(counter, mask, strict=True))
        ok = lib.EVP_EncryptInit_ex(ctx, None, None, None, iv) == 1
        ok &= lib.EVP_EncryptUpdate(ctx, bounce, ctypes.byref(n), layers[m % LAYERS], CHUNK) == 1
        ok &= n.value == CHUNK
        ok &= lib.EVP_EncryptFinal_ex(ctx, ctypes.byref(bounce, CHUNK), ctypes.byref(n)) == 1
        ok &= lib.EVP_CIPHER_CTX_ctrl(ctx, 0x10, 16, tag) == 1  # GET_TAG
        assert ok, f"message {m} failed"
        h.update(bounce.raw[:CHUNK])
        h.update(tag.raw)
    lib.EVP_CIPHER_CTX_free(ctx)
    return h.hexdigest(), hasattr(lib, "pipellm_cc_active")


def report() -> dict[str, Any]:
    before = cc.status()
    digest, interposer = encrypt()
    after = cc.status()
    b, a = before["stats"], after["stats"]
    return {
        "pid": os.getpid(),
        "loaded": after["loaded"],
        "active": after["active"],
        "digest": digest,
        "libcrypto_is_interposer": interposer,
        "before": b,
        "grew": {k: v - b[k] for k, v in a.items() if v != b[k]},
    }


def in_fork() -> dict[str, Any]:
    """report() from a child forked here, continuing in Python (no exec)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.close(r)
            with os.fdopen(w, "w") as f:
                f.write(json.dumps(report()))
            code = 0
        finally:
            os._exit(code)
    os.close(w)
    with os.fdopen(r) as f:
        data = f.read()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0 and data, "the forked child failed"
    return json.loads(data)


def fork_while_watched(forks: int) -> dict[str, Any]:
    """Forks `forks` times while a thread encrypts chunks of a watched buffer (the
    interposer's workers pre-encrypt them, each arming the chunk's watch under the watched
    ranges' lock); each child unwatches the buffer and exits. A lock some thread held at the
    fork would never be released in the child: it hangs, is killed and counted."""
    import threading
    import time

    chunks = 32
    buf = bytearray(hashlib.sha256(b"w").digest() * (chunks * CHUNK // 32))
    cc.watch(buf)
    lib = ctypes.CDLL("libcrypto.so.3")
    vp, ip = ctypes.c_void_p, ctypes.c_int
    lib.EVP_CIPHER_CTX_new.restype = vp
    lib.EVP_aes_256_gcm.restype = vp
    lib.EVP_EncryptInit_ex.argtypes = [vp, vp, vp, ctypes.c_char_p, ctypes.c_char_p]
    lib.EVP_EncryptUpdate.argtypes = [vp, vp, ctypes.POINTER(ip), vp, ip]
    lib.EVP_EncryptFinal_ex.argtypes = [vp, vp, ctypes.POINTER(ip)]
    lib.EVP_CIPHER_CTX_ctrl.argtypes = [vp, ip, ip, vp]
    base = ctypes.addressof((ctypes.c_char * len(buf)).from_buffer(buf))
    stop = threading.Event()
    sent = [0]

    def copy() -> None:  # one copy of the whole buffer after another, as the driver does
        ctx = lib.EVP_CIPHER_CTX_new()
        lib.EVP_EncryptInit_ex(ctx, lib.EVP_aes_256_gcm(), None, b"k" * 32, None)
        out = ctypes.create_string_buffer(CHUNK + 16)
        tag = ctypes.create_string_buffer(16)
        n = ip(0)
        m = 0
        while not stop.is_set():
            m += 1
            lib.EVP_EncryptInit_ex(ctx, None, None, None, m.to_bytes(4, "little") + bytes(8))
            lib.EVP_EncryptUpdate(ctx, out, ctypes.byref(n), base + (m % chunks) * CHUNK, CHUNK)
            lib.EVP_EncryptFinal_ex(ctx, ctypes.byref(out, CHUNK), ctypes.byref(n))
            lib.EVP_CIPHER_CTX_ctrl(ctx, 0x10, 16, tag)
            sent[0] = m

    t = threading.Thread(target=copy)
    t.start()
    hung = 0
    try:
        for _ in range(forks):
            pid = os.fork()
            if pid == 0:
                try:
                    cc.unwatch(buf)
                finally:
                    os._exit(0)
            deadline = time.monotonic() + 60  # a hang, not a slow machine
            while os.waitpid(pid, os.WNOHANG) == (0, 0):
                if time.monotonic() > deadline:
                    os.kill(pid, 9)
                    os.waitpid(pid, 0)
                    hung += 1
                    break
                time.sleep(0.001)
    finally:
        stop.set()
        t.join()
    cc.unwatch(buf)
    return {"forks": forks, "hung": hung, "sent": sent[0], "stats": cc.status()["stats"]}


def run_child(env: dict[str, str] | None = None) -> dict[str, Any]:
    """report() from `python this-script report`: fork+exec, the environment inherited
    unless `env` is given."""
    p = subprocess.run(
        [sys.executable, __file__, "report"],
        env=env, capture_output=True, text=True, timeout=300, check=False,
    )
    if p.returncode != 0:  # what the child said goes with the failure
        raise RuntimeError(f"report child failed ({p.returncode}):\n{p.stderr}")
    return json.loads(p.stdout)


def main() -> None:
    mode = sys.argv[1]
    if mode == "report":
        out: Any = report()
    elif mode == "fork":  # the parent has made no EVP call before the fork
        child = in_fork()
        out = {"child": child, "parent": report()}
    elif mode == "fork-after-use":  # it has: the interposer has state, and threads
        parent = report()
        out = {"parent": parent, "child": in_fork()}
    elif mode == "fork-while-watched":
        out = fork_while_watched(int(sys.argv[2]))
    elif mode == "exec":
        parent = report()
        out = {"parent": parent, "child": run_child()}
        if len(sys.argv) > 2:  # exec of the C emulator
            p = subprocess.run(
                sys.argv[2:], capture_output=True, text=True, timeout=300, check=False
            )
            out["emulator"] = {"rc": p.returncode, "stdout": p.stdout, "stderr": p.stderr}
    elif mode in ("spawn", "forkserver"):
        parent = report()
        with multiprocessing.get_context(mode).Pool(1) as pool:
            child = pool.apply(report)
        out = {"parent": parent, "child": child}
    elif mode == "clean-env":
        path = {"PATH": os.environ["PATH"]}
        out = {
            "empty": run_child({}),
            "path_only": run_child(path),
            "no_preload": run_child({k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}),
            "rebuilt": run_child(cc.environment(path)),
        }
    else:
        raise SystemExit(f"unknown mode {mode}")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
'''

RAY_DRIVER = r'''
"""Written out and run by test_cc_children.py: a Ray driver whose task reports, from inside a
Ray worker, pipellm.cc.status() around its own calls (the child script's report()) and runs
the driver emulator as a subprocess of the worker. Prints one JSON line, last."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from typing import Any

import ray

CHILD_DIR, MODE, ADDRESS, EMULATOR = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]


@ray.remote(num_cpus=1)
def probe(emulator: list[str]) -> dict[str, Any]:
    sys.path.insert(0, CHILD_DIR)
    import cc_child

    r = cc_child.report()
    r["env"] = {k: v for k, v in os.environ.items() if k.startswith(("LD_", "PIPELLM_", "RAY_LD"))}
    if emulator:
        p = subprocess.run(emulator, capture_output=True, text=True, timeout=300, check=False)
        r["emulator"] = {"rc": p.returncode, "stdout": p.stdout, "stderr": p.stderr}
    return r


if MODE == "local":  # this driver starts its own single-node cluster (ADDRESS: a temp dir)
    ray.init(
        num_cpus=1,
        include_dashboard=False,
        object_store_memory=100_000_000,
        _temp_dir=ADDRESS,
        log_to_driver=False,
    )
else:
    ray.init(address=ADDRESS, log_to_driver=False)
try:
    if MODE == "nodes":  # a task on each node, by the custom resource each one has
        deadline = time.monotonic() + 300
        while ray.cluster_resources().get("cc", 0) < 1:  # the second node has joined
            if time.monotonic() > deadline:
                raise TimeoutError(f"the cc node never joined: {ray.cluster_resources()}")
            time.sleep(0.5)
        out: Any = {
            node: ray.get(probe.options(resources={node: 1}).remote([]), timeout=600)
            for node in ("plain", "cc")
        }
    else:
        out = ray.get(probe.remote(EMULATOR), timeout=600)
finally:
    ray.shutdown()
print(json.dumps(out))
'''


def plain_env() -> dict[str, str]:
    """This process's environment without loader settings, interposer options (but where the
    interposer library is, if set) or Ray's settings."""
    return {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("PIPELLM_CC", "LD_", "RAY_")) or k == "PIPELLM_CC_LIB"
    }


@pytest.fixture(scope="module")
def child_script(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("children") / "cc_child.py"
    path.write_text(CHILD)
    return path


@pytest.fixture(scope="module")
def reference(child_script: Path) -> str:
    """The digest of the child's messages with no interposer anywhere (and proof that the
    report tells a plain process apart)."""
    r = run_json([sys.executable, str(child_script), "report"])
    assert r["loaded"] is False and r["grew"] == {}, r
    return str(r["digest"])


@pytest.fixture(scope="module")
def emulator_plain(emulator: Path) -> str:
    """The emulator's digests with no interposer."""
    p = subprocess.run(
        [str(emulator), *EMULATOR_ARGS],
        env=plain_env(), capture_output=True, text=True, timeout=300, check=True,
    )  # fmt: skip
    assert "pipellm-cc" not in p.stderr
    return p.stdout


def run_json(cmd: list[str], env: dict[str, str] | None = None, timeout: int = 300) -> Any:
    """Runs `cmd` and parses the last line of its stdout as JSON."""
    p = subprocess.run(
        cmd,
        env=plain_env() if env is None else env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert p.returncode == 0, f"{cmd} failed ({p.returncode}):\n{p.stdout}\n{p.stderr}"
    return json.loads(p.stdout.strip().splitlines()[-1])


def under_pipellm(script: Path, *args: str) -> Any:
    """`pipellm run --log -- python SCRIPT ARGS...`, from a plain environment."""
    return run_json([*PIPELLM, "run", "--log", "--", sys.executable, str(script), *args])


def assert_counted_its_own(r: dict[str, Any], reference: str, fresh: bool = True) -> None:
    """`r` (a report()) comes from a process with the interposer loaded and active that
    counted the MESSAGES it encrypted itself, with OpenSSL's ciphertexts and tags; `fresh`:
    its counters started at zero (nothing was counted in it before, e.g. by its parent)."""
    assert r["loaded"] is True and r["active"] is True, r
    assert r["libcrypto_is_interposer"] is True and r["digest"] == reference, r
    if fresh:
        assert set(r["before"].values()) == {0}, r
    grew = r["grew"]
    # Every Update on a followed context is a hit or a miss; the first message confirms the key.
    assert grew.get("hits", 0) + grew.get("misses", 0) == MESSAGES, r
    assert grew.get("keys_confirmed") == 1 and "panics" not in grew, r


def emulator_stats(stderr: str) -> dict[str, int]:
    """The counters the interposer logs at exit (`pipellm run --log`)."""
    stats: dict[str, int] = {}
    for line in stderr.splitlines():
        if line.startswith("pipellm-cc: stats "):
            stats = {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", line)}
    return stats


def assert_emulator_interposed(run: dict[str, Any], plain: str) -> None:
    """The emulator ran with the interposer loaded, which followed its channels, and every
    ciphertext and tag was OpenSSL's."""
    assert run["rc"] == 0, run
    assert run["stdout"] == plain, run
    stats = emulator_stats(run["stderr"])
    assert stats, f"the interposer did not report in the emulator: {run['stderr']}"
    assert stats["keys_confirmed"] >= 3, stats  # its three predictable channels
    assert stats["models_rejected"] >= 1, stats  # the random-IV channel
    assert stats["hits"] + stats["misses"] >= 100 and stats["panics"] == 0, stats


def test_the_launcher_loads_the_interposer(child_script: Path, reference: str) -> None:
    assert_counted_its_own(under_pipellm(child_script, "report"), reference)


def test_os_fork_child_continuing_in_python(child_script: Path, reference: str) -> None:
    r = under_pipellm(child_script, "fork")
    # The parent had made no EVP call: the child inherits a clean interposer and counts its
    # own messages...
    assert_counted_its_own(r["child"], reference)
    assert r["child"]["pid"] != r["parent"]["pid"]
    # ... in its own memory: the parent, after the child is done, still starts from zero.
    assert_counted_its_own(r["parent"], reference)


def test_os_fork_after_the_parent_used_it_forwards_everything(
    child_script: Path, reference: str
) -> None:
    # The interposer's worker threads do not survive a fork: a child forked after the parent's
    # first EVP call is still loaded but inactive (exports.rs, in_child_after_fork): it
    # pre-encrypts and serves nothing, and only keeps answering as OpenSSL would for messages
    # it inherited. Its counters stay the parent's; its answers stay right. An exec (next
    # tests) gives a fresh, working interposer again.
    r = under_pipellm(child_script, "fork-after-use")
    assert_counted_its_own(r["parent"], reference)
    child = r["child"]
    assert child["loaded"] is True and child["active"] is False, child
    assert child["digest"] == reference, child
    assert child["grew"] == {}, child  # nothing served, nothing counted
    before = child["before"]  # the parent's counters, as they were at the fork
    assert before["hits"] + before["misses"] == MESSAGES and before["keys_confirmed"] == 1, r


def test_a_fork_while_workers_read_a_watched_range_leaves_the_child_able_to_unwatch(
    child_script: Path,
) -> None:
    """The fork handlers hold every lock a worker takes on its way through a watched chunk,
    so no child inherits one held: each child's unwatch returns."""
    r = under_pipellm(child_script, "fork-while-watched", "200")
    assert r["hung"] == 0, r
    # The path was reached: the workers pre-encrypted watched chunks meanwhile.
    assert r["stats"]["jobs_done"] > 0 and r["stats"]["hits_watched"] > 0, r


def test_fork_exec_python_and_the_emulator(
    child_script: Path, reference: str, emulator: Path, emulator_plain: str
) -> None:
    # subprocess.run([sys.executable, script]) and an exec of the C emulator, both after the
    # parent used the interposer (which makes no difference after an exec).
    r = under_pipellm(child_script, "exec", str(emulator), *EMULATOR_ARGS)
    assert_counted_its_own(r["parent"], reference)
    assert_counted_its_own(r["child"], reference)
    assert r["child"]["pid"] != r["parent"]["pid"]
    assert_emulator_interposed(r["emulator"], emulator_plain)


@pytest.mark.parametrize("method", ["spawn", "forkserver"])
def test_multiprocessing_start_method(child_script: Path, reference: str, method: str) -> None:
    r = under_pipellm(child_script, method)
    assert_counted_its_own(r["parent"], reference)
    assert_counted_its_own(r["child"], reference)  # fresh although the parent used it
    assert r["child"]["pid"] != r["parent"]["pid"]


def test_a_child_with_a_scrubbed_environment_cannot_inherit(
    child_script: Path, reference: str
) -> None:
    # LD_PRELOAD and LD_LIBRARY_PATH are environment variables: a child started with env={}
    # or only PATH runs plain OpenSSL (same answers, no interposer). A launcher that must
    # build its children's environment from scratch can put the interposer back with
    # pipellm.cc.environment(base).
    r = under_pipellm(child_script, "clean-env")
    for case in ("empty", "path_only"):
        assert r[case]["loaded"] is False and r[case]["grew"] == {}, r[case]
        assert r[case]["libcrypto_is_interposer"] is False, r[case]
        assert r[case]["digest"] == reference, r[case]
    assert_counted_its_own(r["rebuilt"], reference)
    # LD_PRELOAD dropped, LD_LIBRARY_PATH kept: a dlopen("libcrypto.so.3") (the CUDA driver's
    # way) still finds the interposer by the library path, but it is not in the process's
    # global scope, where status() looks: half loaded, and reported as not loaded.
    half = r["no_preload"]
    assert half["libcrypto_is_interposer"] is True and half["digest"] == reference, half
    assert half["loaded"] is False, half


def test_environment_undoes_rays_stale_preload_switch() -> None:
    # A raylet that sees RAY_LD_PRELOAD_ON_WORKERS=0 unsets LD_PRELOAD for its workers; every
    # process of a Ray node started without pipellm inherits that value.
    env = cc.environment({"PATH": os.environ["PATH"], "RAY_LD_PRELOAD_ON_WORKERS": "0"})
    assert "RAY_LD_PRELOAD_ON_WORKERS" not in env and env["LD_PRELOAD"]
    kept = cc.environment({"RAY_LD_PRELOAD_ON_WORKERS": "1"})
    assert kept["RAY_LD_PRELOAD_ON_WORKERS"] == "1"


# ---- Ray ------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _pids_naming(text: str) -> list[int]:
    """Processes of this user whose command line contains `text` (a temp dir of ours)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if text.encode() in (entry / "cmdline").read_bytes():
                pids.append(int(entry.name))
        except OSError:
            pass
    return pids


def _ray_temp_dir() -> Path:
    # Short: Ray puts Unix sockets under it (their paths are limited to 107 bytes).
    return Path(tempfile.mkdtemp(prefix="pllm-ray-", dir="/tmp"))


def _ray_env(temp_dir: Path) -> dict[str, str]:
    """The environment of every Ray process of a test: no usage stats, and token
    authentication with a token of the test's own, in its temp dir (left to itself, a Ray
    that has token auth starts a local cluster with a token it writes to ~/.ray/auth_token,
    which every later `ray start` of this user then picks up)."""
    token = temp_dir / "auth_token"
    if not token.exists():
        token.write_text(secrets.token_hex(32))
        token.chmod(0o600)
    return dict(
        plain_env(),
        RAY_USAGE_STATS_ENABLED="0",
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN_PATH=str(token),
    )


class RayNodes:
    """Ray nodes on this machine started by one test with `ray start --block`: each launcher
    stays in the foreground, its node's processes fate-share with it, and SIGTERM takes the
    node down. Stopped by pid (and, for anything that outlived its launcher, by our temp dir
    in the command line): `ray stop --force` would kill every Ray process of this user on the
    machine, other people's clusters included."""

    def __init__(self, temp_dir: Path) -> None:
        self.temp_dir = temp_dir
        self.port = _free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.ray = shutil.which("ray", path=str(Path(sys.executable).parent)) or "ray"
        self.procs: list[tuple[subprocess.Popen[bytes], Path]] = []

    def env(self, **extra: str) -> dict[str, str]:
        return dict(_ray_env(self.temp_dir), **extra)

    def start(self, *args: str, interposed: bool, **extra_env: str) -> None:
        cmd = [
            self.ray, "start", "--block", "--disable-usage-stats", "--num-cpus=1",
            "--node-ip-address=127.0.0.1", "--object-store-memory=100000000",
            f"--dashboard-agent-listen-port={_free_port()}", *args,
        ]  # fmt: skip
        if interposed:
            cmd = [*PIPELLM, "run", "--log", "--", *cmd]
        log = self.temp_dir / f"node{len(self.procs)}.log"
        with log.open("wb") as out:
            p = subprocess.Popen(
                cmd, env=self.env(**extra_env), stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip
        self.procs.append((p, log))

    def start_head(self, *args: str, interposed: bool, **extra_env: str) -> None:
        self.start(
            "--head", f"--port={self.port}", "--include-dashboard=false",
            f"--temp-dir={self.temp_dir}", *args, interposed=interposed, **extra_env,
        )  # fmt: skip
        self.wait_ready()

    def join(self, *args: str, interposed: bool, **extra_env: str) -> None:
        self.start(f"--address={self.address}", *args, interposed=interposed, **extra_env)

    def wait_ready(self) -> None:
        """Until `ray status` answers (the head's GCS and raylet are up)."""
        deadline = time.monotonic() + 300  # a limit on waiting, not an assertion on speed
        while True:
            for p, log in self.procs:
                assert p.poll() is None, f"ray start exited ({p.returncode}):\n{log.read_text()}"
            try:
                s = subprocess.run(
                    [self.ray, "status", f"--address={self.address}"],
                    env=self.env(), capture_output=True, timeout=120, check=False,
                )  # fmt: skip
                if s.returncode == 0:
                    return
            except subprocess.TimeoutExpired:
                pass
            assert time.monotonic() < deadline, "the Ray head never came up"
            time.sleep(1)

    def stop(self) -> None:
        for p, _ in reversed(self.procs):  # worker nodes first, the head last
            if p.poll() is None:
                p.terminate()
            try:
                p.wait(timeout=120)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        for pid in _pids_naming(str(self.temp_dir)):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


@pytest.fixture
def ray_nodes(ray: str) -> Iterator[RayNodes]:
    nodes = RayNodes(_ray_temp_dir())
    try:
        yield nodes
    finally:
        nodes.stop()
        shutil.rmtree(nodes.temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def ray_driver(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("ray") / "ray_driver.py"
    path.write_text(RAY_DRIVER)
    return path


@pytest.mark.ray
def test_ray_worker_inherits_from_a_raylet_started_under_pipellm_run(
    ray_nodes: RayNodes,
    ray_driver: Path,
    child_script: Path,
    reference: str,
    emulator: Path,
    emulator_plain: str,
) -> None:
    ray_nodes.start_head(interposed=True)
    # The driver runs plain: the worker gets the interposer from the raylet, not from it.
    r = run_json(
        [sys.executable, str(ray_driver), str(child_script.parent), "cluster",
         ray_nodes.address, str(emulator), *EMULATOR_ARGS],
        env=ray_nodes.env(), timeout=600,
    )  # fmt: skip
    assert_counted_its_own(r, reference, fresh=False)
    assert_emulator_interposed(r["emulator"], emulator_plain)


@pytest.mark.ray
def test_ray_every_node_needs_its_own_pipellm_run(
    ray_nodes: RayNodes, ray_driver: Path, child_script: Path, reference: str
) -> None:
    # A plain head and a second node started under pipellm run; the second one with the
    # RAY_LD_PRELOAD_ON_WORKERS=0 that every process of a plain Ray node inherits (without
    # the launcher removing it, its raylet would unset LD_PRELOAD for its workers).
    ray_nodes.start_head('--resources={"plain": 1}', interposed=False)
    ray_nodes.join('--resources={"cc": 1}', interposed=True, RAY_LD_PRELOAD_ON_WORKERS="0")
    r = run_json(
        [sys.executable, str(ray_driver), str(child_script.parent), "nodes", ray_nodes.address],
        env=ray_nodes.env(), timeout=600,
    )  # fmt: skip
    assert_counted_its_own(r["cc"], reference, fresh=False)
    assert r["plain"]["loaded"] is False and r["plain"]["grew"] == {}, r["plain"]
    assert r["plain"]["libcrypto_is_interposer"] is False, r["plain"]
    assert r["plain"]["digest"] == reference


@pytest.mark.ray
def test_ray_cluster_started_by_a_driver_under_pipellm_run(
    ray: str, ray_driver: Path, child_script: Path, reference: str, emulator: Path,
    emulator_plain: str,
) -> None:  # fmt: skip
    # ray.init() with no address starts the node's processes from the driver (a single-node
    # serving engine with Ray workers does this): they, and so the workers, inherit from it.
    temp = _ray_temp_dir()
    try:
        r = run_json(
            [*PIPELLM, "run", "--log", "--", sys.executable, str(ray_driver),
             str(child_script.parent), "local", str(temp), str(emulator), *EMULATOR_ARGS],
            env=_ray_env(temp), timeout=600,
        )  # fmt: skip
    finally:
        for pid in _pids_naming(str(temp)):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        shutil.rmtree(temp, ignore_errors=True)
    assert_counted_its_own(r, reference, fresh=False)
    assert_emulator_interposed(r["emulator"], emulator_plain)
