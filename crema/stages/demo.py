"""The main job end to end on the embedded default: ingest → pretrain (tiny, CPU) → linear probe.

Pretrains CR-MAE and its MAE-only ablation (λ = 0), then probes both against a random-init encoder.

    python -m crema.stages.demo --workdir demo-output        (also `crema demo`, `make demo`)

Everything is local: a Ray instance in this process, SQLite MLflow at WORKDIR/mlflow.db, files under
WORKDIR. Data: the real PTB-XL records at $CREMA_SHARED_DATA/ptbxl/records100 (default ../shared/data) when
present, else a synthetic 12-lead corpus generated as real WFDB files; ingested at 100 Hz. The probe step
reports two probes per encoder: the converged L-BFGS probe (``probe_lbfgs``, the measuring stick) and the
Ray Tune sweep of AdamW heads (``probe``).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from crema.config import PACKAGED_CONFIGS, PretrainConfig, load_yaml
from crema.data.labels import PSEUDONYM_KEY_ENV
from crema.stages import ingest as ingest_stage
from crema.stages import pretrain as pretrain_stage
from crema.stages import probe as probe_stage
from crema.stages.common import init_ray

REPO = Path(__file__).resolve().parents[2]
DEMO_KEY = "crema-demo-key-not-secret"
# 10-s windows at 100 Hz in 0.25-s patches: the token count of the 500 Hz presets at a fifth of the input, so a
# 2-core machine takes the few hundred steps a tiny model needs to reconstruct (about 6 epochs of PTB-XL's 1,499
# training records), in about a quarter of an hour for both pretrainings.
DEMO_FS = 100
DEMO_PRETRAIN = {"model.window_samples": 10 * DEMO_FS, "model.patch_size": 25, "epochs": 6}
console = Console()


def shared_ptbxl() -> Path | None:
    """The real PTB-XL under $CREMA_SHARED_DATA (default ../shared/data), when it is there."""
    root = Path(os.environ.get("CREMA_SHARED_DATA", REPO.parent / "shared" / "data")) / "ptbxl"
    return root if (root / "records100").is_dir() and (root / "ptbxl_database.csv").exists() else None


def choose_data(workdir: Path) -> tuple[Path, Path]:
    """(source YAML, task YAML): the real PTB-XL at 100 Hz where it is, else a synthetic corpus made here."""
    ptbxl = shared_ptbxl()
    if ptbxl is not None:
        os.environ["PTBXL_ROOT"] = str(ptbxl)
        console.print(f"data: real PTB-XL records at {ptbxl / 'records100'} (1,999 records, 100 Hz)")
        return PACKAGED_CONFIGS / "sources/ptbxl100.yaml", PACKAGED_CONFIGS / "tasks/ptbxl_superdiagnostic.yaml"
    from crema.data.synthetic import write_synthetic_corpus

    console.print("data: no PTB-XL found; generating a synthetic 12-lead corpus (real WFDB files)")
    source = write_synthetic_corpus(workdir / "synthetic", n_records=300)
    return source, PACKAGED_CONFIGS / "tasks/synthetic_rhythm.yaml"


def run(workdir: Path) -> None:
    """ingest → pretrain CR-MAE and MAE → probe both and a random init, everything under `workdir`."""
    workdir = workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    if not os.environ.get(PSEUDONYM_KEY_ENV):
        console.print(f"[yellow]{PSEUDONYM_KEY_ENV} is not set: the demo uses a fixed, public key[/yellow]")
        os.environ[PSEUDONYM_KEY_ENV] = DEMO_KEY
    tracking_uri = f"sqlite:///{workdir / 'mlflow.db'}"
    os.environ["MLFLOW_TRACKING_URI"] = tracking_uri
    dataset = workdir / "dataset"
    started = time.perf_counter()
    init_ray()

    source, task = choose_data(workdir)
    console.rule("1/3 ingest")
    ingest_stage.print_summary(ingest_stage.run([source], str(dataset), PACKAGED_CONFIGS / "ingest.yaml",
                                                [f"target_fs={DEMO_FS}"]))

    console.rule("2/3 pretrain: CR-MAE and its MAE-only ablation (tiny, CPU)")
    encoders = []
    for name, weight, description in (("crema", None, "CR-MAE pretrained by this demo"),
                                      ("mae", 0.0, "MAE only: the same pretraining with lambda = 0")):
        overrides = {"name": f"demo-{name}-tiny", "storage_path": str(workdir / "runs"),
                     "data.dataset": str(dataset), "tracking.tracking_uri": tracking_uri, **DEMO_PRETRAIN}
        if weight is not None:
            overrides["model.contrastive_weight"] = weight
        pretrained = pretrain_stage.run(load_yaml(PACKAGED_CONFIGS / "pretrain/tiny.yaml", PretrainConfig, overrides))
        console.print(f"{name} encoder → {pretrained.encoder_path}")
        encoders.append({"name": name, "path": pretrained.encoder_path, "mlflow_run_id": pretrained.mlflow_run_id,
                         "description": description})

    console.rule("3/3 linear probe: CR-MAE vs MAE vs random init")
    probe_stage.run_demo(task, dataset=str(dataset), encoders=encoders, tracking_uri=tracking_uri)

    console.rule(f"done in {time.perf_counter() - started:.0f} s")
    console.print(f"browse every run:  mlflow ui --backend-store-uri {tracking_uri}")


def main(workdir: Annotated[Path, typer.Option(help="Where the demo writes data, runs and mlflow.db")]
         = Path("demo-output")) -> None:
    """Run ingest → pretrain → probe end to end on local data (CPU, a few minutes)."""
    run(workdir)


if __name__ == "__main__":
    typer.run(main)
