"""Where a page-protected hit's critical path goes: `request()`, taking all messages but the
last, and the last one (which releases the transfer's write watches and sources, see
docs/pipeline.md). One 256 MiB source in 4 MiB chunks, every chunk pre-encrypted; medians
of 7 requests. Run it once per write tracker:

    PIPELLM_WRITE_TRACKER=mprotect python bench/release_split.py
    PIPELLM_WRITE_TRACKER=uffd python bench/release_split.py
"""

from __future__ import annotations

import statistics
import time

import numpy as np

import pipellm

KEY = pipellm.SessionKey.generate()
CHUNK = 4 << 20
SIZE = 256 << 20


def main() -> None:
    n = SIZE // CHUNK
    src = np.random.default_rng(1).integers(0, 256, SIZE, dtype=np.uint8)
    with pipellm.Pipeline(
        KEY,
        slots=n,
        chunk_bytes=CHUNK,
        workers=2,
        validation="protect",
        max_staging_bytes=n * CHUNK,
    ) as pipe:
        request, rest, last = [], [], []
        for i in range(7):
            pipe.predict([src])
            assert pipe.wait_idle()
            assert pipe.stats()["chunks_pre_encrypted"] == (i + 1) * n
            time.sleep(0.005)
            t0 = time.perf_counter()
            t = pipe.request(src)
            t1 = time.perf_counter()
            msgs = [next(t) for _ in range(n - 1)]
            t2 = time.perf_counter()
            msgs.append(next(t))
            t3 = time.perf_counter()
            request.append(t1 - t0)
            rest.append(t2 - t1)
            last.append(t3 - t2)
            del msgs, t
        assert pipe.stats()["hits"] == 7 * n
    print(
        f"{pipellm.write_tracker()}: request() {statistics.median(request) * 1e3:.2f} ms,"
        f" {n - 1} messages {statistics.median(rest) * 1e3:.2f} ms, the last one (release)"
        f" {statistics.median(last) * 1e3:.2f} ms"
    )


if __name__ == "__main__":
    main()
