"""tools/convergence.py (issue 15 part 5): the run plan (budgets resume one run; baseline stages; NLL sweep) and the
report's table and best-guidance choice from score records."""

from __future__ import annotations

import importlib.util
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
spec = importlib.util.spec_from_file_location("convergence", os.path.join(ROOT, "tools", "convergence.py"))
conv = importlib.util.module_from_spec(spec)
spec.loader.exec_module(conv)


def _args(tmp_path, **kw):
    p = conv.argparse.Namespace(budgets="1000,500", every=500, seeds="0,1", pretrain=600, nll_weights="0.5,1,2",
                                nll_budget=500, out=str(tmp_path), train_npz="/d/demo.npz")
    p.__dict__.update(kw)
    return p


def test_plan_trains_each_run_once_to_its_largest_budget(tmp_path):
    args = _args(tmp_path)
    runs = {r["name"]: r for r in conv.plan(args)}
    assert sorted(runs) == ["a_nll0.5_s0", "a_nll2_s0", "a_s0", "a_s1", "d_s0", "d_s1"]  # w=1 is a_s0 itself
    a = runs["a_s0"]
    assert a["budgets"] == [500, 1000]
    (config, over, out), = a["stages"]
    assert config.endswith("a_e2e_fixed.yaml") and "train.steps=1000" in over and "train.seed=0" in over
    assert "checkpoint.every_steps=500" in over and out == os.path.join(str(tmp_path), "a_s0")
    pre, main = runs["d_s1"]["stages"]
    assert pre[0].endswith("d_vae_pretrain.yaml") and "train.steps=600" in pre[1]
    assert main[0].endswith("d_frozen_vae.yaml") and "train.steps=1000" in main[1]
    assert f"train.init_vae_from={pre[2]}/weights.safetensors" in main[1]
    assert "loss.nll_weight=2" in runs["a_nll2_s0"]["stages"][0][1] and runs["a_nll2_s0"]["budgets"] == [500]


def _rec(run, variant, step, fid0, acc0, scores):
    return {"run": run, "variant": variant, "seed": 0, "step": step, "train_wall_s": 120.0,
            "scores": {"0": {"demo_fid": fid0, "class_accuracy": acc0}, **scores}}


def test_report_table_and_best_scale(tmp_path):
    pts = [_rec("a_s0", "a", 500, 12.0, 0.3, {"1": {"demo_fid": 9.0, "class_accuracy": 0.4},
                                              "2": {"demo_fid": 10.5, "class_accuracy": 0.5}}),
           _rec("d_s0", "d", 500, 20.0, 0.2, {"1": {"demo_fid": 25.0, "class_accuracy": 0.25}})]
    assert conv._best(pts[0]) == (1.0, pts[0]["scores"]["1"])  # lowest demo-FID among w > 0
    md, png = str(tmp_path / "c.md"), str(tmp_path / "c.png")
    conv.write_report(pts, md, png, {"commands": ["`x`"], "commit": "abc", "seeds": "0", "cfg_mode": "deep_only",
                                     "num_samples": 1000, "num_reference": 10000})
    text = open(md).read()
    assert "| a_s0 | 500 | 2.0 | 12.00 / 0.300 | 9.00 / 0.400 | 10.50 / 0.500 | 1 |" in text
    assert "| d_s0 | 500 | 2.0 | 20.00 / 0.200 | 25.00 / 0.250 | - | 1 |" in text
    assert "NOT Inception FID" in text and os.path.getsize(png) > 1000
