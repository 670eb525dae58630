"""Figures for people: a 12-lead ECG against the model's reconstruction, masked spans shaded."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # headless: workers and CI have no display

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from crema.data.signals import LEADS  # noqa: E402


def masked_spans(mask: np.ndarray) -> list[tuple[int, int]]:
    """[start, stop) sample ranges where a 1-D bool mask is True."""
    edges = np.diff(np.concatenate([[0], mask.astype(np.int8), [0]]))
    return list(zip(np.flatnonzero(edges == 1).tolist(), np.flatnonzero(edges == -1).tolist()))


def plot_reconstruction(original: np.ndarray, reconstruction: np.ndarray, masked: np.ndarray,
                        lead_mask: np.ndarray, fs: float, title: str = "") -> Figure:
    """Leads in the standard 6×2 layout; grey bands (and the red trace) are the spans the model filled in.

    original, reconstruction: (12, L) in mV; masked: (12, L) bool; lead_mask: (12,) bool.
    """
    t = np.arange(original.shape[1]) / fs
    fig, axes = plt.subplots(6, 2, figsize=(14, 12), sharex=True, constrained_layout=True)
    for lead, ax in zip(range(len(LEADS)), axes.T.ravel()):
        for start, stop in masked_spans(masked[lead]):
            ax.axvspan(t[start], t[stop - 1], color="0.85", lw=0)
        if lead_mask[lead]:
            ax.plot(t, original[lead], color="black", lw=0.8, label="original")
            # Only where the model had to fill in: elsewhere it was shown the original.
            filled = np.where(masked[lead], reconstruction[lead], np.nan)
            ax.plot(t, filled, color="tab:red", lw=0.8, alpha=0.85, label="reconstruction")
        else:
            ax.text(0.5, 0.5, "lead absent", transform=ax.transAxes, ha="center", va="center", color="0.5")
        ax.set_ylabel(f"{LEADS[lead]} (mV)")
    for ax in axes[-1]:
        ax.set_xlabel("time (s)")
    axes[0, 0].legend(loc="upper right", fontsize="small")
    fig.suptitle(title or "original vs reconstruction (grey: masked)")
    return fig
