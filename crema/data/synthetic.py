"""A small synthetic 12-lead corpus in real WFDB files: the data a fresh clone can run end to end on.

Each beat is a sum of gaussian bumps (P, Q, R, S, T, plus an R' wave and an ST shift for the
abnormal morphologies) with lead-specific amplitudes for the independently recorded leads I, II and
V1-V6; III, aVR, aVL and aVF are derived from I and II as an electrocardiograph does, so the corpus
obeys Einthoven's law. Classes differ in ways a model (and a simple feature) can see:

========  ====================================================================================
NORM      sinus rhythm 60-90 bpm with mild respiratory sinus arrhythmia
BRADY     sinus rhythm 40-55 bpm
TACHY     sinus rhythm 105-140 bpm
AFIB      irregularly irregular RR intervals, no P waves, 4-8 Hz fibrillatory baseline
CD        right bundle branch block-like conduction delay: QRS ~150 ms, R' in V1-V2, broad S in I/V6
MI        ST elevation in an anterior or inferior territory with reciprocal depression and Q waves
========  ====================================================================================

Some CD and MI records also carry a rate label (``MI;TACHY``). Patients keep their morphology and
class across their records. Baseline wander, white noise and, in some records, 50 Hz mains hum
are added before quantisation to 1 µV (PTB-XL's resolution).
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import wfdb
import yaml
from scipy.special import expit

from crema.config import LabelTable, SourceConfig
from crema.data.signals import LEADS

CLASSES: tuple[str, ...] = ("NORM", "AFIB", "BRADY", "TACHY", "CD", "MI")
_CLASS_SHARE = {"NORM": 0.35, "AFIB": 0.15, "BRADY": 0.125, "TACHY": 0.125, "CD": 0.125, "MI": 0.125}
_HEART_RATE_BPM = {"NORM": (60, 90), "BRADY": (40, 55), "TACHY": (105, 140), "AFIB": (80, 130)}

# The leads an electrocardiograph records; the other four are linear combinations of I and II.
_RECORDED = ("I", "II", "V1", "V2", "V3", "V4", "V5", "V6")
_WAVES = ("P", "Q", "R", "S", "R2", "ST", "T")
# Typical amplitudes (mV) of a normal adult beat: R grows across the precordium, S shrinks.
_NORMAL_AMPLITUDE = {
    #      P      Q      R     S     R2   ST    T
    "I":  (0.08, -0.05, 0.70, -0.10, 0.0, 0.0, 0.20),
    "II": (0.12, -0.07, 1.10, -0.20, 0.0, 0.0, 0.30),
    "V1": (0.06, 0.00, 0.25, -0.90, 0.0, 0.0, 0.05),
    "V2": (0.07, 0.00, 0.50, -1.20, 0.0, 0.0, 0.45),
    "V3": (0.07, -0.03, 0.90, -0.80, 0.0, 0.0, 0.45),
    "V4": (0.07, -0.05, 1.30, -0.50, 0.0, 0.0, 0.40),
    "V5": (0.07, -0.07, 1.20, -0.30, 0.0, 0.0, 0.30),
    "V6": (0.06, -0.07, 0.90, -0.15, 0.0, 0.0, 0.25),
}
# ST shift per lead for a unit elevation in each territory; the limb values make III/aVF (inferior)
# or aVL (lateral) follow once derived, and the negative entries are the reciprocal depression.
_ST_TERRITORY = {
    "anterior": {"I": 0.5, "II": -0.3, "V1": 0.6, "V2": 1.0, "V3": 1.0, "V4": 0.8, "V5": 0.3, "V6": 0.0},
    "inferior": {"I": -0.3, "II": 1.0, "V1": -0.3, "V2": -0.4, "V3": -0.2, "V4": 0.0, "V5": 0.2, "V6": 0.3},
}
_AF_WAVE_GAIN = {"I": 0.3, "II": 0.6, "V1": 1.0, "V2": 0.8, "V3": 0.5, "V4": 0.4, "V5": 0.3, "V6": 0.3}
ADC_GAIN_PER_MV = 1000.0


@dataclass(frozen=True)
class _Patient:
    patient_id: str
    condition: str
    amplitude: np.ndarray  # (8 recorded leads, 7 waves) mV
    pr_s: float


def _allocate_patients(n_records: int, rng: np.random.Generator) -> list[tuple[str, int]]:
    """(condition, number of records) per patient; class shares match _CLASS_SHARE as closely as n allows."""
    counts = dict.fromkeys(CLASSES, 0)
    patients, total = [], 0
    while total < n_records:
        condition = min(CLASSES, key=lambda c: (counts[c] / _CLASS_SHARE[c], CLASSES.index(c)))
        n = min(int(rng.choice([1, 2, 3], p=[0.6, 0.3, 0.1])), n_records - total)
        patients.append((condition, n))
        counts[condition] += n
        total += n
    return patients


def _make_patient(index: int, condition: str, rng: np.random.Generator) -> _Patient:
    """One synthetic patient: wave amplitudes and timings for its condition."""
    base = np.array([_NORMAL_AMPLITUDE[lead] for lead in _RECORDED])
    amplitude = base * rng.lognormal(0.0, 0.15, size=base.shape)
    territory = str(rng.choice(["anterior", "inferior"]))
    if condition == "CD":
        rows = {lead: i for i, lead in enumerate(_RECORDED)}
        amplitude[rows["V1"], _WAVES.index("R2")] = rng.uniform(0.5, 0.9)
        amplitude[rows["V2"], _WAVES.index("R2")] = rng.uniform(0.3, 0.6)
        for lead in ("I", "V5", "V6"):
            amplitude[rows[lead], _WAVES.index("S")] -= rng.uniform(0.25, 0.4)
        for lead in ("V1", "V2", "V3"):  # secondary repolarisation change: discordant T
            amplitude[rows[lead], _WAVES.index("T")] = -abs(amplitude[rows[lead], _WAVES.index("T")]) * 0.6
    if condition == "MI":
        elevation = rng.uniform(0.2, 0.4)
        for i, lead in enumerate(_RECORDED):
            weight = _ST_TERRITORY[territory][lead]
            amplitude[i, _WAVES.index("ST")] = elevation * weight
            if weight >= 0.8:  # infarcted wall: pathological Q, lost R
                amplitude[i, _WAVES.index("Q")] -= rng.uniform(0.2, 0.4)
                amplitude[i, _WAVES.index("R")] *= 0.6
    return _Patient(f"P{index:04d}", condition, amplitude, float(rng.uniform(0.14, 0.19)))


def _r_peak_times(rhythm: str, seconds: float, rng: np.random.Generator) -> np.ndarray:
    """R-peak times covering [-1 s, seconds + 1 s], so beats overlapping the edges are drawn whole."""
    low, high = _HEART_RATE_BPM[rhythm]
    mean_rr = 60.0 / rng.uniform(low, high)
    resp_period = rng.uniform(3.0, 5.0)
    times = [-rng.uniform(0.0, mean_rr) - 0.5]
    while times[-1] < seconds + 1.0:
        if rhythm == "AFIB":
            rr = max(0.28, mean_rr * rng.lognormal(0.0, 0.22))
        else:
            rr = mean_rr * (1 + 0.03 * np.sin(2 * np.pi * times[-1] / resp_period) + rng.normal(0, 0.008))
        times.append(times[-1] + rr)
    return np.array(times)


def _gaussians(t: np.ndarray, centres: np.ndarray, width: float, gain: np.ndarray) -> np.ndarray:
    """Sum over beats of gain_k * exp(-(t - centre_k)^2 / 2 width^2), as one (n_samples,) curve."""
    z = (t[None, :] - centres[:, None]) / width
    return gain @ np.exp(-0.5 * z * z)


def _plateaus(t: np.ndarray, starts: np.ndarray, ends: np.ndarray, rise_s: float, fall_s: float) -> np.ndarray:
    """Sum over beats of a step up at starts_k and a gentler step down at ends_k, as one (n_samples,) curve."""
    return (expit((t[None, :] - starts[:, None]) / rise_s) * expit((ends[:, None] - t[None, :]) / fall_s)).sum(0)


def _wave_basis(t: np.ndarray, r_times: np.ndarray, patient: _Patient, has_p: bool) -> np.ndarray:
    """(7 waves, n_samples): every beat's unit-amplitude P, Q, R, S, R', ST and T curves."""
    rr = np.diff(r_times, prepend=r_times[0] - (r_times[1] - r_times[0]))
    qrs_stretch = 1.7 if patient.condition == "CD" else 1.0
    t_peak = 0.34 * np.sqrt(rr) + (0.04 if patient.condition == "CD" else 0.0)  # QT shortens with rate
    beat_gain = 1 + 0.04 * np.sin(2 * np.pi * r_times / 4.0)  # respiration modulates amplitude
    timing = {  # (offset from R, width) in seconds
        "P": (-patient.pr_s, 0.022),
        "Q": (-0.022 * qrs_stretch, 0.008 * qrs_stretch),
        "R": (0.0, 0.010 * qrs_stretch),
        "S": (0.026 * qrs_stretch, 0.010 * qrs_stretch),
        "R2": (0.065, 0.016),
    }
    curves = []
    for wave in _WAVES:
        if wave == "ST":  # from the J point (end of QRS) until it merges into the T wave
            curves.append(_plateaus(t, r_times + 0.045 * qrs_stretch, r_times + t_peak, 0.006, 0.03))
            continue
        if wave == "T":
            centres, width = r_times + t_peak, 0.05
        else:
            offset, width = timing[wave]
            centres = r_times + offset
        gain = beat_gain * (0.0 if wave == "P" and not has_p else 1.0)
        curves.append(_gaussians(t, centres, width, gain))
    return np.stack(curves)


def _fibrillation(t: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A 4-8 Hz fibrillatory wave with drifting frequency and amplitude, ~0.05-0.1 mV."""
    wave = np.zeros_like(t)
    for _ in range(3):
        freq = rng.uniform(4.0, 8.0)
        drift = 0.4 * np.sin(2 * np.pi * rng.uniform(0.1, 0.3) * t + rng.uniform(0, 2 * np.pi))
        envelope = 1 + 0.5 * np.sin(2 * np.pi * rng.uniform(0.2, 0.6) * t + rng.uniform(0, 2 * np.pi))
        wave += envelope * np.sin(2 * np.pi * freq * t + drift + rng.uniform(0, 2 * np.pi))
    return wave * rng.uniform(0.05, 0.1) / 3


def _with_limb_leads(recorded: np.ndarray) -> np.ndarray:
    """(8, n) recorded leads -> (12, n) in canonical order, deriving III, aVR, aVL, aVF from I and II."""
    by_name = dict(zip(_RECORDED, recorded))
    lead_i, lead_ii = by_name["I"], by_name["II"]
    by_name.update({
        "III": lead_ii - lead_i,
        "aVR": -(lead_i + lead_ii) / 2,
        "aVL": lead_i - lead_ii / 2,
        "aVF": lead_ii - lead_i / 2,
    })
    return np.stack([by_name[lead] for lead in LEADS])


def _synthesize_record(patient: _Patient, rhythm: str, fs: int, seconds: float,
                       rng: np.random.Generator) -> np.ndarray:
    """One recording of `patient` at `rhythm` (a key of _HEART_RATE_BPM): (12, n) float64 mV."""
    t = np.arange(int(round(fs * seconds))) / fs
    r_times = _r_peak_times(rhythm, seconds, rng)
    basis = _wave_basis(t, r_times, patient, has_p=rhythm != "AFIB")
    jitter = rng.lognormal(0.0, 0.05, size=patient.amplitude.shape)
    recorded = (patient.amplitude * jitter) @ basis
    if rhythm == "AFIB":
        recorded += np.outer([_AF_WAVE_GAIN[lead] for lead in _RECORDED], _fibrillation(t, rng))
    n_leads = len(_RECORDED)
    for _ in range(2):  # respiration and electrode drift
        recorded += np.outer(rng.uniform(0.02, 0.12, n_leads),
                             np.sin(2 * np.pi * rng.uniform(0.1, 0.45) * t + rng.uniform(0, 2 * np.pi)))
    recorded += rng.normal(0.0, rng.uniform(0.008, 0.025), size=recorded.shape)
    if rng.random() < 0.3:
        recorded += rng.uniform(0.005, 0.02) * np.sin(2 * np.pi * 50.0 * t + rng.uniform(0, 2 * np.pi))
    return _with_limb_leads(recorded)


def _record_labels(condition: str, rng: np.random.Generator) -> tuple[str, list[str]]:
    """(rhythm used to draw the beats, label codes) for one record of a patient with `condition`."""
    if condition in ("NORM", "AFIB", "BRADY", "TACHY"):
        return condition, [condition]
    if rng.random() < 0.2:
        rate = str(rng.choice(["BRADY", "TACHY"]))
        return rate, [condition, rate]
    return "NORM", [condition]


def source_config(dest: Path, name: str = "synthetic") -> SourceConfig:
    """The SourceConfig that reads a corpus written by :func:`write_synthetic_corpus` at `dest`."""
    return SourceConfig(
        name=name,
        format="wfdb",
        path=str(Path(dest).resolve() / "records"),
        labels=LabelTable(
            table="../labels.csv",
            record_column="record",
            label_column="label",
            label_format="list",
            patient_column="patient_id",
        ),
    )


def write_synthetic_corpus(dest: Path, n_records: int = 200, fs: int = 500, seconds: float = 10.0,
                           seed: int = 0) -> Path:
    """Write `n_records` WFDB records, ``labels.csv`` and ``source.yaml`` under `dest`; returns the YAML path.

    Byte-identical output for the same arguments. Records are ``dest/records/syn<NNNNN>.{hea,dat}``.
    """
    if n_records < 1:
        raise ValueError("n_records must be at least 1")
    dest = Path(dest)
    records_dir = dest / "records"
    records_dir.mkdir(parents=True, exist_ok=True)
    root = np.random.SeedSequence(seed)
    allocation_seed, order_seed, *patient_seeds = root.spawn(2 + n_records)
    allocation = _allocate_patients(n_records, np.random.default_rng(allocation_seed))

    # Record numbers are shuffled so a record's neighbours are not its siblings (as in a real export).
    numbers = iter(np.random.default_rng(order_seed).permutation(n_records) + 1)
    table = []
    for index, ((condition, n), patient_seed) in enumerate(zip(allocation, patient_seeds)):
        rng = np.random.default_rng(patient_seed)
        patient = _make_patient(index + 1, condition, rng)
        for _ in range(n):
            rhythm, labels = _record_labels(condition, rng)
            signal = _synthesize_record(patient, rhythm, fs, seconds, rng)
            record = f"syn{next(numbers):05d}"
            digital = np.clip(np.round(signal.T * ADC_GAIN_PER_MV), -32767, 32767).astype(np.int16)
            wfdb.wrsamp(
                record, fs=fs, units=["mV"] * len(LEADS), sig_name=list(LEADS), d_signal=digital,
                fmt=["16"] * len(LEADS), adc_gain=[ADC_GAIN_PER_MV] * len(LEADS), baseline=[0] * len(LEADS),
                write_dir=str(records_dir),
            )
            table.append({"record": record, "patient_id": patient.patient_id, "label": ";".join(labels)})
    table.sort(key=lambda row: row["record"])

    with open(dest / "labels.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["record", "patient_id", "label"], lineterminator="\n")
        writer.writeheader()
        writer.writerows(table)
    config_path = dest / "source.yaml"
    config = source_config(dest).model_dump(mode="json", exclude_defaults=True)
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    return config_path
