"""Exception text in logs and the jobs table: the project's own messages, never a library's quote of a header value."""

import pydicom
import pytest

from dicomnode.analysis import NotApplicable
from dicomnode.logs import safe_error, safe_trace


def test_a_library_error_quoting_a_value_keeps_only_its_type_and_place():
    with pytest.raises(ValueError) as info:
        pydicom.valuerep.DA("1901020399")
    text = safe_error(info.value) + safe_trace(info.value)
    assert "1901020399" not in text
    assert text.startswith("ValueError in ") and "withheld" in text


def test_the_projects_own_messages_are_kept():
    try:
        raise NotApplicable("the instance has no pixel data")
    except NotApplicable as exc:
        assert safe_error(exc) == "NotApplicable: the instance has no pixel data"
