"""Training killed mid-epoch resumes from the last checkpoint (issue 8), for every bundle with a ``tiny`` variant.

Each bundle trains through its own ``python -m monai.bundle run`` with ``configs/train.json`` + ``configs/tiny.json``
on the tiny demo set (6 training items in batches of 2, 2 epochs, one CPU thread). A probe (written by this test, attached through an extra config
file and ``--init_id``, the bundle's own ``initialize`` runs first) makes the run wait at the 2nd iteration of
epoch 2, after it saved its own state; the test then SIGKILLs the process. At that moment the only full checkpoint
on disk is the one of epoch 1, and the process has already taken optimizer steps past it.

The resumed run (the bundle's resume key, ``resume`` or ``resume_from``, naming that checkpoint) must start from
exactly that checkpoint: at its first iteration the model weights, every optimizer tensor (Adam's ``exp_avg``,
``exp_avg_sq``, ``step``), the optimizer's learning rates and the scheduler's state (``last_epoch``, ``_last_lr``)
equal the checkpoint's, the iteration counter continues (epoch 2, iteration N + 1 rather than 1), only epoch 2 is
trained, and the run ends with the epoch-2 checkpoint. A run that silently restarts from scratch fails on the
first of these (empty optimizer state, iteration 1).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("monai")

from vlseg.app_support.bundles import discover_bundles, repo_bundles_dir  # noqa: E402
from vlseg.app_support.checkpoints import train_command  # noqa: E402

BUNDLES = sorted(n for n, p in discover_bundles(repo_bundles_dir()).items() if (p / "configs" / "tiny.json").is_file())
RESUME_KEYS = ("resume", "resume_from")
TRAIN_ITEMS, BATCH_SIZE = 6, 2  # 3 iterations per epoch
KILL_AT = 2  # kill at this iteration of epoch 2
TIMEOUT = 300

PROBE = '''
"""Test probe attached to a bundle's trainer (tests/test_reliability_resume.py)."""
import json
import time
from pathlib import Path

import torch
from ignite.engine import Events


def _state(engine, optimizer, scheduler, network=None):
    out = {"epoch": engine.state.epoch, "iteration": engine.state.iteration,
           "epoch_length": engine.state.epoch_length, "optimizer": optimizer.state_dict(),
           "lr_scheduler": scheduler.state_dict(), "lr": [g["lr"] for g in optimizer.param_groups]}
    if network is not None:
        out["model"] = {k: v.detach().clone() for k, v in network.state_dict().items()}
    return out


def attach(trainer, optimizer, scheduler, network, out_dir, kill_epoch):
    out = Path(out_dir)
    seen = {"iterations": 0}

    def first_iteration(engine):  # before this process's first optimizer step (after a resume has loaded)
        if seen["iterations"] == 0 and not (out / "first_iteration.pt").exists():
            torch.save(_state(engine, optimizer, scheduler, network), out / "first_iteration.pt")

    def iteration_done(engine):
        seen["iterations"] += 1
        within = engine.state.iteration - (engine.state.epoch - 1) * engine.state.epoch_length
        if kill_epoch and engine.state.epoch == kill_epoch and within == %(kill_at)d:
            torch.save(_state(engine, optimizer, scheduler), out / "at_kill.pt")
            (out / "waiting_for_kill").write_text(str(engine.state.iteration))
            time.sleep(3600)

    def completed(engine):
        (out / "completed.json").write_text(json.dumps({
            "iterations_run": seen["iterations"], "epoch": engine.state.epoch, "iteration": engine.state.iteration}))

    trainer.add_event_handler(Events.ITERATION_STARTED, first_iteration)
    trainer.add_event_handler(Events.ITERATION_COMPLETED, iteration_done)
    trainer.add_event_handler(Events.COMPLETED, completed)
''' % {"kill_at": KILL_AT}


def _resume_key(bundle_dir: Path) -> str | None:
    train = json.loads((bundle_dir / "configs" / "train.json").read_text())
    return next((k for k in RESUME_KEYS if k in train), None)


def _start(bundle_dir: Path, work: Path, name: str, datalist: Path, probe_path: Path, kill_epoch: int,
           extra: dict) -> dict:
    """Start one training of ``bundle_dir`` (``tiny``) with the probe; its files go to ``work/name``."""
    probe_dir = work / name
    probe_dir.mkdir(parents=True)
    probe_cfg = probe_dir / "probe.json"
    probe_cfg.write_text(json.dumps({
        "probe_dir": str(probe_dir), "probe_kill_epoch": kill_epoch,
        "probe_module": "$import vlseg_resume_probe",
        "vlseg_probe_init": ["%initialize", "$vlseg_resume_probe.attach(@train#trainer, @optimizer, @lr_scheduler, "
                                            "@network, @probe_dir, @probe_kill_epoch)"]}))
    overrides = {"init_id": "vlseg_probe_init", "ckpt_dir": str(work / "models"), "output_dir": str(work / "out"),
                 "max_epochs": 2, "max_train_items": TRAIN_ITEMS, "batch_size": BATCH_SIZE, "max_val_items": 2,
                 "val_batch_size": 2, "num_threads": 1, **extra}
    cmd = train_command(bundle_dir, "tiny", datalist=datalist, overrides=overrides, extra_config_files=[probe_cfg])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(bundle_dir), str(probe_path),
                                                       os.environ.get("PYTHONPATH", "")]),
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    log = open(probe_dir / "train.log", "w")
    proc = subprocess.Popen(cmd, cwd=str(bundle_dir), env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    return {"proc": proc, "dir": probe_dir, "log": log}


def _finish(run: dict) -> None:
    if run["proc"].poll() is None:
        os.kill(run["proc"].pid, signal.SIGKILL)
    run["rc"] = run["proc"].wait()
    run["log"].close()


def _tail(probe_dir: Path) -> str:
    return (probe_dir / "train.log").read_text(errors="replace")[-3000:]


@pytest.fixture(scope="module")
def killed_and_resumed(tiny_demo, tmp_path_factory) -> dict:
    """Every bundle at once (the trainings are single-threaded): train, SIGKILL mid-epoch 2, resume from the
    epoch-1 checkpoint. Returns, per bundle, its work folder, the kill time and the return codes."""
    root = tmp_path_factory.mktemp("resume")
    probe_path = root / "probe"
    probe_path.mkdir()
    (probe_path / "vlseg_resume_probe.py").write_text(PROBE)
    t0 = time.time()
    res = {b: {"work": root / b, "bundle_dir": repo_bundles_dir() / b} for b in BUNDLES}
    first = {b: _start(r["bundle_dir"], r["work"], "first", tiny_demo, probe_path, 2, {}) for b, r in res.items()}
    try:  # 1. wait for each run to reach iteration KILL_AT of epoch 2, then SIGKILL it
        while any(r["proc"].poll() is None and "killed_after" not in res[b] for b, r in first.items()):
            for b, r in first.items():
                if "killed_after" not in res[b] and r["proc"].poll() is None and (r["dir"] / "waiting_for_kill").exists():
                    os.kill(r["proc"].pid, signal.SIGKILL)
                    res[b]["killed_after"] = time.time() - t0
            if time.time() - t0 > TIMEOUT:
                break
            time.sleep(0.2)
    finally:
        for r in first.values():
            _finish(r)
    for b, r in first.items():
        res[b].update(first_rc=r["rc"], first_log=_tail(r["dir"]))
    second = {}
    try:  # 2. resume each killed run from its only full checkpoint
        for b, r in res.items():
            full = sorted((r["work"] / "models").glob("*checkpoint_epoch=*.pt"))
            r["checkpoints_after_kill"] = full
            if full:  # what was on disk at the kill, kept aside: the resumed run may rotate its checkpoints
                shutil.copy2(full[-1], r["work"] / "at_kill_checkpoint.pt")
            key = _resume_key(r["bundle_dir"])
            if r["first_rc"] == -signal.SIGKILL and len(full) == 1 and key:
                second[b] = _start(r["bundle_dir"], r["work"], "second", tiny_demo, probe_path, 0, {key: str(full[0])})
        deadline = time.time() + TIMEOUT
        for b, r in second.items():
            try:
                r["proc"].wait(timeout=max(1.0, deadline - time.time()))
            except subprocess.TimeoutExpired:
                pass
    finally:
        for r in second.values():
            _finish(r)
    for b, r in second.items():
        res[b].update(second_rc=r["rc"], second_log=_tail(r["dir"]))
    res["total_seconds"] = time.time() - t0
    return res


def _assert_same(a, b, where: str = "") -> None:
    """Exact equality of nested dicts / lists of tensors and numbers."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a, b), f"{where} differs"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), f"{where}: keys {sorted(map(str, a))} != {sorted(map(str, b))}"
        for k in a:
            _assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), f"{where}: length differs"
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def _steps(optimizer_state: dict) -> list[float]:
    return [float(s["step"]) for _, s in sorted(optimizer_state["state"].items()) if "step" in s]


def test_every_bundle_has_a_resume_key():
    assert BUNDLES, "no bundle with configs/tiny.json found"
    for name in BUNDLES:
        assert _resume_key(repo_bundles_dir() / name), f"{name}: train.json has none of {RESUME_KEYS}"


@pytest.mark.parametrize("bundle", BUNDLES)
def test_sigkill_mid_epoch_then_resume_continues_from_the_checkpoint(bundle, killed_and_resumed):
    r = killed_and_resumed[bundle]
    work, first, second = r["work"], r["work"] / "first", r["work"] / "second"

    # 1. the run was SIGKILLed in the middle of epoch 2, leaving the complete epoch-1 checkpoint only
    assert "killed_after" in r, f"no mid-epoch-2 iteration (rc {r['first_rc']}):\n{r['first_log']}"
    assert r["first_rc"] == -signal.SIGKILL, r["first_log"]
    models = work / "models"
    full = r["checkpoints_after_kill"]
    assert [p.name.rsplit("=", 1)[1] for p in full] == ["1.pt"], f"expected only the epoch-1 checkpoint: {full}"
    assert not [p for p in models.iterdir() if p.name.startswith("tmp")], "a half-written checkpoint was left"
    ckpt = torch.load(work / "at_kill_checkpoint.pt", map_location="cpu", weights_only=False)
    assert {"model", "optimizer", "lr_scheduler", "trainer"} <= set(ckpt), sorted(ckpt)
    epoch_length = ckpt["trainer"]["epoch_length"]
    assert ckpt["trainer"]["iteration"] == epoch_length >= KILL_AT + 1, ckpt["trainer"]
    assert ckpt["optimizer"]["state"], "the checkpoint holds no optimizer state"
    at_kill = torch.load(first / "at_kill.pt", map_location="cpu", weights_only=False)
    assert (at_kill["epoch"], at_kill["iteration"]) == (2, epoch_length + KILL_AT)
    # the killed process had moved on past the checkpoint (so "equal to the checkpoint" below means "restored")
    assert _steps(at_kill["optimizer"]) != _steps(ckpt["optimizer"]), "no optimizer step between checkpoint and kill"

    # 2. the resumed run starts from exactly that checkpoint and continues its counters
    assert r.get("second_rc") == 0, f"resumed training failed (rc {r.get('second_rc')}):\n{r.get('second_log')}"
    start = torch.load(second / "first_iteration.pt", map_location="cpu", weights_only=False)
    assert (start["epoch"], start["iteration"]) == (2, epoch_length + 1), \
        f"resumed at epoch {start['epoch']} iteration {start['iteration']}: it restarted instead of continuing"
    _assert_same(start["optimizer"], ckpt["optimizer"], "optimizer")
    _assert_same(start["lr_scheduler"], ckpt["lr_scheduler"], "lr_scheduler")
    assert start["lr"] == [g["lr"] for g in ckpt["optimizer"]["param_groups"]]
    _assert_same(start["model"], dict(ckpt["model"]), "model")
    assert any(s > 0 for s in _steps(start["optimizer"])), "no optimizer step counts were restored"

    # 3. only epoch 2 was trained, and its checkpoint continues the counters
    done = json.loads((second / "completed.json").read_text())
    assert done == {"iterations_run": epoch_length, "epoch": 2, "iteration": 2 * epoch_length}, done
    last = torch.load(next(models.glob("*checkpoint_epoch=2.pt")), map_location="cpu", weights_only=False)
    assert last["trainer"]["iteration"] == 2 * epoch_length
    assert min(_steps(last["optimizer"])) > max(_steps(ckpt["optimizer"])) or \
        last["lr_scheduler"]["last_epoch"] > ckpt["lr_scheduler"]["last_epoch"]
    print(f"\n[resume] {bundle}: SIGKILL at epoch 2 iteration {at_kill['iteration']} ({r['killed_after']:.0f} s); "
          f"resumed from {full[0].name} (iteration {epoch_length}, optimizer steps "
          f"{sorted(set(_steps(ckpt['optimizer'])))}, scheduler last_epoch {ckpt['lr_scheduler'].get('last_epoch')}); "
          f"all bundles killed and resumed in {killed_and_resumed['total_seconds']:.0f} s")
