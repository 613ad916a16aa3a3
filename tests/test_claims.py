"""The claims experiment (tests/claims.py) end to end in its --quick size, through
`python river.py claims`: the files it writes and the structure of its tables and JSON.
Never its numbers: a quick run trains for seconds and its scores mean nothing."""
import json

import pytest
from PIL import Image

import river

pytestmark = pytest.mark.slow  # the fixture runs `claims --quick`: about a minute

ARMS = ("random", "last", "fixed", "dense")
LABELS = ("random past frame (paper)", "last frame only", "last + fixed previous frame",
          "dense: last 4 frames at once", "copy last frame (baseline)")


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("claims")
    river.main(["claims", "--quick", "--out", str(out)])
    return out, json.loads((out / "claims.json").read_text()), (out / "claims.md").read_text()


def test_writes_its_files_and_data(quick):
    out, result, _ = quick
    assert Image.open(out / "sparse_conditioning.png").size[0] > 500
    assert {p.name for p in (out / "data").iterdir()} == {"balls.h5", "occluder.h5",
                                                          "slow_balls.h5"}
    assert result["settings"]["quick"] and result["elapsed_s"]["total"] > 0


def test_conditioning_arms_on_both_data_sets(quick):
    _, result, md = quick
    assert set(result["conditioning"]) == {"balls", "occluder"}
    for name, r in result["conditioning"].items():
        assert tuple(r["arms"]) == ARMS
        for arm in ARMS:
            summary = r["arms"][arm]["summary"]
            for key in ("mean_psnr", "best_psnr", "mean_ssim", "best_ssim", "steps_per_s",
                        "ms_per_frame", "nfe_per_frame"):
                assert isinstance(summary[key], float), (name, arm, key)
            # memory frames: flagged in the occluder file only
            assert (summary["memory_mean_psnr"] is None) == (name == "balls")
    budget = result["settings"]["budget"]
    for arm in ARMS:  # the same autoencoder and budget for every arm of a data set
        for name in ("balls", "occluder"):
            key = json.loads(quick[0].joinpath(name, f"{arm}-seed0", "claims_key.json").read_text())
            assert key["config"]["conditioning"] == arm
            assert key["config"]["flow_steps"] == budget["flow_steps"]
            assert key["config"]["flow_batch"] == budget["batch"]
    cost = result["cost"]
    assert cost["dense"]["field_params"] > cost["random"]["field_params"]
    assert all(cost[arm]["peak_mb"] > 0 for arm in ARMS) and cost["floor_mb"] > 0
    for heading in ("## Conditioning arms: bouncing balls", "## Conditioning arms: occluder",
                    "## What each arm costs"):
        assert heading in md
    # rows: two conditioning tables and the cost table; random and fixed in the picture's too
    for label, rows in zip(LABELS, (4, 3, 4, 3, 2)):
        assert md.count(f"| {label} |") == rows, label


def test_warm_start_grid_on_the_official_grid(quick):
    _, result, md = quick
    budget = result["settings"]["budget"]
    assert set(result["warm_start"]) == {"balls", "slow_balls"}
    for w in result["warm_start"].values():
        seen = {(r["warm_start"], n) for r in w["rows"] for n in r["steps"]}
        assert seen == {(s, n) for s in budget["warm_starts"] for n in budget["grid_steps"]}
        for r in w["rows"]:
            assert r["nfe_per_frame"] == river.nfe_per_frame(r["steps"][0], r["warm_start"],
                                                             "euler")
        assert [float(s) for s in w["reach"]["per_warm_start"]] == budget["warm_starts"]
    assert md.count("## Warm start against NFE") == 2
    assert "| warm start s | reaches the cold best at NFE/frame |" in md


def test_picture_records_every_evaluation(quick):
    _, result, md = quick
    pic = result["picture"]
    steps = result["settings"]["budget"]["sample_steps"]
    for arm in ("random", "fixed"):
        assert len(pic[arm]) == result["settings"]["sample_steps"] == steps
        assert all(1 <= e["d"] < pic["frame"] for e in pic[arm])  # the true frames before it
    assert all(e["d"] == 1 for e in pic["fixed"])  # fixed: always the frame before the last
    assert "sparse_conditioning.png" in md and "## Elapsed" in md
