"""Run under the interposer by test_cc.py: D2H copies in the driver's pattern, through the
process's libcrypto (ctypes), into a HostPool registered with `pipellm.cc.receive`. Prints a
JSON report; every check is recomputed here from the bytes read back."""

from __future__ import annotations

import ctypes
import json
import os

import pipellm
import pipellm.cc as cc
from pipellm._core import _buffer_span

lib = ctypes.CDLL("libcrypto.so.3")  # the interposer, under pipellm run
vp, cp, ip = ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int
lib.EVP_CIPHER_CTX_new.restype = vp
lib.EVP_aes_256_gcm.restype = vp
for name in ("EVP_EncryptInit_ex", "EVP_DecryptInit_ex"):
    getattr(lib, name).argtypes = [vp, vp, vp, cp, cp]
for name in ("EVP_EncryptUpdate", "EVP_DecryptUpdate"):
    getattr(lib, name).argtypes = [vp, vp, ctypes.POINTER(ip), vp, ip]
for name in ("EVP_EncryptFinal_ex", "EVP_DecryptFinal_ex"):
    getattr(lib, name).argtypes = [vp, vp, ctypes.POINTER(ip)]
lib.EVP_CIPHER_CTX_ctrl.argtypes = [vp, ip, ip, vp]
GET_TAG, SET_TAG = 0x10, 0x11

key = os.urandom(32)
enc = lib.EVP_CIPHER_CTX_new()
dec = lib.EVP_CIPHER_CTX_new()
assert lib.EVP_EncryptInit_ex(enc, lib.EVP_aes_256_gcm(), None, key, None) == 1
assert lib.EVP_DecryptInit_ex(dec, lib.EVP_aes_256_gcm(), None, key, None) == 1

pool = pipellm.HostPool(8 << 20)
cc.receive(pool)
view = _buffer_span(pool)[0]
# A second registration is refused, and leaves the first one's loan in place (the pool's view
# stays refused to write watches).
try:
    cc.receive(pool)
    report_second = "accepted"
except ValueError as e:
    report_second = str(e)
still_lent = any(
    k == "lent pool" and a == view and mine for a, _, k, mine in pipellm._core._space_entries()
)
scratch = ctypes.create_string_buffer(16)


def d2h(data: bytes, off: int, tamper: bool = False) -> int:
    """The device encrypts `data` (here: the CPU, standing in), the driver decrypts it into
    the pool at `off`. Returns DecryptFinal's answer."""
    iv = os.urandom(12)
    n = ip(0)
    ct = ctypes.create_string_buffer(len(data))
    src = ctypes.create_string_buffer(data, len(data))
    tag = ctypes.create_string_buffer(16)
    lib.EVP_EncryptInit_ex(enc, None, None, None, iv)
    lib.EVP_EncryptUpdate(enc, ct, ctypes.byref(n), src, len(data))
    lib.EVP_EncryptFinal_ex(enc, scratch, ctypes.byref(n))
    lib.EVP_CIPHER_CTX_ctrl(enc, GET_TAG, 16, tag)
    if tamper:
        ct[len(data) // 2] = bytes([ct.raw[len(data) // 2] ^ 1])
    assert lib.EVP_DecryptInit_ex(dec, None, None, None, iv) == 1
    assert lib.EVP_CIPHER_CTX_ctrl(dec, SET_TAG, 16, tag) == 1
    assert lib.EVP_DecryptUpdate(dec, view + off, ctypes.byref(n), ct, len(data)) == 1
    ctypes.memset(ct, 0x5A, len(data))  # the driver reuses its bounce buffer
    return int(lib.EVP_DecryptFinal_ex(dec, scratch, ctypes.byref(n)))


report: dict[str, object] = {}
mv = memoryview(pool)
plan = [(0, 1 << 20), (1 << 20, 1 << 20), ((2 << 20) + 100, 300_001), ((3 << 20), 4096)]


def exact_rounds(rounds: int, mv: memoryview) -> int:
    """Runs `plan` `rounds` times; counts the chunks that succeeded and read back exact
    through `mv` (the pool)."""
    exact = 0
    for _round in range(rounds):
        for off, n in plan:
            data = os.urandom(n)
            rc = d2h(data, off)
            exact += rc == 1 and bytes(mv[off : off + n]) == data
    return exact


report["exact"] = exact_rounds(6, mv)
report["expected"] = 6 * len(plan)

# Now the extension installs its own fault handler (a pipeline validating by page
# protection), after the interposer's: faults on gated pages reach it first and must be
# passed on to the interposer's, which waits for the plaintext.
import numpy as np  # noqa: E402

other = np.zeros(4 << 20, dtype=np.uint8)
with pipellm.Pipeline(
    pipellm.SessionKey(os.urandom(32)), slots=4, chunk_bytes=1 << 20, validation="protect"
) as pipe:
    pipe.predict([other])
    # Once the chunks are encrypted, they were armed: the extension's handler is installed.
    assert pipe.wait_idle(), "the pipeline's workers did not finish"
    assert pipe.stats()["chunks_pre_encrypted"] == 4, pipe.stats()
    other[12345] = 1  # a write fault the extension's handler claims
    report["exact_chained"] = exact_rounds(3, mv)
report["expected_chained"] = 3 * len(plan)

# An application write right after a copy returns lands after the deferred decryption.
data = os.urandom(1 << 20)
ok = d2h(data, 4 << 20) == 1
pool.write(4 << 20, b"W" * 100)
got = bytes(mv[4 << 20 : (4 << 20) + (1 << 20)])
report["write_after"] = ok and got[:100] == b"W" * 100 and got[100:] == data[100:]

before = cc.status()["stats"]
# A tampered chunk: the copy fails, its destination holds zeroes, the pipeline stops.
data = os.urandom(1 << 20)
report["tamper_rc"] = d2h(data, 5 << 20, tamper=True)
report["tamper_zeroed"] = bytes(mv[5 << 20 : (5 << 20) + (1 << 20)]) == bytes(1 << 20)
# After the stop, copies are decrypted by OpenSSL, still exact.
data = os.urandom(1 << 20)
report["after_stop"] = d2h(data, 6 << 20) == 1 and bytes(mv[6 << 20 : 7 << 20]) == data
stats = cc.status()["stats"]
assert isinstance(stats, dict) and isinstance(before, dict)
report["stats"] = stats
report["second_receive"] = report_second
report["still_lent"] = still_lent
report["deferred_after_stop"] = stats["d2h_deferred"] - before["d2h_deferred"]
del mv
cc.unreceive(pool)
print(json.dumps(report))
