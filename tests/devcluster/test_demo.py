"""`make demo`'s choices and its live line: which example each model applies, and which adapter
the eval loss it prints belongs to (the status alone does not say)."""

from __future__ import annotations

import yaml

from devcluster import demo
from devcluster.cluster import REPO_ROOT


def test_every_demo_model_applies_an_example_named_demo() -> None:
    assert demo.DEFAULT_MODEL in demo.MODELS
    for model in demo.MODELS.values():
        manifest = yaml.safe_load((REPO_ROOT / "examples" / model.example).read_text())
        # watch() and the cleanup before a rerun look for this name.
        assert manifest["metadata"]["name"] == "demo"
        assert [c["name"] for c in manifest["spec"]["clients"]] == list(demo.CLIENTS)


def test_the_live_line_says_which_round_the_eval_loss_is_of() -> None:
    base = {"status": {"phase": "Running", "roundProgress": "1/3", "lastEvalLoss": 3.1118}}
    assert "eval loss 3.1118 (base)" in demo.progress_line(base)
    history = [{"round": 1, "evalLoss": 2.957}, {"round": 2, "trainLoss": 3.04}]
    later = {"status": {**base["status"], "lastEvalLoss": 2.957, "history": history}}
    assert "eval loss 2.9570 (round 1)" in demo.progress_line(later)
    assert "eval loss" not in demo.progress_line({"status": {"phase": "Pending"}})
