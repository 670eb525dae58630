"""Model quality on real PTB-XL: does CR-MAE pretraining beat the hand-made feature floor and a random encoder?

    python -m benchmarks.quality [--steps 400] [--seeds 3] [--records 1999] [--arms ...] [--model KEY=VALUE ...]
                                 [--encoder NAME=PATH ...] [--fractions 0.01 0.1 1] [--draws 3] [--external ludb]
                                 [--out benchmarks-output/quality]

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
"""

from __future__ import annotations

import argparse
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
from crema.model.network import CREMA, SiTEncoder  # noqa: E402
from crema.tracking import ensure_experiment, experiment_page  # noqa: E402
from crema.train.artifacts import load_encoder  # noqa: E402
from crema.train.engine_pretrain import train_one_epoch  # noqa: E402
from crema.train.optim import param_groups, warmup_cosine  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CLASSES = ("NORM", "MI", "STTC", "CD", "HYP")
FS = 100
WINDOW = 1000
ARMS = ("features", "random_init", "mae", "crema")
PTBXL = "ptbxl"
EXTERNAL = "external"  # the split of another hospital's records: never trained or chosen on, scored by every arm


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

    @property
    def val_auroc(self) -> float:
        return self.probe.val_macro_auroc

    @property
    def label(self) -> str:
        return f"{self.name} seed {self.seed}" if self.path is None else f"{self.name} ({self.path})"


@dataclass
class FractionScore:
    arm: str
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
    test = corpus.split == "test"
    ci = bootstrap_ci(macro_metric(per_class_auroc_weighted, range(len(CLASSES))), corpus.y[test],
                      probe.predict(z[test]), corpus.patients[test], n_boot=1000)
    return (ci.point, ci.low, ci.high), probe


def cross_domain(corpus: Corpus, arm: Arm) -> pd.DataFrame:
    """The arm's PTB-XL probe on PTB-XL's test fold and on every external record: the product's table."""
    rows = np.isin(corpus.split, ["test", EXTERNAL])
    keys = np.array([f"{s}/{r}" for s, r in zip(corpus.source[rows], corpus.record_ids[rows])])
    scored = ScoredRecords(keys, corpus.y[rows], corpus.patients[rows], arm.probe.predict(arm.z[rows]))
    return cross_domain_table(scored, CLASSES, [PTBXL]).assign(arm=arm.name, run=arm.label)


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
    arm.z = embed(model.encoder, x)
    arm.test_auroc, arm.probe = score(corpus, arm.z)
    arm.curve.append((done, arm.val_auroc))
    test = arm.test_auroc
    print(f"  {name} seed {seed} step {done}: recon {np.mean(arm.losses[-20:]):.3f}, val {arm.val_auroc:.3f}, "
          f"test macro AUROC {test[0]:.3f} [{test[1]:.3f}, {test[2]:.3f}] ({time.perf_counter() - started:.0f} s)",
          flush=True)
    return arm


def label_efficiency(corpus: Corpus, arms: list[Arm], fractions: list[float], draws: int) -> list[FractionScore]:
    """Every arm's probe on `fractions` of the training patients, `draws` patient draws below 1."""
    train = np.flatnonzero(corpus.split == "train")
    scores = []
    for arm in arms:
        for fraction in fractions:
            if fraction == 1.0:
                scores.append(FractionScore(arm.name, arm.label, 1.0, 0, arm.test_auroc, arm.val_auroc))
                continue
            for draw in range(draws):
                rows = np.zeros(len(corpus.split), dtype=bool)
                rows[sample_label_fraction(train, corpus.patients[train], fraction, seed=draw)] = True
                test, probe = score(corpus, arm.z, rows)
                val = probe.val_macro_auroc
                scores.append(FractionScore(arm.name, arm.label, fraction, draw, test, val))
                print(f"  {arm.label} @ {fraction:g} draw {draw} ({rows.sum()} records): test macro "
                      f"AUROC {test[0]:.3f} [{test[1]:.3f}, {test[2]:.3f}], val {val:.3f}", flush=True)
    return scores


def fraction_summary(scores: list[FractionScore]) -> list[dict]:
    rows = []
    for arm, fraction in dict.fromkeys((s.arm, s.fraction) for s in scores):
        mine = [s for s in scores if (s.arm, s.fraction) == (arm, fraction)]
        points = np.array([s.test_auroc[0] for s in mine])
        rows.append({"arm": arm, "fraction": fraction, "probes": len(mine),
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
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks-output" / "quality")
    args = parser.parse_args()
    if any(not 0 < f <= 1 for f in args.fractions):
        parser.error(f"fractions must be in (0, 1], got {args.fractions}")
    if any("=" not in item for item in args.encoder):
        parser.error(f"--encoder takes NAME=PATH, got {args.encoder}")
    pretrained = [tuple(item.split("=", 1)) for item in args.encoder]  # a name given twice: two seeds of one arm
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
        z = embed(CREMA(base).encoder, x)
        test, probe = score(corpus, z)
        arms.append(Arm("random_init", seed, test, probe, z=z))
        print(f"  random_init seed {seed}: test macro AUROC {test[0]:.3f}", flush=True)
    for name, path in pretrained:
        encoder = load_encoder(path)
        conditioned = condition(corpus.raw, np.ones(corpus.raw.shape[:2], dtype=bool), FS, encoder.cfg.input)
        z = embed(encoder, torch.from_numpy(conditioned))
        test, probe = score(corpus, z)
        arms.append(Arm(name, None, test, probe, z=z, path=path))
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
    fraction_rows = []
    if args.fractions != [1.0]:
        fraction_rows = fraction_summary(label_efficiency(corpus, arms, args.fractions, args.draws))
        print(f"\nlabel efficiency: the converged probe on a fraction of the training patients (folds 1-8), C chosen "
              f"on fold 9, test fold 10; mean ± sd over the arm's encoders x {args.draws} patient draws, mean 95% CI")
        print(f"{'arm':<12} {'fraction':>8} {'probes':>6} {'test macro AUROC':>17} {'sd':>6} {'mean 95% CI':>18} "
              f"{'val':>7}")
        for r in fraction_rows:
            print(f"{r['arm']:<12} {r['fraction']:>8g} {r['probes']:>6} {r['test_macro_auroc']:>17.3f} {r['sd']:>6.3f} "
                  f"[{r['ci_low']:.3f}, {r['ci_high']:.3f}]  {r['val_macro_auroc']:>7.3f}")
    domain_tables, domain_rows = [], pd.DataFrame()
    if args.external:
        domain_tables = [cross_domain(corpus, arm) for arm in arms]
        domain_rows = cross_domain_summary(domain_tables)
        print(f"\ncross-domain: the probe fitted on PTB-XL (folds 1-8, C on fold 9), scored on PTB-XL fold 10 and "
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
            mlflow.log_metrics({f"{r['arm']}_f{r['fraction']:g}_test_macro_auroc": r["test_macro_auroc"]
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
