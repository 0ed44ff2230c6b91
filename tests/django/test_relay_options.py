"""``relay_domain_events`` explains a bad ``--interval`` or ``--timeout`` in words."""

from __future__ import annotations

import pytest
from django.core.management import CommandError, call_command


@pytest.mark.parametrize("value", ["0", "-1", "nan", "inf"])
def test_interval_zero_is_a_clear_usage_error(value: str) -> None:
    with pytest.raises(CommandError) as info:
        call_command("relay_domain_events", "--once", "--interval", value)
    assert "must be a positive number of seconds" in str(info.value)
    assert "_positive_float" not in str(info.value)


def test_interval_not_a_number() -> None:
    with pytest.raises(CommandError, match="not a number of seconds: 'soon'"):
        call_command("relay_domain_events", "--once", "--interval", "soon")
