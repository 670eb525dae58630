"""Lead sets: a task evaluated as a wearable records, with only some of the 12 leads.

A lead set is named in a task's ``lead_sets`` (:func:`crema.data.signals.lead_set_leads`). Its windows keep
their other leads neither in the signal nor in ``lead_mask``: they are zeros the model is told are absent, at
train and at test time, so no head and no encoder can read a hidden lead.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from crema.data.schema import decode_masks, decode_signals
from crema.data.signals import ALL_LEADS, LEAD_INDEX, N_LEADS, lead_set_leads

def hide_leads(windows: pa.Table, name: str) -> pa.Table:
    """The windows with only the leads of lead set `name`: the others zeroed and out of `lead_mask`."""
    if name == ALL_LEADS:
        return windows
    kept = np.zeros(N_LEADS, dtype=bool)
    kept[[LEAD_INDEX[lead] for lead in lead_set_leads(name)]] = True
    signals = decode_signals(windows)
    signals = np.where(kept[None, :, None], signals, 0).astype(signals.dtype)
    field = windows.schema.field("signal")
    signal = pa.FixedSizeBinaryArray.from_buffers(field.type, len(windows), [None, pa.py_buffer(signals.tobytes())])
    mask = decode_masks(windows.column("lead_mask")) & kept[None, :]
    lead_mask = pa.FixedSizeListArray.from_arrays(pa.array(mask.ravel()), N_LEADS)
    windows = windows.set_column(windows.schema.get_field_index("signal"), field, signal)
    index = windows.schema.get_field_index("lead_mask")
    return windows.set_column(index, windows.schema.field(index), lead_mask.cast(windows.schema.field(index).type))


def lead_set_suffix(name: str) -> str:
    """What a lead set adds to a run or folder name: nothing for all twelve leads."""
    return "" if name == ALL_LEADS else f"-leads{name.replace('+', '_')}"
