"""Concurrent load on a real server (issue 8): the toy bundle only (the module's own server, same setup as
``test_reliability_bad_input``).

``VLSEG_LOAD_REQUESTS`` (default 50) concurrent infer requests with mixed prompts and fixed seeds must all succeed
and give the same masks and uncertainty statistics as the same requests sent one by one; latency percentiles are
printed. ``VLSEG_LOAD_MEMORY_REQUESTS`` (default 0 = skipped; the issue asks for 500) runs that many more requests
and checks the server's resident memory after them is within 10 % of after the first 50.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from test_reliability_bad_input import server  # noqa: F401  (the module-scoped server fixture)

requests = pytest.importorskip("requests")

N_CONCURRENT = int(os.environ.get("VLSEG_LOAD_REQUESTS", "50"))
N_MEMORY = int(os.environ.get("VLSEG_LOAD_MEMORY_REQUESTS", "0"))
PROMPTS = ["polyp", "small round polyp", "cyst", "a dark oval lesion", "lesion near the border"]


def _request(server, k: int) -> dict:
    params = {"text": PROMPTS[k % len(PROMPTS)], "num_samples": 2, "seed": k % 7, "uncertainty_inline": True}
    t0 = time.perf_counter()
    r = requests.post(f"{server['url']}/infer/toy", params={"image": "img_0", "output": "json"},
                      files={"params": (None, json.dumps(params))}, timeout=300)
    latency = time.perf_counter() - t0
    assert r.status_code == 200, r.text[:500]
    p = r.json()
    unc = base64.b64decode(p["uncertainty"]["npy_base64"])
    return {"k": k, "latency": latency, "fg": p["foreground_pixels"], "unc_mean": p["uncertainty_mean"],
            "unc": hashlib.sha256(unc).hexdigest(), "prompt": p["prompt"], "seed": p["seed"]}


def _key(res: dict) -> tuple:
    return res["fg"], res["unc_mean"], res["unc"], res["prompt"], res["seed"]


def _rss(server) -> int:
    import psutil

    proc = psutil.Process(server["handle"].proc.pid)
    return proc.memory_info().rss + sum(c.memory_info().rss for c in proc.children(recursive=True))


def test_concurrent_requests_match_sequential_ones(server):  # noqa: F811
    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=N_CONCURRENT) as pool:
        concurrent = list(pool.map(lambda k: _request(server, k), range(N_CONCURRENT)))
    wall = time.perf_counter() - t0
    sequential = [_request(server, k) for k in range(N_CONCURRENT)]
    assert [_key(a) for a in concurrent] == [_key(b) for b in sequential]
    for name, res in (("concurrent", concurrent), ("sequential", sequential)):
        lat = np.array([r["latency"] for r in res])
        print(f"\n[load] {name} {len(res)} requests: p50 {np.percentile(lat, 50):.3f}s p90 "
              f"{np.percentile(lat, 90):.3f}s p99 {np.percentile(lat, 99):.3f}s max {lat.max():.3f}s")
    print(f"[load] {N_CONCURRENT} concurrent requests in {wall:.1f}s, zero errors")


@pytest.mark.skipif(N_MEMORY <= 0, reason="set VLSEG_LOAD_MEMORY_REQUESTS=500 to run the memory check")
def test_resident_memory_is_stable(server):  # noqa: F811
    for k in range(50):
        _request(server, k)
    after_50 = _rss(server)
    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(lambda k: _request(server, k), range(N_MEMORY)))
    after = _rss(server)
    print(f"\n[load] resident memory after 50: {after_50 / 2**20:.0f} MiB, after {50 + N_MEMORY}: "
          f"{after / 2**20:.0f} MiB")
    assert after <= 1.10 * after_50
