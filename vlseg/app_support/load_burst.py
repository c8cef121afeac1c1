"""A burst of requests against a running server, with other endpoints probed while it lasts (issue 15's load test
and the scale-out measurement).

:func:`burst` sends ``n`` requests from ``n`` threads, started ``stagger`` seconds apart, and meanwhile probes
each of ``probes`` (GET paths) every ``probe_interval`` seconds until the last request is answered. It returns each
request's send and answer times (seconds from the burst's start), status, ``Retry-After`` and the server's
``X-Vlseg-Infer`` record, and each probe's latencies. :func:`order_agreement` and :func:`completion_spread` sum
up the order and the spread of the answers.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Dict, List, Sequence

__all__ = ["burst", "completion_spread", "order_agreement", "percentile", "parse_infer_header", "summary"]


def percentile(values: Sequence[float], q: float) -> float:
    import numpy as np

    return float(np.percentile(np.asarray(values, dtype=float), q)) if len(values) else float("nan")


def parse_infer_header(value: str | None) -> dict:
    """``"seq=3; wait=1.250; run=0.210"`` -> ``{"seq": 3, "wait": 1.25, "run": 0.21}`` ({} when absent)."""
    out: dict = {}
    for part in (value or "").split(";"):
        key, _, raw = part.strip().partition("=")
        if key and raw:
            out[key] = int(raw) if key == "seq" else float(raw)
    return out


def burst(base_url: str, n: int, send_one: Callable[[int], "object"], probes: Sequence[str] = ("/info/",),
          stagger: float = 0.02, probe_interval: float = 0.2, probe_timeout: float = 120.0) -> dict:
    """``send_one(k)`` (returns a ``requests.Response``) for k = 0..n-1 from n threads, ``stagger`` s apart;
    ``probes`` fetched in turn from one more thread meanwhile. Returns ``{"requests": [...], "probes": {path:
    [latency, ...]}, "wall": seconds}``."""
    import requests

    t0 = time.perf_counter()
    done = threading.Event()
    probe_latencies: Dict[str, List[float]] = {p: [] for p in probes}

    def probe_loop():
        session = requests.Session()
        while not done.is_set():
            for path in probes:
                s = time.perf_counter()
                try:
                    ok = session.get(base_url + path, timeout=probe_timeout).status_code == 200
                except requests.RequestException:
                    ok = False
                probe_latencies[path].append(time.perf_counter() - s if ok else float("inf"))
            done.wait(probe_interval)

    def one(k: int) -> dict:
        time.sleep(max(0.0, t0 + k * stagger - time.perf_counter()))
        sent = time.perf_counter() - t0
        try:
            r = send_one(k)
            status, headers = r.status_code, r.headers
        except requests.RequestException as e:
            status, headers = f"{type(e).__name__}: {e}", {}
        return {"k": k, "sent": sent, "done": time.perf_counter() - t0, "status": status,
                "retry_after": headers.get("Retry-After"), **parse_infer_header(headers.get("X-Vlseg-Infer"))}

    prober = threading.Thread(target=probe_loop, daemon=True)
    prober.start()
    try:
        with ThreadPoolExecutor(max_workers=n) as pool:
            results = list(pool.map(one, range(n)))
    finally:
        done.set()
        prober.join(probe_timeout)
    return {"requests": results, "probes": probe_latencies, "wall": time.perf_counter() - t0}


def order_agreement(first: Sequence[float], second: Sequence[float]) -> float:
    """Fraction of pairs (i, j) that ``first`` and ``second`` put in the same order (1.0: the same order)."""
    pairs = agree = 0
    for i in range(len(first)):
        for j in range(i + 1, len(first)):
            if first[i] == first[j] or second[i] == second[j]:
                continue
            pairs += 1
            agree += (first[i] < first[j]) == (second[i] < second[j])
    return agree / pairs if pairs else 1.0


def completion_spread(results: Sequence[dict]) -> dict:
    """Answer times of the successful requests as fractions of the burst (first send .. last answer):
    their 10th, 50th and 90th percentiles (all near 1.0: everything answered at the end)."""
    ok = [r for r in results if r["status"] == 200]
    if not ok:
        return {"p10": float("nan"), "p50": float("nan"), "p90": float("nan")}
    start, end = min(r["sent"] for r in results), max(r["done"] for r in ok)
    fractions = [(r["done"] - start) / max(end - start, 1e-9) for r in ok]
    return {f"p{q}": percentile(fractions, q) for q in (10, 50, 90)}


def summary(result: dict) -> str:
    """One paragraph for the logs: probes' p50 / p90 / max, answers, spread, order, throughput."""
    reqs = result["requests"]
    ok = [r for r in reqs if r["status"] == 200]
    lines = [f"{len(reqs)} requests in {result['wall']:.1f} s: {len(ok)} answered 200, "
             f"{sum(r['status'] == 503 for r in reqs)} refused 503, "
             f"{len(reqs) - len(ok) - sum(r['status'] == 503 for r in reqs)} other; "
             f"{len(ok) / result['wall']:.2f} answers/s"]
    for path, lat in result["probes"].items():
        lines.append(f"GET {path} x{len(lat)} during the burst: p50 {percentile(lat, 50):.3f} s, "
                     f"p90 {percentile(lat, 90):.3f} s, max {max(lat) if lat else float('nan'):.3f} s")
    spread = completion_spread(reqs)
    lines.append("answers at fractions of the burst: " + ", ".join(f"{k} {v:.2f}" for k, v in spread.items()))
    if ok and all("seq" in r for r in ok) and len({r["seq"] for r in ok}) == len(ok):  # one server's numbers
        lines.append(f"answer order vs server arrival order (seq): "
                     f"{order_agreement([r['seq'] for r in ok], [r['done'] for r in ok]):.3f} of pairs agree")
    if ok:
        lines.append(f"answer order vs send order: {order_agreement([r['k'] for r in ok], [r['done'] for r in ok]):.3f}"
                     f" of pairs agree")
    return "\n".join(lines)
