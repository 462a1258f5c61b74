"""Tracking a comparison in wandb (offline, no login): its runs share a group named after the comparison and
carry policy and seed as config; the comparison table is logged once, as its own run of that group."""

import os

import wandb

from lis.compare import compare

TINY = ["teacher.epochs=1", "kdp.epochs=1", "finetune.epochs=1", "admm.interval=5", "signals.interval=5",
        "meta.interval=5", "tracking.wandb=offline"]


def test_a_comparison_is_one_wandb_group(tmp_path, monkeypatch, repo):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb"))
    calls, logged, real_init = [], [], wandb.init

    def init(**kw):
        calls.append(kw)
        run = real_init(**kw)
        real_log = run.log
        run.log = lambda data, *a, **k: (logged.append((kw["name"], data)), real_log(data, *a, **k))[1]
        return run

    monkeypatch.setattr(wandb, "init", init)
    compare(repo / "experiments" / "digits.yaml", ["fixed", "prune_only"], [0],
            [f"run.dir={tmp_path / 'runs'}", f"data.root={tmp_path / 'data'}", *TINY], name="cmp")
    runs = [c for c in calls if c.get("job_type") != "comparison"]
    assert sorted(c["name"] for c in runs) == ["cmp/fixed-s0", "cmp/prune_only-s0"]
    assert all(c["group"] == "cmp" and c["mode"] == "offline" for c in runs)
    assert sorted((c["config"]["policy"]["name"], c["config"]["run"]["seed"]) for c in runs) == [("fixed", 0), ("prune_only", 0)]
    tables = [(name, d["comparison"]) for name, d in logged if "comparison" in d]
    assert len(tables) == 1 and tables[0][0] == "cmp"
    assert [c for c in calls if c.get("job_type") == "comparison"][0]["group"] == "cmp"
    assert sorted(row[:3] for row in tables[0][1].data) == [["fixed", "fixed", 0], ["prune_only", "prune_only", 0]]
    assert os.listdir(tmp_path / "runs" / "cmp" / "wandb")  # the offline run of the table is on disk
