"""The SimFlow training loop (method §5.4), readable top to bottom.

One optimizer step = ``grad_accumulation`` micro-batches on each of ``dp_size`` data-parallel ranks:

    for each micro-batch (images x, labels y, global sample indices i):
        eps      = N(0, I) drawn from (seed, i)           # posterior noise, method §3.2
        y_in     = y or null with p = label_drop from (seed, i)   # CFG label dropout, method §2
        out      = generator(x, y_in, eps)                # VAE encode -> z = mu + s eps -> decode; flow NLL of z
        L_G      = L1 + LPIPS + GAN + lambda NLL (+KL) (+REPA)    # method §5.2, D frozen
        generator.backward(L_G); discriminator.backward(hinge(D(x), D(x_hat.detach())))
    generator.step(); discriminator.step(); EMA update of the flow   # method §5.4 steps 5-7

No host syncs between log steps: metrics stay 0-dim device tensors (:mod:`simflow.train.step_stats`) and are reduced
across ranks once per ``train.log_every`` steps (and before every checkpoint save); a step whose loss or gradient
norm is non-finite on any rank is skipped on the device by the engines (policy: :mod:`simflow.parallel.engine`),
counted (``skipped_steps``) and named in a warning at the next log step; ``train.max_skipped_steps`` consecutive
skips stop the run with :data:`~simflow.train.signals.NONFINITE_EXIT_CODE`.

The trainer talks to weights only through the :class:`~simflow.parallel.engine.Engine` interface and to data only
through the loader's (consumed-samples) state, so the same loop runs in one process or under torchrun/srun.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import time
from typing import Any, Dict, Iterator, List, NoReturn, Optional

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from simflow.checkpoint.export import write_streamed
from simflow.checkpoint.lock import claim_run_dir
from simflow.checkpoint.manager import Checkpointer, check_resumable, describe_refusal
from simflow.checkpoint.rng import rng_state, set_rng_state
from simflow.checkpoint.store import Group
from simflow.checkpoint.weights import load_vae_weights
from simflow.config import SimFlowConfig, to_dict
from simflow.data import build_loader
from simflow.losses.joint import discriminator_loss, generator_loss, nll_lower_bound
from simflow.losses.perceptual import build_perceptual
from simflow.losses.teacher import build_teacher
from simflow.models.discriminator import NLayerDiscriminator
from simflow.models.simflow import SimFlowModel, build_generator
from simflow.parallel.engine import Engine
from simflow.parallel.factory import build_engine as default_build_engine
from simflow.parallel.topology import Topology
from simflow.rng import Stream, drop_labels, per_sample_normal
from simflow.runtime import autocast_dtype, code_version, resolve_device
from simflow.sampling import sample_images, save_grid
from simflow.train.metrics import MetricsLogger, plot_loss_curve
from simflow.train.signals import (REQUEUE_EXIT_CODE, NonFiniteExit, RequeueExit, StepBoundary, Watchdog,
                                   holding_after_requeue)
from simflow.train.step_stats import MetricWindow, SkipTracker, poisoned_steps

log = logging.getLogger("simflow")

# Test hook (tests/test_step.py, tests/test_step_dist.py): "STEP[@RANK],..." makes rank RANK (every rank without
# @RANK) multiply its generator and discriminator losses at 0-based trainer step STEP by NaN. Read at Trainer build.
POISON_ENV = "SIMFLOW_TEST_POISON_LOSS"


class Trainer:
    """Builds everything from a config and runs the loop. See the module docstring for one step."""

    def __init__(self, cfg: SimFlowConfig, topology: Optional[Topology] = None, build_engine=None):
        self.cfg = cfg
        self.topo = topology or Topology.single(resolve_device(cfg.train.device, key="train.device"),
                                                cfg.parallel.engine)
        self.device = self.topo.device
        self.dtype = autocast_dtype(cfg, self.device)
        self.out_dir = cfg.train.out_dir
        self.ckpt_dir = cfg.checkpoint.dir or os.path.join(self.out_dir, "checkpoints")
        self.run_id = cfg.train.run_id or os.path.basename(os.path.normpath(self.out_dir))
        # Teachers first: a missing weights file must stop the run before anything expensive happens.
        self.perceptual = build_perceptual(cfg.loss.perceptual)
        if self.perceptual is not None:
            self.perceptual.to(self.device)
        self.teacher = None
        if cfg.loss.repa.enabled:
            self.teacher = build_teacher(cfg.loss.repa).to(self.device)

        torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank and for any TP size
        build_engine = build_engine or default_build_engine  # local or DeepSpeed by parallel.engine
        vae_init = (functools.partial(load_vae_weights, path=cfg.train.init_vae_from) if cfg.train.init_vae_from
                    else None)  # a frozen-VAE variant starts from a trained VAE (method §10.3)
        self.gen: Engine = build_engine(cfg, lambda factory=None: build_generator(cfg, factory, vae_init), "generator",
                                        ["flow", "vae"] if cfg.train.ema_vae else ["flow"], self.topo)
        self.disc: Optional[Engine] = None
        if cfg.loss.gan.weight > 0:
            g = cfg.loss.gan
            self.disc = build_engine(cfg, lambda factory=None: NLayerDiscriminator(3, g.ndf, g.n_layers, g.norm),
                                     "discriminator", [], self.topo)
        self.loader = build_loader(cfg, self.topo.dp_rank, self.topo.dp_size)
        check_data_labels(self.loader, cfg)  # once, on the host: the step never reads labels back
        self.step = 0
        self.checkpointer = Checkpointer(self.ckpt_dir, {"generator": self.gen, "discriminator": self.disc},
                                         self.loader, keep=cfg.checkpoint.keep, async_save=cfg.checkpoint.async_save,
                                         rng_get=rng_state, rng_set=set_rng_state)
        self.window = MetricWindow(self.device)  # per-step metric rows, reduced at log steps
        self.skips = SkipTracker(self.device)  # skipped (non-finite) steps, read at log steps and before saves
        self.skipped_steps = 0  # host copy of the cumulative count, as of the last read (saved in the trainer state)
        self._poison = poisoned_steps(os.environ.get(POISON_ENV), self.topo.rank)
        self._t_flush = time.perf_counter()  # host timer for img_per_s over a log window
        self._window_images = 0
        self.metrics = MetricsLogger(self.out_dir, cfg.logging.wandb, cfg.logging.project, self.run_id,
                                     to_dict(cfg), enabled=self.topo.is_main)
        self.history: List[Dict[str, float]] = []
        self._saved_step = -1  # step of the last checkpoint this process saved or resumed from
        self.resume_report: Dict[str, Any] = {"loaded": None, "skipped": []}
        self._bound = nll_lower_bound(cfg.model.vae.posterior_std) if cfg.model.vae.posterior == "fixed" else None
        self._warned_bound = False

    # ------------------------------------------------------------------------------------------------------
    @property
    def model(self) -> SimFlowModel:
        return self.gen.module

    def save(self, block: bool = False) -> str:
        """Collective: checkpoint step ``self.step`` through :class:`~simflow.checkpoint.manager.Checkpointer`
        (each rank writes only its own shards; committed when every rank finished; in the background when
        ``checkpoint.async_save`` and not ``block``)."""
        meta = {"run_id": self.run_id, "config": to_dict(self.cfg), "code_version": code_version(),
                "topology": {"world_size": self.topo.world_size, "tp_size": self.topo.tp_size,
                             "dp_size": self.topo.dp_size},
                "precision": str(self.dtype).replace("torch.", ""),
                "loss_scale": "none (fp32 master weights, fp32 or bf16 compute: no dynamic loss scaling)"}
        d = self.checkpointer.save(self.step, {"step": self.step, "skipped_steps": self.skipped_steps}, meta,
                                 block=block)
        self._saved_step = self.step
        return d

    def maybe_resume(self) -> bool:
        """Load the newest valid checkpoint of this run, if any (collective; any TP/DP: each rank reads only the
        chunks it owns at this layout). Newer partial or corrupt steps, and steps whose files fail to load on any
        rank, are skipped and reported with the reason. ``self.resume_report`` holds ``{"loaded": location or None,
        "skipped": [(location, reason), ...]}``.

        Raises:
            CheckpointError: the checkpoint belongs to another run id, or its config has another architecture.
        """
        self.resume_report: Dict[str, Any] = {"loaded": None, "skipped": []}
        if not self.cfg.checkpoint.resume:
            return False
        got = self.checkpointer.load_latest(lambda manifest, d: check_resumable(manifest, self.run_id, self.cfg, d))
        if got is None:
            self.resume_report["skipped"] = list(self.checkpointer.skipped)
            return False
        found, trainer_state, info = got
        self.resume_report = {"loaded": found, "skipped": info["skipped"]}
        self.step = self._saved_step = int(trainer_state["step"])
        self.skipped_steps = int(trainer_state.get("skipped_steps", 0))
        self.skips = SkipTracker(self.device, self.skipped_steps)
        if self.topo.is_main:
            log.info("resumed from %s at step %d (saved at world size %s, now %d%s)", found, self.step,
                     info["manifest"].get("world_size"), self.topo.world_size,
                     "" if info["exact_rng"] else "; RNG states remapped")
        return True

    @contextlib.contextmanager
    def _run_guard(self, boundary: StepBoundary) -> Iterator[Watchdog]:
        """For the duration of :meth:`fit`: the run-id check and run lock (collective :func:`claim_run_dir`: rank 0
        holds it, every rank raises the same error if either fails; re-entrant, so a lock the launcher already took
        before building the engines is reused), the stop-signal handlers and the watchdog. All undone on any exit;
        under the process entry point, after a committed stop step the flag-only handlers stay (:meth:`StopFlag.hold`),
        so the exit status stays 75."""
        group = Group()
        lock = claim_run_dir(self.ckpt_dir, self.run_id, self.cfg.checkpoint, group)
        if (group.rank == 0 and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
                and int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0") or 0) > 0):
            log.warning("torchrun shares its rendezvous TCPStore with the workers: after a worker restart it still "
                        "holds the failed round's keys and the restarted workers can hang in init_process_group "
                        "(pytorch/pytorch#135712); export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 before torchrun")
        installed = boundary.flag.install()
        watchdog = Watchdog(self.cfg.checkpoint.watchdog_s).start()
        requeue = False
        try:
            yield watchdog
        except RequeueExit:
            requeue = True  # the stop step's save is finished: later signals must not change the exit status (75)
            raise
        finally:
            watchdog.stop()
            if installed and requeue and holding_after_requeue():  # set by the process entry point
                boundary.flag.hold()
            elif installed:
                boundary.flag.uninstall()
            lock.release()
            self.metrics.close()

    # ------------------------------------------------------------------------------------------------------
    def _autocast(self):
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)

    def host_inputs(self, batch: Dict[str, torch.Tensor]) -> Dict[str, Optional[torch.Tensor]]:
        """The host (CPU) half of a micro-step: per-sample posterior noise, CFG label dropout and latent noise from
        the batch's global sample indices (:mod:`simflow.rng`), on CPU tensors that never were on the
        device (their reads are not device syncs). Returns ``image`` (B, 3, H, W), ``label`` (B,) int64 after
        dropout, ``eps`` and ``latent_noise`` (B, C_lat, h, w) float32 or None."""
        cfg = self.cfg
        idx = batch["index"]
        latent_noise = None
        if cfg.model.flow.noise_std > 0:  # STARFlow-style extra latent noise, its own per-sample stream
            latent_noise = per_sample_normal(self.model.latent_shape, cfg.train.seed, idx, Stream.LATENT_NOISE)
        return {
            "image": batch["image"],
            "label": drop_labels(batch["label"], self.model.null_class, cfg.train.label_drop, cfg.train.seed, idx),
            "eps": per_sample_normal(self.model.latent_shape, cfg.train.seed, idx, Stream.POSTERIOR),
            "latent_noise": latent_noise,
        }

    def micro_step(self, batch: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """Forward + backward of one micro-batch for the generator and the discriminator. Returns the detached
        0-dim device metrics of :func:`~simflow.losses.joint.generator_loss` / ``discriminator_loss``; no host sync
        after :meth:`host_inputs`."""
        cfg = self.cfg
        h = self.host_inputs(batch)
        x = h["image"].to(self.device, non_blocking=True)
        y_in = h["label"].to(self.device, non_blocking=True)
        eps = h["eps"].to(self.device, non_blocking=True)
        latent_noise = None if h["latent_noise"] is None else h["latent_noise"].to(self.device, non_blocking=True)
        poison = self.step in self._poison  # test hook (POISON_ENV): a host int lookup, no tensor read
        teacher_features = None
        if self.teacher is not None:
            with torch.no_grad():
                teacher_features = self.teacher(x)  # (B, N, C); repa_loss resamples to the flow grid
        gan_on = self.disc is not None and self.step >= cfg.loss.gan.start_step
        with self._autocast():
            out = self.gen.module(x, y_in, eps, latent_noise)
            frozen = self.disc.frozen() if gan_on else contextlib.nullcontext()
            with frozen:
                loss, m = generator_loss(cfg, self.model, out, x, self.step, self.perceptual,
                                         self.disc.module if gan_on else None, teacher_features)
        if poison:
            loss = loss * float("nan")
            m["loss"] = loss.detach().float()
        self.gen.backward(loss)
        if gan_on:
            with self._autocast():
                d_loss, dm = discriminator_loss(self.disc.module, x, out["x_hat"])
            if poison:
                d_loss = d_loss * float("nan")
                dm["d_loss"] = d_loss.detach().float()
            self.disc.backward(d_loss)
            m.update(dm)
        return m

    def train_step(self, data_iter) -> Dict[str, torch.Tensor]:
        """One optimizer step (``grad_accumulation`` micro-batches), with **no host sync** (DeepSpeed's internal
        overflow read aside): returns this rank's micro-batch-averaged metrics and ``grad_norm`` as 0-dim device
        tensors and queues them, with the host values ``lr`` and ``skipped_samples``, as one row of
        :attr:`window` (reduce with :meth:`flush_metrics`). A non-finite step is skipped by the engines and
        recorded in :attr:`skips` (device counters); ``self.step`` counts attempted steps either way."""
        acc: Dict[str, torch.Tensor] = {}
        n = self.cfg.train.grad_accumulation
        for _ in range(n):
            for k, v in self.micro_step(next(data_iter)).items():
                acc[k] = v / n if k not in acc else acc[k] + v / n
        stats = self.gen.step()
        bits = stats["nonfinite"]
        if self.disc is not None and self.step >= self.cfg.loss.gan.start_step:
            bits = bits + 4 * self.disc.step()["nonfinite"]  # discriminator's bits 2-3 (step_stats.SKIP_REASONS)
        self.gen.ema_update()
        self.skips.update(self.step + 1, bits)
        acc["grad_norm"] = stats["grad_norm"]
        self.step += 1
        self._window_images += self.cfg.train.micro_batch_size * n * self.topo.dp_size
        self.window.add(self.step, acc, {"lr": float(stats["lr"]),
                                         "skipped_samples": float(getattr(self.loader, "skipped_samples", 0))})
        return acc

    def flush_metrics(self) -> List[Dict[str, float]]:
        """Collective (every rank, same step): the pending rows of :meth:`train_step` averaged over the ranks (one
        all-reduce) as Python floats, oldest first, each with ``step``, ``img_per_s`` (images of the window over the
        host time since the previous flush, which was a sync point too) and ``skipped_steps`` (cumulative, as of the
        previous :meth:`check_skips`). This is where the step's device work is waited for."""
        world = self.topo.world_size if dist.is_available() and dist.is_initialized() else 1
        rows = self.window.flush(world)
        now = time.perf_counter()
        img_per_s = self._window_images / max(now - self._t_flush, 1e-9)
        self._t_flush, self._window_images = now, 0
        for r in rows:
            r.update(img_per_s=img_per_s, skipped_steps=float(self.skipped_steps))
        return rows

    def train_step_logged(self, data_iter) -> Dict[str, float]:
        """:meth:`train_step` then :meth:`flush_metrics` (a sync point): this step's rank-averaged metrics as
        floats. For tests and tools that want every step's values; the loop itself flushes at log steps only."""
        self.train_step(data_iter)
        return self.flush_metrics()[-1]

    def check_skips(self) -> None:
        """Read the skipped-step counters (a host sync; at log steps and before every checkpoint save), warn
        naming the skipped steps and what was non-finite, update ``skipped_steps``.

        Raises:
            NonFiniteExit: ``train.max_skipped_steps`` consecutive steps were skipped (identical on every rank: the
                counters are built from rank-combined flags), so every rank stops alike, exit status 3.
        """
        rep = self.skips.read()
        self.skipped_steps = rep.total
        if rep.window and self.topo.is_main:
            log.warning("non-finite step(s): %s; weights, AdamW moments and EMA were left unchanged and the global "
                        "batch was consumed (not retried)", rep.describe())
        limit = self.cfg.train.max_skipped_steps
        if rep.consecutive >= limit:
            msg = (f"{rep.consecutive} consecutive non-finite steps up to step {self.step} (train.max_skipped_steps="
                   f"{limit}; last window: {rep.describe()}): the run stops without saving; the newest checkpoint "
                   f"holds the last good state. Lower optim.lr or check the data, then restart")
            self._stop_nonfinite(msg)

    def _stop_nonfinite(self, msg: str) -> NoReturn:
        """Log ``msg`` once (main rank) and raise :class:`NonFiniteExit` (status 3); every rank calls it alike."""
        exc = NonFiniteExit(self.step, msg)
        if self.topo.is_main:
            log.error("%s; exiting with status %d", msg, exc.code)
        raise exc

    def check_refused_checkpoint(self) -> None:
        """After a save was finalized (``save``, ``poll``, ``wait``): a save refused because the state held NaN/Inf
        stops the run, since the weights, moments or EMA in memory stay non-finite and no later save could commit
        (a week of training would go on with no checkpoint). A write failure (storage) only logs: the next save
        retries. Identical on every rank (:attr:`Checkpointer.refused` is built from all-gathered flags).

        Raises:
            NonFiniteExit: exit status 3, naming the step, the rank and the tensor.
        """
        refused = self.checkpointer.refused
        if refused is None or not refused["nonfinite"]:
            return
        msg = (f"checkpoint of step {refused['step']} refused ({describe_refusal(refused)}): the training state in "
               f"memory is non-finite, so no later save can commit; the run stops, and the newest committed checkpoint "
               f"holds the last good state")
        self._stop_nonfinite(msg)

    def _save_checked(self, block: bool) -> None:
        """:meth:`save` inside ``fit``: the previous background save is finalized and checked first (a refused one
        stops the run before another save of the same state starts), and a blocking save is checked at once."""
        self.checkpointer.wait()
        self.check_refused_checkpoint()
        self.save(block=block)
        self.check_refused_checkpoint()

    def _sync_point(self) -> List[Dict[str, float]]:
        """Log-step / pre-save reads: flush the metric rows into :attr:`history`, then check the skip counters."""
        rows = self.flush_metrics()
        self.history.extend(rows)
        self.check_skips()
        if rows:
            rows[-1]["skipped_steps"] = float(self.skipped_steps)
        return rows

    def _warn_below_bound(self, rows: List[Dict[str, float]]) -> None:
        """Warn once if a flushed step's flow NLL is below the fixed-posterior bound (method §4.4)."""
        if self._bound is None or self._warned_bound:
            return
        low = [r for r in rows if "nll" in r and r["nll"] < self._bound]
        if low:
            log.warning("flow NLL %.4f nats/dim at step %d is below the bound %.4f for posterior_std=%g: causal "
                        "leakage or a log-det bug (method §4.4)", low[0]["nll"], low[0]["step"], self._bound,
                        self.cfg.model.vae.posterior_std)
            self._warned_bound = True

    @torch.no_grad()
    def sample_grid(self, path: str) -> str:
        """Write a grid of EMA-flow samples: ``train.sample_grid`` images, classes cycling, fixed noise."""
        n = self.cfg.train.sample_grid
        num_classes = self.cfg.model.flow.num_classes
        idx = torch.arange(n)
        labels = idx % num_classes
        with self.gen.full_params(ema=True) as model:  # collective for sharded engines: every rank samples
            was_training = model.training
            model.eval()
            x = sample_images(model, idx, labels, self.cfg.sample, self.device, self.dtype)
            model.train(was_training)
        if not self.topo.is_main:
            return path
        return save_grid(x, path, nrow=num_classes if num_classes <= n else None)  # one column per class

    def export(self, path: str) -> str:
        """Full fp32 weights (EMA flow + VAE) as safetensors, for single-process sampling: streamed one tensor at a
        time (collective for sharded engines, rank 0 writes; :func:`simflow.checkpoint.export.write_streamed`), a
        local path or ``s3://`` URL. Raises NonFiniteExportError (no file) if any value is NaN/Inf."""
        return write_streamed(path, self.gen.full_tensor_specs(ema=True), self.gen.iter_full_state(ema=True),
                              {"run_id": self.run_id, "step": str(self.step)}, write=self.topo.is_main)

    # ------------------------------------------------------------------------------------------------------
    def fit(self) -> Dict[str, Any]:
        """Run to ``train.steps`` (README "Checkpoints and fault tolerance"): take the run lock, resume from the
        newest valid checkpoint, train; save every ``checkpoint.every_steps`` steps, every ``every_minutes`` minutes
        and at the end; on SIGTERM/SIGUSR1 (flags voted at the step boundary) every rank saves the same step and
        exits with ``REQUEUE_EXIT_CODE`` (:class:`~simflow.train.signals.RequeueExit`). Writes sample grids, the
        loss curve and exported weights."""
        cfg = self.cfg
        boundary = StepBoundary(cfg.checkpoint.every_minutes, cfg.checkpoint.signals)  # votes over a gloo group
        with self._run_guard(boundary) as watchdog:
            watchdog.beat("resume")
            self.maybe_resume()
            os.makedirs(self.out_dir, exist_ok=True)
            self.gen.module.train()
            data_iter = iter(self.loader)
            bar = tqdm(total=cfg.train.steps, initial=self.step, desc="train", disable=not self.topo.is_main,
                       dynamic_ncols=True)
            m: Dict[str, float] = {}
            self._t_flush, self._window_images = time.perf_counter(), 0
            while self.step < cfg.train.steps:
                watchdog.beat("train step")
                self.train_step(data_iter)  # queues device work; reads nothing back
                if self.step % cfg.train.log_every == 0 or self.step == cfg.train.steps:
                    watchdog.beat("log step")
                    rows = self._sync_point()  # the one sync per log window (may raise NonFiniteExit)
                    m = rows[-1] if rows else m
                    self._warn_below_bound(rows)
                    if rows:
                        self.metrics.log(self.step, {k: v for k, v in m.items() if k != "step"})
                        bar.set_postfix(loss=f"{m['loss']:.3f}", bpd=f"{m['bits_per_dim']:.3f}",
                                        rec=f"{m['rec']:.3f}")
                bar.update(1)
                if cfg.train.sample_every and self.step % cfg.train.sample_every == 0:
                    watchdog.beat("sample grid")
                    self.sample_grid(os.path.join(self.out_dir, f"samples_step{self.step:07d}.png"))
                    if self.topo.is_main:
                        plot_loss_curve(self.metrics.path, os.path.join(self.out_dir, "loss_curve.png"))
                watchdog.beat("checkpoint poll")
                self.checkpointer.poll()  # commits a finished background save (collective only while one is pending)
                self.check_refused_checkpoint()
                watchdog.beat("step boundary vote")
                stop, time_due = boundary.vote()  # one all-reduce(MAX): any rank's signal or timer counts
                if stop or time_due or (cfg.checkpoint.every_steps and self.step % cfg.checkpoint.every_steps == 0):
                    watchdog.beat("checkpoint save")
                    self._sync_point()  # never save while max_skipped_steps consecutive skips are pending
                    self._save_checked(block=stop)  # a requeue exit waits for its checkpoint to be committed
                    boundary.saved()
                if stop:
                    bar.close()
                    got = boundary.flag.received
                    failed = self.checkpointer.refused  # only a write failure gets here (non-finite stopped above)
                    failed = failed if failed is not None and failed["step"] == self.step else None
                    saved = (f"the save of step {self.step} FAILED ({describe_refusal(failed)}), so the requeued "
                             f"job resumes from the newest committed step" if failed else
                             f"saved step {self.step} on every rank")
                    if got or self.topo.is_main:
                        log.warning("stop requested by %s: %s; exiting with the requeue status %d",
                                    f"{got} on rank {self.topo.rank}" if got else "a signal to another rank", saved,
                                    REQUEUE_EXIT_CODE)
                    raise RequeueExit(self.step)
            bar.close()
            out = {"step": self.step, "metrics": m}
            self._sync_point()
            if self._saved_step != self.step:
                watchdog.beat("final checkpoint save")
                self._save_checked(block=False)
            self.checkpointer.wait()
            self.check_refused_checkpoint()
            failed = self.checkpointer.refused
            if failed is not None and failed["step"] == self.step:  # the final step's write failed: retry it once
                if self.topo.is_main:
                    log.warning("retrying the save of the final step %d (%s)", self.step, describe_refusal(failed))
                self.save(block=True)
                self.check_refused_checkpoint()
            watchdog.beat("final samples and export")
            samples = self.sample_grid(os.path.join(self.out_dir, "samples.png"))  # collective: every rank
            weights = self.export(os.path.join(self.out_dir, "weights.safetensors"))
            if self.topo.is_main:
                out.update(samples=samples, weights=weights,
                           loss_curve=plot_loss_curve(self.metrics.path, os.path.join(self.out_dir, "loss_curve.png")))
        return out


def check_data_labels(loader: Any, cfg: SimFlowConfig) -> None:
    """One-time label check at the data boundary (the flow's forward no longer reads labels back): the data set's
    classes must fit ``model.flow.num_classes`` (index ``num_classes`` is the CFG null class). The shard reader
    already drops a sample whose class lies outside its index's class list; an NPZ's label array is checked here.

    Raises:
        ValueError: naming ``data.path``, the class count or the offending label, and ``model.flow.num_classes``.
    """
    source = getattr(loader, "source", loader)
    n = cfg.model.flow.num_classes
    names = getattr(source, "class_names", None)
    if names is not None and len(names) > n:
        raise ValueError(f"data.path={cfg.data.path!r} has {len(names)} classes but model.flow.num_classes={n}")
    labels = getattr(source, "labels", None)
    if isinstance(labels, np.ndarray) and labels.size:
        lo, hi = int(labels.min()), int(labels.max())
        if lo < 0 or hi >= n:
            raise ValueError(f"data.path={cfg.data.path!r}: labels span [{lo}, {hi}], outside [0, {n}) "
                             f"(model.flow.num_classes={n})")


def run(cfg: SimFlowConfig, topology: Optional[Topology] = None, build_engine=None) -> Dict[str, Any]:
    """Train with ``cfg`` (the launcher's entry point). Returns ``{"step", "metrics", paths...}``."""
    return Trainer(cfg, topology, build_engine).fit()
