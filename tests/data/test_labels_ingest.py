"""Labels from the records themselves (Challenge `#Dx:` lines) and from richer label tables."""

from __future__ import annotations

import shutil

from crema.config import IngestConfig, LabelTable, SourceConfig
from crema.data.catalog import read_windows
from crema.data.labels import label_name
from crema.stages.ingest import print_summary
from crema.data.ingest import run_ingest

KEY = b"test-pseudonym-key"


def copy_record(ptbxl_root, src, name, extra_header: str = "") -> None:
    shutil.copy(ptbxl_root / "records500/00000" / f"{name}.dat", src)
    header = (ptbxl_root / "records500/00000" / f"{name}.hea").read_text()
    (src / f"{name}.hea").write_text(header + extra_header)


def labels_of(out) -> dict:
    table = read_windows(str(out), columns=["record_id", "labels"])
    return dict(zip(table["record_id"].to_pylist(), table["labels"].to_pylist()))


def test_challenge_dx_codes_become_labels(ptbxl_root, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    copy_record(ptbxl_root, src, "00001_hr", "#Age: 56\n#Sex: Female\n#Dx: 164889003,59118001\n#Rx: Unknown\n")
    copy_record(ptbxl_root, src, "00002_hr")
    run_ingest([SourceConfig(name="cinc", format="wfdb", path=str(src), pseudonymise_record_ids=False)],
           str(tmp_path / "ds"), IngestConfig(), pseudonym=KEY)
    assert labels_of(tmp_path / "ds") == {"00001_hr": ["164889003", "59118001"], "00002_hr": []}
    assert [label_name(c) for c in ("164889003", "59118001", "999")] == ["AF", "RBBB", "999"]


def test_label_separator_several_columns_and_the_coverage_line(ptbxl_root, tmp_path, capsys):
    src = tmp_path / "src"
    src.mkdir()
    for name in ("00001_hr", "00002_hr", "00003_hr"):
        copy_record(ptbxl_root, src, name)
    (src / "labels.csv").write_text('record,rhythm,form\n00001_hr,"Atrial flutter, typical",Q waves\n'
                                    '00002_hr,Sinus rhythm|Sinus arrhythmia,\nnot_here,Sinus rhythm,\n')
    table = LabelTable(table="labels.csv", record_column="record", label_column=["rhythm", "form"],
                       label_format="list", label_separator="|")
    summary = run_ingest([SourceConfig(name="ludb", format="wfdb", path=str(src), labels=table)],
                     str(tmp_path / "ds"), IngestConfig(), pseudonym=KEY)
    assert labels_of(tmp_path / "ds") == {"00001_hr": ["Atrial flutter, typical", "Q waves"],
                                         "00002_hr": ["Sinus arrhythmia", "Sinus rhythm"], "00003_hr": []}
    s = summary.sources[0]
    assert (s.discovered - s.records_without_labels, s.records_without_labels, s.unmatched_label_rows) == (2, 1, 1)
    print_summary(summary)
    assert "labels: 2 records" in capsys.readouterr().out
