"""Inference off the event loop (issue 15, item 1): ``vlseg.app_support.infer_queue``.

* In-process (seconds): a small FastAPI app served by uvicorn in a thread, whose queued endpoint holds each job
  until the test releases it: other routes answer while a job runs, jobs run first in, first out, a request over
  ``workers + queue`` gets 503 with ``Retry-After`` before its body is read, and the counts add up.
* A real ``monailabel start_server`` (the toy bundle, ``tiny``, on demo images) under a 50-request ``/infer``
  burst, with ``GET /info/`` and ``GET /datastore/`` probed all along: both must answer in < 1 s at p90, and the
  inferences must complete spread over the burst in the order they arrived (``X-Vlseg-Infer: seq=...``).
  ``VLSEG_SERVING_LOAD_COMPARE=1`` also runs the burst against a server with ``--conf infer_workers 0``
  (MONAI Label's synchronous endpoint) and prints its figures (no assertion on them).
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

requests = pytest.importorskip("requests")

from vlseg.app_support.infer_queue import InferQueue, install_infer_queue, queue_from_conf  # noqa: E402
from vlseg.app_support.load_burst import burst, completion_spread, order_agreement, percentile, summary  # noqa: E402
from vlseg.app_support.server import free_port, start_server, stop_server  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
APP = REPO / "apps" / "vlseg"
TOY = REPO / "tests" / "data" / "toy_bundle"
N_BURST = int(os.environ.get("VLSEG_SERVING_BURST", "50"))
SAMPLES = int(os.environ.get("VLSEG_SERVING_SAMPLES", "32"))
COMPARE = os.environ.get("VLSEG_SERVING_LOAD_COMPARE", "") == "1"


# ------------------------------------------------------------------------------------------------ in-process
def test_conf_keys_are_checked():
    q = queue_from_conf({})
    assert (q.workers, q.queue, q.retry_after, q.capacity) == (1, 64, 5, 65)
    q.close()
    assert queue_from_conf({"infer_workers": "0"}) is None
    for key, bad in (("infer_workers", "-1"), ("infer_queue", "many"), ("infer_retry_after", "0")):
        with pytest.raises(ValueError, match=f"--conf {key}"):
            queue_from_conf({key: bad})


@pytest.fixture
def toy_api():
    """uvicorn in a thread serving ``POST /infer/{job}`` from an InferQueue (1 worker, 2 waiting, Retry-After 7)
    and a plain ``GET /ping``; a job with ``hold=true`` waits for the test's ``release`` event."""
    import uvicorn
    from fastapi import FastAPI

    api = FastAPI()
    started, release, order = threading.Event(), threading.Event(), []

    @api.get("/ping")
    async def ping():
        return {"ok": True}

    async def endpoint(job: str, hold: bool = False, pad: str = ""):  # the signature the queued route copies
        raise AssertionError("the queued route must answer instead")

    api.post("/infer/{job}")(endpoint)

    def work(job, hold):
        order.append(job)
        started.set()
        if hold:
            assert release.wait(30)
        return {"job": job}

    queue = InferQueue(workers=1, queue=2, retry_after=7)
    assert install_infer_queue(queue, api=api, endpoint=endpoint, run=work, path="/infer/{job}")
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(api, host="127.0.0.1", port=port, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    for _ in range(200):
        if server.started:
            break
        time.sleep(0.05)
    try:
        yield {"url": f"http://127.0.0.1:{port}", "queue": queue, "started": started, "release": release,
               "order": order}
    finally:
        release.set()
        server.should_exit = True
        thread.join(10)
        queue.close()


def _wait(cond, timeout=10.0):
    t0 = time.time()
    while not cond():
        assert time.time() - t0 < timeout, "timed out"
        time.sleep(0.01)


def test_queue_admits_runs_fifo_and_refuses_with_retry_after(toy_api):
    url, queue = toy_api["url"], toy_api["queue"]
    pool = ThreadPoolExecutor(4)
    post = lambda job: requests.post(f"{url}/infer/{job}", params={"hold": "true"}, timeout=30)  # noqa: E731
    futures = [pool.submit(post, "a")]
    assert toy_api["started"].wait(10)
    for n, job in ((2, "b"), (3, "c")):  # b is admitted before c
        futures.append(pool.submit(post, job))
        _wait(lambda: queue.pending == n)
    # the loop is free while a job runs
    t0 = time.perf_counter()
    assert requests.get(f"{url}/ping", timeout=5).json() == {"ok": True}
    assert time.perf_counter() - t0 < 1.0
    # the fourth is refused at once, before its (1 MiB) body counts for anything
    t0 = time.perf_counter()
    r = requests.post(f"{url}/infer/d", params={"hold": "true"}, data={"pad": "x" * (1 << 20)}, timeout=10)
    assert r.status_code == 503 and r.headers["Retry-After"] == "7", (r.status_code, r.headers, r.text)
    assert "--conf infer_queue 2" in r.json()["detail"] and time.perf_counter() - t0 < 5
    toy_api["release"].set()
    answers = [f.result(30) for f in futures]
    assert [a.status_code for a in answers] == [200, 200, 200]
    assert [a.json()["job"] for a in answers] == ["a", "b", "c"] and toy_api["order"] == ["a", "b", "c"]
    assert [a.headers["x-vlseg-infer"].split(";")[0] for a in answers] == ["seq=1", "seq=2", "seq=3"]
    _wait(lambda: queue.pending == 0)
    stats = queue.stats()
    assert (stats["admitted"], stats["rejected"], stats["completed"], stats["failed"]) == (3, 1, 3, 0)
    # room again: a new request is admitted
    assert requests.post(f"{url}/infer/e", timeout=10).json() == {"job": "e"}
    pool.shutdown()


# ------------------------------------------------------------------------------------------------ the real server
@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """The toy bundle (``tiny``, random-init checkpoint) on the demo images; returns a ``start(conf)`` that starts
    a server (stopped at the module's end) and the studies' image ids."""
    from vlseg.data.demo import generate_demo_dataset

    root = tmp_path_factory.mktemp("serving_load")
    demo = root / "demo"
    generate_demo_dataset(demo, seed=0, n_images=(6, 2, 2), image_size=64, n_volumes=0)
    studies = root / "studies"
    studies.mkdir()
    for png in sorted((demo / "images").rglob("*.png"))[:6]:
        shutil.copy(png, studies / png.name)
    bundles = root / "bundles"
    toy = shutil.copytree(TOY, bundles / "toy", ignore=shutil.ignore_patterns("*.pt", "*.ts", "runs", "eval",
                                                                                "__pycache__", "vlseg_checkpoint.json"))
    from vlseg.app_support.checkpoints import write_initial_checkpoint

    write_initial_checkpoint(toy, "tiny")  # random weights that fit: serving needs no good ones
    app = root / "app"
    shutil.copytree(APP, app, ignore=shutil.ignore_patterns("model", "logs", "bin", "__pycache__"))
    handles = []

    def start(extra: dict):
        # uncertainty maps are stored: the infer thread writes to the datastore while /datastore/ is read
        conf = {"bundles_dir": bundles, "variant": "tiny", "skip_trainers": "true", **extra}
        name = "_".join(f"{k}{v}" for k, v in extra.items()) or "defaults"
        handle = start_server(app, studies, conf, log_path=root / f"server_{name}.log", timeout=300,
                              env={"MONAI_LABEL_AUTO_UPDATE_SCORING": "false", "MONAI_LABEL_SESSIONS": "false"})
        handles.append(handle)
        return handle

    try:
        yield {"start": start, "images": sorted(p.stem for p in studies.glob("*.png"))}
    finally:
        for h in handles:
            stop_server(h)


def _infer_burst(url: str, images: list, n: int) -> dict:
    def send_one(k: int):
        params = {"text": ["polyp", "small round polyp", "a dark lesion"][k % 3], "num_samples": SAMPLES, "seed": k}
        return requests.post(f"{url}/infer/toy", params={"image": images[k % len(images)], "output": "json"},
                             files={"params": (None, json.dumps(params))}, timeout=600)

    requests.post(f"{url}/infer/toy", params={"image": images[0], "output": "json"},  # loads the network once
                  files={"params": (None, json.dumps({"text": "polyp"}))}, timeout=300).raise_for_status()
    return burst(url, n, send_one, probes=("/info/", "/datastore/"), stagger=0.01, probe_interval=0.2)


def test_server_stays_responsive_during_an_infer_burst(served):
    handle = served["start"]({})  # the defaults: 1 worker, 64 waiting
    result = _infer_burst(handle.url, served["images"], N_BURST)
    print(f"\n[serving] defaults (infer_workers 1, infer_queue 64):\n{summary(result)}")
    reqs = result["requests"]
    assert [r["status"] for r in reqs] == [200] * N_BURST, [r["status"] for r in reqs]
    # the other endpoints answer at once while inferences run
    for path, latencies in result["probes"].items():
        assert len(latencies) >= 5, (path, latencies)
        assert percentile(latencies, 90) < 1.0, (path, sorted(latencies))
    # answers spread over the burst, in the order the server received the requests
    spread = completion_spread(reqs)
    assert spread["p10"] < 0.3 and spread["p50"] < 0.7, spread
    assert sorted(r["seq"] for r in reqs) == list(range(2, N_BURST + 2))  # seq 1: the warm-up request
    assert order_agreement([r["seq"] for r in reqs], [r["done"] for r in reqs]) >= 0.95
    stats = requests.get(f"{handle.url}/info/", timeout=30).json()["vlseg"]["infer_queue"]
    assert stats["completed"] == N_BURST + 1 and stats["rejected"] == 0 and stats["pending"] == 0, stats


@pytest.mark.skipif(not COMPARE, reason="set VLSEG_SERVING_LOAD_COMPARE=1 to measure MONAI Label's synchronous "
                                        "endpoint (--conf infer_workers 0) under the same burst")
def test_compare_with_synchronous_endpoint(served):
    handle = served["start"]({"infer_workers": 0})
    result = _infer_burst(handle.url, served["images"], N_BURST)
    print(f"\n[serving] infer_workers 0 (MONAI Label's synchronous endpoint):\n{summary(result)}")
    assert requests.get(f"{handle.url}/info/", timeout=30).json()["vlseg"]["infer_queue"] is None
