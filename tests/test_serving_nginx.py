"""Scale-out behind a real nginx (issue 15, item 5b): ``vlseg.app_support.scaled``.

A primary and two inference-only workers (the toy bundle, ``tiny``, on demo images) behind Debian's nginx on
127.0.0.1, as ``scripts/serve_scaled.sh`` starts them. The test checks that ``/infer`` goes to both workers
(``least_conn``) and that ``/info`` and ``/datastore`` go to the primary (nginx's ``X-Vlseg-Upstream`` header). The
workers return the uncertainty map inline and store nothing in the datastore. The throughput (answers/s) of the same
burst is printed through nginx with both workers and through a second nginx with one of them. Skips when nginx is
not installed (``apt-get install -y nginx``).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

requests = pytest.importorskip("requests")

from vlseg.app_support.load_burst import burst, percentile, summary  # noqa: E402
from vlseg.app_support.scaled import (nginx_executable, render_nginx_conf, start_nginx, start_scaled,  # noqa: E402
                                      stop_scaled)
from vlseg.app_support.server import free_port  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
APP = REPO / "apps" / "vlseg"
TOY = REPO / "tests" / "data" / "toy_bundle"
N_BURST = int(os.environ.get("VLSEG_NGINX_BURST", "40"))

pytestmark = pytest.mark.skipif(nginx_executable() is None,
                                reason="nginx is not installed (Debian: apt-get install -y nginx)")


def test_nginx_conf_renders_every_placeholder(tmp_path):
    text = render_nginx_conf("127.0.0.1:1", "127.0.0.1:2", ["127.0.0.1:3", "127.0.0.1:4"], tmp_path)
    assert "{{" not in text and "least_conn;" in text
    assert "server 127.0.0.1:3 max_fails=0;" in text and "server 127.0.0.1:2;" in text
    with pytest.raises(ValueError, match="at least one"):
        render_nginx_conf("127.0.0.1:1", "127.0.0.1:2", [], tmp_path)


@pytest.fixture(scope="module")
def scaled(tmp_path_factory):
    from vlseg.data.demo import generate_demo_dataset

    root = tmp_path_factory.mktemp("serving_nginx")
    generate_demo_dataset(root / "demo", seed=0, n_images=(6, 2, 2), image_size=64, n_volumes=0)
    studies = root / "studies"
    studies.mkdir()
    for png in sorted((root / "demo" / "images").rglob("*.png"))[:6]:
        shutil.copy(png, studies / png.name)
    toy = shutil.copytree(TOY, root / "bundles" / "toy", ignore=shutil.ignore_patterns("*.pt", "*.ts", "runs", "eval",
                                                                                        "__pycache__"))
    from vlseg.app_support.checkpoints import write_initial_checkpoint

    write_initial_checkpoint(toy, "tiny")  # random weights that fit: serving needs no good ones
    app = shutil.copytree(APP, root / "app", ignore=shutil.ignore_patterns("model", "logs", "bin", "__pycache__"))
    conf = {"bundles_dir": root / "bundles", "variant": "tiny", "skip_trainers": "true"}
    handle = start_scaled(app, studies, conf, workers=2, run_dir=root / "run",
                          primary_env={"MONAI_LABEL_AUTO_UPDATE_SCORING": "false", "MONAI_LABEL_SESSIONS": "false"})
    try:
        yield {"handle": handle, "images": sorted(p.stem for p in studies.glob("*.png")), "root": root}
    finally:
        stop_scaled(handle)


def _addr(server_handle) -> str:
    return server_handle.url.split("://", 1)[1]


def _send(url: str, images: list):
    def send_one(k: int):
        params = {"text": ["polyp", "a dark lesion"][k % 2], "num_samples": 32, "seed": k, "uncertainty_inline": True}
        return requests.post(f"{url}/infer/toy", params={"image": images[k % len(images)], "output": "json"},
                             files={"params": (None, json.dumps(params))}, timeout=600)
    return send_one


def test_infer_goes_to_the_workers_and_the_rest_to_the_primary(scaled):
    h = scaled["handle"]
    primary, workers = _addr(h.primary), {_addr(w) for w in h.workers}
    for path in ("/info/", "/datastore/"):
        r = requests.get(h.url + path, timeout=30)
        assert r.status_code == 200 and r.headers["X-Vlseg-Upstream"] == primary, (path, r.status_code, r.headers)
    upstreams = []
    for k in range(4):  # sequential: least_conn falls back to round robin between idle workers
        r = _send(h.url, scaled["images"])(k)
        assert r.status_code == 200, (r.status_code, r.text[:300], h.nginx_log_tail())
        assert r.json()["uncertainty"]["npy_base64"]  # the map comes inline
        upstreams.append(r.headers["X-Vlseg-Upstream"])
    assert set(upstreams) == workers, upstreams
    # the workers stored nothing: no uncertainty labels in the primary's datastore
    ds = requests.get(f"{h.url}/datastore/?output=all", timeout=30).json()
    assert not any("uncertainty" in tag for obj in ds["objects"].values() for tag in obj.get("labels", {})), ds


def test_worker_threads_share_the_cores():
    from vlseg.app_support.scaled import thread_env, worker_threads

    assert worker_threads(2, cores=2) == 1 and worker_threads(3, cores=8) == 2 and worker_threads(4, cores=2) == 1
    assert thread_env(3)["OMP_NUM_THREADS"] == "3"


def test_throughput_one_vs_two_workers(scaled):
    h = scaled["handle"]
    images = scaled["images"]
    # a second nginx with only the first worker
    one_dir = scaled["root"] / "run_one"
    one_dir.mkdir(exist_ok=True)
    port = free_port()
    text = render_nginx_conf(f"127.0.0.1:{port}", _addr(h.primary), [_addr(h.workers[0])], one_dir)
    proc, log = start_nginx(text, one_dir, f"http://127.0.0.1:{port}/info/")
    urls = {"1 worker": f"http://127.0.0.1:{port}", "2 workers": h.url}
    runs = {name: [] for name in urls}
    try:
        for name in ("2 workers", "1 worker", "2 workers", "1 worker"):  # alternated, so neither gets the warm-up
            runs[name].append(burst(urls[name], N_BURST, _send(urls[name], images), probes=("/info/",), stagger=0.0))
    finally:
        proc.terminate()
        proc.wait(10)
        log.close()
    one, two = (min(runs[n], key=lambda r: r["wall"]) for n in ("1 worker", "2 workers"))  # best of two bursts each
    rate = {}
    for name, result in (("1 worker", one), ("2 workers", two)):
        print(f"\n[nginx] {name}:\n{summary(result)}")
        assert [r["status"] for r in result["requests"]] == [200] * N_BURST
        assert percentile(result["probes"]["/info/"], 90) < 1.0
        rate[name] = N_BURST / result["wall"]
    print(f"[nginx] throughput: 1 worker {rate['1 worker']:.2f} req/s, 2 workers {rate['2 workers']:.2f} req/s "
          f"({rate['2 workers'] / rate['1 worker']:.2f}x) on {os.cpu_count()} cores, load average "
          f"{os.getloadavg()[0]:.1f}")
