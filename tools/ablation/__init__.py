"""The paper's variant study (method §10.3) at small scale on the demo data, driven by ``tools/ablate.py``.

Variants (configs under ``configs/ablate/``, all from the same base, trained for the same number of steps):

* **a** end-to-end, fixed posterior std 0.5 (SimFlow, method §3.2 / §5.1); plus a ``posterior_std`` sweep;
* **b** end-to-end, learned posterior variance with the KL term (LDM/REPA-E weight, method §5.2);
* **c** end-to-end, learned variance + STARFlow-style extra Gaussian latent noise (``model.flow.noise_std``,
  method §5.5 / §10.3 "Noise");
* **d** frozen VAE: a learned-variance VAE pretrained on the same data (``loss.nll_weight=0``), then the flow trained
  on its frozen latents (``train.init_vae_from`` + ``train.freeze_vae``; method §10.3 "Frozen VAE").

Rooms: :mod:`ablation.plan` (the variants), :mod:`ablation.driver` (train + evaluate one (variant, seed) in its own
process), :mod:`ablation.report` (table, verdict, plots). The evaluation itself is library code,
:mod:`simflow.eval.generator`. ``tools/`` is not a package: ``python tools/ablate.py`` puts ``tools/`` on
``sys.path``, so this package imports as ``ablation``.
"""
