"""Tests for lis/agreement.py: the prediction and the observation computed by hand on written run directories."""

import json
import math

import numpy as np
import pytest
import yaml

from lis.agreement import Setting, agreement, format_agreement, main, predicted_change
from lis.errors import LISError

LAYERS = ["l0", "l1", "l2"]


def write_run(path, seed, alpha, val_acc, hypergradients=None, policy="fixed"):
    """A finished run directory as lis compress leaves it: config.yaml, summary.json, metrics.jsonl."""
    path.mkdir(parents=True)
    (path / "config.yaml").write_text(yaml.safe_dump({"policy": {"name": policy, "alpha": alpha, "alpha_out": 1.0,
                                                                 "rho": 0.03}}))
    (path / "summary.json").write_text(json.dumps({"policy": policy, "seed": seed, "val_acc": val_acc,
                                                   "student_acc": val_acc, "layer_names": LAYERS}))
    records = [{"phase": "kdp", "iter": 0, "layer_names": LAYERS}]
    for i, hg in enumerate(hypergradients or []):
        records.append({"phase": "kdp", "iter": 20 * (i + 1), "hg_alpha": hg, "hg_rho": [0.0] * 3,
                        "hg_alpha_out": 0.0})
    (path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")


@pytest.fixture
def study(tmp_path):
    """Base a = 1 measured on seeds 0-2 (two meta steps each); lowering layer 0 to 0 raises val accuracy by
    2, 3, 4 points; raising layer 2 to 3 lowers it by 0.1, 0.15, 0.2 points; a dean run is ignored."""
    hg = {0: [[1.0, 0.0, -1.0], [3.0, 2.0, -1.0]], 1: [[2.0, 1.0, 0.0], [2.0, 1.0, -2.0]],
          2: [[4.0, 0.0, -1.0], [2.0, 0.0, -1.0]]}
    base_acc = {0: 0.80, 1: 0.81, 2: 0.79}
    for s in range(3):
        write_run(tmp_path / "hg" / f"fixed-s{s}", s, 1.0, base_acc[s], hg[s])
        write_run(tmp_path / "iv" / f"low0-s{s}", s, [0.0, 1.0, 1.0], base_acc[s] + 0.02 + 0.01 * s)
        write_run(tmp_path / "iv" / f"high2-s{s}", s, [1.0, 1.0, 3.0], base_acc[s] - [0.001, 0.0015, 0.002][s])
    write_run(tmp_path / "iv" / "dean-s0", 0, 1.0, 0.5, policy="dean")
    return tmp_path, hg


def test_predicted_change_is_the_directional_derivative_by_hand():
    hg = np.array([[1.0, 2.0], [3.0, -1.0]])
    mean, se, n = predicted_change(hg, np.array([-1.0, 0.0]))
    assert (mean, n) == (-2.0, 2) and se == pytest.approx(1.0)  # values -1 and -3: std sqrt(2), se 1


def test_agreement_against_a_hand_computation(study):
    root, hg = study
    result = agreement({"ce": [root / "hg"]}, [root / "iv"])
    assert result["base"] == Setting((1.0, 1.0, 1.0), 1.0, (0.03, 0.03, 0.03))
    rows = {r["change"]: r for r in result["rows"]}
    assert set(rows) == {"a_0: 1 -> 0", "a_2: 1 -> 3"}  # the dean run is not an intervention

    low = rows["a_0: 1 -> 0"]
    diffs = [0.02, 0.03, 0.04]
    assert low["observed"]["mean"] == pytest.approx(np.mean(diffs)) and low["observed"]["n"] == 3
    half = 4.302652729911275 * np.std(diffs, ddof=1) / math.sqrt(3)  # t(0.975, 2)
    assert low["observed"]["lo"] == pytest.approx(np.mean(diffs) - half)
    # each seed's mean dL/da_0 over its meta steps: 2, 2, 3; delta = -1 on layer 0
    per_seed = np.array([-np.mean([h[0] for h in hg[s]]) for s in range(3)])
    mean, se, n = low["ce"]["predicted"]
    assert mean == pytest.approx(per_seed.mean()) and se == pytest.approx(per_seed.std(ddof=1) / math.sqrt(3))
    assert low["ce"]["agrees"] is True  # L_meta predicted down, accuracy observed up

    high = rows["a_2: 1 -> 3"]  # dL/da_2 means -1, -1, -1: L_meta predicted down by 2, accuracy observed down
    assert high["ce"]["predicted"][0] == pytest.approx(-2.0) and high["observed"]["hi"] < 0
    assert high["ce"]["agrees"] is False

    text = format_agreement(result)
    assert "| a_0: 1 -> 0 | +3.00 [" in text and "(agrees)" in text and "(disagrees)" in text
    assert "- ce: agrees with 1 of the 2 interventions" in text


def test_an_undecided_intervention_counts_for_nothing(study):
    root, _ = study
    for s in range(3):  # a change of +1, -1, 0 points: the CI spans 0
        (root / "iv" / f"high2-s{s}" / "summary.json").write_text(json.dumps(
            {"policy": "fixed", "seed": s, "val_acc": [0.81, 0.80, 0.79][s], "student_acc": 0.0,
             "layer_names": LAYERS}))
    rows = {r["change"]: r for r in agreement({"ce": [root / "hg"]}, [root / "iv"])["rows"]}
    assert rows["a_2: 1 -> 3"]["ce"]["agrees"] is None


def test_bad_input_is_one_line_and_exit_2(study, capsys):
    root, _ = study
    assert main(["--measured", "ce", "--runs", str(root / "iv")]) == 2
    assert "give NAME=DIR" in capsys.readouterr().err
    with pytest.raises(LISError, match="no finished run with hypergradients"):
        agreement({"ce": [root / "iv"]}, [root / "iv"])
    write_run(root / "hg" / "other-s0", 0, 2.0, 0.8, [[1.0, 1.0, 1.0]])
    with pytest.raises(LISError, match="must all be at one setting"):
        agreement({"ce": [root / "hg"]}, [root / "iv"])
    assert main(["--measured", f"ce={root / 'hg' / 'fixed-s0'}", "--runs", str(root / "iv")]) == 0


def test_follows_by_hand(tmp_path):
    """Layer 0's hypergradient is consistently positive (t > 2), layers 1-2's are not: the dean follows when
    layer 0 ends lowest."""
    from lis.agreement import follows
    from lis.plots import read_run

    def dean(name, final):
        path = tmp_path / name
        write_run(path, 0, 1.0, 0.8, [[1.0, -0.1, 0.2], [1.2, 0.1, -0.3], [0.8, 0.3, -0.2]], policy="dean")
        with open(path / "metrics.jsonl", "a") as f:
            for a in ([1.0, 1.0, 1.0], final):
                f.write(json.dumps({"phase": "kdp", "iter": 100, "alpha": a, "rho": [0.03] * 3}) + "\n")
        return read_run(path)

    f = follows(dean("good", [0.2, 1.4, 0.9]))
    assert f["less"] == [0] and f["rest"] == [1, 2] and f["follows"] is True
    assert f["a_less"] == pytest.approx(0.2) and f["a_rest"] == pytest.approx(1.15)
    # mean hypergradients 1.0, 0.1, -0.1 (ranks 3, 2, 1) against final a 0.2, 1.4, 0.9 (ranks 1, 3, 2):
    # 1 - 6 * (4 + 1 + 1) / (3 * 8)
    assert f["spearman"] == pytest.approx(-0.5)
    assert follows(dean("bad", [1.9, 1.0, 1.0]))["follows"] is False
