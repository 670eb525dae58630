"""Model quality on real PTB-XL: does CR-MAE pretraining beat the hand-made feature floor and a random encoder?

    python -m benchmarks.quality [--steps 400] [--seeds 3] [--records 1999] [--arms ...] [--model KEY=VALUE ...]
                                 [--encoder NAME=PATH ...] [--fractions 0.01 0.1 1] [--draws 3] [--external ludb]
                                 [--finetune ARM ...] [--finetune-epochs 8] [--out benchmarks-output/quality]

Data: the shared ``ptbxl/records100`` (1,999 records, 100 Hz, one 10-s window each), read by the product's
WFDB reader and label mapping (``configs/sources/ptbxl.yaml``: the 5 diagnostic superclasses) and
conditioned as the model config says. PTB-XL's folds: 1-8 pretrain and probe-train, 9 chooses the probe's
C, 10 is the test, scored once, with patient-bootstrap 95% CIs.

Arms, every encoder probed the same way (standardised frozen embeddings, L-BFGS logistic regression to
convergence, C chosen on fold 9: :func:`crema.evaluation.probe.fit_converged_probe`):
  - features: nine amplitude and band-power features per lead (the floor a foundation model has to beat);
  - random_init: the same architecture, untrained, per seed;
  - mae: CR-MAE with lambda = 0, ``--steps`` optimiser steps per seed;
  - crema: CR-MAE, the same steps and batches per seed;
  - NAME (``--encoder NAME=PATH``): an encoder the product pretrained (``crema pretrain`` writes
    ``<storage>/<run>/encoder.safetensors``), conditioned as its artifact says; nothing is pretrained for it.
The table (mean over seeds, the seed spread, the CI of each seed) is printed and logged to MLflow with the
reconstruction-loss curves against the predict-the-mean line and the AUROC-vs-steps learning curve.

Cross-domain (``--external ludb``): the records of another hospital (its ``configs/sources/NAME.yaml``, read
from ``<shared>/NAME``, every record with one of the classes) are embedded by every arm and scored by the probe
fitted on PTB-XL alone, beside PTB-XL's fold 10: :func:`crema.evaluation.cross_domain.cross_domain_table`, the
product's own table (per class and macro, patient-bootstrap CIs, the drop from in-domain, a class a source
lacks reported as such).

Label efficiency (``--fractions``): every arm's probe is also fitted on a fraction of the training patients
(whole patients, ``--draws`` different draws below 1, :func:`crema.evaluation.metrics.sample_label_fraction`),
C still chosen on all of fold 9, and scored on fold 10: the mean and spread over seeds x draws, and the mean CI.

Fine-tune (``--finetune ARM ...``): every encoder of those arms is also fine-tuned whole, with a head, at each
fraction and draw, by the product's engine (:mod:`crema.train.engine_finetune`: layer-wise lr decay, drop path,
warm-up and cosine, class-weighted BCE) with the recipe of the README's ``crema finetune`` runs; the epoch is
chosen on fold 9, and fold 10 scored once with it. ``random_init`` fine-tuned is the same architecture trained
from scratch (supervised). The rows join the label-efficiency table (method ``finetune``) and, at fraction 1,
the cross-domain table.
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import mlflow  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402

from crema.config import ModelConfig, SourceConfig, load_yaml  # noqa: E402
from crema.data.conditioning import condition  # noqa: E402
from crema.data.labels import LabelIndex  # noqa: E402
from crema.data.readers import reader_for  # noqa: E402
from crema.data.signals import N_LEADS, NormaliseOptions, to_canonical  # noqa: E402
from crema.evaluation.bootstrap import bootstrap_ci  # noqa: E402
from crema.evaluation.cross_domain import IN_DOMAIN, MACRO, ScoredRecords, cross_domain_figure, cross_domain_table  # noqa: E402
from crema.evaluation.features import hand_made_features  # noqa: E402
from crema.evaluation.metrics import macro_auroc, macro_metric, per_class_auroc_weighted, sample_label_fraction  # noqa: E402
from crema.evaluation.probe import ConvergedProbe, fit_converged_probe  # noqa: E402
from crema.model.network import CREMA, Classifier, SiTEncoder  # noqa: E402
from crema.tracking import ensure_experiment, experiment_page  # noqa: E402
from crema.train.artifacts import load_encoder  # noqa: E402
from crema.train.engine_finetune import build_optimizer, multilabel_loss, predict, with_drop_path  # noqa: E402
from crema.train.engine_finetune import train_one_epoch as finetune_one_epoch  # noqa: E402
from crema.train.engine_pretrain import train_one_epoch  # noqa: E402
from crema.train.optim import param_groups, warmup_cosine  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CLASSES = ("NORM", "MI", "STTC", "CD", "HYP")
FS = 100
WINDOW = 1000
ARMS = ("features", "random_init", "mae", "crema")
PTBXL = "ptbxl"
EXTERNAL = "external"  # the split of another hospital's records: never trained or chosen on, scored by every arm
PROBE, FINETUNE = "probe", "finetune"
# The fine-tune recipe of the README's `crema finetune` runs (one trial of the task's search space)
FINETUNE_RECIPE = {"lr": 5e-4, "weight_decay": 0.05, "layer_decay": 0.75, "drop_path": 0.1, "batch_size": 32,
                   "warmup_epochs": 1, "clip_grad": 1.0}


@dataclass
class Corpus:
    raw: np.ndarray  # (n, 12, 1000) mV
    y: np.ndarray  # (n, 5) multi-hot
    patients: np.ndarray  # (n,)
    split: np.ndarray  # (n,) train / val / test, or external
    source: np.ndarray  # (n,) ptbxl, or the --external source the record came from
    record_ids: np.ndarray  # (n,)


@dataclass
class Arm:
    name: str
    seed: int | None  # None: an encoder pretrained elsewhere (--encoder), its seed unknown here
    test_auroc: tuple[float, float, float]  # point, low, high
    probe: ConvergedProbe | None  # fitted on PTB-XL's train split, C chosen on its val split
    curve: list[tuple[int, float]] = field(default_factory=list)  # (step, val macro AUROC): fold 9, not the test
    losses: list[float] = field(default_factory=list)  # training recon loss per step
    z: np.ndarray | None = None  # the final embeddings (or features) of every record: the label-efficiency probes fit on them
    path: str | None = None  # of an encoder pretrained elsewhere
    encoder: SiTEncoder | None = None  # what --finetune starts from (None: the feature floor)

    @property
    def val_auroc(self) -> float:
        return self.probe.val_macro_auroc

    @property
    def label(self) -> str:
        return f"{self.name} seed {self.seed}" if self.path is None else f"{self.name} ({self.path})"


@dataclass
class FractionScore:
    arm: str
    method: str  # PROBE (frozen encoder) or FINETUNE (the whole encoder and a head)
    run: str  # which of the arm's encoders (Arm.label): a seed, or an artifact's path
    fraction: float
    draw: int  # the seed of the patient draw (0 at fraction 1: all patients)
    test_auroc: tuple[float, float, float]  # point, low, high
    val_auroc: float


def read_source(source: SourceConfig, n_records: int | None = None) -> dict[str, list]:
    """A source's records at 100 Hz through the product's reader, canonical form and label table: the first
    10 s of each, its classes, patient, split and id."""
    reader, labels = reader_for(source), LabelIndex(source)
    read: dict[str, list] = {"raw": [], "y": [], "patients": [], "split": [], "record_ids": []}
    for record_id in reader.discover()[:n_records]:
        record = to_canonical(reader.read(record_id), NormaliseOptions(target_fs=FS))
        info = labels.lookup(record_id)
        read["raw"].append(record.signal[:, :WINDOW])
        read["y"].append([c in info.labels for c in CLASSES])
        read["patients"].append(f"{source.name}/{info.patient_id}")
        read["split"].append(info.split)
        read["record_ids"].append(record_id)
    return read


def load_corpus(shared: Path, n_records: int, external: list[str]) -> Corpus:
    """PTB-XL's records100 (folds -> splits), then every record of each `external` source that has one of the
    classes (split "external")."""
    os.environ["PTBXL_ROOT"] = str(shared / "ptbxl")
    ptbxl = load_yaml(REPO / "configs/sources/ptbxl.yaml", SourceConfig,
                      {"path": str(shared / "ptbxl" / "records100"), "labels.record_column": "filename_lr"})
    parts = [(PTBXL, read_source(ptbxl, n_records))]
    for name in external:
        os.environ[f"{name.upper()}_ROOT"] = str(shared / name)
        read = read_source(load_yaml(REPO / "configs/sources" / f"{name}.yaml", SourceConfig))
        labelled = [i for i, y in enumerate(read["y"]) if any(y)]
        print(f"{name}: {len(read['y'])} records, {len(labelled)} with one of {', '.join(CLASSES)} "
              f"(the others left out)", flush=True)
        read = {key: [values[i] for i in labelled] for key, values in read.items()}
        parts.append((name, {**read, "split": [EXTERNAL] * len(labelled)}))
    joined = {key: [v for _, read in parts for v in read[key]] for key in parts[0][1]}
    return Corpus(np.stack(joined["raw"]), np.array(joined["y"], dtype=np.int64), np.array(joined["patients"]),
                  np.array(joined["split"]), np.array([name for name, read in parts for _ in read["y"]]),
                  np.array(joined["record_ids"]))


def fit_probe(corpus: Corpus, z: np.ndarray, train: np.ndarray | None = None):
    """The converged probe on the train split's embeddings/features `z` (or the `train` rows of it), C chosen on
    the val split."""
    train = corpus.split == "train" if train is None else train
    val = corpus.split == "val"
    return fit_converged_probe(z[train], corpus.y[train], z[val], corpus.y[val],
                               score=lambda y, p: macro_auroc(y, p).value)


def score(corpus: Corpus, z: np.ndarray, train: np.ndarray | None = None
          ) -> tuple[tuple[float, float, float], ConvergedProbe]:
    """(test AUROC with CI, the converged probe) on embeddings/features `z`."""
    probe = fit_probe(corpus, z, train)
    return test_auroc(corpus, probe.predict(z[corpus.split == "test"])), probe


def test_auroc(corpus: Corpus, scores: np.ndarray) -> tuple[float, float, float]:
    """(macro AUROC, low, high) of a model's `scores` of the test split, with its patient-bootstrap 95% CI."""
    test = corpus.split == "test"
    ci = bootstrap_ci(macro_metric(per_class_auroc_weighted, range(len(CLASSES))), corpus.y[test], scores,
                      corpus.patients[test], n_boot=1000)
    return ci.point, ci.low, ci.high


def scored_rows(corpus: Corpus) -> np.ndarray:
    """The rows a cross-domain table scores: PTB-XL's test fold and every external record."""
    return np.isin(corpus.split, ["test", EXTERNAL])


def cross_domain(corpus: Corpus, arm: str, run: str, scores: np.ndarray) -> pd.DataFrame:
    """The product's table of a model fitted on PTB-XL alone, from its `scores` of the scored_rows."""
    rows = scored_rows(corpus)
    keys = np.array([f"{s}/{r}" for s, r in zip(corpus.source[rows], corpus.record_ids[rows])])
    scored = ScoredRecords(keys, corpus.y[rows], corpus.patients[rows], scores)
    return cross_domain_table(scored, CLASSES, [PTBXL]).assign(arm=arm, run=run)


def cross_domain_summary(tables: list[pd.DataFrame]) -> pd.DataFrame:
    """Macro rows, per arm and source: the mean over the arm's encoders, their spread and mean CI."""
    macro = pd.concat(tables)
    macro = macro[macro["class"] == MACRO].sort_values("domain", key=lambda d: d != IN_DOMAIN, kind="stable")
    return (macro.groupby(["arm", "source"], sort=False)
            .agg(encoders=("run", "nunique"), auroc=("auroc", "mean"), sd=("auroc", "std"),
                 ci_low=("ci_low", "mean"), ci_high=("ci_high", "mean"), drop=("drop", "mean"))
            .fillna({"sd": 0.0}).reset_index())


@torch.no_grad()
def embed(encoder: SiTEncoder, x: torch.Tensor) -> np.ndarray:
    encoder.eval()
    lead_mask = torch.ones(len(x), N_LEADS, dtype=torch.bool)
    out = [encoder.embed(x[i:i + 256], lead_mask[i:i + 256]) for i in range(0, len(x), 256)]
    encoder.train()
    return torch.cat(out).numpy()


def pretrain(name: str, cfg: ModelConfig, corpus: Corpus, x: torch.Tensor, seed: int, steps: int, batch: int,
             lr: float, curve_points: int) -> Arm:
    """`steps` AdamW steps of CR-MAE on the train split; the probe's val AUROC at `curve_points` points on the
    way, the test scored once, at the end."""
    started = time.perf_counter()
    torch.manual_seed(seed)
    model = CREMA(cfg)
    train = x[torch.from_numpy(corpus.split == "train")]  # never an external record
    optimizer = torch.optim.AdamW(param_groups(model, 0.05), lr=lr, betas=(0.9, 0.95))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(min(40, steps // 10), steps, 0.1))
    generator = torch.Generator().manual_seed(seed)
    arm = Arm(name, seed, (0, 0, 0), None)
    checkpoints = sorted({round(steps * (i + 1) / curve_points) for i in range(curve_points)})
    done = 0
    for until in checkpoints:
        n = until - done
        batches = ({"x": train[rows], "lead_mask": torch.ones(batch, N_LEADS, dtype=torch.bool), "record_group": rows}
                   for rows in (torch.randint(len(train), (batch,), generator=generator) for _ in range(n)))
        done = train_one_epoch(model, batches, optimizer, scheduler, num_steps=n, start_step=done,
                               device=torch.device("cpu"), clip_grad=1.0,
                               on_step=lambda s: arm.losses.append(s.terms["recon_loss"]))
        if done < steps:
            val = fit_probe(corpus, embed(model.encoder, x)).val_macro_auroc
            arm.curve.append((done, val))
            print(f"  {name} seed {seed} step {done}: recon {np.mean(arm.losses[-20:]):.3f}, val macro AUROC "
                  f"{val:.3f} ({time.perf_counter() - started:.0f} s)", flush=True)
    arm.z, arm.encoder = embed(model.encoder, x), model.encoder
    arm.test_auroc, arm.probe = score(corpus, arm.z)
    arm.curve.append((done, arm.val_auroc))
    test = arm.test_auroc
    print(f"  {name} seed {seed} step {done}: recon {np.mean(arm.losses[-20:]):.3f}, val {arm.val_auroc:.3f}, "
          f"test macro AUROC {test[0]:.3f} [{test[1]:.3f}, {test[2]:.3f}] ({time.perf_counter() - started:.0f} s)",
          flush=True)
    return arm


def training_draws(corpus: Corpus, fractions: list[float], draws: int):
    """(fraction, draw, train rows): all of the training patients at fraction 1, `draws` patient draws below."""
    train = np.flatnonzero(corpus.split == "train")
    for fraction in fractions:
        for draw in range(1 if fraction == 1.0 else draws):
            rows = np.zeros(len(corpus.split), dtype=bool)
            rows[train if fraction == 1.0 else sample_label_fraction(train, corpus.patients[train], fraction, seed=draw)] = True
            yield fraction, draw, rows


def label_efficiency(corpus: Corpus, arms: list[Arm], fractions: list[float], draws: int) -> list[FractionScore]:
    """Every arm's probe on `fractions` of the training patients, `draws` patient draws below 1."""
    scores = []
    for arm in arms:
        for fraction, draw, rows in training_draws(corpus, fractions, draws):
            if fraction == 1.0:
                scores.append(FractionScore(arm.name, PROBE, arm.label, 1.0, 0, arm.test_auroc, arm.val_auroc))
                continue
            test, probe = score(corpus, arm.z, rows)
            val = probe.val_macro_auroc
            scores.append(FractionScore(arm.name, PROBE, arm.label, fraction, draw, test, val))
            print(f"  {arm.label} @ {fraction:g} draw {draw} ({rows.sum()} records): test macro "
                  f"AUROC {test[0]:.3f} [{test[1]:.3f}, {test[2]:.3f}], val {val:.3f}", flush=True)
    return scores


def finetune(corpus: Corpus, encoder: SiTEncoder, train: np.ndarray, epochs: int, seed: int
             ) -> tuple[float, np.ndarray]:
    """Fine-tune `encoder` and a head on the `train` rows for `epochs`, keep the epoch with the best val macro
    AUROC (fold 9); returns (that AUROC, its class probabilities of every record)."""
    recipe = FINETUNE_RECIPE
    x = torch.from_numpy(condition(corpus.raw, np.ones(corpus.raw.shape[:2], dtype=bool), FS, encoder.cfg.input))
    y = torch.from_numpy(corpus.y.astype(np.float32))
    val = corpus.split == "val"
    cpu = torch.device("cpu")

    def batches(rows: np.ndarray, shuffle: torch.Generator | None = None):
        index = torch.from_numpy(np.flatnonzero(rows))
        if shuffle is not None:
            index = index[torch.randperm(len(index), generator=shuffle)]
        for part in index.split(recipe["batch_size"]):
            yield {"x": x[part], "lead_mask": torch.ones(len(part), N_LEADS, dtype=torch.bool), "y": y[part]}

    torch.manual_seed(seed)
    model = Classifier(with_drop_path(encoder, recipe["drop_path"]), len(CLASSES))
    optimizer = build_optimizer(model, lr=recipe["lr"], weight_decay=recipe["weight_decay"],
                                layer_decay=recipe["layer_decay"])
    steps_per_epoch = math.ceil(train.sum() / recipe["batch_size"])
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_cosine(recipe["warmup_epochs"] * steps_per_epoch, epochs * steps_per_epoch))
    loss_fn = multilabel_loss(corpus.y[train])
    shuffle = torch.Generator().manual_seed(seed)
    best_val, best_state = -math.inf, None
    for _ in range(epochs):
        finetune_one_epoch(model, batches(train, shuffle), optimizer, scheduler, loss_fn, device=cpu,
                           clip_grad=recipe["clip_grad"])
        val_auroc = macro_auroc(corpus.y[val], predict(model, batches(val), device=cpu)).value
        if val_auroc > best_val:
            best_val, best_state = val_auroc, copy.deepcopy(model.state_dict())
    model.load_state_dict(best_state)
    return best_val, predict(model, batches(np.ones(len(corpus.y), dtype=bool)), device=cpu)


def finetune_arms(corpus: Corpus, arms: list[Arm], fractions: list[float], draws: int, epochs: int
                  ) -> tuple[list[FractionScore], list[pd.DataFrame]]:
    """Every given arm's encoders fine-tuned at every fraction and draw: their scores, and at fraction 1 their
    cross-domain tables (when there are external records)."""
    scores, tables = [], []
    for arm in arms:
        for fraction, draw, rows in training_draws(corpus, fractions, draws):
            started = time.perf_counter()
            val, probabilities = finetune(corpus, arm.encoder, rows, epochs, seed=draw)
            test = test_auroc(corpus, probabilities[corpus.split == "test"])
            scores.append(FractionScore(arm.name, FINETUNE, arm.label, fraction, draw, test, val))
            print(f"  {arm.label} fine-tuned @ {fraction:g} draw {draw} ({rows.sum()} records, {epochs} epochs): "
                  f"test macro AUROC {test[0]:.3f} [{test[1]:.3f}, {test[2]:.3f}], val {val:.3f} "
                  f"({time.perf_counter() - started:.0f} s)", flush=True)
            if fraction == 1.0 and (corpus.split == EXTERNAL).any():
                tables.append(cross_domain(corpus, f"{arm.name}-{FINETUNE}", arm.label,
                                           probabilities[scored_rows(corpus)]))
    return scores, tables


def fraction_summary(scores: list[FractionScore]) -> list[dict]:
    rows = []
    for arm, method, fraction in dict.fromkeys((s.arm, s.method, s.fraction) for s in scores):
        mine = [s for s in scores if (s.arm, s.method, s.fraction) == (arm, method, fraction)]
        points = np.array([s.test_auroc[0] for s in mine])
        rows.append({"arm": arm, "method": method, "fraction": fraction, "runs": len(mine),
                     "encoders": len({s.run for s in mine}), "draws": len({s.draw for s in mine}),
                     "test_macro_auroc": float(points.mean()),
                     "sd": float(points.std(ddof=1)) if len(mine) > 1 else 0.0,
                     "ci_low": float(np.mean([s.test_auroc[1] for s in mine])),
                     "ci_high": float(np.mean([s.test_auroc[2] for s in mine])),
                     "val_macro_auroc": float(np.mean([s.val_auroc for s in mine]))})
    return rows


def summary(arms: list[Arm]) -> list[dict]:
    rows = []
    for name in dict.fromkeys(a.name for a in arms):
        mine = [a for a in arms if a.name == name]
        points = np.array([a.test_auroc[0] for a in mine])
        rows.append({"arm": name, "seeds": len(mine), "test_macro_auroc": float(points.mean()),
                     "seed_spread": float(points.max() - points.min()) if len(mine) > 1 else 0.0,
                     "ci_low": float(np.mean([a.test_auroc[1] for a in mine])),
                     "ci_high": float(np.mean([a.test_auroc[2] for a in mine])),
                     "val_macro_auroc": float(np.mean([a.val_auroc for a in mine]))})
    return rows


def loss_figure(arms: list[Arm]):
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for arm in arms:
        if arm.losses:
            smooth = np.convolve(arm.losses, np.ones(10) / 10, mode="valid")
            ax.plot(np.arange(len(smooth)) + 10, smooth, label=f"{arm.name} seed {arm.seed}", lw=1)
    ax.axhline(1.0, color="k", ls="--", label="predict the mean (each standardised patch's mean = 0)")
    ax.set(xlabel="optimiser step", ylabel="masked reconstruction loss (standardised patches)",
           title="Reconstruction vs the trivial answer")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--records", type=int, default=1999)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--curve-points", type=int, default=3)
    parser.add_argument("--contrastive-weight", type=float, default=None,
                        help="lambda of the crema arm (default: the model config's)")
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS,
                        help="the arms to run (default all; a partial run compares only what it ran, in one process)")
    parser.add_argument("--model", nargs="*", default=[], metavar="KEY=VALUE",
                        help="model settings of every arm, e.g. patch_size=50 decoder=self_attention (crema.config.ModelConfig)")
    parser.add_argument("--crema", nargs="*", default=[], metavar="KEY=VALUE",
                        help="settings of the crema arm only, e.g. temperature=0.2 augment=false")
    parser.add_argument("--input", nargs="*", default=[], metavar="KEY=VALUE",
                        help="input conditioning settings, e.g. scale=fixed highpass_hz=null (crema.config.InputConditioning)")
    parser.add_argument("--encoder", nargs="+", action="extend", default=[], metavar="NAME=PATH",
                        help="an arm per encoder the product pretrained, e.g. crema=output/runs/crema-cpu/encoder.safetensors")
    parser.add_argument("--fractions", nargs="+", type=float, default=[1.0],
                        help="label fractions of the training patients to probe at, e.g. 0.01 0.1 1")
    parser.add_argument("--draws", type=int, default=3, help="patient draws at each fraction below 1")
    parser.add_argument("--external", nargs="+", default=[], metavar="SOURCE",
                        help="other hospitals to score every arm's PTB-XL probe on (configs/sources/SOURCE.yaml, "
                             "read from <shared>/SOURCE), e.g. ludb")
    parser.add_argument("--finetune", nargs="+", default=[], metavar="ARM",
                        help="arms whose encoders are also fine-tuned at every fraction, e.g. crema random_init "
                             "(random_init fine-tuned: supervised from scratch)")
    parser.add_argument("--finetune-epochs", type=int, default=8)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks-output" / "quality")
    args = parser.parse_args()
    if any(not 0 < f <= 1 for f in args.fractions):
        parser.error(f"fractions must be in (0, 1], got {args.fractions}")
    if any("=" not in item for item in args.encoder):
        parser.error(f"--encoder takes NAME=PATH, got {args.encoder}")
    pretrained = [tuple(item.split("=", 1)) for item in args.encoder]  # a name given twice: two seeds of one arm
    tunable = {*args.arms, *(name for name, _ in pretrained)} - {"features"}
    if set(args.finetune) - tunable:
        parser.error(f"--finetune takes arms this run has, other than features ({', '.join(sorted(tunable))}); "
                     f"got {args.finetune}")
    shared = Path(os.environ.get("CREMA_SHARED_DATA", REPO.parent / "shared" / "data"))
    if not (shared / "ptbxl" / "records100").is_dir():
        raise SystemExit(f"no PTB-XL records100 under {shared} (set CREMA_SHARED_DATA)")
    torch.set_num_threads(os.cpu_count() or 1)
    started = time.perf_counter()
    missing = [name for name in args.external if not (shared / name).is_dir()]
    if missing:
        raise SystemExit(f"no {', '.join(missing)} under {shared} (set CREMA_SHARED_DATA)")
    corpus = load_corpus(shared, args.records, args.external)
    print(f"{len(corpus.raw)} records: " + ", ".join(f"{s} {int((corpus.split == s).sum())}"
                                                    for s in ("train", "val", "test", EXTERNAL)), flush=True)
    def settings(items: list[str]) -> dict:
        return {k: yaml.safe_load(v) for k, v in (item.split("=", 1) for item in items)}

    base = ModelConfig(**{"size": "tiny", "window_samples": WINDOW, "patch_size": 25, **settings(args.model),
                          "input": settings(args.input)})
    x = torch.from_numpy(condition(corpus.raw, np.ones(corpus.raw.shape[:2], dtype=bool), FS, base.input))

    arms = []
    if "features" in args.arms:
        z = hand_made_features(corpus.raw, FS)
        test, probe = score(corpus, z)
        arms.append(Arm("features", 0, test, probe, z=z))
        print(f"  features: test macro AUROC {test[0]:.3f} [{test[1]:.3f}, {test[2]:.3f}]", flush=True)
    for seed in range(args.seeds if "random_init" in args.arms else 0):
        torch.manual_seed(seed)
        encoder = CREMA(base).encoder
        z = embed(encoder, x)
        test, probe = score(corpus, z)
        arms.append(Arm("random_init", seed, test, probe, z=z, encoder=encoder))
        print(f"  random_init seed {seed}: test macro AUROC {test[0]:.3f}", flush=True)
    for name, path in pretrained:
        encoder = load_encoder(path)
        conditioned = condition(corpus.raw, np.ones(corpus.raw.shape[:2], dtype=bool), FS, encoder.cfg.input)
        z = embed(encoder, torch.from_numpy(conditioned))
        test, probe = score(corpus, z)
        arms.append(Arm(name, None, test, probe, z=z, path=path, encoder=encoder))
        print(f"  {arms[-1].label}: test macro AUROC {test[0]:.3f} [{test[1]:.3f}, {test[2]:.3f}], "
              f"val {probe.val_macro_auroc:.3f}", flush=True)
    crema_weight = base.contrastive_weight if args.contrastive_weight is None else args.contrastive_weight
    for name, update in (("mae", {"contrastive_weight": 0.0}),
                         ("crema", {"contrastive_weight": crema_weight, **settings(args.crema)})):
        if name not in args.arms:
            continue
        cfg = ModelConfig.model_validate({**base.model_dump(), **update})
        for seed in range(args.seeds):
            arms.append(pretrain(name, cfg, corpus, x, seed, args.steps, args.batch, args.lr, args.curve_points))

    rows = summary(arms)
    print(f"\nPTB-XL records100, {len(corpus.raw)} records, superdiagnostic (5 classes), fold 10 test; "
          f"converged linear probe; {args.steps} pretraining steps x batch {args.batch}, {args.seeds} seeds; "
          f"{time.perf_counter() - started:.0f} s")
    print(f"{'arm':<12} {'seeds':>5} {'test macro AUROC':>17} {'seed spread':>12} {'mean 95% CI':>18} {'val':>7}")
    for r in rows:
        print(f"{r['arm']:<12} {r['seeds']:>5} {r['test_macro_auroc']:>17.3f} {r['seed_spread']:>12.3f} "
              f"[{r['ci_low']:.3f}, {r['ci_high']:.3f}]  {r['val_macro_auroc']:>7.3f}")
    print("\nlearning curve (val macro AUROC, fold 9, by pretraining step):")
    for arm in arms:
        if arm.curve:
            print(f"  {arm.name:<6} seed {arm.seed}: " + ", ".join(f"{s}: {a:.3f}" for s, a in arm.curve))
    fraction_rows, finetune_tables = [], []
    if args.fractions != [1.0] or args.finetune:
        fraction_scores = label_efficiency(corpus, arms, args.fractions, args.draws)
        finetune_scores, finetune_tables = finetune_arms(corpus, [a for a in arms if a.name in args.finetune],
                                                         args.fractions, args.draws, args.finetune_epochs)
        fraction_rows = fraction_summary(fraction_scores + finetune_scores)
        print(f"\nlabel efficiency: the converged probe, or {args.finetune_epochs} epochs of fine-tuning (random_init "
              f"fine-tuned: supervised from scratch), on a fraction of the training patients (folds 1-8), C or the "
              f"epoch chosen on fold 9, test fold 10; mean ± sd over the arm's encoders x {args.draws} patient draws "
              f"below 1, mean 95% CI")
        print(f"{'arm':<12} {'method':<8} {'fraction':>8} {'runs':>5} {'test macro AUROC':>17} {'sd':>6} "
              f"{'mean 95% CI':>18} {'val':>7}")
        for r in fraction_rows:
            print(f"{r['arm']:<12} {r['method']:<8} {r['fraction']:>8g} {r['runs']:>5} {r['test_macro_auroc']:>17.3f} "
                  f"{r['sd']:>6.3f} [{r['ci_low']:.3f}, {r['ci_high']:.3f}]  {r['val_macro_auroc']:>7.3f}")
    domain_tables, domain_rows = [], pd.DataFrame()
    if args.external:
        scored = scored_rows(corpus)
        domain_tables = [cross_domain(corpus, arm.name, arm.label, arm.probe.predict(arm.z[scored])) for arm in arms]
        domain_tables += finetune_tables
        domain_rows = cross_domain_summary(domain_tables)
        print(f"\ncross-domain: the probe (and an ARM-finetune model) fitted on PTB-XL (folds 1-8, C or the epoch on "
              f"fold 9), scored on PTB-XL fold 10 and "
              f"on every record of {', '.join(args.external)}; macro over the classes a source has, mean over the "
              f"arm's encoders (sd), mean 95% patient-bootstrap CI; per class in {args.out / 'cross_domain.csv'}")
        print(f"{'arm':<12} {'source':<8} {'encoders':>8} {'macro AUROC':>12} {'sd':>6} {'mean 95% CI':>18} {'drop':>7}")
        for r in domain_rows.to_dict("records"):
            print(f"{r['arm']:<12} {r['source']:<8} {r['encoders']:>8} {r['auroc']:>12.3f} {r['sd']:>6.3f} "
                  f"[{r['ci_low']:.3f}, {r['ci_high']:.3f}]  {r['drop']:>7.3f}")

    args.out.mkdir(parents=True, exist_ok=True)
    if domain_tables:
        pd.concat(domain_tables).to_csv(args.out / "cross_domain.csv", index=False)
    mlflow.set_tracking_uri(f"sqlite:///{args.out / 'mlflow.db'}")
    experiment_id = ensure_experiment("crema-quality", mlflow.get_tracking_uri())
    mlflow.set_experiment(experiment_id=experiment_id)
    with mlflow.start_run(run_name=f"quality-{args.steps}steps-{args.seeds}seeds"):
        mlflow.log_params({**vars(args), "out": str(args.out), "model": base.model_dump_json()})
        for r in rows:
            mlflow.log_metrics({f"{r['arm']}_{k}": v for k, v in r.items() if isinstance(v, float)})
        mlflow.log_table({k: [r[k] for r in rows] for k in rows[0]}, "quality_table.json")
        if fraction_rows:
            mlflow.log_table({k: [r[k] for r in fraction_rows] for k in fraction_rows[0]}, "label_efficiency.json")
            mlflow.log_metrics({f"{r['arm']}_{r['method']}_f{r['fraction']:g}_test_macro_auroc": r["test_macro_auroc"]
                                for r in fraction_rows})
        if domain_tables:
            mlflow.log_artifact(str(args.out / "cross_domain.csv"))
            mlflow.log_table(domain_rows, "cross_domain_summary.json")
            mlflow.log_metrics({f"{r['arm']}_on_{r['source']}_macro_auroc": r["auroc"]
                                for r in domain_rows.to_dict("records")})
            for i, table in enumerate(domain_tables):  # one figure per encoder: its classes by source
                mlflow.log_figure(cross_domain_figure(table), f"cross_domain/{i:02d}_{table['arm'].iloc[0]}.png")
        mlflow.log_figure(loss_figure(arms), "reconstruction_loss.png")
        for arm in arms:
            for step, auroc in arm.curve:
                mlflow.log_metric(f"{arm.name}_seed{arm.seed}_val_macro_auroc", auroc, step=step)
    print(f"logged to MLflow: mlflow ui --backend-store-uri sqlite:///{args.out / 'mlflow.db'}   then open "
          f"{experiment_page(experiment_id)}")


if __name__ == "__main__":
    main()
