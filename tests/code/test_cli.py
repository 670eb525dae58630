"""The command line as users meet it: exit codes and messages for good and bad input."""

from __future__ import annotations

import shutil

from typer.testing import CliRunner

from crema.stages.cli import app
from crema.data.schema import read_windows
from crema.data.ingest import read_manifest

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
