"""Registry and champion/challenger gate against a real SQLite MLflow store and real models."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf

from search.model_registry import champion as gate
from search.model_registry import registration as registry
from search.model_registry.champion import HeldOutScore

REPO = Path(__file__).resolve().parents[2]
NAME = "pneumonia-cnn"


def score(metric: float, tie: float, version: int = 1) -> HeldOutScore:
    return HeldOutScore(version, metric, tie, 0.5, {}, "fp")


# ---------------------------------------------------------------------------------------------
# Pure rules (fast)


@pytest.mark.parametrize(
    ("new", "champion", "wins"),
    [
        ((0.90, 0.5), (0.80, 0.9), True),  # higher metric wins whatever the tie-break
        ((0.80, 0.9), (0.90, 0.5), False),
        ((0.85, 0.9), (0.85, 0.8), True),  # tie on the metric: higher sensitivity wins
        ((0.85, 0.8), (0.85, 0.9), False),
        ((0.85, 0.8), (0.85, 0.8), False),  # a full tie keeps the champion
        ((float("nan"), 1.0), (0.5, 0.5), False),
        ((0.6, 0.5), (float("nan"), 0.5), True),
    ],
)
def test_beats_metric_then_tie_break(new, champion, wins):
    assert gate.beats(score(*new), score(*champion))[0] is wins


def _scored(version: int, y, s, threshold: float = 0.5) -> HeldOutScore:
    from search.evaluation import metrics as ev

    metrics = ev.evaluate_split("heldout", y, s, ["normal", "pneumonia"], threshold).metrics
    return HeldOutScore(version, metrics["roc_auc"], metrics["sensitivity"], threshold, metrics,
                        "fp", y=y, scores=s)


def test_gate_promotes_only_beyond_noise_and_never_on_a_tiny_split(compose_cfg):
    import numpy as np

    evaluator = gate.HeldOutEvaluator(compose_cfg())
    evaluator.class_names = ["normal", "pneumonia"]
    rng = np.random.default_rng(1)
    y = (rng.random(400) < 0.7).astype(int)
    s = np.clip(0.3 * y + 0.7 * rng.random(400), 0, 1)
    champion = _scored(1, y, s)
    better = _scored(2, y, np.clip(s + 0.25 * (y - 0.5), 0, 1))
    promoted, reason, diff = evaluator.compare(better, champion)
    assert promoted and reason.startswith("better beyond noise") and diff["low"] > 0
    assert diff["metric"] == "roc_auc" and diff["n"] == 400
    promoted, reason, diff = evaluator.compare(champion, better)
    assert not promoted and reason.startswith("worse beyond noise") and diff["high"] < 0
    # a model as good, with errors of its own: whichever scores higher, it is noise
    lucky = _scored(3, y, np.clip(0.3 * y + 0.7 * rng.random(400), 0, 1))
    promoted, reason, diff = evaluator.compare(lucky, champion)
    assert not promoted and "not better beyond noise" in reason and diff["low"] < 0 < diff["high"]
    # the point rule (registry.gate=point) takes any higher value
    point = gate.HeldOutEvaluator(compose_cfg(), gate=gate.GateSpec(rule="point"))
    point.class_names = evaluator.class_names
    assert point.compare(lucky, champion)[0] == (lucky.metric > champion.metric)
    # 24 images, 6 of them normal: too small to decide, whatever the scores say
    tiny = np.r_[np.flatnonzero(y == 0)[:6], np.flatnonzero(y == 1)[:18]]
    promoted, reason, _ = evaluator.compare(_scored(2, y[tiny], better.scores[tiny]),
                                            _scored(1, y[tiny], s[tiny]))
    assert not promoted and "too small to decide" in reason and "6 of class normal" in reason
    with pytest.raises(ValueError, match="registry.gate='coin'"):
        gate.GateSpec.from_config({"gate": "coin"})
    with pytest.raises(ValueError, match="registry.compare_on='ext9'"):
        gate.HeldOutEvaluator(compose_cfg(), gate=gate.GateSpec(compare_on="ext9"))


def test_metric_names_are_checked():
    assert gate.check_metric("roc_auc") == "roc_auc"
    assert gate.check_metric("test_sensitivity") == "sensitivity"
    assert gate.check_metric("eval_test_f1") == "f1"
    with pytest.raises(ValueError, match="cannot rank models"):
        gate.check_metric("val_loss")


def test_registry_yaml_composes_with_documented_keys(compose_cfg):
    text = (REPO / "conf" / "registry" / "default.yaml").read_text()
    assert text.startswith("# ")
    cfg = compose_cfg()
    if "registry" not in cfg:  # until conf/config.yaml lists `- registry: default`
        cfg = compose_cfg("+registry=default")
    assert registry.registry_options(cfg) == {
        "enabled": True, "model_name": NAME, "metric": "roc_auc", "tie_break": "sensitivity",
    }
    assert registry.registry_options(OmegaConf.create({}))["model_name"] == NAME


@pytest.mark.slow
def test_held_out_split_is_the_same_whatever_the_preprocessing(compose_cfg):
    """A champion with another input size/channels is scored on the very same test images."""
    cfg = compose_cfg("data.subset_fraction=0.1", "seed=5")
    evaluator = gate.HeldOutEvaluator(cfg)
    small, large = evaluator.bundle(28, 1), evaluator.bundle(32, 3)
    assert small.fingerprint == large.fingerprint == evaluator.fingerprint
    assert small.y_test.tolist() == large.y_test.tolist() and evaluator.n_test > 0
    assert next(iter(large.test))[0].shape[1:] == (32, 32, 3)
    none = gate.HeldOutEvaluator(compose_cfg("data.subset_fraction=0.1",
                                                 "data.test_fraction=0"))
    with pytest.raises(gate.NoHeldOutSplit, match="test_fraction"):
        none.bundle(28, 1)


def test_sqlite_lock_serialises_processes(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    code = (
        "import sys, time; from search.model_registry.champion import promotion_lock\n"
        f"with promotion_lock({uri!r}) as locked:\n"
        "    print('locked' if locked else 'none', time.time(), flush=True)\n"
    )
    with gate.promotion_lock(uri) as locked:
        assert locked
        held_until = time.time() + 1.0
        proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
        time.sleep(1.0)
    out, _ = proc.communicate(timeout=60)
    word, stamp = out.split()
    assert word == "locked" and float(stamp) >= held_until - 0.05
    assert (tmp_path / f"mlflow.db{gate.LOCK_SUFFIX}").exists()
    with gate.promotion_lock("http://127.0.0.1:5000") as locked:
        assert locked is False


# ---------------------------------------------------------------------------------------------
# Against a real store (slow: trains three tiny CNNs once per session)


def version_files(version) -> Path:
    import mlflow

    return Path(mlflow.artifacts.download_artifacts(f"models:/{NAME}/{version.version}"))


@pytest.mark.slow
def test_first_version_becomes_champion_with_all_fields(registry_store, capsys, tmp_path):
    good = registry_store.runs.good_run_id
    parent = registry_store.new_parent_run()
    decision = registry.register_and_promote(good, parent_run_id=parent)

    assert decision.promoted and decision.alias == "champion"
    assert decision.champion_version is None and "first version" in decision.reason
    assert 0.7 < decision.new_score <= 1.0  # scored anyway, for the record
    low, high = decision.new_intervals["roc_auc"]
    assert low <= decision.new_score <= high and low < high
    printed = capsys.readouterr().out
    assert f"{NAME} v{decision.version}" in printed and "@champion" in printed

    client = MlflowClient()
    run = client.get_run(good)
    mv = client.get_model_version_by_alias(NAME, "champion")
    assert int(mv.version) == decision.version and mv.run_id == good
    assert mv.source == run.data.tags["best_model_uri"]
    tags = mv.tags
    assert json.loads(tags["class_names"]) == ["normal", "pneumonia"]
    assert json.loads(tags["preprocessing"])["image_size"] == 28
    assert json.loads(tags["threshold"]) == pytest.approx(run.data.metrics["threshold"])
    assert tags["threshold_rule"] == "min_sensitivity" and tags["threshold_chosen_on"] == "val"
    assert tags["data_fingerprint"] == run.data.params["data.fingerprint"]
    assert tags["config_hash"] == run.data.params["config_hash"]
    assert "config" not in tags and tags["config_uri"] == f"runs:/{good}/config/config.yaml"
    config = client.download_artifacts(good, "config/config.yaml", str(tmp_path))
    assert yaml.safe_load(Path(config).read_text())["seed"] == 3
    # the version's page says how it fared on the held-out split, the model's who leads
    mv = client.get_model_version(NAME, mv.version)
    assert "Operating point (held-out, at the threshold)" in mv.description
    assert f"held-out roc_auc = {decision.new_score:.4g}" in mv.description
    assert f"v{decision.version}" in client.get_registered_model(NAME).description
    assert tags["run_uri"] == f"runs:/{good}"
    assert tags["promotion.decision"] == "champion" and tags["promotion.compared_with"] == "none"
    assert good in mv.description

    model_dir = version_files(mv)
    mlmodel = yaml.safe_load((model_dir / "MLmodel").read_text())
    assert mlmodel["signature"]["inputs"] and mlmodel["metadata"]["class_names"]
    assert (model_dir / "data" / "model.keras").is_file()

    parent_run = client.get_run(parent)
    assert parent_run.data.tags["promotion.alias"] == "champion"
    assert parent_run.data.tags["promotion.model_uri"] == f"models:/{NAME}/{decision.version}"
    assert parent_run.data.params["promotion.metric"] == "roc_auc"
    assert parent_run.data.metrics["promotion_new_roc_auc"] == pytest.approx(decision.new_score)
    assert parent_run.data.metrics["promotion_new_roc_auc_ci_low"] == pytest.approx(low)
    saved = client.download_artifacts(parent, "promotion/decision.json", str(model_dir.parent))
    assert json.loads(Path(saved).read_text())["version"] == decision.version

    again = registry.register_and_promote(good, parent_run_id=parent)  # idempotent per run
    assert again.version == decision.version and again.reason == "already the champion"
    assert len(client.search_model_versions(f"name='{NAME}'")) == 1


@pytest.mark.slow
def test_worse_version_becomes_challenger_and_champion_stays(registry_store):
    runs = registry_store.runs
    first = registry.register_and_promote(runs.good_run_id)
    parent = registry_store.new_parent_run()
    decision = registry.register_and_promote(runs.poor_run_id, parent_run_id=parent)

    assert not decision.promoted and decision.alias == "challenger"
    assert decision.champion_version == first.version
    assert decision.new_score < decision.champion_score  # same split, same metric
    assert decision.reason.startswith("worse beyond noise") and decision.difference["high"] < 0
    assert decision.difference["n"] == decision.evaluation["n"]  # the same images, paired
    assert decision.champion_score == pytest.approx(first.new_score)
    assert decision.evaluation["n"] == first.evaluation["n"]
    assert decision.warnings == []  # same data fingerprint
    client = MlflowClient()
    assert int(client.get_model_version_by_alias(NAME, "champion").version) == first.version
    assert int(client.get_model_version_by_alias(NAME, "challenger").version) == decision.version
    tags = client.get_run(parent).data.tags
    assert tags["promotion.alias"] == "challenger" and tags["promotion.promoted"] == "false"
    assert tags["promotion.compared_with"] == f"v{first.version}"


@pytest.mark.slow
def test_better_version_takes_champion(registry_store):
    runs = registry_store.runs
    poor = registry.register_and_promote(runs.poor_run_id)
    assert poor.alias == "champion"  # first version, however poor
    decision = registry.register_and_promote(runs.good_run_id, metric="roc_auc")
    assert decision.promoted and decision.champion_version == poor.version
    assert decision.new_score > decision.champion_score
    client = MlflowClient()
    assert int(client.get_model_version_by_alias(NAME, "champion").version) == decision.version
    assert client.get_model_version(NAME, str(poor.version)).aliases == []


@pytest.mark.slow
def test_other_training_data_is_compared_with_a_warning(registry_store):
    runs = registry_store.runs
    registry.register_and_promote(runs.good_run_id)
    parent = registry_store.new_parent_run()
    decision = registry.register_and_promote(runs.other_data_run_id, parent_run_id=parent)
    assert decision.champion_version is not None
    # promoted only beyond noise: the paired interval of new - champion lies above zero
    assert decision.promoted == (decision.difference["low"] > 0)
    assert any("fingerprints differ" in w for w in decision.warnings)
    client = MlflowClient()
    assert "fingerprints differ" in client.get_run(parent).data.tags["promotion.warning"]
    version = client.get_model_version(NAME, str(decision.version))
    assert "fingerprints differ" in version.tags["promotion.warning"]


@pytest.mark.slow
def test_sweep_hook_and_cli(registry_store, capsys):
    runs = registry_store.runs
    parent = registry_store.new_parent_run(best_run_id=runs.good_run_id)
    off = OmegaConf.create({"registry": {"enabled": False}})
    assert registry.promote_sweep_best(off, parent) is None
    empty = registry_store.new_parent_run()
    assert registry.promote_sweep_best(OmegaConf.create({}), empty) is None  # no best_run_id
    client = MlflowClient()
    assert "no best_run_id" in client.get_run(empty).data.tags["promotion.skipped"]
    bad = OmegaConf.create({"registry": {"metric": "val_loss"}})
    with pytest.raises(ValueError, match="cannot rank"):
        registry.promote_sweep_best(bad, parent)
    assert "cannot rank" in client.get_run(parent).data.tags["promotion.error"]

    cfg = OmegaConf.create({"registry": {"enabled": True, "model_name": "sweep-model",
                                         "metric": "sensitivity"}})
    decision = registry.promote_sweep_best(cfg, parent)
    assert decision.model_name == "sweep-model" and decision.metric == "sensitivity"
    assert MlflowClient().get_run(parent).data.tags["promotion.alias"] == "champion"

    capsys.readouterr()
    cli_parent = registry_store.new_parent_run(best_run_id=runs.poor_run_id)
    code = registry.main(["--sweep-run-id", cli_parent, "--name", "sweep-model",
                          "--metric", "roc_auc", "--tracking-uri", registry_store.uri])
    assert code == 0
    assert "@challenger" in capsys.readouterr().out
    assert MlflowClient().get_run(cli_parent).data.tags["promotion.alias"] == "challenger"


# ---------------------------------------------------------------------------------------------
# Two promotions at once


def _waiting_on(lock_file: Path, pid: int) -> bool:
    """Whether `pid` is blocked on the flock of `lock_file` (/proc/locks lists waiters)."""
    inode = os.stat(lock_file).st_ino
    for line in Path("/proc/locks").read_text().splitlines():
        fields = line.split()
        if "->" in fields and str(pid) in fields and any(
            f.endswith(f":{inode}") for f in fields
        ):
            return True
    return False


def _stop(pid: int) -> None:
    """SIGSTOP `pid` and wait until it is stopped: a signal is delivered asynchronously, and a
    process still runnable when the lock is released could take it before stopping."""
    os.kill(pid, signal.SIGSTOP)
    deadline = time.time() + 30
    while Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in "Tt":
        assert time.time() < deadline, f"process {pid} did not stop"
        time.sleep(0.05)


def _promote_cli(run_id: str, uri: str) -> subprocess.Popen:
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "TF_CPP_MIN_LOG_LEVEL": "2"}
    return subprocess.Popen(
        [sys.executable, str(REPO / "search" / "registry.py"), "--run-id", run_id],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )


def _proc_locks_show_flocks() -> bool:
    """Whether /proc/locks lists this process's flocks (it may be hidden in some sandboxes)."""
    import fcntl
    import tempfile

    if not Path("/proc/locks").exists():
        return False
    with tempfile.NamedTemporaryFile() as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        inode = os.fstat(handle.fileno()).st_ino
        return any(line.split()[-3].endswith(f":{inode}") for line in
                   Path("/proc/locks").read_text().splitlines() if len(line.split()) >= 3)


@pytest.mark.slow
@pytest.mark.skipif(not _proc_locks_show_flocks(), reason="needs flocks listed in /proc/locks")
@pytest.mark.parametrize("first", ["poor", "good"])
def test_concurrent_promotions_leave_the_better_champion(first, trained_store, tmp_path):
    """Two CLI processes promote the good and the poor run into one SQLite registry at once.

    The test holds the promotion lock until both have registered and evaluated (each saw no
    champion) and block on the lock; then it lets `first` in alone (the other is SIGSTOPped),
    so the second must notice the champion changed and re-evaluate inside the lock. Both
    orders run; the good model must end champion.
    """
    db = tmp_path / "mlflow.db"
    shutil.copyfile(trained_store.db, db)
    uri = f"sqlite:///{db}"
    lock_file = db.with_name(db.name + gate.LOCK_SUFFIX)
    procs = {}
    with gate.promotion_lock(uri):
        procs["good"] = _promote_cli(trained_store.good_run_id, uri)
        procs["poor"] = _promote_cli(trained_store.poor_run_id, uri)
        deadline = time.time() + 240
        while not all(_waiting_on(lock_file, p.pid) for p in procs.values()):
            assert time.time() < deadline, "promotions never reached the lock"
            assert all(p.poll() is None for p in procs.values()), [
                p.communicate()[0][-3000:] for p in procs.values() if p.poll() is not None]
            time.sleep(0.2)
        second = "good" if first == "poor" else "poor"
        _stop(procs[second].pid)  # released below: only `first` can take the lock
    outputs: dict[str, str] = {}
    try:
        outputs[first] = procs[first].communicate(timeout=240)[0]
        os.kill(procs[second].pid, signal.SIGCONT)
        outputs[second] = procs[second].communicate(timeout=240)[0]
    finally:
        for p in procs.values():
            if p.poll() is None:
                os.kill(p.pid, signal.SIGCONT)
                p.kill()
    for key, p in procs.items():
        assert p.returncode == 0, outputs[key][-3000:]

    client = MlflowClient(uri, registry_uri=uri)
    champion = client.get_model_version_by_alias(NAME, "champion")
    assert champion.run_id == trained_store.good_run_id, outputs
    found = client.search_model_versions(f"name='{NAME}' and run_id='{trained_store.poor_run_id}'")
    poor = client.get_model_version(NAME, found[0].version)  # search results lack aliases
    # Poor second: compared and left @challenger; poor first: champion, then displaced.
    assert poor.aliases == (["challenger"] if first == "good" else [])
    # The second one in had seen no champion; inside the lock it found the first one there.
    run_id = getattr(trained_store, f"{second}_run_id")
    version = client.search_model_versions(f"name='{NAME}' and run_id='{run_id}'")[0]
    assert version.tags["promotion.compared_with"] != "none", outputs[second]
