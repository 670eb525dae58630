"""What the console prints: rates and ETAs at the precision they have (a 3-record ingest is not "0 records/s")."""

from crema.stages.ingest import rate
from crema.stages.pretrain import duration


def test_rates_keep_their_significant_digits():
    assert rate(0.246) == "0.25 records/s"  # 3 records in 12.2 s
    assert rate(3.14) == "3.1 records/s"
    assert rate(1520.4) == "1,520 records/s"


def test_etas_read_in_the_units_they_need():
    assert duration(42.4) == "42s"
    assert duration(185) == "3m05s"
    assert duration(4320) == "1h12m"
