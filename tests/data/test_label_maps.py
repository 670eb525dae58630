"""Label maps as data: rules (exact, wildcard, regex, ignore, `unless`), the shipped maps on the real PTB-XL and
LUDB tables, LUDB ingested as a second hospital, and statements no map matches counted, never stored."""

from __future__ import annotations

import shutil
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest

from crema.config import ConfigError, IngestConfig, LabelMap, SourceConfig, load_yaml, validate
from crema.data.catalog import read_manifest, read_windows
from crema.data.labels import CHALLENGE_SNOMED, LabelIndex, LabelMapper
from crema.stages.ingest import print_summary
from crema.data.ingest import run_ingest

KEY = b"test-pseudonym-key"
REPO = Path(__file__).resolve().parents[2]
LUDB_LABEL_COLUMNS = ["Rhythms", "Electric axis of the heart", "Conduction abnormalities", "Extrasystolies",
                      "Hypertrophies", "Cardiac pacing", "Ischemia", "Non-specific repolarization abnormalities",
                      "Other states"]


@pytest.fixture(scope="module")
def ludb_root(shared_data) -> Path:
    root = shared_data / "ludb"
    if not (root / "ludb.csv").exists():
        pytest.skip(f"LUDB not found at {root}")
    return root


def source_with(label_maps: list, **keys) -> SourceConfig:
    return validate(SourceConfig, {"name": "site", "format": "wfdb", "path": "/nowhere", "label_maps": label_maps,
                                   **keys})


def ludb_source(ludb_root: Path, monkeypatch, **keys) -> SourceConfig:
    monkeypatch.setenv("LUDB_ROOT", str(ludb_root))
    source = load_yaml(REPO / "configs/sources/ludb.yaml", SourceConfig)
    return source.model_copy(update=keys)


def header_statements(hea: Path) -> list[str]:
    """The diagnosis lines of a LUDB header (`#` lines after `#<diagnoses>:`)."""
    lines = hea.read_text().split("#<diagnoses>:", 1)[1].splitlines()
    return [line.lstrip("#").strip() for line in lines if line.strip()]


# ------------------------------------------------------------------------------------------ rules

def test_rules_match_exactly_by_wildcard_and_regex_first_match_wins_and_unless_cancels():
    mapper = LabelMapper(source_with([{
        "rules": [
            {"statement": "Sinus rhythm", "to": ["SR", "NORM"]},
            {"glob": "Ischemia: *", "to": "STTC"},
            {"regex": "(complete|incomplete) (left|right) bundle branch block", "to": "CD"},
            {"glob": "Electric axis*", "ignore": True},
            {"glob": "*block", "to": "NOT_FIRST"},  # after the regex: never reached by a bundle branch block
        ],
        "unless": {"NORM": ["MI", "STTC", "CD", "HYP"]},
    }]))
    # Case, repeated spaces and a final period are not differences.
    assert mapper.map(["sinus  RHYTHM. "]).labels == ("NORM", "SR")
    assert mapper.map(["Sinus rhythm", "Electric axis of the heart: normal"]) == mapper.map(["Sinus rhythm"])
    # NORM is cancelled by another class on the same record; the rhythm code stays.
    assert mapper.map(["Sinus rhythm", "Ischemia: apical"]).labels == ("SR", "STTC")
    assert mapper.map(["Complete right bundle branch block"]).labels == ("CD",)
    assert mapper.map(["Sinoatrial block"]).labels == ("NOT_FIRST",)
    # What no rule matches is listed as given, not dropped silently; ignored statements are not listed.
    mapped = mapper.map(["Sinus rhythm", "Brugada pattern", "Electric axis: vertical"])
    assert mapped.labels == ("NORM", "SR") and mapped.unmapped == ("Brugada pattern",)


def test_table_and_rules_maps_unite_and_min_likelihood_filters_codes(tmp_path):
    (tmp_path / "codes.csv").write_text("code,superclass\nIMI,MI\nLVH,HYP\n")
    mapper = LabelMapper(validate(SourceConfig, {
        "name": "site", "format": "wfdb", "path": str(tmp_path),
        "label_maps": [{"table": "codes.csv", "value_column": "superclass", "min_likelihood": 50},
                       {"rules": [{"statement": "AFIB", "to": "AFIB"}]}]}))
    mapped = mapper.map({"IMI": 100.0, "LVH": 15.0, "AFIB": 0.0, "XYZ": 100.0})
    assert mapped.labels == ("AFIB", "MI")  # LVH at 15 % is below the table map's 50: known, not kept
    assert mapped.unmapped == ("XYZ",)


def test_without_maps_codes_are_kept_and_free_text_is_not():
    mapper = LabelMapper(source_with([]))
    assert mapper.map(["164889003"]).labels == ("164889003",)
    statements = mapper.map(["Sinus bradycardia", "Otherwise normal ECG"], free_text=True)
    assert statements.labels == () and statements.unmapped == ("Sinus bradycardia", "Otherwise normal ECG")


@pytest.mark.parametrize("rule, message", [
    ({"statement": "a", "glob": "b*", "to": "X"}, "exactly one of statement, glob and regex"),
    ({"statement": "a"}, "either `to`"),
    ({"statement": "a", "to": "X", "ignore": True}, "either `to`"),
    ({"regex": "(unclosed", "to": "X"}, "label rule regex"),
])
def test_a_bad_rule_is_a_config_error(rule, message):
    with pytest.raises(ConfigError, match=message):
        source_with([{"rules": [rule]}])


def test_map_files_load_and_misplaced_or_missing_maps_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config"):
        source_with([str(tmp_path / "no_such_map.yaml")])
    with pytest.raises(ConfigError, match="is now the source's `label_maps`"):
        source_with([], labels={"table": "t.csv", "record_column": "r", "maps": [{"table": "m.csv"}]})
    with pytest.raises(ConfigError, match="either `table`"):
        source_with([{"description": "nothing to map with"}])
    for name in ("ptbxl_scp", "challenge_snomed", "ludb"):
        assert load_yaml(f"configs/label_maps/{name}.yaml", LabelMap).rules


# ------------------------------------------------------------------------------------ shipped maps

def test_ptbxl_scp_map_gives_what_scp_statements_csv_gives_on_every_ptbxl_row(ptbxl_root):
    """The YAML map equals the two table maps it replaces (diagnostic_class, rhythm codes) on all 21,837 rows
    of the real label table, and leaves no statement unmapped where the table maps left the form ones."""
    labels = {"table": "../ptbxl_database.csv", "record_column": "filename_lr", "label_column": "scp_codes",
              "label_format": "dict", "patient_column": "patient_id", "split_column": "strat_fold"}
    path = str(ptbxl_root / "records100")
    tables = validate(SourceConfig, {"name": "ptbxl", "format": "wfdb", "path": path, "labels": labels, "label_maps": [
        {"table": "../scp_statements.csv", "value_column": "diagnostic_class", "where": {"diagnostic": 1}},
        {"table": "../scp_statements.csv", "where": {"rhythm": 1}}]})
    rules = validate(SourceConfig, {"name": "ptbxl", "format": "wfdb", "path": path, "labels": labels,
                                    "label_maps": ["configs/label_maps/ptbxl_scp.yaml"]})
    by_table, by_rules = LabelIndex(tables).rows, LabelIndex(rules).rows
    assert len(by_rules) == 21_837
    assert {k: r.labels for k, r in by_rules.items()} == {k: r.labels for k, r in by_table.items()}
    assert not any(r.unmapped for r in by_rules.values())
    statements = pd.read_csv(ptbxl_root / "scp_statements.csv", index_col=0)
    form_only = set(statements.index[(statements.form == 1) & (statements.diagnostic != 1)])
    assert {s for r in by_table.values() for s in r.unmapped} == form_only


def test_challenge_map_covers_every_scored_class_and_lists_the_unscored():
    mapper = LabelMapper(source_with(["configs/label_maps/challenge_snomed.yaml"]))
    assert [code for code in CHALLENGE_SNOMED if mapper.map([code]).unmapped] == []
    assert mapper.map(["426783006"]).labels == ("NORM", "SR")
    assert mapper.map(["426783006", "59118001"]).labels == ("CD", "SR")  # sinus rhythm with RBBB: not normal
    assert mapper.map(["164865005"]).unmapped == ("164865005",)  # myocardial infarction: not a scored class


def test_ludb_csv_reads_as_it_is_and_the_map_covers_every_statement(ludb_root, monkeypatch):
    table = pd.read_csv(ludb_root / "ludb.csv", dtype=str, keep_default_na=False)
    assert len(table) == 200 and set(LUDB_LABEL_COLUMNS) <= set(table.columns)
    index = LabelIndex(ludb_source(ludb_root, monkeypatch))
    assert len(index.rows) == 200
    # Multi-statement cells: record 4 holds three statements in its one quoted Ischemia cell.
    assert table.loc[table.ID == "4", "Ischemia"].item().count("\n") == 2
    assert index.lookup("4").labels == ("CD", "HYP", "MI", "SR", "STTC")
    assert index.lookup("1").labels == ("HYP", "SBRAD", "STTC")  # sinus bradycardia with LVH: no NORM
    assert [k for k, r in index.rows.items() if r.unmapped] == []
    # The header lines say the same things in other words ("Rhythm: Sinus rhythm.", "III degree AV-block."):
    # the map covers those too, and gives each record the classes its csv row gives it.
    mapper = LabelMapper(ludb_source(ludb_root, monkeypatch))
    for hea in sorted((ludb_root / "data").glob("*.hea")):
        mapped = mapper.map(header_statements(hea))
        assert mapped.unmapped == (), hea.name
        superclasses = {"NORM", "MI", "STTC", "CD", "HYP"}
        # The csv lists a pacemaker where some headers do not: compare the superclasses of unpaced records.
        if "PACE" not in index.lookup(hea.stem).labels:
            assert set(mapped.labels) & superclasses == set(index.lookup(hea.stem).labels) & superclasses, hea.name
    counts = Counter(code for r in index.rows.values() for code in r.labels)
    assert all(counts[c] > 0 for c in ("NORM", "MI", "STTC", "CD", "HYP"))


# ------------------------------------------------------------------------------------------ ingest

def some_ludb_records(tmp_path: Path, ids: list[str], as_uri: bool = False) -> str:
    """A RECORDS file outside the source folder, by its absolute path or as a file:// URI."""
    (tmp_path / "RECORDS").write_text("\n".join(ids) + "\n")
    return f"file://{tmp_path / 'RECORDS'}" if as_uri else str(tmp_path / "RECORDS")


def labels_of(out: Path) -> dict:
    table = read_windows(str(out), columns=["record_id", "labels"])
    return dict(zip(table["record_id"].to_pylist(), table["labels"].to_pylist()))


def test_ludb_ingest_yields_the_mapped_classes(ludb_root, tmp_path, monkeypatch, capsys):
    # 1: sinus bradycardia, LVH, repolarisation; 4: IRBBB, LVH, ischaemia and scar; 56: a normal ECG.
    ids = ["1", "4", "56"]
    source = ludb_source(ludb_root, monkeypatch, records=some_ludb_records(tmp_path, ids))
    summary = run_ingest([source], str(tmp_path / "ds"), IngestConfig(), pseudonym=KEY)
    index = LabelIndex(source)
    assert labels_of(tmp_path / "ds") == {r: list(index.lookup(r).labels) for r in ids}
    assert (labels_of(tmp_path / "ds")["4"], labels_of(tmp_path / "ds")["56"]) == (["CD", "HYP", "MI", "SR", "STTC"],
                                                                                  ["NORM", "SR"])
    s = summary.sources[0]
    assert (s.ok, s.records_without_labels, s.unmapped_labels) == (3, 0, Counter())
    print_summary(summary)
    assert "no label map matches" not in capsys.readouterr().out


def test_unmapped_ludb_statements_are_counted_and_listed_never_stored(ludb_root, tmp_path,
                                                                       monkeypatch, capsys):
    """A map that forgot the hypertrophies: the summary names them with their record counts; the windows hold
    no statement text."""
    full = load_yaml("configs/label_maps/ludb.yaml", LabelMap)
    partial = full.model_copy(update={"rules": [r for r in full.rules if "hypertrophy" not in (r.regex or "")]})
    ids = ["1", "2", "5"]  # LVH in 1 and 2, left atrial hypertrophy in 2 and 5
    source = ludb_source(ludb_root, monkeypatch, records=some_ludb_records(tmp_path, ids, as_uri=True),
                         label_maps=[partial])
    summary = run_ingest([source], str(tmp_path / "ds"), IngestConfig(), pseudonym=KEY)
    s = summary.sources[0]
    assert s.unmapped_labels == Counter({"Left ventricular hypertrophy": 2, "Left atrial hypertrophy": 2,
                                         "Left ventricular overload": 1})
    assert all("HYP" not in labels and not any(" " in code for code in labels)
               for labels in labels_of(tmp_path / "ds").values())
    print_summary(summary)
    out = capsys.readouterr().out
    assert "3 label statements no label map matches" in out and "'Left ventricular hypertrophy' × 2" in out


def test_challenge_dx_codes_are_mapped_in_the_window_pass(ptbxl_root, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name, dx in (("00001_hr", "426783006,59118001"), ("00002_hr", "426783006"), ("00003_hr", "164865005")):
        shutil.copy(ptbxl_root / "records500/00000" / f"{name}.dat", src)
        header = (ptbxl_root / "records500/00000" / f"{name}.hea").read_text()
        (src / f"{name}.hea").write_text(header + f"#Dx: {dx}\n")
    source = SourceConfig(name="cinc", format="wfdb", path=str(src), pseudonymise_record_ids=False,
                          label_maps=["configs/label_maps/challenge_snomed.yaml"])  # type: ignore[list-item]
    summary = run_ingest([source], str(tmp_path / "ds"), IngestConfig(), pseudonym=KEY)
    assert labels_of(tmp_path / "ds") == {"00001_hr": ["CD", "SR"], "00002_hr": ["NORM", "SR"], "00003_hr": []}
    manifest = read_manifest(str(tmp_path / "ds")).to_pylist()
    flagged = {row["record_id"] for row in manifest if "unmapped_labels" in (row["flags"] or "")}
    assert flagged == {"00003_hr"} and summary.sources[0].records_with_unmapped_header_labels == 1


def test_muse_statements_become_labels_only_through_a_map(shared_data, tmp_path):
    """The real GE MUSE export says "Sinus bradycardia / with sinus arrhythmia / with 1st degree A-V block /
    Otherwise normal ECG" (and "Confirmed by <physician>", typed in: never read)."""
    path = str(shared_data / "formats" / "ge_muse_xml")
    muse_map = {"rules": [
        {"statement": "Sinus bradycardia", "to": "SBRAD"},
        {"regex": "(with )?sinus arrhythmia", "to": "SARRH"},
        {"regex": "(with )?1st degree a-v block", "to": "CD"},
        {"glob": "*normal ECG", "to": "NORM"},
    ], "unless": {"NORM": ["CD"]}}
    mapped = SourceConfig(name="muse", format="muse", path=path, label_maps=[muse_map])  # type: ignore[list-item]
    run_ingest([mapped], str(tmp_path / "mapped"), IngestConfig(), pseudonym=KEY)
    assert list(labels_of(tmp_path / "mapped").values()) == [["CD", "SARRH", "SBRAD"]]

    unmapped = SourceConfig(name="muse", format="muse", path=path)  # no map: free text is never stored
    summary = run_ingest([unmapped], str(tmp_path / "raw"), IngestConfig(), pseudonym=KEY)
    assert list(labels_of(tmp_path / "raw").values()) == [[]]
    assert summary.sources[0].records_with_unmapped_header_labels == 1
