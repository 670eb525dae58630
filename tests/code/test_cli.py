"""The command line as users meet it: exit codes and messages for good and bad input."""

from __future__ import annotations

import shutil

from typer.testing import CliRunner

from crema.stages.cli import app
from crema.data.catalog import read_manifest, read_windows

runner = CliRunner()


def test_ingest_cli_success_invalid_config_and_reject_threshold(ptbxl_root, ray_local, tmp_path, monkeypatch):
    monkeypatch.setenv("CREMA_PSEUDONYM_KEY", "cli-test-key")
    src = tmp_path / "src"
    src.mkdir()
    for name in ("00001_hr", "00002_hr"):
        for ext in ("hea", "dat"):
            shutil.copy(ptbxl_root / "records500/00000" / f"{name}.{ext}", src)
    (src / "broken.hea").write_text("garbage\n")
    source = tmp_path / "hospital.yaml"
    source.write_text(f"name: hospital\nformat: wfdb\npath: {src}\n")

    result = runner.invoke(app, ["ingest", str(source), "--output", str(tmp_path / "ok"), "--set", "target_fs=250"])
    assert result.exit_code == 0, result.output
    assert "hospital" in result.output and "bad_header" in result.output
    assert set(read_windows(str(tmp_path / "ok"), columns=["fs"])["fs"].to_pylist()) == {250}

    result = runner.invoke(app, ["ingest", str(source), "--output", str(tmp_path / "strict"),
                                 "--set", "max_reject_fraction=0.1"])
    assert result.exit_code == 1 and "rejected" in result.output
    assert "bad_header" in result.output  # the summary and its reasons, also when the job fails
    assert read_manifest(str(tmp_path / "strict"), {}).num_rows == 3

    # A source with no records (wrong path, empty folder) is a config error before Ray starts.
    for path, message in ((tmp_path / "nowhere", "does not exist"), (tmp_path / "empty", "no wfdb records")):
        (tmp_path / "empty").mkdir(exist_ok=True)
        wrong = tmp_path / "wrong.yaml"
        wrong.write_text(f"name: wrong\nformat: wfdb\npath: {path}\n")
        result = runner.invoke(app, ["ingest", str(source), str(wrong), "--output", str(tmp_path / "never")])
        assert result.exit_code == 2 and message in result.output, result.output
        assert not (tmp_path / "never").exists()

    bad = tmp_path / "bad.yaml"
    bad.write_text("name: bad name with spaces\nformat: wfdb\n")
    result = runner.invoke(app, ["ingest", str(bad), "--output", str(tmp_path / "never")])
    assert result.exit_code == 2 and "invalid config" in result.output and "path" in result.output
    assert not (tmp_path / "never").exists()

    result = runner.invoke(app, ["ingest", str(source), "--output", str(tmp_path / "x"), "--set", "window_s=-1"])
    assert result.exit_code == 2 and "window_s" in result.output


def test_a_source_whose_every_record_is_rejected_is_summarised_committed_and_exits_1(ptbxl_root, ray_local, tmp_path,
                                                                                     monkeypatch):
    """No ok record, on a first ingest (no window ever committed) and on later ones (new bad files; a dataset
    that holds another source's windows): the summary with its reasons, the rejects on record, exit 1."""
    monkeypatch.setenv("CREMA_PSEUDONYM_KEY", "cli-test-key")
    folder = ptbxl_root / "records500/00000"
    src = tmp_path / "src"
    src.mkdir()

    def add_truncated(name: str, ecg_id: int) -> None:
        header = (folder / f"{ecg_id:05d}_hr.hea").read_text()
        (src / f"{name}.hea").write_text(header.replace(f"{ecg_id:05d}_hr", name))
        dat = (folder / f"{ecg_id:05d}_hr.dat").read_bytes()
        (src / f"{name}.dat").write_bytes(dat[: len(dat) // 3])

    add_truncated("cut1", 1)
    add_truncated("cut2", 2)
    (src / "garbled.hea").write_text("this is not a header\n")
    source = tmp_path / "hospital.yaml"
    source.write_text(f"name: hospital\nformat: wfdb\npath: {src}\npseudonymise_record_ids: false\n")

    def ingest_fails(output, *sources) -> str:
        result = runner.invoke(app, ["ingest", *map(str, sources), "--output", str(output)])
        assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
        assert "ingest failed" in result.output and "hospital: rejected" in result.output
        return result.output

    output = ingest_fails(tmp_path / "first", source)
    assert "2 × truncated_signal" in output and "1 × bad_header" in output
    rows = read_manifest(str(tmp_path / "first"), {})
    assert rows.num_rows == 3 and set(rows["status"].to_pylist()) == {"rejected"}

    add_truncated("cut3", 3)  # later: a new file, as bad as the others
    output = ingest_fails(tmp_path / "first", source)
    assert "3 × truncated_signal" in output
    assert sorted(read_manifest(str(tmp_path / "first"), {})["record_id"].to_pylist()) == ["cut1", "cut2", "cut3",
                                                                                         "garbled"]

    good = tmp_path / "good"
    good.mkdir()
    for ext in ("hea", "dat"):
        shutil.copy(folder / f"00004_hr.{ext}", good)
    good_source = tmp_path / "good.yaml"
    good_source.write_text(f"name: good\nformat: wfdb\npath: {good}\n")
    result = runner.invoke(app, ["ingest", str(good_source), "--output", str(tmp_path / "second")])
    assert result.exit_code == 0, result.output
    ingest_fails(tmp_path / "second", source)  # an all-rejected source added to a dataset that has windows
    assert read_windows(str(tmp_path / "second"), columns=["source"])["source"].to_pylist() == ["good"]
    assert read_manifest(str(tmp_path / "second"), {}).num_rows == 5


def test_missing_pseudonym_key_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.delenv("CREMA_PSEUDONYM_KEY", raising=False)
    source = tmp_path / "s.yaml"
    source.write_text(f"name: s\nformat: wfdb\npath: {tmp_path}\n")
    result = runner.invoke(app, ["ingest", str(source), "--output", str(tmp_path / "o")])
    assert result.exit_code == 2 and "CREMA_PSEUDONYM_KEY" in result.output


def test_sources_formats_lists_the_installed_readers_and_unknown_formats_name_them(tmp_path, monkeypatch):
    result = runner.invoke(app, ["sources", "formats"])
    assert result.exit_code == 0, result.output
    listed = {line.split()[0] for line in result.output.splitlines() if line.strip()}
    assert {"wfdb", "numpy", "muse", "hl7_aecg", "dicom", "philips_xml", "scp_ecg", "edf", "csv"} <= listed

    monkeypatch.setenv("CREMA_PSEUDONYM_KEY", "cli-test-key")
    source = tmp_path / "s.yaml"
    source.write_text(f"name: s\nformat: MFER\npath: {tmp_path}\n")
    result = runner.invoke(app, ["ingest", str(source), "--output", str(tmp_path / "o")])
    assert result.exit_code == 2 and "unknown format 'MFER'" in result.output and "scp_ecg" in result.output
