"""The variant study (issue 8 item 2): the latent-noise and frozen-VAE options it needs, its held-out NLL, the
ordering verdict, and a smoke run of ``tools/ablate.py`` end to end (tiny budget, real demo data)."""

import dataclasses
import importlib.util
import json
import math
import os
import sys

import pytest
import torch

from simflow.config import ConfigError, load_config
from simflow.eval.generator import heldout_nll
from simflow.models.simflow import SimFlowModel
from simflow.rng import Stream, per_sample_normal

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ABLATE = os.path.join(ROOT, "configs", "ablate")
sys.path.insert(0, os.path.join(ROOT, "tools"))  # as `python tools/ablate.py` does: the study package is `ablation`
from ablation.plan import default_plan  # noqa: E402
from ablation.report import noise_note, ordering_verdict, seed_noise, summarise  # noqa: E402


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def demo(demo_data):
    """(train_npz, test_npz) with 600 real Fashion-MNIST images per split."""
    return demo_data(600, "fashion_mnist")


def cfg_for(name, tmp_path, demo, *overrides):
    return load_config(os.path.join(ABLATE, name), [f"data.path={demo[0]}", f"train.out_dir={tmp_path}/run",
                                                    "train.log_every=1", *overrides])


def test_configs_describe_the_variants(tmp_path, demo):
    a = cfg_for("a_e2e_fixed.yaml", tmp_path, demo)
    b = cfg_for("b_e2e_learned.yaml", tmp_path, demo)
    c = cfg_for("c_e2e_noise.yaml", tmp_path, demo)
    d0 = cfg_for("d_vae_pretrain.yaml", tmp_path, demo)
    d = cfg_for("d_frozen_vae.yaml", tmp_path, demo)
    assert (a.model.vae.posterior, a.model.vae.posterior_std, a.model.flow.noise_std) == ("fixed", 0.5, 0.0)
    assert (b.model.vae.posterior, b.loss.kl_weight, b.model.flow.noise_std) == ("learned", 1e-6, 0.0)
    assert (c.model.vae.posterior, c.model.flow.noise_std) == ("learned", 0.3)
    assert d0.loss.nll_weight == 0.0 and d0.model.vae.posterior == "learned" and not d0.train.freeze_vae
    assert d.train.freeze_vae and d.model.vae.posterior == "learned" and d.loss.gan.weight == 0.0
    # everything else equal: same architecture sizes, optimiser and batch for every variant
    for other in (b, c, d0, d):
        assert dataclasses.replace(other.model.flow, noise_std=0.0) == a.model.flow
        assert other.model.vae.base_channels == a.model.vae.base_channels == 16
        assert other.optim == a.optim and other.train.micro_batch_size == a.train.micro_batch_size
    names = [v.name for v in default_plan(ABLATE)]
    assert names == ["a", "b", "c", "d", "a_std0.25", "a_std0.75", "a_std1"]


def test_latent_noise_option(tmp_path, demo):
    cfg = cfg_for("c_e2e_noise.yaml", tmp_path, demo)
    torch.manual_seed(0)
    model = SimFlowModel(cfg)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    y = torch.tensor([1, 3])
    eps, n = torch.randn(2, *model.latent_shape), torch.randn(2, *model.latent_shape)
    with pytest.raises(ValueError, match="model.flow.noise_std=0.3"):
        model(x, y, eps)
    out = model(x, y, eps, n)
    mu, logvar = model.vae.encode(x)
    assert torch.allclose(out["z"], mu + torch.exp(0.5 * logvar) * eps + 0.3 * n, atol=1e-6)
    assert torch.allclose(out["x_hat"], model.vae.decode(out["z"]), atol=1e-6)  # the decoder sees the noisy z
    plain = SimFlowModel(cfg_for("b_e2e_learned.yaml", tmp_path, demo))
    plain.load_state_dict(model.state_dict())
    assert torch.allclose(plain(x, y, eps, n)["z"], mu + torch.exp(0.5 * logvar) * eps, atol=1e-6)  # ignored at 0
    with pytest.raises(ConfigError, match="model.flow.noise_std"):
        cfg_for("c_e2e_noise.yaml", tmp_path, demo, "model.flow.noise_std=-0.1")


@pytest.mark.parametrize("name", ["a_e2e_fixed.yaml", "c_e2e_noise.yaml"])
def test_heldout_nll_exact_for_identity_flow(name, tmp_path, demo):
    """At initialisation every flow block is the identity (zero-init heads, softplus shift: method §4.3), so the
    NLL must equal the standard-normal NLL of the very latents the function draws."""
    from simflow.data.demo import load_npz
    from simflow.data.transforms import to_model_input

    cfg = cfg_for(name, tmp_path, demo)
    torch.manual_seed(1)
    model = SimFlowModel(cfg).eval()
    test = load_npz(demo[1])
    images, labels = test["images"][:37], test["labels"][:37]
    got = heldout_nll(model, images, labels, seed=5, batch_size=16)
    with torch.no_grad():
        mu, logvar = model.vae.encode(to_model_input(images))
        idx = torch.arange(37)
        eps = per_sample_normal(model.latent_shape, 5, idx, Stream.POSTERIOR)
        std = 0.5 if logvar is None else torch.exp(0.5 * logvar)
        z = mu + std * eps
        if cfg.model.flow.noise_std:
            z = z + cfg.model.flow.noise_std * per_sample_normal(model.latent_shape, 5, idx, Stream.LATENT_NOISE)
        nats = (0.5 * z.pow(2).flatten(1).mean(1)).mean().item() + 0.5 * math.log(2 * math.pi)
    assert got["num_images"] == 37
    assert got["nats_per_dim"] == pytest.approx(nats, rel=1e-5)
    assert got["bits_per_dim"] == pytest.approx(nats / math.log(2), rel=1e-5)
    if logvar is None:
        assert got["posterior_std"] == pytest.approx(0.5)
        assert got["bound_bits_per_dim"] == pytest.approx(0.5 * math.log2(2 * math.pi * math.e * 0.25))
        assert got["bits_per_dim"] > got["bound_bits_per_dim"]
    else:
        want_std = torch.sqrt(torch.exp(logvar) + 0.09).mean().item()
        assert got["posterior_std"] == pytest.approx(want_std, rel=1e-5) and got["bound_bits_per_dim"] is None


def test_frozen_vae_training(tmp_path, demo):
    """Stage 1 exports a VAE; stage 2 loads it, trains only the flow, and leaves the VAE bit-identical."""
    from safetensors.torch import load_file

    from simflow.train.trainer import Trainer

    common = ["train.steps=2", "loss.gan.start_step=0", "checkpoint.every_steps=0"]
    pre = Trainer(cfg_for("d_vae_pretrain.yaml", tmp_path / "pre", demo, *common)).fit()
    pre_vae = {k[4:]: v for k, v in load_file(pre["weights"]).items() if k.startswith("vae.")}
    cfg = cfg_for("d_frozen_vae.yaml", tmp_path / "flow", demo, *common, "train.steps=3",
                  f"train.init_vae_from={pre['weights']}")
    tr = Trainer(cfg)
    vae = tr.model.vae.state_dict()
    assert all(torch.equal(vae[k], pre_vae[k]) for k in pre_vae) and set(vae) == set(pre_vae)
    assert not any(p.requires_grad for p in tr.model.vae.parameters())
    n_opt = sum(p.numel() for g in tr.gen.optimizer.param_groups for p in g["params"])
    assert n_opt == sum(p.numel() for p in tr.model.flow.parameters())
    flow0 = {k: v.clone() for k, v in tr.model.flow.state_dict().items()}
    tr.fit()
    assert all(torch.equal(v, pre_vae[k]) for k, v in tr.model.vae.state_dict().items())
    assert any(not torch.equal(v, flow0[k]) for k, v in tr.model.flow.state_dict().items())
    with pytest.raises(ValueError, match="train.init_vae_from"):
        Trainer(cfg_for("d_frozen_vae.yaml", tmp_path / "x", demo, f"train.init_vae_from={tmp_path}/nope.safetensors"))
    with pytest.raises(ValueError, match="do not fit model.vae"):
        Trainer(cfg_for("d_frozen_vae.yaml", tmp_path / "y", demo, f"train.init_vae_from={pre['weights']}",
                        "model.vae.latent_channels=4"))
    with pytest.raises(ConfigError, match="train.init_vae_from"):
        cfg_for("d_frozen_vae.yaml", tmp_path, demo, f"train.init_vae_from={pre['weights']}",
                "parallel.engine=deepspeed")


def _result(variant, seed, gfid0, gfid_cfg, group="main"):
    return {"variant": variant, "label": variant, "group": group, "seed": seed, "train_seconds": 10.0,
            "reconstruction": {"psnr": 20.0, "demo_rfid": 1.0}, "nll": {"bits_per_dim": 1.0, "posterior_std": 0.5},
            "gfid_no_cfg": gfid0, "gfid_best_cfg": gfid_cfg, "best_cfg_scale": 1.0,
            "samples": {"0": {"demo_fid": gfid0}, "1": {"demo_fid": gfid_cfg}}}


def test_ordering_verdict_and_seed_noise():
    paper = [_result("a", 0, 10.0, 5.0), _result("a", 1, 11.0, 6.0), _result("c", 0, 12.0, 7.0),
             _result("c", 1, 12.5, 7.5), _result("d", 0, 20.0, 9.0), _result("b", 0, 30.0, 9.0),
             _result("a_std1", 0, 1.0, 1.0, group="sweep")]
    rows = summarise(paper)
    assert [r["variant"] for r in rows] == ["a", "b", "c", "d", "a_std1"]
    assert rows[0]["gfid0"] == [10.0, 11.0] and rows[0]["seeds"] == [0, 1]
    v = ordering_verdict(rows)
    assert v["order"] == ["a", "c", "d", "b"]  # the sweep row does not enter the ranking
    assert (v["paper_order_holds"], v["a_best"], v["b_rank"]) == (True, True, 4)
    # a: [10, 11], c: [12, 12.5], d: one seed; with CFG a: [5, 6], c: [7, 7.5]
    assert v["pairs"]["gfid0"] == {("a", "c"): "as_paper", ("c", "d"): "one_seed", ("a", "d"): "one_seed"}
    assert v["pairs"]["gfid_cfg"][("a", "c")] == "as_paper"
    # the one prose check: the paragraph written into docs/ablation.md carries the verdict and the ranges
    assert "HOLDS" in v["text"] and "a < c in every seed (ranges [10.0, 11.0] and [12.0, 12.5] do not overlap)" in v["text"]
    flipped = summarise([_result("a", 0, 13.0, 5.0), _result("a", 1, 14.0, 5.0), _result("c", 0, 12.0, 5.0),
                         _result("c", 1, 13.5, 5.0), _result("d", 0, 9.0, 5.0), _result("d", 1, 10.0, 5.0)])
    v2 = ordering_verdict(flipped)
    assert v2["order"] == ["d", "c", "a"] and v2["paper_order_holds"] is False
    assert v2["pairs"]["gfid0"] == {("a", "c"): "overlap", ("c", "d"): "against", ("a", "d"): "against"}
    assert v2["pairs"]["gfid_cfg"] == {("a", "c"): "overlap", ("c", "d"): "overlap", ("a", "d"): "overlap"}
    noise = seed_noise(rows)
    assert noise["spread"] == {"a": {"gfid0": 1.0, "gfid_cfg": 1.0}, "c": {"gfid0": 0.5, "gfid_cfg": 0.5}}
    assert noise["gap"] == {"between": ("a", "c"), "gap": 1.75, "spread": 1.0, "larger": True}  # 12.25 - 10.5
    assert seed_noise(summarise(paper[:1]))["gap"] is None
    assert noise_note(summarise(paper[4:6])) == "Only one seed per variant: no estimate of seed noise."
    v3 = ordering_verdict(summarise([_result("a", 0, 15.0, 5.0), _result("c", 0, 12.0, 5.0),
                                     _result("d", 0, 20.0, 5.0)]))
    assert v3["order"] == ["c", "a", "d"] and (v3["paper_order_holds"], v3["a_best"], v3["b_rank"]) == (False, False, None)
    assert ordering_verdict(summarise(paper[:2]))["pairs"] == {}  # c and d missing: no pairwise verdict


@pytest.fixture(scope="module")
def small_feature_net(demo, tmp_path_factory):
    """A quickly trained demo feature net (accuracy irrelevant for the smoke run; its real training code runs)."""
    from simflow.data.demo import load_npz
    from simflow.eval.demo_features import save_fashion_cnn, train_feature_net

    a, b = load_npz(demo[0]), load_npz(demo[1])
    model, rec = train_feature_net(a["images"], a["labels"], b["images"], b["labels"], epochs=1, width=8,
                                   progress=False)
    path = str(tmp_path_factory.mktemp("fnet") / "net.safetensors")
    save_fashion_cnn(model, path, rec)
    return path


@pytest.mark.slow
def test_ablate_smoke_end_to_end(demo, small_feature_net, tmp_path):
    """tools/ablate.py with a tiny budget: three variants (incl. the two-stage frozen VAE), an extra seed for the
    best one, table + plot written; a second call resumes from the results on disk without training."""
    from safetensors.torch import load_file

    spec = importlib.util.spec_from_file_location("ablate_tool", os.path.join(ROOT, "tools", "ablate.py"))
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    out, md, png = tmp_path / "runs", tmp_path / "docs" / "ablation.md", tmp_path / "docs" / "ablation.png"
    argv = ["--budget", "2", "--variants", "a,c,d", "--top", "1", "--extra-seeds", "1", "--num-samples", "20",
            "--num-heldout", "20", "--cfg-scales", "1", "--jobs", "2", "--train-npz", demo[0], "--test-npz", demo[1],
            "--extractor-weights", small_feature_net, "--out", str(out), "--md", str(md), "--png", str(png),
            "--override", "sample.batch_size=20"]
    assert tool.main(argv) == 0
    results = [json.load(open(p)) for p in sorted(out.glob("*/seed*/result.json"))]
    first = sorted((r for r in results if r["seed"] == 0), key=lambda r: r["gfid_no_cfg"])
    assert [r["variant"] for r in sorted(first, key=lambda r: r["variant"])] == ["a", "c", "d"]
    assert [(r["variant"], r["seed"]) for r in results if r["seed"] == 1] == [(first[0]["variant"], 1)]  # --top 1
    for r in results:
        assert r["steps"] == 2 and all(s["steps"] == 2 for s in r["stages"].values())
        assert r["num_samples"] == 20 and set(r["samples"]) == {"0", "1"}
        for key in ("gfid_no_cfg", "gfid_best_cfg"):
            assert math.isfinite(r[key]) and r[key] >= 0
        assert math.isfinite(r["reconstruction"]["psnr"]) and math.isfinite(r["nll"]["bits_per_dim"])
        assert (out / r["variant"] / f"seed{r['seed']}" / "samples_cfg0.png").is_file()
    d = next(r for r in results if r["variant"] == "d" and r["seed"] == 0)
    assert set(d["stages"]) == {"pretrain", "main"}
    pre = load_file(d["stages"]["pretrain"]["weights"])
    main = load_file(d["stages"]["main"]["weights"])
    assert all(torch.equal(main[k], v) for k, v in pre.items() if k.startswith("vae."))  # frozen end to end
    text = md.read_text()
    assert "python tools/ablate.py --budget 2" in text and "commit: `" in text
    assert "| a |" in text and "| c |" in text and "| d |" in text  # one table row per variant
    assert ordering_verdict(summarise(results))["text"] in text
    assert png.stat().st_size > 10_000 and (tmp_path / "docs" / "ablation_samples.png").stat().st_size > 10_000
    def stamp():  # every result, sample grid and weights file of the first invocation
        return {p: p.stat().st_mtime_ns for p in out.glob("*/seed*/**/*") if p.is_file()}

    before = stamp()
    assert len(before) >= 9
    assert tool.main(argv) == 0  # everything on disk: no training, no sampling (no file rewritten)
    assert stamp() == before
    runs = json.load(open(out / "run.json"))["invocations"]
    assert len(runs) == 2 and runs[0]["commit"] == runs[1]["commit"]
    assert "2. `python tools/ablate.py --budget 2" in md.read_text()  # both invocations listed
    assert tool.main(argv[:1] + ["0"] + argv[2:]) == 2  # --budget 0 refused
    with pytest.raises(SystemExit):
        tool.main(["--budget", "x"])
    assert tool.main(["--variants", "zz", "--out", str(out)]) == 2
