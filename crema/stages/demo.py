"""The main job end to end on the embedded default: ingest → pretrain (tiny, CPU) → linear probe.

Pretrains CR-MAE and its MAE-only ablation (λ = 0), then probes both against a random-init encoder.

    python -m crema.stages.demo --workdir demo-output        (also `crema demo`, `make demo`)

Everything is local: a Ray instance in this process, SQLite MLflow at WORKDIR/mlflow.db, files under
WORKDIR. Data: the real PTB-XL records at $CREMA_SHARED_DATA/ptbxl (default ../shared/data) when
present, else a synthetic 12-lead corpus generated as real WFDB files.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from crema.config import PretrainConfig, load_yaml
from crema.data.labels import PSEUDONYM_KEY_ENV
from crema.stages import ingest as ingest_stage
from crema.stages import pretrain as pretrain_stage
from crema.stages import probe as probe_stage
from crema.stages.common import init_ray

REPO = Path(__file__).resolve().parents[2]
DEMO_KEY = "crema-demo-key-not-secret"
console = Console()


def shared_ptbxl() -> Path | None:
    """The real PTB-XL under $CREMA_SHARED_DATA (default ../shared/data), when it is there."""
    root = Path(os.environ.get("CREMA_SHARED_DATA", REPO.parent / "shared" / "data")) / "ptbxl"
    return root if (root / "records500").is_dir() and (root / "ptbxl_database.csv").exists() else None


def choose_data(workdir: Path) -> tuple[Path, Path]:
    """(source YAML, task YAML): real PTB-XL where it is, else a synthetic corpus made here."""
    ptbxl = shared_ptbxl()
    if ptbxl is not None:
        os.environ["PTBXL_ROOT"] = str(ptbxl)
        console.print(f"data: real PTB-XL records at {ptbxl}")
        return REPO / "configs/sources/ptbxl.yaml", REPO / "configs/tasks/ptbxl_superdiagnostic.yaml"
    from crema.data.synthetic import write_synthetic_corpus

    console.print("data: no PTB-XL found; generating a synthetic 12-lead corpus (real WFDB files)")
    source = write_synthetic_corpus(workdir / "synthetic", n_records=300)
    return source, REPO / "configs/tasks/synthetic_rhythm.yaml"


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
    ingest_stage.print_summary(ingest_stage.run([source], str(dataset), REPO / "configs/ingest.yaml"))

    console.rule("2/3 pretrain: CR-MAE and its MAE-only ablation (tiny, CPU)")
    encoders = []
    for name, weight, description in (("crema", None, "CR-MAE pretrained by this demo"),
                                      ("mae", 0.0, "MAE only: the same pretraining with lambda = 0")):
        overrides = {"name": f"demo-{name}-tiny", "storage_path": str(workdir / "runs"),
                     "data.dataset": str(dataset), "tracking.tracking_uri": tracking_uri}
        if weight is not None:
            overrides["model.contrastive_weight"] = weight
        pretrained = pretrain_stage.run(load_yaml(REPO / "configs/pretrain/tiny.yaml", PretrainConfig, overrides))
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
