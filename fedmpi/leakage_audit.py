"""Rank 0's leakage audits: what an attacker learns from the run, measured inside it.

:class:`InversionAudit` (``audit.inversion``): rank 0, an honest-but-curious
server, attacks the updates of the first ``slots`` cohort slots of the
configured rounds with a method of :mod:`fedmpi.leakage`. It knows what such a
server knows: the global weights it broadcast, the architecture, the loss, the
clients' local training settings (``train.*``) and each client's sample count
(sent with its update). It rebuilds the client's true shard from the seed (as
every rank does), matches reconstructions to true examples by a minimum-cost
assignment, and stores per image the reconstruction, the truth, MSE, PSNR and
SSIM on the [0, 1] pixel scale, the recovered labels, and the PSNR of the
training set's mean image against the truth (the "nothing leaked" reference).

:class:`MembershipAudit` (``audit.membership``): membership inference on the
global model (after the run, and every ``every`` rounds) with the
loss-threshold attack (Yeom et al. 2018) and LiRA offline and online (Carlini
et al. 2022), from :mod:`fedmpi.membership`. Design:

- the audited run trains on a keyed half of the data: half of every client's
  examples of each class (``level: example``) or half of the clients
  (``level: client``), drawn from (seed, "membership", 0, ...) before any
  training (:func:`fedmpi.preflight.preflight`, :func:`fedmpi.membership.target_keep`),
  so members and non-members come from the same distribution and the target is
  trained as its shadows are;
- after the last round, rank 0 drives ``shadows`` further federations through
  the same clients interface, so shadow training uses every rank: a RUN order
  (:mod:`fedmpi.protocol`) tells the workers to train the clients of shadow s,
  i.e. the same config with the experiment seed of (seed, "shadow", s) and
  each client restricted to its units of a balanced keyed split (every unit is
  in exactly half of the shadows); then the usual rounds follow, without
  records;
- every model (target and shadows) is scored on every unit of the full
  training data at the evaluated rounds: the cross-entropy and LiRA's
  logit-scaled confidence, averaged over a client's examples at client level.

The per-round parts of both audits are appended to growable datasets whose
group holds a ``round`` dataset, so ``--resume`` keeps exactly the rows of the
rounds it continues after (:func:`fedmpi.results.read_checkpoint`); the
membership results are written once, after the shadows (a signal during them
stops with a checkpoint after the last round, and ``--resume`` trains the
shadows again, with the same keys).
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import torch

from . import leakage, membership, seeding
from .data import FederatedData
from .models import FlatModel, init_weights
from .results import DatasetSpec, ResultsWriter
from .rounds import Updates
from .schema import Config, replace
from .server import ServerLoop

INVERSION = "/audit/inversion"
MEMBERSHIP = "/audit/membership"
FPR_LEVELS = (0.001, 0.01)


# --------------------------------------------------------------------------- gradient inversion


@dataclasses.dataclass
class Observed:
    """What rank 0 keeps of a round for the inversion attack: the attacked slots' rows and
    the global weights they were computed from (copies: the round goes on with its own)."""

    round_index: int
    client_ids: np.ndarray
    rows: np.ndarray
    num_samples: np.ndarray
    weights: np.ndarray


class InversionAudit:
    """Gradient inversion of the attacked slots' updates (see the module docstring)."""

    def __init__(self, cfg: Config, data: FederatedData, build_module):
        self.cfg, self.v, self.data = cfg, cfg.audit.inversion, data
        self.module = build_module()
        self.shape = tuple(data.input_shape)
        self.examples = max(1, min(self.v.max_examples, int(data.client_sizes().max())))
        self.standard = cfg.data.normalize == "standard"
        if self.standard:
            self.box = leakage.value_box(data.norm_mean, data.norm_std, self.shape)
        else:
            self.box = (torch.zeros(()), torch.ones(()))
        self.mean_image = self.unit(data.x_train.mean(axis=0, dtype=np.float64)[None])[0]
        self.slots_done: list[dict] = []

    def unit(self, x) -> torch.Tensor:
        """Model inputs on the [0, 1] pixel scale (float64)."""
        if self.standard:
            return leakage.to_unit(x, self.data.norm_mean, self.data.norm_std)
        return leakage.to_unit(x, 0.0, 1.0)  # data.normalize = unit: already on the scale

    def specs(self) -> dict[str, DatasetSpec]:
        m, shape = self.examples, self.shape
        per_image = (f"(attacked slot, example): {m} columns, NaN past the slot's num_examples; matched to truth by "
                     "minimum-cost assignment")
        specs = {
            "mean_image": DatasetSpec(shape, "f4", "mean training image on the [0, 1] scale: the 'nothing leaked' guess"),
            "round": DatasetSpec((0,), "i8", "round of each attacked slot", growable=True),
            "slot": DatasetSpec((0,), "i8", "cohort slot attacked", growable=True),
            "client_id": DatasetSpec((0,), "i8", "client whose update was attacked", growable=True),
            "num_examples": DatasetSpec((0,), "i8", "examples the client trained on (the reconstructed batch)", growable=True),
            "label_accuracy": DatasetSpec((0,), "f8", "share of labels recovered, after matching", growable=True),
            "attack_loss": DatasetSpec((0,), "f8", "the attack's final gradient (update) distance; NaN for analytic",
                                       growable=True),
            "seconds": DatasetSpec((0,), "f8", "wall time of the attack on this slot", growable=True),
            "reconstruction": DatasetSpec((0, m, *shape), "f4", f"reconstructed examples on the [0, 1] scale, {per_image}",
                                          growable=True),
            "truth": DatasetSpec((0, m, *shape), "f4", f"the client's true examples on the [0, 1] scale, {per_image}",
                                 growable=True),
            "labels": DatasetSpec((0, m), "i8", "recovered label of each reconstruction (-1 past num_examples)", growable=True),
            "true_labels": DatasetSpec((0, m), "i8", "true label of each example (-1 past num_examples)", growable=True),
        }
        for name, what in (("mse", "mean squared error"), ("psnr", "PSNR in dB, 10 log10(1 / MSE)"),
                           ("ssim", "SSIM, 5x5 Gaussian window (sigma 1), valid windows"),
                           ("mean_image_psnr", "PSNR of mean_image against the truth (the reference)")):
            specs[name] = DatasetSpec((0, m), "f8", f"{what} per image, {per_image}", growable=True)
        return {f"{INVERSION}/{k}": v for k, v in specs.items()}

    def start(self, writer: ResultsWriter) -> None:
        writer.write(f"{INVERSION}/mean_image", self.mean_image.numpy().astype(np.float32))

    def observe(self, r: int, updates: Updates, weights: np.ndarray) -> Observed | None:
        if r not in self.v.rounds or updates.rows is None:
            return None
        k = min(self.v.slots, len(updates.cohort))
        return Observed(r, updates.cohort[:k].copy(), updates.rows[:k].copy(), updates.samples[:k].astype(np.int64),
                        weights.copy())

    def attack(self, observed: Observed, writer: ResultsWriter) -> None:
        for slot, (cid, row, n) in enumerate(zip(observed.client_ids, observed.rows, observed.num_samples)):
            if n == 0 or not np.isfinite(row).all():  # trained on nothing (a membership split), or a non-finite row
                continue
            start = time.perf_counter()
            x_true, y_true = self.data.client(int(cid))
            gen = torch.Generator().manual_seed(seeding.torch_seed(self.cfg.seed, "inversion", observed.round_index, cid))
            x, labels, loss = self.reconstruct(observed.weights, row, int(n), y_true, gen, observed.round_index, int(cid))
            self.record(writer, observed.round_index, slot, int(cid), x, labels, loss, x_true, y_true,
                        time.perf_counter() - start)

    def reconstruct(self, weights: np.ndarray, update: np.ndarray, n: int, y_true: np.ndarray, gen: torch.Generator,
                    r: int, cid: int) -> tuple[torch.Tensor, np.ndarray, float]:
        """(inputs in the model's space (n, *shape), labels (n,), final data-term value) of the configured method."""
        v, t = self.v, self.cfg.train
        known = y_true if v.labels == "known" else None
        opt = {"iterations": v.iterations} if v.iterations is not None else {}
        if v.step_size is not None:
            opt["step_size"] = v.step_size
        common = dict(input_shape=self.shape, generator=gen, box=self.box, restarts=v.restarts)
        if v.method in ("analytic", "idlg"):
            grads = leakage.split_flat(
                leakage.gradient_from_update(update, t.lr, t.weight_decay, weights if t.weight_decay else None).numpy(),
                self.module)
            labels = known if known is not None else np.array([leakage.idlg_label(grads[-2], grads[-1])])
            if v.method == "analytic":
                x = leakage.analytic_fc_input(grads[0], grads[1]).reshape(1, *self.shape)
                x = torch.maximum(torch.minimum(x, self.box[1].double()), self.box[0].double())
                return x, np.asarray(labels), float("nan")
            result = leakage.dlg(self.module, weights, update, batch_size=1, lr=t.lr, weight_decay=t.weight_decay,
                                 labels=labels, **common, **opt)
        elif v.method == "dlg":
            result = leakage.dlg(self.module, weights, update, batch_size=n, lr=t.lr, weight_decay=t.weight_decay,
                                 labels=known, **common, **opt)
        elif v.method == "inverting_gradients":
            result = leakage.inverting_gradients(self.module, weights, update, batch_size=n, lr=t.lr,
                                                 weight_decay=t.weight_decay, labels=known, tv=v.tv, **common, **opt)
        else:  # fedavg_unrolled
            orders = leakage.fedmpi_orders(self.cfg.seed, r, cid, n, t.epochs) if v.known_order else None
            result = leakage.fedavg_inversion(self.module, weights, update, num_examples=n, lr=t.lr, epochs=t.epochs,
                                              batch_size=t.batch_size, momentum=t.momentum, weight_decay=t.weight_decay,
                                              orders=orders, labels=known, tv=v.tv, **common, **opt)
        return result.x, result.labels.numpy(), result.loss

    def record(self, writer: ResultsWriter, r: int, slot: int, cid: int, x: torch.Tensor, labels: np.ndarray,
               loss: float, x_true: np.ndarray, y_true: np.ndarray, seconds: float) -> None:
        n, m = len(y_true), self.examples
        recon, truth = self.unit(x), self.unit(x_true)
        perm = leakage.match(recon, truth)
        recon = recon[perm]
        metrics = {"mse": leakage.mse(recon, truth), "psnr": leakage.psnr(recon, truth), "ssim": leakage.ssim(recon, truth),
                   "mean_image_psnr": leakage.mean_image_psnr(truth, self.mean_image)}

        def padded(values, fill, dtype) -> np.ndarray:
            values = np.asarray(values, dtype=dtype)
            out = np.full((1, m, *values.shape[1:]), fill, dtype=dtype)
            out[0, :n] = values
            return out

        rows = {
            "round": [r], "slot": [slot], "client_id": [cid], "num_examples": [n],
            "label_accuracy": [leakage.label_accuracy(labels, y_true, perm)], "attack_loss": [loss], "seconds": [seconds],
            "reconstruction": padded(recon.numpy(), np.nan, np.float32), "truth": padded(truth.numpy(), np.nan, np.float32),
            "labels": padded(np.asarray(labels)[perm], -1, np.int64), "true_labels": padded(y_true, -1, np.int64),
        }
        rows.update({name: padded(value.numpy(), np.nan, np.float64) for name, value in metrics.items()})
        for name, values in rows.items():
            writer.append_rows(f"{INVERSION}/{name}", values)
        self.slots_done.append({"psnr": metrics["psnr"].numpy(), "ssim": metrics["ssim"].numpy(),
                                "reference": metrics["mean_image_psnr"].numpy(), "labels": rows["label_accuracy"][0]})

    def summary_line(self) -> str | None:
        if not self.slots_done:
            return None
        psnr = np.concatenate([s["psnr"] for s in self.slots_done])
        ssim = np.concatenate([s["ssim"] for s in self.slots_done])
        ref = np.concatenate([s["reference"] for s in self.slots_done])
        labels = np.mean([s["labels"] for s in self.slots_done])
        rounds = ",".join(str(r) for r in self.v.rounds)
        return (f"leakage: gradient inversion ({self.v.method}) of {len(self.slots_done)} update(s) in round(s) {rounds}: "
                f"PSNR {psnr.mean():.1f} dB (min {psnr.min():.1f}), SSIM {ssim.mean():.3f}, labels {labels:.2f} right; "
                f"the mean image scores {ref.mean():.1f} dB")


# --------------------------------------------------------------------------- membership inference


def shadow_config(cfg: Config, run: int) -> Config:
    """Shadow federation ``run`` (>= 1): the audited config with its own experiment seed."""
    return replace(cfg, "seed", membership.shadow_seed(cfg.seed, run))


def shadow_data(cfg: Config, data: FederatedData, run: int) -> FederatedData:
    """The data shadow federation ``run`` (>= 1) trains on: each client's units of the shadow's split."""
    m, full = cfg.audit.membership, data.full if data.full is not None else data
    keeps = membership.shadow_keep(cfg.seed, full.client_sizes(), m.level, m.shadows)
    return membership.restrict(full, [k[run - 1] for k in keeps])


class MembershipAudit:
    """Membership inference with shadow federations (see the module docstring)."""

    def __init__(self, cfg: Config, data: FederatedData, build_module, model_size: int):
        self.cfg, self.m = cfg, cfg.audit.membership
        self.build_module = build_module
        self.model_size = model_size
        self.full = data.full
        sizes = self.full.client_sizes()
        self.client_of_example = np.repeat(np.arange(len(sizes)), sizes)
        self.clients = len(sizes)
        # at client level the draws depend only on the number of clients: one unit per client, even an empty one
        if self.m.level == "example":
            self.unit_sizes = sizes
            labels = [self.full.client(c)[1] for c in range(self.clients)]
        else:
            self.unit_sizes = np.ones(self.clients, dtype=np.int64)
            labels = [np.zeros(1, dtype=np.int64)] * self.clients
        self.member = np.concatenate(membership.target_keep(cfg.seed, labels, self.m.level))
        if self.m.level == "example":
            self.unit_client = self.client_of_example
            self.unit_example = np.concatenate([np.arange(n) for n in sizes])
        else:
            self.unit_client = np.arange(self.clients)
            self.unit_example = np.full(self.clients, -1)
        self.units = len(self.member)
        every, rounds = self.m.every, cfg.rounds
        self.eval_rounds = sorted({r for r in range(rounds) if every and (r + 1) % every == 0} | {rounds - 1})
        self.results: dict | None = None

    def specs(self) -> dict[str, DatasetSpec]:
        e, a, u, s = len(self.eval_rounds), len(membership.ATTACKS), self.units, self.m.shadows
        attack_axis = "attack axis: " + ", ".join(membership.ATTACKS)
        specs = {
            "round": DatasetSpec((e,), "i8", "rounds whose global model was attacked (the last one, and every k)"),
            "attack": DatasetSpec((a,), "S16", "attack names, in the order of every attack axis"),
            "member": DatasetSpec((u,), "bool", "per unit (example or client): the audited run trained on it"),
            "unit_client": DatasetSpec((u,), "i8", "per unit: its client id"),
            "unit_example": DatasetSpec((u,), "i8", "per unit: its position in the client's full shard (-1 at client level)"),
            "auc": DatasetSpec((e, a), "f8", f"ROC AUC per evaluated round and attack ({attack_axis})"),
            "tpr_at_fpr_0.001": DatasetSpec((e, a), "f8", f"TPR at FPR <= 0.1% ({attack_axis})"),
            "tpr_at_fpr_0.01": DatasetSpec((e, a), "f8", f"TPR at FPR <= 1% ({attack_axis})"),
            "advantage": DatasetSpec((e, a), "f8", f"membership advantage, max over thresholds of TPR - FPR ({attack_axis})"),
            "scores": DatasetSpec((e, a, u), "f8", f"each attack's score per unit, higher = member ({attack_axis})"),
            "roc_fpr": DatasetSpec((e, a, u + 1), "f8", "ROC false-positive rates from (0, 0) to (1, 1); NaN-padded"),
            "roc_tpr": DatasetSpec((e, a, u + 1), "f8", "ROC true-positive rates, paired with roc_fpr; NaN-padded"),
            "target_loss": DatasetSpec((e, u), "f8", "the audited model's cross-entropy per unit"),
            "target_confidence": DatasetSpec((e, u), "f8", "the audited model's logit-scaled confidence per unit (LiRA's phi)"),
            "shadow_confidence": DatasetSpec((s, e, u), "f8", "each shadow model's phi per unit"),
            "shadow_member": DatasetSpec((s, u), "bool", "per shadow and unit: the shadow trained on it"),
            "seconds": DatasetSpec((), "f8", "wall time of the shadow federations and the attacks"),
            "target/round": DatasetSpec((0,), "i8", "round of each stored global model", growable=True),
            "target/weights": DatasetSpec((0, self.model_size), "f4", "the global model at each evaluated round",
                                          growable=True),
        }
        return {f"{MEMBERSHIP}/{k}": v for k, v in specs.items()}

    def start(self, writer: ResultsWriter) -> None:
        writer.write(f"{MEMBERSHIP}/member", self.member)
        writer.write(f"{MEMBERSHIP}/unit_client", self.unit_client)
        writer.write(f"{MEMBERSHIP}/unit_example", self.unit_example)
        writer.write(f"{MEMBERSHIP}/round", np.asarray(self.eval_rounds, dtype=np.int64))
        writer.write(f"{MEMBERSHIP}/attack", np.array([a.encode() for a in membership.ATTACKS], dtype="S16"))

    def after_round(self, r: int, weights: np.ndarray, writer: ResultsWriter) -> None:
        if r in self.eval_rounds:
            writer.append_rows(f"{MEMBERSHIP}/target/round", [r])
            writer.append_rows(f"{MEMBERSHIP}/target/weights", weights[None, :])

    def pool_batches(self):
        """The full training data, every client's examples in client order, in evaluation batches."""
        full, batch = self.full, self.cfg.eval.batch_size
        if full.generate is None:
            order = np.concatenate(full.client_indices) if full.client_indices else np.zeros(0, np.int64)
            for start in range(0, len(order), batch):
                yield full.x_train[order[start:start + batch]], full.y_train[order[start:start + batch]]
            return
        for c in range(self.clients):
            x, y = full.client(c)
            for start in range(0, len(y), batch):
                yield x[start:start + batch], y[start:start + batch]

    def scores(self, model: FlatModel, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(cross-entropy, logit-scaled confidence) of ``weights`` per unit of the full training data."""
        model.set_weights(weights)
        model.module.eval()
        logits, labels = [], []
        with torch.no_grad():
            for x, y in self.pool_batches():
                logits.append(model.module(torch.from_numpy(x).to(model.device)).double().cpu().numpy())
                labels.append(y)
        z, y = np.concatenate(logits), np.concatenate(labels)
        loss, phi = membership.cross_entropy(z, y), membership.logit_confidence(z, y)
        if self.m.level == "client":
            return (membership.per_unit(loss, self.client_of_example, self.clients),
                    membership.per_unit(phi, self.client_of_example, self.clients))
        return loss, phi

    def after_run(self, loop: ServerLoop) -> bool:
        """Train the shadow federations over ``loop.clients``, attack every evaluated model, write
        the results. False when a signal stopped it (the checkpoint after the last round is written)."""
        start = time.perf_counter()
        cfg, m, writer = self.cfg, self.m, loop.writer
        writer.checkpoint(cfg.rounds - 1, loop.weights, loop.state())  # a signal during the shadows resumes here
        stored = writer.f[f"{MEMBERSHIP}/target/round"][:]
        target_weights = writer.f[f"{MEMBERSHIP}/target/weights"][:]
        e = len(self.eval_rounds)
        target_loss, target_phi = np.empty((e, self.units)), np.empty((e, self.units))
        for i, r in enumerate(self.eval_rounds):
            target_loss[i], target_phi[i] = self.scores(loop.model, target_weights[int(np.flatnonzero(stored == r)[-1])])
        shadow_phi = np.empty((m.shadows, e, self.units))
        shadow_in = np.concatenate(membership.shadow_keep(cfg.seed, self.unit_sizes, m.level, m.shadows), axis=1)
        for s in range(1, m.shadows + 1):
            began = time.perf_counter()
            loop.clients.switch(s)
            scfg = shadow_config(cfg, s)
            shadow = ServerLoop(scfg, loop.clients, loop.data, loop.model, init_weights(self.build_module(), scfg.seed),
                                writer=None, quiet=True)
            for r in range(cfg.rounds):
                if loop.stop_signal is not None:
                    return False
                shadow.train_round(r)
                if r in self.eval_rounds:
                    shadow_phi[s - 1, self.eval_rounds.index(r)] = self.scores(loop.model, shadow.weights)[1]
            if not loop.quiet:
                print(f"membership: shadow federation {s}/{m.shadows} trained ({time.perf_counter() - began:.1f} s)",
                      flush=True)
        loop.clients.switch(0)
        self.results = self.attack(target_loss, target_phi, shadow_phi, shadow_in)
        for name, values in self.results.items():
            writer.write(f"{MEMBERSHIP}/{name}", values)
        writer.write(f"{MEMBERSHIP}/target_loss", target_loss)
        writer.write(f"{MEMBERSHIP}/target_confidence", target_phi)
        writer.write(f"{MEMBERSHIP}/shadow_confidence", shadow_phi)
        writer.write(f"{MEMBERSHIP}/shadow_member", shadow_in)
        writer.write(f"{MEMBERSHIP}/seconds", time.perf_counter() - start)
        return True

    def attack(self, target_loss: np.ndarray, target_phi: np.ndarray, shadow_phi: np.ndarray,
               shadow_in: np.ndarray) -> dict[str, np.ndarray]:
        """Every attack at every evaluated round: scores, ROC curves and their summaries."""
        e, a, u = len(self.eval_rounds), len(membership.ATTACKS), self.units
        out = {"scores": np.full((e, a, u), np.nan), "roc_fpr": np.full((e, a, u + 1), np.nan),
               "roc_tpr": np.full((e, a, u + 1), np.nan), "auc": np.full((e, a), np.nan), "advantage": np.full((e, a), np.nan)}
        for level in FPR_LEVELS:
            out[f"tpr_at_fpr_{level}"] = np.full((e, a), np.nan)
        for i in range(e):
            fit = membership.fit_gaussians(shadow_phi[:, i], shadow_in, self.m.variance)
            scores = (membership.loss_threshold_scores(target_loss[i]), membership.lira_offline(target_phi[i], fit),
                      membership.lira_online(target_phi[i], fit))
            for j, score in enumerate(scores):
                out["scores"][i, j] = score
                if not np.isfinite(score).all():  # a diverged model: no ROC
                    continue
                fpr, tpr = membership.roc_curve(score, self.member)
                out["roc_fpr"][i, j, :len(fpr)], out["roc_tpr"][i, j, :len(tpr)] = fpr, tpr
                out["auc"][i, j], out["advantage"][i, j] = membership.auc(fpr, tpr), membership.advantage(fpr, tpr)
                for level in FPR_LEVELS:
                    out[f"tpr_at_fpr_{level}"][i, j] = membership.tpr_at_fpr(fpr, tpr, level)
        return out

    def summary_line(self, privacy: dict) -> str | None:
        if self.results is None:
            return None
        names = ("loss threshold", "LiRA offline", "LiRA online")

        def row(key: str) -> str:
            return ", ".join(f"{v:.3f}" for v in self.results[key][-1])

        eps = f"; epsilon {privacy['epsilon']:.4g}" if privacy.get("epsilon") is not None else ""
        return (f"leakage: membership inference ({self.m.level} level, {self.m.shadows} shadows, "
                f"{int(self.member.sum())} members of {self.units}) on the final model{eps}: "
                f"AUC {row('auc')}; TPR at 1% FPR {row('tpr_at_fpr_0.01')}; TPR at 0.1% FPR {row('tpr_at_fpr_0.001')}; "
                f"advantage {row('advantage')} ({', '.join(names)})")


# --------------------------------------------------------------------------- both


class LeakageAudit:
    """The audits a config asks for, as :class:`fedmpi.server.ServerLoop` calls them:
    ``observe`` after the cohort's updates arrive, ``after_round`` after the round is
    recorded, ``after_run`` after the last round (before the workers stop),
    ``summary_lines`` for the run's last lines."""

    def __init__(self, cfg: Config, data: FederatedData, build_module, model_size: int):
        self.inversion = InversionAudit(cfg, data, build_module) if cfg.audit.inversion.method != "none" else None
        self.membership = (MembershipAudit(cfg, data, build_module, model_size)
                           if cfg.audit.membership.level != "none" else None)
        self.writer: ResultsWriter | None = None

    def specs(self) -> dict[str, DatasetSpec]:
        specs = {}
        for audit in (self.inversion, self.membership):
            if audit is not None:
                specs.update(audit.specs())
        return specs

    def start(self, writer: ResultsWriter) -> None:
        self.writer = writer
        for audit in (self.inversion, self.membership):
            if audit is not None:
                audit.start(writer)

    def observe(self, r: int, updates: Updates, weights: np.ndarray) -> Observed | None:
        return self.inversion.observe(r, updates, weights) if self.inversion is not None else None

    def after_round(self, r: int, observed: Observed | None, weights: np.ndarray) -> None:
        if observed is not None:
            self.inversion.attack(observed, self.writer)
        if self.membership is not None:
            self.membership.after_round(r, weights, self.writer)

    def after_run(self, loop: ServerLoop) -> bool:
        return self.membership.after_run(loop) if self.membership is not None else True

    def summary_lines(self, privacy: dict) -> list[str]:
        lines = [self.inversion.summary_line() if self.inversion is not None else None,
                 self.membership.summary_line(privacy) if self.membership is not None else None]
        return [line for line in lines if line]
