"""pareto.py: a tiny smoke run with a budget of seconds, resume, the headline and the Pareto frontier."""

import importlib.util
import json
import math

import pytest

import pareto
from config import ConfigError

SMOKE = ["--size=tiny", "--budget_s=2", "--n_points=8", "--slices_per_point=1", "--downstream_at=8", "--seeds=1",
         "--batch_size=4", "--seq_len=32", "--eval_batches=1", "--eval_batch_size=8", "--ft_examples=32",
         "--ft_epochs=1", "--device=cpu", "--data=default+sentiment"]


def test_smoke_run_writes_both_arms_with_increasing_time(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    out = tmp_path / "p"
    pareto.main(SMOKE + [f"--out_dir={out}"])
    res = json.loads((out / "pareto.json").read_text())
    assert set(res) >= {"device", "torch", "budget_s", "arms", "headline"} and res["budget_s"] == 2
    assert set(res["arms"]) == {"mosaic", "bert"}
    for arm, points in res["arms"].items():
        assert len(points) == 9, arm  # t = 0 and 8 budget fractions
        assert points[0]["wall_s"] == 0 and points[0]["tokens"] == 0
        walls = [p["wall_s"] for p in points]
        assert walls[1] > 0 and all(b >= a for a, b in zip(walls, walls[1:])), (arm, walls)
        assert walls[-1] >= 2.0  # the whole budget was trained
        # at most one step past the budget: the last step starts before the budget is spent
        assert points[-1]["steps"] == 1 or walls[-1] - 2.0 < walls[-1] / points[-1]["steps"] * 3, (arm, walls)
        for p in points:
            assert set(p) >= {"wall_s", "tokens", "eval_loss", "eval_mlm_acc", "downstream_acc"}
            assert math.isfinite(p["eval_loss"]) and 0 <= p["eval_mlm_acc"] <= 1
        fine_tuned = [k for k, p in enumerate(points) if p["downstream_acc"] is not None]
        assert fine_tuned == [0, 8], (arm, fine_tuned)
        assert all(0 <= points[k]["downstream_acc"] <= 1 for k in fine_tuned)
    assert "summary" in res["headline"]
    table = (out / "pareto.md").read_text()
    assert table.count("| mosaic |") == 9 and table.count("| bert |") == 9
    assert (out / "pareto.png").is_file() == (importlib.util.find_spec("matplotlib") is not None)

    # resume: a finished run is reloaded, not retrained; another pretraining config is refused
    pareto.main(SMOKE + [f"--out_dir={out}", "--resume"])
    again = json.loads((out / "pareto.json").read_text())
    for arm in ("mosaic", "bert"):
        assert [p["wall_s"] for p in again["arms"][arm]] == [p["wall_s"] for p in res["arms"][arm]]
        assert [p["downstream_acc"] for p in again["arms"][arm]] == [p["downstream_acc"] for p in res["arms"][arm]]
    with pytest.raises(ConfigError, match="another configuration"):
        pareto.main(SMOKE + [f"--out_dir={out}", "--resume", "--lr=3e-3"])


def test_time_to_reach_interpolates_and_headline_names_the_faster_arm():
    pts = lambda accs, dt: [dict(wall_s=i * dt, eval_mlm_acc=a) for i, a in enumerate(accs)]
    fast, slow = pts([0.0, 0.2, 0.4], 10.0), pts([0.0, 0.1, 0.2], 10.0)
    assert pareto.time_to_reach(fast, 0.3) == pytest.approx(15.0)
    assert pareto.time_to_reach(fast, 0.2) == pytest.approx(10.0)
    assert pareto.time_to_reach(slow, 0.3) is None
    h = pareto.headline({"mosaic": fast, "bert": slow}, 20.0)
    assert h["mosaic_s_to_bert_final"] == pytest.approx(10.0) and h["mosaic_fraction_to_bert_final"] == 0.5
    assert h["bert_s_to_mosaic_final"] is None and h["summary"].startswith("MosaicBERT")
    h = pareto.headline({"mosaic": slow, "bert": fast}, 20.0)
    assert h["bert_fraction_to_mosaic_final"] == 0.5 and "baseline wins" in h["summary"]


def test_pareto_front_against_brute_force():
    pts = [(0, 0.1), (1, 0.3), (2, 0.2), (2, 0.35), (3, 0.35), (4, 0.5), (1, 0.3)]
    front = pareto.pareto_front(pts)
    for (t, q), f in zip(pts, front):
        dominated = any(t2 <= t and q2 >= q and (t2, q2) != (t, q) for t2, q2 in pts)
        assert f == (not dominated), (t, q)
    assert front == [True, True, False, True, False, True, True]


def test_bert_arm_is_the_mosaic_shape_with_every_switch_off():
    m, b = pareto.arm_model_config("small", "mosaic"), pareto.arm_model_config("small", "bert")
    assert (m.n_layers, m.d_model, m.n_heads, m.d_ff) == (b.n_layers, b.d_model, b.n_heads, b.d_ff)
    assert (m.position, m.ffn, m.unpad, m.low_precision_layernorm, m.sparse_prediction) == \
        ("alibi", "geglu", True, True, True)
    assert (b.position, b.ffn, b.unpad, b.low_precision_layernorm, b.sparse_prediction, b.attn_dropout) == \
        ("learned", "gelu", False, False, False, 0.1)
    with pytest.raises(ConfigError, match="size"):
        pareto.resolve(pareto.ParetoConfig(size="huge"))


def test_time_schedule_warms_up_then_decays_to_final_frac():
    """lr_at (train.lr_factor on time) against the schedule written directly in budget fractions f: warmup f / w up
    to warmup_frac w, then 1 - (1 - final) * (f - w) / (1 - w), held at final past the budget."""
    cfg = pareto.resolve(pareto.ParetoConfig(quick=True, budget_s=100.0, lr=1e-3))
    w, final = cfg.warmup_frac, cfg.final_lr_frac
    assert 0 < pareto.lr_at(0.0, cfg) < 0.01 * cfg.lr
    assert pareto.lr_at(3.0, cfg) == pytest.approx(cfg.lr * 0.03 / w, rel=1e-2)
    for t in (6.0, 30.0, 53.0, 99.0, 100.0, 250.0):
        f = min(t / 100.0, 1.0)
        assert pareto.lr_at(t, cfg) == pytest.approx(cfg.lr * (1 - (1 - final) * (f - w) / (1 - w))), t
